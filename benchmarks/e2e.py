"""End-to-end benchmark: training tokens/s, MFU and peak memory against sequence length.

Run as `spindle bench e2e [...]` or `python -m spindle.benchmarks.e2e [...]`. For each model variant
(linear-only "L", hybrid 1:3 "LLLA", hybrid 1:7 "LLLLLLLA", softmax-only "A", and the 1:7 RAttention
"RRRRRRRA" and sliding-window "SSSSSSSA" models at window 512, which have the hybrid's projections and
so about its parameter count), built from a preset
(default configs/hybrid-1m-1gpu.yaml) with --set overrides, and each sequence length, it times real
training steps on one device: forward, backward, clipping and the AdamW step, through the trainer's
``train_step`` (runtime/trainer.py), with the preset's activation checkpointing. It compares the
measured peak memory with the planner's estimate (runtime/plan.py) and writes a markdown report with
the command line, a table and a PNG plot.

On a GPU the default sweep is 8K → 1M tokens with the preset's model in bf16; peak memory is
torch.cuda.max_memory_allocated from before the model is built. On a CPU the sweep uses tiny lengths
and a tiny model in fp32, and peak memory comes from one extra, untimed step under a dispatch mode that
follows every tensor storage the step creates until it is freed (the parameters are added). CPU
kernels (the chunked PyTorch linear attention, the math softmax path, which is O(T²)) keep more than
the GPU kernels the planner models, so CPU ratios are above 1 by construction.

A variant stops growing its sequence length after an out-of-memory error or a step slower than
--time-limit. With --budget-s the sweep runs shortest lengths first across all variants and skips a
case whose predicted time (step time fitted as a·T + b·T² to the variant's last two lengths) exceeds
what is left, so a time-boxed run (the GPU check, benchmarks/gpu_check.py) still covers every variant.
The report and JSON are rewritten after every case, so a run stopped from outside keeps what it measured.
The torchtitan Llama-3 debug model runs as a reference when torchtitan is importable.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Sequence

VARIANTS = {"linear": "L", "hybrid-1:3": "LLLA", "hybrid-1:7": "LLLLLLLA", "softmax": "A",
            "rattention-1:7": "RRRRRRRA", "window-1:7": "SSSSSSSA"}
WINDOW = 512
"""Sliding window of the R and S variants (RAttention's setting); a quarter of the sequence when shorter."""
DEFAULT_PRESET = "configs/hybrid-1m-1gpu.yaml"
GPU_SEQ_LENS = [8192 * 2**i for i in range(8)]  # 8K ... 1M
CPU_SEQ_LENS = [256, 512, 1024]
# The CPU sweep's model: small enough for seconds per step on two cores, both layer kinds, GQA.
CPU_MODEL = ["model.dim=64", "model.heads=4", "model.kv_heads=2", "model.n_layers=8", "model.vocab_size=512",
             "model.ffn_dim=0"]
# One sequence per step on one device; no checkpoints, no wandb.
SINGLE_DEVICE = ["parallel.dp=1", "parallel.cp=1", "parallel.tp=1", "train.global_batch=1", "train.micro_batch=1",
                 "checkpoint.every=0", "logging.wandb=disabled", "logging.progress=false"]
GIB = 1024**3


@dataclasses.dataclass
class Measurement:
    model: str
    pattern: str
    seq_len: int
    status: str
    """"ok", "OOM", "skipped: ..." or "error: ..."."""
    parameters: int = 0
    step_s: float | None = None
    tokens_per_s: float | None = None
    mfu: float | None = None
    peak_gib: float | None = None
    planned_gib: float | None = None
    wall_s: float | None = None
    """Wall time of the whole case: model build, warm-up and timed steps."""

    @property
    def ratio(self) -> float | None:
        """Measured peak over the planner's estimate."""
        if self.peak_gib is None or not self.planned_gib:
            return None
        return self.peak_gib / self.planned_gib


# ---------------------------------------------------------------------------------------------
# One case: build, warm up, time; runs in this process (GPU) or a child process (CPU)
# ---------------------------------------------------------------------------------------------
def _step_function(model, optimizer, config, device):
    """One optimizer step through the trainer's own train_step (single-process context)."""
    from spindle.parallel.layout import ParallelContext
    from spindle.runtime.trainer import autocast_dtype, train_step

    context = ParallelContext.single_process(device)
    precision = autocast_dtype(config.train.precision, device)

    def step(batch):
        train_step(model, optimizer, batch, context, lr=config.train.lr, grad_clip=config.train.grad_clip,
                   precision=precision)
    return step


def _apply_checkpointing(model, policy: str) -> None:
    if policy == "none":
        return
    from spindle.parallel.parallelize import apply_ac

    apply_ac(model, policy)


def run_case(config, device_name: str, warmup: int, steps: int) -> dict:
    """Time ``steps`` training steps after ``warmup``; peak memory counts from before the model exists."""
    import torch

    from spindle.benchmarks.harness import PeakLiveBytes
    from spindle.runtime.metrics import peak_flops_per_second
    from spindle.runtime.model import HybridModel
    from spindle.runtime.optim import build_optimizer

    device = torch.device(device_name)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
    torch.manual_seed(config.train.seed)
    model = HybridModel(config.model).to(device)
    _apply_checkpointing(model, config.parallel.activation_checkpointing)
    optimizer = build_optimizer(model, config.train)
    step = _step_function(model, optimizer, config, device)
    tokens = torch.randint(0, config.model.vocab_size, (1, config.data.seq_len + 1))
    batch = [(tokens[:, :-1], tokens[:, 1:])]
    if device.type == "cpu":
        # one untimed step under the storage tracker; its first step also creates the AdamW state
        weights = sum(t.untyped_storage().nbytes() for t in (*model.parameters(), *model.buffers()))
        with PeakLiveBytes() as tracker:
            step(batch)
        peak = weights + tracker.peak
    for _ in range(warmup):
        step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - baseline
    step_s = (time.perf_counter() - started) / steps
    tokens_per_s = config.data.seq_len / step_s
    dtype = torch.bfloat16 if config.train.precision != "fp32" else torch.float32
    peak_flops = peak_flops_per_second(device, dtype)
    mfu = None if peak_flops is None else model.flops_per_token(config.data.seq_len) * tokens_per_s / peak_flops
    return {"parameters": model.num_parameters(), "step_s": step_s, "tokens_per_s": tokens_per_s, "mfu": mfu,
            "peak_gib": peak / GIB}


def _run_case_guarded(config, device_name: str, warmup: int, steps: int) -> dict:
    """run_case, with an out-of-memory error reported as a status (and the memory given back)."""
    import torch

    try:
        return {"status": "ok", **run_case(config, device_name, warmup, steps)}
    except (torch.cuda.OutOfMemoryError, MemoryError):
        return {"status": "OOM"}
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# The sweep
# ---------------------------------------------------------------------------------------------
def case_config(preset: str, overrides: list[str], pattern: str, seq_len: int):
    from spindle.runtime.config import load_config

    window = [f"model.window={min(WINDOW, max(1, seq_len // 4))}"] if set(pattern) & set("RS") else []
    return load_config(preset, [*overrides, *SINGLE_DEVICE, f"model.layers={pattern}", f"data.seq_len={seq_len}",
                                *window])


def _planned_gib(config, device_name: str) -> float:
    """The planner's per-GPU peak for this config on this GPU (an H200 when unknown or on a CPU)."""
    from spindle.runtime import plan
    from spindle.runtime.hardware import spec_for_device_name

    spec = None
    if device_name.startswith("cuda"):
        import torch

        spec = spec_for_device_name(torch.cuda.get_device_name(0))
    return plan.make_plan(config, spec or "h200").memory.total / GIB


def predicted_step_s(history: list[tuple[int, float]], seq_len: int) -> float:
    """Step time at ``seq_len`` from the variant's measured (seq_len, step_s) so far: a·T + b·T² through
    the last two points (both terms non-negative), or quadratic growth from a single point."""
    if not history:
        return 0.0
    (t1, s1) = history[-1]
    if len(history) == 1:
        return s1 * (seq_len / t1) ** 2
    (t0, s0) = history[-2]
    # solve s = a·t + b·t² through both points; clamp to the pure-linear / pure-quadratic fit if negative
    quadratic = (s1 / t1 - s0 / t0) / (t1 - t0)
    linear = s1 / t1 - quadratic * t1
    if quadratic < 0:
        return s1 * seq_len / t1
    if linear < 0:
        return s1 * (seq_len / t1) ** 2
    return linear * seq_len + quadratic * seq_len**2


def sweep(args: argparse.Namespace, overrides: list[str], on_case=None) -> list[Measurement]:
    """Every (length, variant) case, shortest lengths first; ``on_case(results)`` runs after each case."""
    results: list[Measurement] = []
    started = time.monotonic()
    stopped: dict[str, str] = {}
    history: dict[str, list[tuple[int, float]]] = {name: [] for name in args.models}
    setup_s: dict[str, float] = {}
    for seq_len in args.seq_lens:
        for name in args.models:
            pattern = VARIANTS[name]
            if name in stopped:
                results.append(Measurement(name, pattern, seq_len, f"skipped: {stopped[name]}"))
                continue
            config = case_config(args.config, overrides, pattern, seq_len)
            if args.budget_s is not None:
                left = args.budget_s - (time.monotonic() - started)
                predicted = (args.warmup + args.steps) * predicted_step_s(history[name], seq_len) + setup_s.get(name, 0.0)
                if not history[name]:  # a variant's first case: as long as another variant's at this length
                    predicted = max((m.wall_s or 0.0 for m in results if m.seq_len == seq_len), default=0.0)
                if predicted > left or left <= 0:
                    stopped[name] = f"over budget at {seq_len:,} (predicted {predicted:.0f} s, {max(left, 0):.0f} s left)"
                    results.append(Measurement(name, pattern, seq_len, f"skipped: {stopped[name]}"))
                    continue
            case_started = time.monotonic()
            outcome = _run_case_guarded(config, args.device, args.warmup, args.steps)
            wall_s = time.monotonic() - case_started
            status = outcome.pop("status")
            measurement = Measurement(name, pattern, seq_len, status, planned_gib=_planned_gib(config, args.device),
                                      wall_s=wall_s, **outcome)
            results.append(measurement)
            print(_row(measurement), flush=True)
            if status != "ok":
                stopped[name] = f"{status} at {seq_len:,}"
            else:
                history[name].append((seq_len, measurement.step_s))
                setup_s[name] = max(0.0, wall_s - (args.warmup + args.steps) * measurement.step_s)
                if measurement.step_s > args.time_limit:
                    stopped[name] = f"step over {args.time_limit:.0f} s at {seq_len:,}"
            if on_case is not None:
                on_case(results)
    order = {name: index for index, name in enumerate(args.models)}
    return sorted(results, key=lambda m: (order[m.model], m.seq_len))


def torchtitan_reference(args: argparse.Namespace) -> list[Measurement]:
    """torchtitan's Llama-3 debug model at the same lengths (full logits, no checkpointing)."""
    try:
        import torch
        try:
            from torchtitan.models.llama3 import Transformer, llama3_configs
        except ImportError:
            from torchtitan.models.llama import Transformer, llama3_configs
    except ImportError:
        return []
    results = []
    for seq_len in args.seq_lens:
        try:
            model_args = dataclasses.replace(llama3_configs["debugmodel"], vocab_size=2048, max_seq_len=seq_len)
            device = torch.device(args.device)
            model = Transformer(model_args).to(device)
            if hasattr(model, "init_weights"):
                model.init_weights()
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
            tokens = torch.randint(0, model_args.vocab_size, (1, seq_len + 1), device=device)

            def step() -> None:
                optimizer.zero_grad(set_to_none=True)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    logits = model(tokens[:, :-1])
                loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
                loss.backward()
                optimizer.step()

            for _ in range(args.warmup):
                step()
            started = time.perf_counter()
            for _ in range(args.steps):
                step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            step_s = (time.perf_counter() - started) / args.steps
            parameters = sum(p.numel() for p in model.parameters())
            results.append(Measurement("torchtitan-llama3-debug", "A", seq_len, "ok", parameters=parameters,
                                       step_s=step_s, tokens_per_s=seq_len / step_s))
        except Exception as error:  # a reference run that fails is reported, not fatal
            results.append(Measurement("torchtitan-llama3-debug", "A", seq_len, f"error: {type(error).__name__}"))
            break
    return results


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
def _number(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _header(unit: str) -> str:
    return (f"| model | layers | params | seq_len | step s | tokens/s | MFU % | peak {unit} | planned {unit} | "
            "measured/planned | status |")


def _unit(results: list[Measurement]) -> tuple[str, float]:
    """GiB, or MiB when every planned peak is below 1 GiB (the CPU sweep)."""
    largest = max((m.planned_gib or 0.0 for m in results), default=0.0)
    return ("GiB", 1.0) if largest >= 1 else ("MiB", 1024.0)


def _row(m: Measurement, unit: tuple[str, float] = ("GiB", 1.0)) -> str:
    mfu = None if m.mfu is None else 100 * m.mfu
    scale = unit[1]
    peak = None if m.peak_gib is None else m.peak_gib * scale
    planned = None if m.planned_gib is None else m.planned_gib * scale
    return (f"| {m.model} | {m.pattern} | {m.parameters / 1e6:.2f}M | {m.seq_len:,} | {_number(m.step_s, '.3f')} | "
            f"{_number(m.tokens_per_s, ',.0f')} | {_number(mfu, '.1f')} | {_number(peak, '.2f')} | "
            f"{_number(planned, '.2f')} | {_number(m.ratio, '.2f')} | {m.status} |")


def plot(results: list[Measurement], path: Path, unit: tuple[str, float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (speed, memory) = plt.subplots(1, 2, figsize=(11, 4))
    for name in dict.fromkeys(m.model for m in results):
        done = [m for m in results if m.model == name and m.status == "ok"]
        if not done:
            continue
        lengths = [m.seq_len for m in done]
        line, = speed.plot(lengths, [m.tokens_per_s for m in done], marker="o", label=name)
        if done[0].peak_gib is not None:
            memory.plot(lengths, [m.peak_gib * unit[1] for m in done], marker="o", color=line.get_color(), label=f"{name} measured")
        if done[0].planned_gib is not None:
            memory.plot(lengths, [m.planned_gib * unit[1] for m in done], linestyle="--", color=line.get_color(),
                        label=f"{name} planned")
    for axis, label in ((speed, "tokens/s"), (memory, f"peak memory ({unit[0]})")):
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("sequence length (tokens)")
        axis.set_ylabel(label)
        axis.grid(True, which="both", alpha=0.3)
    speed.legend(fontsize=8)
    memory.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _command_line(argv: Sequence[str]) -> str:
    threads = os.environ.get("OMP_NUM_THREADS")
    prefix = f"OMP_NUM_THREADS={threads} " if threads else ""
    return f"{prefix}spindle bench e2e {shlex.join(argv)}".rstrip()


def write_report(results: list[Measurement], args: argparse.Namespace, argv: Sequence[str], device: str,
                 overrides: list[str], *, with_plot: bool = True) -> None:
    """Markdown report, JSON beside it, and (``with_plot``) the PNG; partial reports skip the plot."""
    import torch

    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    image = output.with_suffix(".png")
    unit = _unit(results)
    if with_plot:
        plot(results, image, unit)
    output.with_suffix(".json").write_text(json.dumps(
        [dataclasses.asdict(m) | {"ratio": m.ratio} for m in results], indent=1) + "\n")
    on_gpu = device.startswith("cuda")
    lines = [
        "# End-to-end training: tokens/s, MFU and peak memory against sequence length",
        "",
        f"Command: `{_command_line(argv)}`",
        "",
        f"Device: {torch.cuda.get_device_name(0) if on_gpu else f'CPU, {torch.get_num_threads()} thread(s)'} · "
        f"torch {torch.__version__} · "
        f"{time.strftime('%Y-%m-%d')} · preset {args.config} with overrides "
        f"`{' '.join(overrides) or 'none'}`; {args.warmup} warm-up and {args.steps} timed step(s) per case.",
        "",
    ]
    if not on_gpu:
        lines += [
            "**GPU numbers are pending.** This run is from a CPU-only machine at tiny sizes (a "
            f"{results[0].parameters / 1e6 if results else 0:.2f}M-parameter model, fp32), so it shows that the "
            "harness works, not how fast spindle is. The CPU paths keep more activations than the GPU kernels the "
            "planner models (the chunked PyTorch linear attention keeps per-chunk scores and states; the math "
            "softmax path keeps the T × T probabilities, so measured/planned grows with T wherever there are "
            "softmax layers); ratios below 1 come from the planner's backward-workspace term, an upper bound. "
            "On a GPU run `spindle bench e2e` (defaults: the preset's model in bf16, 8K → 1M tokens) and replace "
            "this file.",
            "",
        ]
    lines += [
        _header(unit[0]),
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *(_row(m, unit) for m in results),
        "",
        *([f"![tokens/s and peak memory against sequence length]({image.name})", ""] if with_plot else
          ["(run in progress or stopped: plot not drawn yet)", ""]),
        "Method: one sequence per step on one device, real training steps (forward, backward, gradient clipping, "
        "AdamW) through `spindle.runtime.trainer.train_step`, activation checkpointing as in the preset. tokens/s = "
        "seq_len / mean step time; MFU = model.flops_per_token(seq_len) × tokens/s / the device's dense peak "
        "(runtime/metrics.py). Peak memory counts from before the model is built (weights, gradients, optimizer "
        "state and activations); \"planned\" is `spindle plan`'s per-GPU total for the same config "
        "(runtime/plan.py). Raw numbers: " + f"[{output.with_suffix('.json').name}]({output.with_suffix('.json').name}).",
    ]
    if not any(m.model.startswith("torchtitan") for m in results):
        lines += ["", "torchtitan was not importable in this environment, so its Llama-3 debug model reference is absent."]
    output.write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def _lengths(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values or any(value < 16 for value in values):
        raise argparse.ArgumentTypeError(f"{text!r}: give sequence lengths of at least 16 tokens")
    return values


def _models(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [name for name in names if name not in VARIANTS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"unknown model variant(s) {unknown or text!r}: choose from {', '.join(VARIANTS)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spindle bench e2e", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=DEFAULT_PRESET, help=f"preset the models are built from (default {DEFAULT_PRESET})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override applied to every case (repeatable)")
    parser.add_argument("--models", type=_models, default=list(VARIANTS),
                        help=f"comma-separated variants (default all: {','.join(VARIANTS)})")
    parser.add_argument("--seq-lens", type=_lengths, default=None,
                        help="comma-separated sequence lengths (default 8K..1M on GPU, 256,512,1024 on CPU)")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cuda or cpu")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per case (default 1)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per case (default 2)")
    parser.add_argument("--time-limit", type=float, default=300.0,
                        help="a variant stops growing T after a step slower than this many seconds (default 300)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="total seconds for the sweep: shortest lengths first, a case predicted to overrun "
                             "what is left is skipped (default: no budget)")
    parser.add_argument("--output", default="docs/benchmarks/e2e.md", help="markdown report (PNG and JSON beside it)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_request:
        return int(exit_request.code or 0)
    import torch

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("spindle bench e2e: error: --device cuda needs a CUDA GPU; use --device cpu.", file=sys.stderr)
        return 2
    if args.warmup < 0 or args.steps < 1:
        print("spindle bench e2e: error: --warmup must be >= 0 and --steps >= 1.", file=sys.stderr)
        return 2
    if args.budget_s is not None and args.budget_s <= 0:
        print(f"spindle bench e2e: error: --budget-s must be positive, got {args.budget_s}.", file=sys.stderr)
        return 2
    on_gpu = args.device.startswith("cuda")
    args.seq_lens = args.seq_lens or (GPU_SEQ_LENS if on_gpu else CPU_SEQ_LENS)
    # CPU: a tiny model in fp32 (what the trainer runs on a CPU); GPU: the preset's model in bf16
    overrides = ([] if on_gpu else [*CPU_MODEL, "train.precision=fp32"]) + args.overrides
    try:
        case_config(args.config, overrides, "LLLA", args.seq_lens[0])  # fail early on a bad preset or --set
    except ValueError as error:
        print(f"spindle bench e2e: error: {error}", file=sys.stderr)
        return 2
    print(_header("GiB"), flush=True)

    def partial_report(done: list[Measurement]) -> None:
        write_report(done, args, argv, args.device, overrides, with_plot=False)

    results = sweep(args, overrides, on_case=partial_report) + torchtitan_reference(args)
    write_report(results, args, argv, args.device, overrides)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
