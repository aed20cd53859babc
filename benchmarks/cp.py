"""Context-parallel benchmark: LASP-2 vs LASP-1 (linear layers) and ring / all-gather / Ulysses (softmax layers).

Run as `spindle bench cp [...]` or `python -m spindle.benchmarks.cp [...]`.

Part 1, measured: P gloo ranks on this machine (loopback), one layer forward+backward per method across
sequence lengths; median wall time (the slowest rank of each repetition) and the bytes each rank
receives, from spindle.parallel.cp.record_comm. Ratios are taken within the same run.

Part 2, projected: one layer at P GPUs and T tokens (default 64 GPUs, 2048K tokens) from an analytic
model: kernel compute time from a FLOP rate (measured here on the single-device kernels, and,
separately, from the published GPU anchors in ALGORITHMS.md) plus the communication each scheme
cannot hide, from stated link bandwidths and latencies. See `projection_terms` for the formulas.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import socket
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

LINEAR_METHODS = ("lasp2", "lasp1")
SOFTMAX_METHODS = ("ring", "allgather", "ulysses")
METHODS = LINEAR_METHODS + SOFTMAX_METHODS
CHUNK = 64  # kernel block size used in the nominal linear-attention FLOP count

# Published single-device anchors (ALGORITHMS.md §1, Lightning Attention-2 README): b=4, h=32, d=128, bf16,
# 32K tokens, GPU unstated. Forward / backward milliseconds.
ANCHOR = {"batch": 4, "heads": 32, "dim": 128, "length": 32768,
          "linear_ms": (17.7, 74.6), "softmax_ms": (162.9, 470.7)}  # fmt: skip
PAPER_RATIOS = {"lasp2_vs_lasp1": 0.152, "lasp2_vs_ring": 0.366}  # LASP-2 paper: faster by, 64 GPUs, 2048K


@dataclass
class Measurement:
    world_size: int
    length: int
    method: str
    median_ms: float
    forward_bytes: int
    backward_bytes: int
    forward_calls: int
    backward_calls: int


# ----------------------------------------------------------------------------------------------------
# part 1: measured on gloo ranks


def _layer_inputs(method: str, args: argparse.Namespace, local_length: int, rank: int):
    generator = torch.Generator().manual_seed(rank)
    kv_heads = args.heads if method in LINEAR_METHODS else args.kv_heads
    shape = (args.batch, local_length)
    q = torch.randn(*shape, args.heads, args.dim, generator=generator)
    k = torch.randn(*shape, kv_heads, args.dim, generator=generator)
    v = torch.randn(*shape, kv_heads, args.dim, generator=generator)
    tensors = [t.requires_grad_() for t in (q, k, v)]
    if method in LINEAR_METHODS:
        decay = torch.nn.functional.logsigmoid(torch.randn(*shape, args.heads, generator=generator) + 4)
        tensors.append(decay.requires_grad_())
    return tensors


def _run_layer(method: str, tensors, group, layout: str) -> torch.Tensor:
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


def _time_method(method: str, args, length: int, group) -> Measurement:
    from spindle.parallel.cp import record_comm

    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    tensors = _layer_inputs(method, args, length // world_size, rank)
    durations, stats = [], None
    for repetition in range(args.warmup + args.repeats):
        for tensor in tensors:
            tensor.grad = None
        dist.barrier(group=group)
        start = time.perf_counter()
        with record_comm() as forward:
            output = _run_layer(method, tensors, group, args.layout)
        with record_comm() as backward:
            output.backward(torch.ones_like(output))
        elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX, group=group)  # a layer is done when its slowest rank is
        if repetition >= args.warmup:
            durations.append(float(elapsed) * 1e3)
        stats = (forward, backward)
    forward, backward = stats
    # the busiest rank's traffic (ranks differ on LASP-1's chain and at the ends of a zigzag)
    counts = torch.tensor([forward.total_bytes(), backward.total_bytes(),
                           sum(forward.calls.values()) - forward.calls.get("validate", 0),
                           sum(backward.calls.values())], dtype=torch.int64)  # fmt: skip
    dist.all_reduce(counts, op=dist.ReduceOp.MAX, group=group)
    return Measurement(world_size, length, method, statistics.median(durations), *counts.tolist())


def _worker(rank: int, world_size: int, port: int, args: argparse.Namespace, results) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=args.timeout))  # fmt: skip
    try:
        measurements = []
        for length in args.lengths:
            for method in args.methods:
                if method == "ulysses" and (args.heads % world_size or args.kv_heads % world_size):
                    continue  # Ulysses needs the heads divisible by P
                measurements.append(_time_method(method, args, length, dist.group.WORLD))
        if rank == 0:
            results.put([asdict(m) for m in measurements])
    finally:
        dist.destroy_process_group()
    os._exit(0)  # skip interpreter teardown (see tests/distributed_utils.py: DeepSpeed's exit-time abort)


def measure(args: argparse.Namespace, world_size: int) -> list[Measurement]:
    """Spawn `world_size` gloo ranks on loopback and time every method at every length."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    results = mp.get_context("spawn").SimpleQueue()
    context = mp.start_processes(_worker, args=(world_size, port, args, results), nprocs=world_size,
                                 join=False, start_method="spawn")  # fmt: skip
    collected = None
    while not context.join(timeout=0.5):
        if not results.empty():
            collected = results.get()
    if collected is None and not results.empty():
        collected = results.get()
    return [Measurement(**row) for row in collected or []]


