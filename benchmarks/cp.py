"""Context-parallel benchmark: LASP-2 vs LASP-1 (linear layers) and ring / all-gather / Ulysses (softmax layers).

Run as `spindle bench cp [...]` or `python -m spindle.benchmarks.cp [...]`.

Measured: P gloo ranks on this machine (loopback), one layer forward+backward per scheme across sequence
lengths, timed with the shared harness (benchmarks/harness.py: warm-ups, repeats, median and spread, each
sample the slowest rank's), and the bytes each rank receives (spindle.parallel.cp.record_comm). Schemes
are compared only with schemes for the same layer kind at equal shapes: LASP-1 against LASP-2, all-gather
and Ulysses against ring attention.

Projected: one layer at P GPUs and T tokens (default 64 GPUs, 2048K tokens) from the planner's
context-parallel cost model (spindle.runtime.plan.cp_layer_cost), and the whole-model step of the
Linear-Llama3-8B preset with LASP-2 and with LASP-1, next to the LASP-2 paper's measurement.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import shlex
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from spindle.benchmarks import harness

LINEAR_METHODS = ("lasp2", "lasp1")
SOFTMAX_METHODS = ("ring", "allgather", "ulysses")
METHODS = LINEAR_METHODS + SOFTMAX_METHODS
BASELINE = {"linear": "lasp2", "softmax": "ring"}  # the scheme each layer kind's ratios are taken against
# LASP-2 paper (Sun et al. 2025, Linear-Llama3 at 64 GPUs, 2048K tokens, end-to-end throughput): LASP-2 is
# faster than LASP-1 by 15.2% and than Ring Attention by 36.6%.
PAPER_RATIOS = {"lasp2_vs_lasp1": 0.152, "lasp2_vs_ring": 0.366}
PRESET = Path(__file__).resolve().parent.parent / "configs" / "linear-llama3-8b-2m-64gpu.yaml"


def kind_of(method: str) -> str:
    return "linear" if method in LINEAR_METHODS else "softmax"


@dataclass
class Measurement:
    world_size: int
    length: int
    method: str
    timing: dict
    forward_bytes: int
    backward_bytes: int
    forward_calls: int
    backward_calls: int
    note: str = ""

    @property
    def median_ms(self) -> float:
        return self.timing["median_ms"] if self.timing else float("nan")


# ----------------------------------------------------------------------------------------------------
# measured on gloo ranks


def _layer_inputs(method: str, args: argparse.Namespace, local_length: int, rank: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(rank)
    kv_heads = args.heads if kind_of(method) == "linear" else args.kv_heads
    shape = (args.batch, local_length)
    q = torch.randn(*shape, args.heads, args.dim, generator=generator)
    k = torch.randn(*shape, kv_heads, args.dim, generator=generator)
    v = torch.randn(*shape, kv_heads, args.dim, generator=generator)
    tensors = [t.requires_grad_() for t in (q, k, v)]
    if kind_of(method) == "linear":
        decay = torch.nn.functional.logsigmoid(torch.randn(*shape, args.heads, generator=generator) + 4)
        tensors.append(decay.requires_grad_())
    return tensors


def _run_layer(method: str, tensors: list[torch.Tensor], group: dist.ProcessGroup, layout: str) -> torch.Tensor:
    from spindle.parallel import cp

    q, k, v = tensors[:3]
    if method == "lasp2":
        return cp.lasp2(q, k, v, group, layout=layout, log_decay=tensors[3])
    if method == "lasp1":
        return cp.lasp1(q, k, v, group, layout=layout, log_decay=tensors[3])
    if method == "ring":
        return cp.ring_attention(q, k, v, group, layout=layout)
    if method == "allgather":
        return cp.allgather_attention(q, k, v, group, layout=layout)
    return cp.ulysses_attention(q, k, v, group, layout=layout)


def _forward_backward(method: str, tensors: list[torch.Tensor], group, layout: str) -> None:
    for tensor in tensors:
        tensor.grad = None
    output = _run_layer(method, tensors, group, layout)
    output.backward(torch.ones_like(output))


def _traffic(method: str, tensors: list[torch.Tensor], group, layout: str) -> list[int]:
    """The busiest rank's received bytes and calls per direction, from one untimed run."""
    from spindle.parallel.cp import record_comm

    for tensor in tensors:
        tensor.grad = None
    with record_comm() as forward:
        output = _run_layer(method, tensors, group, layout)
    with record_comm() as backward:
        output.backward(torch.ones_like(output))
    counts = torch.tensor([forward.total_bytes(), backward.total_bytes(),
                           sum(forward.calls.values()) - forward.calls.get("validate", 0),
                           sum(backward.calls.values())], dtype=torch.int64)  # fmt: skip
    dist.all_reduce(counts, op=dist.ReduceOp.MAX, group=group)  # ranks differ along LASP-1's chain
    return counts.tolist()


