"""Kernel benchmark: linear attention (spindle triton / torch vs fla and lightning-attn) and softmax
attention (spindle vs raw SDPA / flash-attn), forward, backward and forward+backward.

Run as `spindle bench kernels [...]` or `python -m spindle.benchmarks.kernels [...]`. Reports the median
time, TFLOP/s, GB/s and the fraction of a roofline floor (default: H200, the larger of FLOPs / 790 TFLOP/s
and bytes / 4.3 TB/s). Writes a markdown table with the command line and a PNG plot.

FLOP and byte counts are nominal, per call, for B batches, H heads, T tokens, head dims Dk, Dv:
  linear attention (chunk C = 64): forward 2·B·H·T·(C·(Dk + Dv)/2 + 2·Dk·Dv) (causal half of each block,
      the inter-block product and the state update); backward 2× forward.
      bytes: forward reads q, k, v (+ g) and writes o; backward reads q, k, v, do and writes dq, dk, dv.
  softmax attention, causal: forward 2·B·H·T²·D (half of the 4·T²·D dense count); backward 2.5× forward.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

CHUNK = 64
MODES = ("fwd", "bwd", "fwd+bwd")


@dataclass
class Result:
    family: str  # "linear" or "softmax"
    provider: str
    length: int
    mode: str
    milliseconds: float | None
    flops: float
    bytes: float
    note: str = ""


# ----------------------------------------------------------------------------------------------------
# providers: each returns a function of (q, k, v, g) -> output tensor, or raises ImportError


def _spindle_linear(backend: str) -> Callable:
    from spindle.kernels import linear_attention

    return lambda q, k, v, g: linear_attention(q, k, v, log_decay=g, backend=backend)[0]


def _fla_simple_gla() -> Callable:
    from fla.ops.simple_gla import chunk_simple_gla  # flash-linear-attention, BTHD layout

    def run(q, k, v, g):
        if g is not None and g.dim() == 1:
            g = g.view(1, 1, -1).expand(q.shape[0], q.shape[1], -1).contiguous()
        return chunk_simple_gla(q, k, v, g=g)[0]

    return run


def _lightning_attn() -> Callable:
    from lightning_attn.ops import lightning_attn_func  # OpenNLPLab, BHND layout, decay exp(-slope)

    def run(q, k, v, g):
        if g is None or g.dim() != 1:
            raise ValueError("lightning-attn takes a constant decay per head (run with --decay constant)")
        slope = (-g).float().view(-1, 1, 1)
        output = lightning_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), slope)
        return output.transpose(1, 2)

    return run


def _spindle_softmax(backend: str) -> Callable:
    from spindle.kernels import attention

    return lambda q, k, v, g: attention(q, k, v, causal=True, backend=backend)


def _sdpa() -> Callable:
    import torch.nn.functional as F

    def run(q, k, v, g):
        output = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return output.transpose(1, 2)

    return run


def _flash_attn() -> Callable:
    from flash_attn import flash_attn_func

    return lambda q, k, v, g: flash_attn_func(q, k, v, causal=True)


LINEAR_PROVIDERS = {
    "spindle-triton": lambda: _spindle_linear("triton"),
    "spindle-torch": lambda: _spindle_linear("torch"),
    "spindle-naive": lambda: _spindle_linear("naive"),
    "fla-simple_gla": _fla_simple_gla,
    "lightning-attn": _lightning_attn,
}
SOFTMAX_PROVIDERS = {
    "spindle-attention": lambda: _spindle_softmax("auto"),
    "sdpa": _sdpa,
    "flash-attn": _flash_attn,
}


# ----------------------------------------------------------------------------------------------------
# measurement


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_milliseconds(function: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        function()
    _synchronize(device)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        _synchronize(device)
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def _inputs(args: argparse.Namespace, length: int, family: str, device: torch.device, dtype: torch.dtype):
    shape = (args.batch, length, args.heads, args.dim)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    g = None
    if family == "linear" and args.decay == "token":
        g = torch.nn.functional.logsigmoid(torch.randn(args.batch, length, args.heads, device=device) + 4.0)
    elif family == "linear" and args.decay == "constant":
        g = -torch.linspace(0.01, 0.5, args.heads, device=device)
    return q, k, v, g


def time_modes(run: Callable, inputs, device: torch.device, warmup: int, repeats: int) -> dict[str, float]:
    """Median ms of the forward, the backward alone (graph retained) and forward+backward."""
    q, k, v, g = inputs
    with torch.no_grad():
        forward = median_milliseconds(lambda: run(q, k, v, g), device, warmup, repeats)
    output = run(q, k, v, g)
    grad = torch.randn_like(output)
    backward = median_milliseconds(lambda: output.backward(grad, retain_graph=True), device, warmup, repeats)
    both = median_milliseconds(lambda: run(q, k, v, g).backward(grad), device, warmup, repeats)
    return {"fwd": forward, "bwd": backward, "fwd+bwd": both}


def nominal_work(family: str, args: argparse.Namespace, length: int, element_bytes: int) -> dict[str, tuple]:
    """(flops, bytes) per mode, as documented at the top of this file."""
    b, h, d = args.batch, args.heads, args.dim
    token_bytes = b * length * h * d * element_bytes
    if family == "linear":
        forward = 2 * b * h * length * (CHUNK * d + 2 * d * d)
        backward = 2 * forward
    else:
        forward = 2 * b * h * length * length * d
        backward = 2.5 * forward
    forward_bytes, backward_bytes = 4 * token_bytes, 7 * token_bytes
    return {
        "fwd": (forward, forward_bytes),
        "bwd": (backward, backward_bytes),
        "fwd+bwd": (forward + backward, forward_bytes + backward_bytes),
    }


def run_family(family: str, providers: dict, names: list[str], args, device, dtype) -> list[Result]:
    results = []
    element_bytes = torch.finfo(dtype).bits // 8
    for name in names:
        try:
            run = providers[name]()
        except ImportError as error:
            print(f"[{family}] {name}: not installed ({error})", file=sys.stderr)
            continue
        for length in args.lengths:
            work = nominal_work(family, args, length, element_bytes)
            try:
                times = time_modes(run, _inputs(args, length, family, device, dtype), device, args.warmup, args.repeats)
                note = ""
            except (RuntimeError, ValueError) as error:  # includes CUDA out-of-memory
                times, note = {}, f"{type(error).__name__}: {str(error).splitlines()[0][:80]}"
            for mode in MODES:
                results.append(Result(family, name, length, mode, times.get(mode), *work[mode], note))
            if device.type == "cuda":
                torch.cuda.empty_cache()
            print(f"[{family}] {name} T={length}: " + (", ".join(f"{m} {t:.3f} ms" for m, t in times.items()) or note),
                  file=sys.stderr)
    return results


# ----------------------------------------------------------------------------------------------------
# report


def floor_milliseconds(result: Result, args: argparse.Namespace) -> float:
    return max(result.flops / (args.peak_tflops * 1e12), result.bytes / (args.peak_tbps * 1e12)) * 1e3


def markdown(results: list[Result], args: argparse.Namespace, device: torch.device, argv: list[str], plot: Path) -> str:
    lines = [
        "# Kernel benchmark",
        "",
        f"Command: `{shlex.join(['spindle', 'bench', 'kernels', *argv])}`",
        "",
        f"Device: {_device_name(device)}; torch {torch.__version__}; dtype {args.dtype}; "
        f"B={args.batch}, H={args.heads}, D={args.dim}; linear-attention decay: {args.decay}; "
        f"median of {args.repeats} runs after {args.warmup} warm-up runs.",
        "",
        f"Floor: max(FLOPs / {args.peak_tflops:g} TFLOP/s, bytes / {args.peak_tbps:g} TB/s) "
        "(H200 defaults); FLOP and byte counts are the nominal ones documented in benchmarks/kernels.py.",
        "",
    ]
    if device.type != "cuda":
        lines += [
            "**These numbers come from a CPU run at tiny shapes, so that the harness and this file exist. "
            "GPU numbers (b=4, h=32, d=128, T=2K..64K, bf16, on an H200) are pending: run "
            "`spindle bench kernels` on a GPU machine to replace this file.** The floor fraction is "
            "meaningless on a CPU, and the CPU timings were taken on a 2-core machine shared with other jobs "
            "(noisy).",
            "",
        ]
    lines += ["| op | provider | T | mode | median ms | TFLOP/s | GB/s | floor fraction | note |",
              "|---|---|---:|---|---:|---:|---:|---:|---|"]
    for r in results:
        if r.milliseconds is None:
            lines.append(f"| {r.family} | {r.provider} | {r.length} | {r.mode} | - | - | - | - | {r.note} |")
            continue
        seconds = r.milliseconds / 1e3
        lines.append(
            f"| {r.family} | {r.provider} | {r.length} | {r.mode} | {r.milliseconds:.3f} | "
            f"{r.flops / seconds / 1e12:.3g} | {r.bytes / seconds / 1e9:.3g} | "
            f"{floor_milliseconds(r, args) / r.milliseconds:.3g} | {r.note} |"
        )
    lines += ["", f"![fwd+bwd time per provider]({plot.name})", ""]
    return "\n".join(lines)


def plot_results(results: list[Result], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for axis, family in zip(axes, ("linear", "softmax")):
        providers = sorted({r.provider for r in results if r.family == family})
        for provider in providers:
            points = [(r.length, r.milliseconds) for r in results
                      if r.family == family and r.provider == provider and r.mode == "fwd+bwd" and r.milliseconds]
            if points:
                axis.plot(*zip(*points), marker="o", label=provider)
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("sequence length T")
        axis.set_ylabel("fwd+bwd median ms")
        axis.set_title(f"{family} attention")
        axis.grid(True, which="both", alpha=0.3)
        if providers:
            axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


# ----------------------------------------------------------------------------------------------------
# command line


def _parser(on_gpu: bool) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spindle bench kernels", description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=4 if on_gpu else 1)
    parser.add_argument("--heads", type=int, default=32 if on_gpu else 2)
    parser.add_argument("--dim", type=int, default=128 if on_gpu else 32, help="head dim (q, k and v)")
    default_lengths = "2048,4096,8192,16384,32768,65536" if on_gpu else "128,256,512"
    parser.add_argument("--lengths", default=default_lengths, help="comma-separated sequence lengths")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16" if on_gpu else "fp32")
    parser.add_argument("--decay", choices=("none", "constant", "token"), default="token")
    parser.add_argument("--linear", default="spindle-triton,spindle-torch,fla-simple_gla,lightning-attn" if on_gpu
                        else "spindle-torch,spindle-naive", help=f"providers among {', '.join(LINEAR_PROVIDERS)}")
    parser.add_argument("--softmax", default="spindle-attention,sdpa,flash-attn" if on_gpu
                        else "spindle-attention,sdpa", help=f"providers among {', '.join(SOFTMAX_PROVIDERS)}")
    parser.add_argument("--warmup", type=int, default=3 if on_gpu else 1)
    parser.add_argument("--repeats", type=int, default=10 if on_gpu else 3)
    parser.add_argument("--peak-tflops", type=float, default=790.0)
    parser.add_argument("--peak-tbps", type=float, default=4.3)
    parser.add_argument("--output", default="docs/benchmarks/kernels.md")
    parser.add_argument("--device", default="cuda" if on_gpu else "cpu")
    return parser


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = _parser(torch.cuda.is_available())
    args = parser.parse_args(argv)
    try:
        args.lengths = [int(x) for x in args.lengths.split(",") if x]
    except ValueError:
        parser.error(f"--lengths must be comma-separated integers, got {args.lengths!r}")
    for option, table in (("linear", LINEAR_PROVIDERS), ("softmax", SOFTMAX_PROVIDERS)):
        names = [x for x in getattr(args, option).split(",") if x]
        unknown = [x for x in names if x not in table]
        if unknown:
            parser.error(f"--{option}: unknown provider(s) {', '.join(unknown)}; choose from {', '.join(table)}")
        setattr(args, option, names)
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parse(argv)
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    torch.manual_seed(0)
    results = run_family("linear", LINEAR_PROVIDERS, args.linear, args, device, dtype)
    results += run_family("softmax", SOFTMAX_PROVIDERS, args.softmax, args, device, dtype)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    plot = output.with_suffix(".png")
    plot_results(results, plot)
    output.write_text(markdown(results, args, device, argv, plot))
    print(f"wrote {output} and {plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