# ----------------------------------------------------------------------------------------------------
# part 2: projection


def linear_flops(batch: int, heads: int, length: int, dim: int) -> float:
    """Nominal forward+backward FLOPs of chunked linear attention (benchmarks/kernels.py): 3 × forward."""
    forward = 2 * batch * heads * length * (CHUNK * dim + 2 * dim * dim)
    return 3 * forward


def softmax_flops(batch: int, heads: int, query_length: int, key_length: int, dim: int, causal_share: float) -> float:
    """Nominal forward+backward FLOPs: forward 4·Tq·Tk·D per head times the unmasked share, backward 2.5×."""
    forward = 4 * batch * heads * query_length * key_length * dim * causal_share
    return 3.5 * forward


def anchor_rates() -> dict[str, float]:
    """FLOP/s implied by the published single-device GPU anchors (forward+backward)."""
    a = ANCHOR
    linear = linear_flops(a["batch"], a["heads"], a["length"], a["dim"]) / (sum(a["linear_ms"]) / 1e3)
    softmax = softmax_flops(a["batch"], a["heads"], a["length"], a["length"], a["dim"], 0.5) / (
        sum(a["softmax_ms"]) / 1e3
    )
    return {"linear": linear, "softmax": softmax}


def measured_rates(args: argparse.Namespace) -> dict[str, float]:
    """FLOP/s of spindle's single-device kernels on this machine (forward+backward, one process)."""
    from spindle.kernels import attention, linear_attention

    torch.manual_seed(0)
    batch, heads, dim, length = 1, 4, args.dim, args.rate_length
    q, k, v = (torch.randn(batch, length, heads, dim, requires_grad=True) for _ in range(3))
    decay = torch.nn.functional.logsigmoid(torch.randn(batch, length, heads) + 4).requires_grad_()

    def timed(function) -> float:
        function()  # warm-up
        samples = []
        for _ in range(3):
            start = time.perf_counter()
            function()
            samples.append(time.perf_counter() - start)
        return statistics.median(samples)

    linear_seconds = timed(lambda: linear_attention(q, k, v, log_decay=decay)[0].sum().backward())
    softmax_seconds = timed(lambda: attention(q, k, v, causal=True).sum().backward())
    return {
        "linear": linear_flops(batch, heads, length, dim) / linear_seconds,
        "softmax": softmax_flops(batch, heads, length, length, dim, 0.5) / softmax_seconds,
    }