def _measure_case(method: str, args: argparse.Namespace, length: int, group) -> Measurement:
    world_size = dist.get_world_size(group)
    tensors = _layer_inputs(method, args, length // world_size, dist.get_rank(group))
    timing, note = harness.guard_out_of_memory(lambda: harness.time_on_ranks(
        lambda: _forward_backward(method, tensors, group, args.layout), group,
        warmup=args.warmup, repeats=args.repeats))  # fmt: skip
    traffic = _traffic(method, tensors, group, args.layout) if timing is not None else [0, 0, 0, 0]
    return Measurement(world_size, length, method, timing.as_dict() if timing else {}, *traffic, note=note)


def _rank_worker(rank: int, world_size: int, group, args: argparse.Namespace) -> list[dict]:
    measurements = []
    for length in args.lengths:
        for method in args.methods:
            if method == "ulysses" and (args.heads % world_size or args.kv_heads % world_size):
                continue  # Ulysses needs the heads divisible by P
            measurements.append(asdict(_measure_case(method, args, length, group)))
    return measurements


def measure(args: argparse.Namespace, world_size: int) -> list[Measurement]:
    """Spawn `world_size` gloo ranks on loopback and time every method at every length."""
    rows = harness.spawn(_rank_worker, world_size, args, timeout=args.timeout)[0]
    return [Measurement(**row) for row in rows]


# ----------------------------------------------------------------------------------------------------
# projected with the planner's cost model


def projection(args: argparse.Namespace) -> dict:
    """One layer per scheme at the projected shape, and the preset's step with LASP-2 vs LASP-1."""
    from spindle.runtime import plan

    gpu = plan.gpu_spec(args.gpu)
    network = plan.network_for(gpu, args.link_gbps)
    spans_nodes = args.project_gpus > network.gpus_per_node
    bandwidth = network.inter_node_bytes_per_s if spans_nodes else network.intra_node_bytes_per_s
    latency = network.inter_node_latency_s if spans_nodes else network.intra_node_latency_s
    flop_rate = gpu.peak_flops * args.efficiency
    layers = {}
    for method in METHODS:
        shape = plan.CpShape(args.project_gpus, args.project_tokens // args.project_gpus, args.project_batch,
                             args.project_heads, args.project_heads if kind_of(method) == "linear"
                             else args.project_kv_heads, args.project_dim, 2, 2)  # fmt: skip
        cost = plan.cp_layer_cost(method, shape, bandwidth, latency, flop_rate)
        layers[method] = dataclasses.asdict(cost) | {"total_s": cost.total_s}
    steps = {}
    if PRESET.exists():
        from spindle.runtime.config import load_config

        for scheme in LINEAR_METHODS:
            config = load_config(PRESET, [f"parallel.cp_linear={scheme}"])
            made = plan.make_plan(config, gpu, inter_node_gbps=args.link_gbps, efficiency=args.efficiency)
            steps[scheme] = dataclasses.asdict(made.time)
    return {"gpu": gpu.name, "bandwidth": bandwidth, "latency": latency, "flop_rate": flop_rate,
            "layers": layers, "preset_steps": steps}


# ----------------------------------------------------------------------------------------------------
# report


def _ms(value: float) -> str:
    return f"{value * 1e3:,.2f}" if value < 10 else f"{value:,.2f} s"


def measured_tables(measurements: list[Measurement]) -> list[str]:
    """One table per layer kind; ratios only against the same kind's baseline at equal P and T."""
    by_key = {(m.world_size, m.length, m.method): m for m in measurements}
    lines: list[str] = []
    for kind, methods in (("linear", LINEAR_METHODS), ("softmax", SOFTMAX_METHODS)):
        baseline = BASELINE[kind]
        rows = []
        for m in (m for m in measurements if m.method in methods):
            reference = by_key.get((m.world_size, m.length, baseline))
            ratio = f"{m.median_ms / reference.median_ms:.2f}" if reference and reference.timing and m.timing else "–"
            timing = harness.Timing(**m.timing).spread() if m.timing else "–"
            rows.append([m.world_size, f"{m.length:,}", m.method, timing, ratio, f"{m.forward_bytes:,}",
                         f"{m.backward_bytes:,}", f"{m.forward_calls} / {m.backward_calls}", m.note])
        if rows:
            lines += [f"### {kind.capitalize()} layers (ratios against {baseline})", ""]
            lines += harness.markdown_table(
                ["P", "T", "scheme", "fwd+bwd ms (median ± IQR/2)", f"× {baseline}", "fwd bytes", "bwd bytes",
                 "calls fwd / bwd", "note"], rows, align="rrlrrrrll")
            lines.append("")
    return lines


def projection_section(args: argparse.Namespace, projected: dict) -> list[str]:
    layers = projected["layers"]
    lines = [
        f"## Projection: {args.project_gpus} GPUs, {args.project_tokens // 1024}K tokens, one layer",
        "",
        f"The planner's cost model (`spindle.runtime.plan.cp_layer_cost`, assumptions in docs/algorithms.md): "
        f"{projected['gpu']} at {args.efficiency:.0%} of its dense bf16 peak "
        f"({projected['flop_rate'] / 1e12:.0f} TFLOP/s), link {projected['bandwidth'] / 1e9:.0f} GB/s and "
        f"{projected['latency'] * 1e6:.0f} µs per step; B={args.project_batch}, H={args.project_heads}, "
        f"H_kv={args.project_kv_heads} (softmax), d={args.project_dim}, bf16, zigzag.",
        "",
    ]
    for kind, methods in (("linear", LINEAR_METHODS), ("softmax", SOFTMAX_METHODS)):
        baseline = layers[BASELINE[kind]]["total_s"]
        rows = [[method, _ms(layers[method]["forward_compute_s"] + layers[method]["backward_compute_s"]),
                 _ms(layers[method]["forward_exposed_s"] + layers[method]["backward_exposed_s"]),
                 _ms(layers[method]["total_s"]), f"{layers[method]['total_s'] / baseline:.3f}",
                 f"{layers[method]['bytes_received'] / 2**20:,.1f}"] for method in methods]
        lines += harness.markdown_table(["scheme", "compute ms", "exposed comm ms", "total ms",
                                         f"× {BASELINE[kind]}", "MiB received"], rows) + [""]
    steps = projected["preset_steps"]
    if steps:
        gain = steps["lasp1"]["step_s"] / steps["lasp2"]["step_s"] - 1
        lines += [
            f"Whole model (configs/{PRESET.name}, planner step estimate): LASP-2 "
            f"{steps['lasp2']['step_s']:.3f} s, LASP-1 {steps['lasp1']['step_s']:.3f} s per step, so LASP-2 is "
            f"{gain:.1%} faster. The LASP-2 paper measured {PAPER_RATIOS['lasp2_vs_lasp1']:.1%} in this setting "
            "(end-to-end throughput on its cluster); the model prices LASP-1's chain by link latency, bandwidth "
            "and a stated per-hop overhead only, so launch and scheduling costs of a real chain are not in it.",
            "",
        ]
    return lines


def markdown(args: argparse.Namespace, argv: list[str], measurements: list[Measurement], projected: dict,
             plot: Path | None) -> str:
    command = "spindle bench cp" + ("" if not argv else " " + shlex.join(argv))
    lines = [
        "# Context-parallel benchmark: LASP-2, LASP-1, ring, all-gather and Ulysses",
        "",
        f"Command: `OMP_NUM_THREADS=1 {command}`",
        "",
        f"Device: CPU ({os.cpu_count()} cores, shared with other jobs), gloo over loopback, torch {torch.__version__}, "
        f"{datetime.date.today()}; one layer, fp32, B={args.batch}, H={args.heads} (softmax H_kv={args.kv_heads}), "
        f"d={args.dim}, layout {args.layout}, per-token decay for the linear layers; {args.repeats} timed "
        f"forward+backward runs after {args.warmup} warm-ups, each sample the slowest rank's.",
        "",
        "On a CPU all ranks share the cores and the loopback 'network' is nearly free, so these times say little "
        "about GPU clusters. The byte counts are exact and hold anywhere (the busiest rank's received bytes per "
        "layer, spindle/parallel/cp/comm.py).",
        "",
        "## Measured",
        "",
        *measured_tables(measurements),
    ]
    if plot is not None:
        lines += [f"![fwd+bwd time per scheme]({plot.name})", ""]
    return "\n".join(lines + projection_section(args, projected))


def plot_measurements(measurements: list[Measurement], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    world_sizes = sorted({m.world_size for m in measurements})
    figure, axes = plt.subplots(2, len(world_sizes), figsize=(5.5 * len(world_sizes), 7), squeeze=False)
    for column, world_size in enumerate(world_sizes):
        for row, (kind, methods) in enumerate((("linear", LINEAR_METHODS), ("softmax", SOFTMAX_METHODS))):
            axis = axes[row][column]
            for method in methods:
                points = sorted((m.length, m.median_ms) for m in measurements
                                if m.world_size == world_size and m.method == method and m.timing)  # fmt: skip
                if points:
                    axis.plot(*zip(*points), marker="o", label=method)
            axis.set(title=f"{kind} layer, P = {world_size} gloo ranks (CPU)", xlabel="sequence length T",
                     ylabel="fwd+bwd ms", xscale="log", yscale="log")  # fmt: skip
            axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spindle bench cp", description=__doc__.split("\n")[0])
    parser.add_argument("--world-sizes", default="2,4", help="comma-separated numbers of gloo ranks")
    parser.add_argument("--lengths", default="1024,4096", help="comma-separated global sequence lengths")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"subset of {','.join(METHODS)}")
    parser.add_argument("--layout", choices=("zigzag", "contiguous"), default="zigzag")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4, help="softmax layers (GQA)")
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds before a run is declared hung")
    projection_options = parser.add_argument_group("projection (the planner's cost model)")
    projection_options.add_argument("--gpu", default="h200", help="GPU of runtime/hardware.py")
    projection_options.add_argument("--efficiency", type=float, default=None,
                                    help="achievable fraction of peak (default: the planner's)")
    projection_options.add_argument("--link-gbps", type=float, default=None,
                                    help="inter-node GB/s per GPU (default: the planner's)")
    projection_options.add_argument("--project-gpus", type=int, default=64)
    projection_options.add_argument("--project-tokens", type=int, default=2048 * 1024)
    projection_options.add_argument("--project-batch", type=int, default=1)
    projection_options.add_argument("--project-heads", type=int, default=32)
    projection_options.add_argument("--project-kv-heads", type=int, default=8)
    projection_options.add_argument("--project-dim", type=int, default=128)
    parser.add_argument("--output", default="docs/benchmarks/cp.md")
    return parser


def _parse(argv: list[str]) -> argparse.Namespace:
    from spindle.runtime import plan

    parser = _parser()
    args = parser.parse_args(argv)
    try:
        args.world_sizes = [int(x) for x in args.world_sizes.split(",") if x]
        args.lengths = [int(x) for x in args.lengths.split(",") if x]
    except ValueError as error:
        parser.error(f"--world-sizes and --lengths take comma-separated integers ({error})")
    args.methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        parser.error(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    for length in args.lengths:
        for world_size in args.world_sizes:
            if length % (2 * world_size):
                parser.error(f"--lengths: {length} is not divisible by 2 x {world_size} ranks (zigzag)")
    if args.gpu.lower() not in plan.GPUS:
        parser.error(f"--gpu {args.gpu!r}: expected one of {', '.join(plan.GPUS)}")
    args.efficiency = plan.DEFAULT_EFFICIENCY if args.efficiency is None else args.efficiency
    args.link_gbps = plan.DEFAULT_INTER_NODE_GBPS if args.link_gbps is None else args.link_gbps
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parse(argv)
    measurements: list[Measurement] = []
    for world_size in args.world_sizes:
        print(f"measuring on {world_size} gloo ranks: lengths {args.lengths}, methods {args.methods}", flush=True)
        measurements += measure(args, world_size)
    projected = projection(args)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    plot = output.with_suffix(".png") if measurements else None
    if plot is not None:
        plot_measurements(measurements, plot)
    text = markdown(args, argv, measurements, projected, plot)
    output.write_text(text)
    output.with_suffix(".json").write_text(json.dumps(
        {"measured": [asdict(m) for m in measurements], "projection": projected}, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