def _step(bytes_per_step: float, bandwidth: float, latency: float) -> float:
    return latency + bytes_per_step / bandwidth


def _link(args: argparse.Namespace) -> tuple[float, float]:
    """(bandwidth, latency) pacing a ring over the projected ranks: inter-node once they span nodes."""
    if args.project_gpus > args.gpus_per_node:
        return args.inter_bandwidth, args.inter_latency
    return args.intra_bandwidth, args.intra_latency


def _gather_seconds(args: argparse.Namespace) -> float:
    bandwidth, latency = _link(args)
    state = args.project_batch * args.project_heads * args.project_dim**2 * 4
    return (args.project_gpus - 1) * _step(state, bandwidth, latency)


def projection_terms(args: argparse.Namespace, rates: dict[str, float]) -> dict[str, dict[str, float]]:
    """Per-layer forward+backward seconds (compute, exposed communication) and bytes per rank, per method.

    P ranks, T tokens, n = T/P per rank, B batch, H heads, H_kv kv heads, d head dim; activations bf16
    (2 bytes), states and dK/dV accumulators fp32. A collective or ring hop over P > gpus_per_node ranks
    is paced by the inter-node link (bandwidth β, latency α per step). Forward is 2/7 of the softmax
    compute and 1/3 of the linear compute (backward 2.5× and 2× forward).
    - lasp2: two all-gathers of the states, s = B·H·d²·4 bytes per rank: G = (P-1)·(α + s/β) each;
      each overlaps the local kernel of its direction: exposed max(0, G - t_fwd) + max(0, G - t_bwd).
    - lasp1: 2·(P-1) dependent hops of one state, each α + δ + s/β (δ: per-hop launch/sync overhead),
      nothing to overlap (a rank needs its incoming state before its inter term).
    - ring (zigzag, double-buffered): P steps of equal compute c; a hop moves the K/V chunk
      kv = 2·B·n·H_kv·d·2 bytes (backward also the fp32 dK/dV, 2·kv): exposed (P-1)·max(0, hop - c).
    - allgather: gather (P-1)·(α + kv/β) forward; backward gather again plus reduce-scatter of fp32
      dK/dV (P-1)·(α + 2·kv/β); not overlapped (head_groups = 1).
    - ulysses: 4 all-to-alls each way (q, k, v, o), each (P-1)·α + (P-1)/P·bytes/β.
    """
    p, total, batch = args.project_gpus, args.project_tokens, args.project_batch
    heads, kv_heads, dim = args.project_heads, args.project_kv_heads, args.project_dim
    n = total // p
    bandwidth, latency = _link(args)
    state = batch * heads * dim * dim * 4
    kv = 2 * batch * n * kv_heads * dim * 2

    linear_compute = linear_flops(batch, heads, n, dim) / rates["linear"]
    # zigzag: every rank does 1/P of the causal T×T work
    softmax_compute = softmax_flops(batch, heads, n, total, dim, 0.5) / rates["softmax"]
    gather_states = _gather_seconds(args)
    lasp2_exposed = max(0.0, gather_states - linear_compute / 3) + max(0.0, gather_states - 2 * linear_compute / 3)
    lasp1_exposed = 2 * (p - 1) * (latency + args.p2p_overhead + state / bandwidth)

    forward_step, backward_step = softmax_compute * (2 / 7) / p, softmax_compute * (5 / 7) / p
    ring_exposed = (p - 1) * (max(0.0, _step(kv, bandwidth, latency) - forward_step)
                              + max(0.0, _step(3 * kv, bandwidth, latency) - backward_step))  # fmt: skip
    allgather_exposed = (p - 1) * (2 * _step(kv, bandwidth, latency) + _step(2 * kv, bandwidth, latency))
    qo = batch * n * heads * dim * 2
    all_to_all_bytes = 2 * qo + kv  # q, o and k+v
    ulysses_exposed = 2 * (4 * (p - 1) * latency + (p - 1) / p * all_to_all_bytes / bandwidth)
    return {
        "lasp2": {"compute": linear_compute, "exposed": lasp2_exposed, "bytes": 2 * (p - 1) * state},
        "lasp1": {"compute": linear_compute, "exposed": lasp1_exposed, "bytes": 2 * (p - 1) * state},
        "ring": {"compute": softmax_compute, "exposed": ring_exposed, "bytes": (p - 1) * 4 * kv},
        "allgather": {"compute": softmax_compute, "exposed": allgather_exposed, "bytes": (p - 1) * 4 * kv},
        "ulysses": {"compute": softmax_compute, "exposed": ulysses_exposed,
                    "bytes": 2 * (p - 1) / p * all_to_all_bytes},  # fmt: skip
    }


# ----------------------------------------------------------------------------------------------------
# report


def _ratio_rows(measurements: list[Measurement]) -> list[str]:
    rows = []
    by_key = {(m.world_size, m.length, m.method): m for m in measurements}
    for m in measurements:
        reference = by_key.get((m.world_size, m.length, "lasp2"))
        ring = by_key.get((m.world_size, m.length, "ring"))
        versus_lasp2 = f"{m.median_ms / reference.median_ms:.2f}" if reference else "–"
        versus_ring = f"{m.median_ms / ring.median_ms:.2f}" if ring and m.method in SOFTMAX_METHODS else "–"
        rows.append(
            f"| {m.world_size} | {m.length:,} | {m.method} | {m.median_ms:.1f} | {versus_lasp2} | {versus_ring} "
            f"| {m.forward_bytes:,} | {m.backward_bytes:,} | {m.forward_calls} / {m.backward_calls} |"
        )
    return rows


def _duration(seconds: float) -> str:
    return f"{seconds * 1e3:,.2f} ms" if seconds < 10 else f"{seconds:,.2f} s"


def _total(term: dict[str, float]) -> float:
    return term["compute"] + term["exposed"]


def _projection_rows(terms_by_source: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    rows = []
    for source, terms in terms_by_source.items():
        lasp2_total = _total(terms["lasp2"])
        for method, term in terms.items():
            total = _total(term)
            rows.append(
                f"| {source} | {method} | {_duration(term['compute'])} | {_duration(term['exposed'])} "
                f"| {_duration(total)} | {total / lasp2_total:,.3f} | {term['bytes'] / 2**20:,.1f} |"
            )
    return rows


def markdown(args, argv, measurements, terms_by_source, rates_by_source, plot: Path | None) -> str:
    command = "spindle bench cp" + ("" if not argv else " " + shlex.join(argv))
    lines = [
        "# Context-parallel benchmark: LASP-2, LASP-1, ring, all-gather and Ulysses",
        "",
        f"Command: `OMP_NUM_THREADS=1 {command}`",
        "",
        f"Device: CPU ({os.cpu_count()} cores, shared with other jobs), gloo over loopback, torch {torch.__version__}, "
        f"{datetime.date.today()}; one layer, fp32, B={args.batch}, H={args.heads} (softmax H_kv={args.kv_heads}), "
        f"d={args.dim}, layout {args.layout}, per-token decay for the linear layers; median of {args.repeats} "
        f"forward+backward runs after {args.warmup} warm-up, each the slowest rank's time.",
        "",
        "**Measured on a CPU with all ranks sharing two cores**: compute contends for the cores and the loopback "
        "'network' is nearly free, so these times say little about GPU clusters. The byte counts are exact and "
        "hold anywhere (bytes a rank receives per layer; see spindle/parallel/cp/comm.py). GPU runs are pending.",
        "",
        "## Measured",
        "",
        "| P | T | method | fwd+bwd ms | × lasp2 | × ring | fwd bytes | bwd bytes | calls fwd / bwd |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---|",
        *_ratio_rows(measurements),
        "",
        "Bytes and calls are the busiest rank's (received, per layer). LASP-2's bytes do not depend on T (one "
        "gather of d×d states per direction); the softmax schemes' grow with T. lasp1's calls are the P2P hops "
        "a rank receives; along the chain they are serial.",
        "",
    ]
    if plot is not None:
        lines += [f"![fwd+bwd time per method]({plot.name})", ""]
    return "\n".join(lines + _projection_section(args, terms_by_source, rates_by_source))


def _projection_section(args, terms_by_source, rates_by_source) -> list[str]:
    cpu, anchor = rates_by_source.get("CPU-measured"), rates_by_source["GPU anchor"]
    p, total = args.project_gpus, args.project_tokens
    lines = [
        f"## Projection: {p} GPUs, {total // 1024}K tokens, one layer",
        "",
        f"Shape: B={args.project_batch}, H={args.project_heads}, H_kv={args.project_kv_heads}, "
        f"d={args.project_dim}, bf16 activations, fp32 states; {args.gpus_per_node} GPUs per node; stated links: "
        f"intra-node {args.intra_bandwidth / 1e9:.0f} GB/s, {args.intra_latency * 1e6:.0f} µs; inter-node "
        f"{args.inter_bandwidth / 1e9:.0f} GB/s, {args.inter_latency * 1e6:.0f} µs per step; LASP-1 per-hop "
        f"overhead {args.p2p_overhead * 1e6:.0f} µs. Model and formulas: `projection_terms` in benchmarks/cp.py.",
        "",
        "Kernel compute comes from a FLOP rate, two ways: **GPU anchor** = the published Lightning Attention-2 / "
        f"FlashAttention-2 times (b=4, h=32, d=128, 32K, bf16; {anchor['linear'] / 1e12:.1f} and "
        f"{anchor['softmax'] / 1e12:.1f} TFLOP/s fwd+bwd), and "
        + (f"**CPU-measured** = spindle's own kernels timed on this CPU ({cpu['linear'] / 1e9:.2f} and "
           f"{cpu['softmax'] / 1e9:.2f} GFLOP/s, {anchor['linear'] / cpu['linear']:,.0f}× and "
           f"{anchor['softmax'] / cpu['softmax']:,.0f}× below the anchors), so there compute dwarfs and hides "
           "all communication." if cpu else "(CPU measurement skipped).")
        + "",
        "",
        "| kernel rate | method | compute | exposed comm | total | × lasp2 | MiB per rank |",
        "|---|---|---:|---:|---:|---:|---:|",
        *_projection_rows(terms_by_source),
        "",
    ]
    terms = terms_by_source["GPU anchor"]
    lasp2_total, lasp1_total, ring_total = (_total(terms[m]) for m in ("lasp2", "lasp1", "ring"))
    lines += [
        "LASP-2 paper (64 GPUs, 2048K tokens, Linear-Llama3 end-to-end throughput): LASP-2 is "
        f"{PAPER_RATIOS['lasp2_vs_lasp1']:.1%} faster than LASP-1 and {PAPER_RATIOS['lasp2_vs_ring']:.1%} faster "
        "than Ring Attention. This projection (GPU anchor), per layer: LASP-2 is "
        f"{lasp1_total / lasp2_total - 1:.1%} faster than LASP-1 on a linear layer, and a linear layer with LASP-2 "
        f"costs {lasp2_total / ring_total:.2%} of a softmax layer with zigzag ring attention. The comparisons "
        "differ: the paper measures whole-model throughput (MLPs and all) and runs Ring Attention on the linear "
        "model, while here ring attention is the softmax layer of a hybrid model. Where the LASP gap comes from: "
        f"LASP-1's 2(P-1) serial hops expose {_duration(terms['lasp1']['exposed'])} per layer, while each of "
        f"LASP-2's two state gathers ({_duration(_gather_seconds(args))}) hides behind the local kernel of its "
        f"direction ({_duration(terms['lasp2']['compute'] / 3)} forward, "
        f"{_duration(2 * terms['lasp2']['compute'] / 3)} backward). The whole gap rides on the stated link "
        "latencies and per-hop overhead: change them with the projection options.",
        "",
    ]
    return lines


def plot_measurements(measurements: list[Measurement], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    world_sizes = sorted({m.world_size for m in measurements})
    figure, axes = plt.subplots(1, len(world_sizes), figsize=(5.5 * len(world_sizes), 4), squeeze=False)
    for axis, world_size in zip(axes[0], world_sizes):
        for method in METHODS:
            points = sorted((m.length, m.median_ms) for m in measurements
                            if m.world_size == world_size and m.method == method)  # fmt: skip
            if points:
                axis.plot(*zip(*points), marker="o", label=method)
        axis.set(title=f"P = {world_size} gloo ranks (CPU)", xlabel="sequence length T",
                 ylabel="fwd+bwd ms per layer", xscale="log", yscale="log")  # fmt: skip
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
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds before a collective gives up")
    parser.add_argument("--rate-length", type=int, default=2048, help="T for the single-device FLOP-rate probe")
    parser.add_argument("--skip-measured-rate", action="store_true", help="project from the GPU anchor only")
    projection = parser.add_argument_group("projection")
    projection.add_argument("--project-gpus", type=int, default=64)
    projection.add_argument("--project-tokens", type=int, default=2048 * 1024)
    projection.add_argument("--project-batch", type=int, default=1)
    projection.add_argument("--project-heads", type=int, default=32)
    projection.add_argument("--project-kv-heads", type=int, default=8)
    projection.add_argument("--project-dim", type=int, default=128)
    projection.add_argument("--gpus-per-node", type=int, default=8)
    projection.add_argument("--intra-bandwidth", type=float, default=300e9, help="bytes/s per GPU (NVLink)")
    projection.add_argument("--inter-bandwidth", type=float, default=25e9, help="bytes/s per GPU (200 Gb/s IB)")
    projection.add_argument("--intra-latency", type=float, default=3e-6, help="seconds per step")
    projection.add_argument("--inter-latency", type=float, default=10e-6, help="seconds per step")
    projection.add_argument("--p2p-overhead", type=float, default=20e-6, help="LASP-1 launch/sync per hop, s")
    parser.add_argument("--output", default="docs/benchmarks/cp.md")
    return parser


def _parse(argv: list[str]) -> argparse.Namespace:
    args = _parser().parse_args(argv)
    try:
        args.world_sizes = [int(x) for x in args.world_sizes.split(",") if x]
        args.lengths = [int(x) for x in args.lengths.split(",") if x]
    except ValueError as error:
        _parser().error(f"--world-sizes and --lengths take comma-separated integers ({error})")
    args.methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        _parser().error(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    for length in args.lengths:
        for world_size in args.world_sizes:
            if length % (2 * world_size):
                _parser().error(f"--lengths: {length} is not divisible by 2 x {world_size} ranks (zigzag)")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parse(argv)
    measurements: list[Measurement] = []
    for world_size in args.world_sizes:
        print(f"measuring on {world_size} gloo ranks: lengths {args.lengths}, methods {args.methods}", flush=True)
        measurements += measure(args, world_size)
    rates_by_source = {"GPU anchor": anchor_rates()}
    if not args.skip_measured_rate:
        rates_by_source["CPU-measured"] = measured_rates(args)
    terms_by_source = {source: projection_terms(args, rates) for source, rates in rates_by_source.items()}

    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    plot = output.with_suffix(".png") if measurements else None
    if plot is not None:
        plot_measurements(measurements, plot)
    text = markdown(args, argv, measurements, terms_by_source, rates_by_source, plot)
    output.write_text(text)
    output.with_suffix(".json").write_text(json.dumps({
        "measured": [asdict(m) for m in measurements],
        "projection": terms_by_source,
        "rates_flops_per_s": rates_by_source,
    }, indent=1))  # fmt: skip
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
