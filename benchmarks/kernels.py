"""Kernel benchmark: linear attention (spindle Triton and chunked PyTorch vs fla's chunk kernel and Lightning
Attention) and softmax attention (spindle vs flash-attn and PyTorch SDPA), forward, backward and
forward+backward, in one run.

Run as `spindle bench kernels [...]` (or `python -m spindle.benchmarks.kernels`). Each row is the median of
`--repeats` timed calls after `--warmup` untimed ones, with min / max / interquartile range (the shared
harness, benchmarks/harness.py: CUDA events and an L2 flush on a GPU, wall time on a CPU). Rows also give the
time floor max(FLOPs / peak FLOP/s, bytes / memory bandwidth) from the GPU's data sheet
(runtime/hardware.py) and the fraction of it reached, and linear-attention rows their speed relative to fla.
Writes kernels.md, kernels.json and kernels.png (with the command line) into `--out`.

Presets (`--preset`): `32k` = B=4, H=32, d=128, T=32K, bf16 (the issue's first shape), `1m` = B=1, H=10,
d=64, T=1M, bf16, linear attention only (softmax at 1M tokens takes minutes per call), `tiny` = the CPU
rehearsal. `--quick` / `--dry-run` = `tiny` with one warm-up and two repeats. Defaults: 3 warm-ups and 10 timed
runs on a GPU, 2 and 5 on a CPU; the chunked PyTorch linear attention is skipped (a row note) above
`--torch-max-length` tokens (default 262144: it loops over T/64 chunks in Python). Every provider of a case gets
the same inputs, and its forward output is compared with the first provider's (`output diff`).

FLOP and byte counts are the nominal, useful work per call for B batches, H query heads (H_kv key/value
heads), T tokens, head dim d (= Dk = Dv), element size e bytes:
  linear attention, chunk C = 64: forward 2·B·H·T·(C·d + 2·d²) (causal half of each C x C block for QKᵀ and
      PV, plus q·S and the state update kᵀv); backward 2 x forward.
      bytes: forward reads q, k, v (+ decay) and writes o: 4·B·T·H·d·e; backward reads q, k, v, do and
      writes dq, dk, dv: 7·B·T·H·d·e.
  softmax attention over P visible (query, key) pairs per head (causal: T(T+1)/2; window w: fewer):
      forward 4·B·H·P·d; backward 2.5 x forward (the recomputed QKᵀ, dV, dP, dQ, dK).
      bytes: forward reads q, k, v, writes o and lse; backward reads q, k, v, o, do, lse, writes dq, dk, dv.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import json
import os
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

try:
    from spindle.benchmarks.harness import Timing, markdown_table, time_function
except ImportError:  # run from a source tree as `python benchmarks/kernels.py`
    from harness import Timing, markdown_table, time_function  # type: ignore[no-redef]

CHUNK = 64
MODES = ("fwd", "bwd", "fwd+bwd")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PRESETS: dict[str, dict[str, Any]] = {
    "32k": dict(batch=4, heads=32, dim=128, lengths="32768", dtype="bf16"),
    "1m": dict(batch=1, heads=10, dim=64, lengths="1048576", dtype="bf16", softmax=""),
    "tiny": dict(batch=1, heads=2, dim=16, lengths="64,128", dtype="fp32"),
}
REFERENCE_PROVIDER = "fla-chunk"  # linear-attention rows report their speed relative to this one


class Unsupported(Exception):
    """A provider that is missing or cannot run this case: a row note, never a crash."""


@dataclass(frozen=True)
class Case:
    batch: int
    heads: int
    kv_heads: int
    dim: int
    length: int
    dtype: torch.dtype
    decay: str  # "none" | "constant" | "token" (linear attention)
    window: int | None  # softmax attention
    device: torch.device
    torch_max_length: int = 262144  # longest T at which the chunked PyTorch linear attention is timed


@dataclass
class Row:
    family: str
    provider: str
    length: int
    mode: str
    timing: Timing | None
    flops: float
    bytes: float
    note: str = ""
    floor_ms: float | None = None
    relative_to_fla: float | None = None
    output_difference: float | None = None  # relative L2 distance of the forward output from the family's first

    def as_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["timing"] = None if self.timing is None else {k: v for k, v in self.timing.as_dict().items()
                                                           if k != "samples_ms"}
        data["median_ms"] = None if self.timing is None else self.timing.median_ms
        data["floor_fraction"] = self.floor_fraction
        return data

    @property
    def floor_fraction(self) -> float | None:
        if self.timing is None or self.floor_ms is None:
            return None
        return self.floor_ms / self.timing.median_ms


# ----------------------------------------------------------------------------------------------------
# providers: make(case) -> Step, or raise Unsupported


@dataclass
class Step:
    """The three timed callables of one provider on one case."""

    forward: Callable[[], object]
    backward: Callable[[], object]
    forward_backward: Callable[[], object]
    note: str = ""  # shown on the provider's rows (e.g. the backend "auto" chose)


def _autograd_step(run: Callable, inputs: list[torch.Tensor]) -> Step:
    """Forward under no_grad; backward = autograd.grad of a retained graph; forward+backward together."""
    with torch.no_grad():
        probe = run(*inputs)
    grad = torch.randn_like(probe)
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    graph = {}

    def forward():
        with torch.no_grad():
            return run(*inputs)

    def backward():
        if "output" not in graph:
            graph["output"] = run(*inputs)
        return torch.autograd.grad(graph["output"], leaves, grad, retain_graph=True)

    def forward_backward():
        return torch.autograd.grad(run(*inputs), leaves, grad)

    return Step(forward, backward, forward_backward)


def _linear_inputs(case: Case) -> list:
    shape = (case.batch, case.length, case.heads, case.dim)
    q, k, v = (torch.randn(shape, device=case.device, dtype=case.dtype).requires_grad_() for _ in range(3))
    if case.decay == "token":
        g = torch.nn.functional.logsigmoid(torch.randn(case.batch, case.length, case.heads, device=case.device) + 4.0)
    elif case.decay == "constant":
        g = -torch.linspace(0.01, 0.5, case.heads, device=case.device)
    else:
        g = None
    return [q, k, v, g]


def spindle_linear(backend: str) -> Callable[[Case], Step]:
    def make(case: Case) -> Step:
        linear_attn = importlib.import_module("spindle.kernels.linear_attn")
        if backend == "torch" and case.length > case.torch_max_length:
            raise Unsupported(f"skipped above --torch-max-length {case.torch_max_length} tokens (the chunked "
                              "PyTorch path loops over T/64 chunks in Python: seconds per call at 1M)")
        if backend == "triton" and not linear_attn.triton_available(case.device):
            raise Unsupported(f"Triton not available on {case.device.type}")
        q, k, v, g = _linear_inputs(case)
        if backend != "triton" or not hasattr(linear_attn, "linear_attention_fwd"):
            # the split forward/backward functions (what LASP calls) where this tree has them for Triton
            run = lambda q, k, v: linear_attn.linear_attention(q, k, v, log_decay=g, backend=backend)[0]  # noqa: E731
            return _autograd_step(run, [q, k, v])
        fwd, bwd = linear_attn.linear_attention_fwd, linear_attn.linear_attention_bwd
        grad = torch.randn_like(q)
        saved = {}

        def forward():
            return fwd(q, k, v, log_decay=g, backend=backend)[0]

        def backward():
            if "residuals" not in saved:
                saved["residuals"] = fwd(q, k, v, log_decay=g, backend=backend)[2]
            return bwd(grad, None, saved["residuals"])

        def forward_backward():
            return bwd(grad, None, fwd(q, k, v, log_decay=g, backend=backend)[2])

        return Step(forward, backward, forward_backward)

    return make


def fla_chunk(case: Case) -> Step:
    try:
        from fla.ops.simple_gla import chunk_simple_gla  # flash-linear-attention, [B, T, H, D]
    except ImportError as error:
        raise Unsupported(f"fla not installed ({error.name})") from None
    if case.device.type != "cuda":
        raise Unsupported("fla needs CUDA")
    q, k, v, g = _linear_inputs(case)
    parameters = inspect.signature(chunk_simple_gla).parameters  # public function: g_gamma is its constant path
    options: dict[str, Any] = {}
    if case.decay == "constant" and "g_gamma" in parameters:
        options["g_gamma"] = g
    elif case.decay == "constant":
        options["g"] = g.view(1, 1, -1).expand(case.batch, case.length, -1).contiguous()
    elif case.decay == "token":
        options["g"] = g
    return _autograd_step(lambda q, k, v: chunk_simple_gla(q, k, v, **options)[0], [q, k, v])


def lightning_attention(case: Case) -> Step:
    try:
        from lightning_attn.ops import lightning_attn_func  # OpenNLPLab, [B, H, T, D], decay exp(-slope)
    except ImportError as error:
        raise Unsupported(f"lightning-attn not installed ({error.name})") from None
    if case.decay == "token":
        raise Unsupported("Lightning Attention takes a constant decay per head (use --decay constant)")
    if case.device.type != "cuda":
        raise Unsupported("lightning-attn needs CUDA")
    if 16 % case.dim == 0:  # its interface asserts that the head dim does not divide 16
        raise Unsupported(f"lightning-attn does not take head dim {case.dim}")
    q, k, v, g = _linear_inputs(case)
    slope = (torch.zeros(case.heads, device=case.device) if g is None else -g).float().view(-1, 1, 1)

    def run(q, k, v):
        return lightning_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), slope).transpose(1, 2)

    return _autograd_step(run, [q, k, v])


def _softmax_inputs(case: Case) -> list[torch.Tensor]:
    kv_shape = (case.batch, case.length, case.kv_heads, case.dim)
    shapes = [(case.batch, case.length, case.heads, case.dim), kv_shape, kv_shape]
    return [torch.randn(s, device=case.device, dtype=case.dtype).requires_grad_() for s in shapes]


def spindle_softmax(backend: str) -> Callable[[Case], Step]:
    def make(case: Case) -> Step:
        from spindle.kernels.attn import attention, resolve_backend, unsupported_reason

        q, k, v = _softmax_inputs(case)
        if backend != "auto":
            reason = unsupported_reason(backend, q, case.window)
            if reason is not None:
                raise Unsupported(f"{backend} {reason}")
        step = _autograd_step(lambda q, k, v: attention(q, k, v, window=case.window, backend=backend), [q, k, v])
        step.note = f"backend {resolve_backend(backend, q, case.window)}"
        return step

    return make


def torch_sdpa(case: Case) -> Step:
    import torch.nn.functional as F

    if case.window is not None:
        raise Unsupported("F.scaled_dot_product_attention has no sliding window without a dense mask")
    q, k, v = _softmax_inputs(case)
    gqa = {"enable_gqa": True} if case.kv_heads != case.heads else {}

    def run(q, k, v):
        output = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                is_causal=True, **gqa)
        return output.transpose(1, 2)

    return _autograd_step(run, [q, k, v])


def flash_attn_raw(case: Case) -> Step:
    try:
        from flash_attn import flash_attn_func
    except ImportError as error:
        raise Unsupported(f"flash-attn not installed ({error.name})") from None
    q, k, v = _softmax_inputs(case)
    window = (-1, -1) if case.window is None else (case.window - 1, 0)
    return _autograd_step(lambda q, k, v: flash_attn_func(q, k, v, causal=True, window_size=window), [q, k, v])


LINEAR_PROVIDERS: dict[str, Callable[[Case], Step]] = {
    "spindle-triton": spindle_linear("triton"),
    "spindle-torch": spindle_linear("torch"),
    "fla-chunk": fla_chunk,
    "lightning-attn": lightning_attention,
}
SOFTMAX_PROVIDERS: dict[str, Callable[[Case], Step]] = {
    "spindle-attention": spindle_softmax("auto"),
    "spindle-sdpa": spindle_softmax("sdpa"),
    "torch-sdpa": torch_sdpa,
    "flash-attn": flash_attn_raw,
}


# ----------------------------------------------------------------------------------------------------
# work and floors


def visible_pairs(length: int, window: int | None) -> int:
    """(query, key) pairs a causal query row set sees: Σ_i min(i + 1, w)."""
    if window is None or window >= length:
        return length * (length + 1) // 2
    return window * (window + 1) // 2 + (length - window) * window


def nominal_work(family: str, case: Case) -> dict[str, tuple[float, float]]:
    """(FLOPs, bytes) per mode, as documented at the top of this file."""
    b, h, d, t = case.batch, case.heads, case.dim, case.length
    e = torch.finfo(case.dtype).bits // 8
    query_bytes = b * t * h * d * e
    if family == "linear":
        forward = 2.0 * b * h * t * (CHUNK * d + 2 * d * d)
        backward = 2 * forward
        decay_bytes = {"token": b * t * h * 4, "constant": h * 4, "none": 0}[case.decay]
        forward_bytes, backward_bytes = 4 * query_bytes + decay_bytes, 7 * query_bytes + 2 * decay_bytes
    else:
        forward = 4.0 * b * h * visible_pairs(t, case.window) * d
        backward = 2.5 * forward
        kv_bytes = b * t * case.kv_heads * d * e
        lse_bytes = b * h * t * 4
        forward_bytes = 2 * query_bytes + 2 * kv_bytes + lse_bytes
        backward_bytes = 4 * query_bytes + 4 * kv_bytes + lse_bytes
    return {"fwd": (forward, forward_bytes), "bwd": (backward, backward_bytes),
            "fwd+bwd": (forward + backward, forward_bytes + backward_bytes)}


@dataclass(frozen=True)
class Peak:
    name: str
    flops_per_s: float
    bytes_per_s: float
    measured_here: bool  # False: the numbers are a reference GPU's, this run is on another device


def peak_for(device: torch.device, dtype: torch.dtype, reference: str) -> Peak:
    """Data-sheet peaks of this GPU (runtime/hardware.py), or of `reference` when on a CPU / unknown GPU."""
    hardware = importlib.import_module("spindle.runtime.hardware")
    spec = None
    if device.type == "cuda":
        spec = hardware.spec_for_device_name(torch.cuda.get_device_name(device))
    measured_here = spec is not None
    spec = spec or hardware.gpu_spec(reference)
    return Peak(spec.name, spec.peak_for(dtype), spec.hbm_bytes_per_s, measured_here)


# ----------------------------------------------------------------------------------------------------
# running


def _is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError)


class References:
    """The first provider's forward output per (family, length): every later provider is compared with it on
    the same inputs, so a fast but wrong kernel shows up in the table instead of passing as a row."""

    def __init__(self) -> None:
        self.outputs: dict[tuple[str, int], tuple[str, torch.Tensor]] = {}

    def difference(self, family: str, length: int, name: str, output: torch.Tensor) -> tuple[float | None, str]:
        key = (family, length)
        if key not in self.outputs:
            self.outputs[key] = (name, output)
            return None, ""
        reference_name, reference = self.outputs[key]
        difference = float((output.float() - reference.float()).norm() / reference.float().norm().clamp_min(1e-30))
        return difference, reference_name

    def clear(self) -> None:
        self.outputs.clear()


def _output_tensor(result: object) -> torch.Tensor:
    return result[0] if isinstance(result, (tuple, list)) else result


def run_provider(family: str, name: str, make: Callable[[Case], Step], case: Case, modes: list[str],
                 warmup: int, repeats: int, references: References | None = None) -> list[Row]:
    work = nominal_work(family, case)
    rows = [Row(family, name, case.length, mode, None, *work[mode]) for mode in modes]
    torch.manual_seed(case.length)  # every provider of a case gets the same inputs
    try:
        step = make(case)
        for row in rows:
            function = {"fwd": step.forward, "bwd": step.backward, "fwd+bwd": step.forward_backward}[row.mode]
            row.timing = time_function(function, case.device, warmup=warmup, repeats=repeats)
            row.note = step.note
        if references is not None:
            difference, reference_name = references.difference(family, case.length, name,
                                                               _output_tensor(step.forward()).detach())
            for row in rows:
                row.output_difference = difference
                if reference_name:
                    row.note = "; ".join(x for x in (row.note, f"output vs {reference_name}") if x)
    except Unsupported as reason:
        for row in rows:
            row.note = str(reason)
    except Exception as error:  # only an out-of-memory error becomes a note; anything else is a real failure
        if not _is_out_of_memory(error):
            raise
        for row in rows:
            if row.timing is None:
                row.note = "out of memory"
    finally:
        if case.device.type == "cuda":
            torch.cuda.empty_cache()
    summary = ", ".join(f"{r.mode} {r.timing.median_ms:.3f} ms" for r in rows if r.timing) or rows[0].note
    print(f"[{family}] {name} T={case.length}: {summary}", file=sys.stderr, flush=True)
    return rows


def add_floors_and_ratios(rows: list[Row], peak: Peak) -> None:
    for row in rows:
        row.floor_ms = max(row.flops / peak.flops_per_s, row.bytes / peak.bytes_per_s) * 1e3
    reference = {(r.length, r.mode): r.timing.median_ms for r in rows
                 if r.provider == REFERENCE_PROVIDER and r.timing is not None}
    for row in rows:
        if row.family == "linear" and row.timing is not None and (row.length, row.mode) in reference:
            row.relative_to_fla = reference[(row.length, row.mode)] / row.timing.median_ms


# ----------------------------------------------------------------------------------------------------
# report


def _format(value: float | None, pattern: str) -> str:
    return "-" if value is None else format(value, pattern)


def markdown(rows: list[Row], args: argparse.Namespace, device: torch.device, peak: Peak, argv: list[str]) -> str:
    command = shlex.join(["spindle", "bench", "kernels", *argv])
    lines = ["# Kernel benchmark", "", f"Command: `{command}`", "",
             f"Device: {_device_name(device)}; torch {torch.__version__}; dtype {args.dtype}; B={args.batch}, "
             f"H={args.heads}, H_kv={args.kv_heads}, d={args.dim}; linear-attention decay: {args.decay}; softmax: "
             f"causal{'' if args.window is None else f', window {args.window}'}; "
             f"median of {args.repeats} timed runs after {args.warmup} warm-up runs (spread: min-max and IQR).", ""]
    floor_text = (f"Floor: max(FLOPs / {peak.flops_per_s / 1e12:g} TFLOP/s, bytes / {peak.bytes_per_s / 1e12:g} TB/s), "
                  f"the {peak.name} data sheet (runtime/hardware.py); FLOP and byte counts are the nominal ones "
                  "documented in benchmarks/kernels.py. `x fla` = fla's median / this row's median (>1: faster). "
                  "`output diff` = relative L2 distance of the forward output from the first provider of the same "
                  "op on the same inputs (a check that a fast row is also a right one).")
    lines += [floor_text, ""]
    if device.type == "cuda" and not peak.measured_here:
        lines += [f"**{_device_name(device)} is not in runtime/hardware.py: the floor uses the {peak.name}'s "
                  "data sheet, so the floor fraction is only indicative.**", ""]
    elif not peak.measured_here:
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "unknown"
        lines += [f"**CPU run at tiny shapes ({_device_name(device)}, {os.cpu_count()} cores, load average {load} "
                  f"when the report was written: noisy). It shows the harness works; the times say nothing about "
                  "GPUs. The floor column is "
                  f"the {peak.name}'s for the same work, so the floor fraction is not meaningful here. GPU numbers: "
                  "`spindle bench kernels --preset 32k` and `--preset 1m` on an H200.**", ""]
    header = ["op", "provider", "T", "mode", "median ms", "min ms", "max ms", "IQR ms", "TFLOP/s", "floor ms",
              "% of floor", "x fla", "output diff", "note"]
    table, noted = [], set()
    for r in rows:
        t = r.timing
        if t is None:  # one line per provider and length for a case that did not run
            if (r.provider, r.length) in noted:
                continue
            noted.add((r.provider, r.length))
            table.append([r.family, r.provider, r.length, "-", *["-"] * 9, r.note])
            continue
        table.append([r.family, r.provider, r.length, r.mode, f"{t.median_ms:.3f}", f"{t.min_ms:.3f}",
                      f"{t.max_ms:.3f}", f"{t.iqr_ms:.3f}", f"{r.flops / t.median_ms / 1e9:.3g}",
                      _format(r.floor_ms, ".3g"),
                      _format(r.floor_fraction and 100 * r.floor_fraction, ".1f") if peak.measured_here else "n/a",
                      _format(r.relative_to_fla, ".2f"), _format(r.output_difference, ".1e"), r.note])
    lines += markdown_table(header, table, "llrlrrrrrrrrrl")
    lines += ["", "![fwd+bwd median per provider, bars min-max](kernels.png)", ""]
    return "\n".join(lines)


def plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for axis, family in zip(axes, ("linear", "softmax")):
        providers = sorted({r.provider for r in rows if r.family == family and r.timing})
        plotted = False
        for provider in providers:
            points = sorted((r.length, r.timing) for r in rows
                            if r.family == family and r.provider == provider and r.mode == "fwd+bwd" and r.timing)
            if not points:
                continue
            lengths = [p[0] for p in points]
            medians = [p[1].median_ms for p in points]
            spread = [[p[1].median_ms - p[1].min_ms for p in points], [p[1].max_ms - p[1].median_ms for p in points]]
            axis.errorbar(lengths, medians, yerr=spread, marker="o", capsize=3, label=provider)
            plotted = True
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("sequence length T")
        axis.set_ylabel("fwd+bwd median ms")
        axis.set_title(f"{family} attention")
        axis.grid(True, which="both", alpha=0.3)
        if plotted:
            axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


# ----------------------------------------------------------------------------------------------------
# command line


def _parser(on_gpu: bool) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spindle bench kernels", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), help="a shape from the kernel issue (32k, 1m) or tiny")
    parser.add_argument("--quick", "--dry-run", dest="quick", action="store_true",
                        help="tiny shapes, 1 warm-up, 2 repeats (the CPU rehearsal)")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--heads", type=int)
    parser.add_argument("--kv-heads", type=int, help="key/value heads for softmax attention (default: --heads)")
    parser.add_argument("--dim", type=int, help="head dim (q, k and v)")
    parser.add_argument("--lengths", help="comma-separated sequence lengths")
    parser.add_argument("--dtype", choices=sorted(DTYPES))
    parser.add_argument("--decay", choices=("none", "constant", "token"), default="constant",
                        help="linear-attention decay (constant: fla's and Lightning's constant-decay paths)")
    parser.add_argument("--window", type=int, help="softmax sliding window (default: full causal)")
    parser.add_argument("--linear", help=f"providers among {', '.join(LINEAR_PROVIDERS)} ('' for none)")
    parser.add_argument("--softmax", help=f"providers among {', '.join(SOFTMAX_PROVIDERS)} ('' for none)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"among {', '.join(MODES)}")
    parser.add_argument("--warmup", type=int)
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--torch-max-length", type=int, default=262144,
                        help="longest T at which the chunked PyTorch linear attention is timed")
    parser.add_argument("--reference-gpu", default="h200", help="data sheet for the floor when not on a known GPU")
    parser.add_argument("--device", default="cuda" if on_gpu else "cpu")
    parser.add_argument("--out", default="docs/benchmarks", help="folder for kernels.md, kernels.json, kernels.png")
    return parser


def _names(parser: argparse.ArgumentParser, option: str, text: str, table: dict) -> list[str]:
    names = [x for x in text.split(",") if x]
    unknown = [x for x in names if x not in table]
    if unknown:
        parser.error(f"--{option}: unknown provider(s) {', '.join(unknown)}; choose from {', '.join(table)}")
    return names


def parse(argv: list[str]) -> argparse.Namespace:
    on_gpu = torch.cuda.is_available()
    parser = _parser(on_gpu)
    args = parser.parse_args(argv)
    preset = "tiny" if args.quick else args.preset or ("32k" if on_gpu else "tiny")
    defaults = dict(PRESETS[preset])
    if preset == "32k" and not args.preset:
        defaults["lengths"] = "4096,8192,16384,32768"  # the default GPU run also shows the trend up to 32K
    defaults.setdefault("softmax", "spindle-attention,torch-sdpa,flash-attn")  # spindle-sdpa: on request
    defaults["linear"] = ",".join(LINEAR_PROVIDERS)
    defaults.update(warmup=1 if args.quick else None, repeats=2 if args.quick else None)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.kv_heads = args.kv_heads or args.heads
    try:
        args.lengths = [int(x) for x in args.lengths.split(",") if x]
    except ValueError:
        parser.error(f"--lengths must be comma-separated integers, got {args.lengths!r}")
    if args.heads % args.kv_heads:
        parser.error(f"--heads ({args.heads}) must be a multiple of --kv-heads ({args.kv_heads})")
    if args.window is not None and args.window < 1:
        parser.error(f"--window must be >= 1, got {args.window}")
    args.linear = _names(parser, "linear", args.linear, LINEAR_PROVIDERS)
    args.softmax = _names(parser, "softmax", args.softmax, SOFTMAX_PROVIDERS)
    args.modes = [m for m in args.modes.split(",") if m]
    if not args.modes or set(args.modes) - set(MODES):
        parser.error(f"--modes: choose among {', '.join(MODES)}, got {args.modes}")
    if args.device.startswith("cuda") and not on_gpu:
        parser.error("--device cuda: no CUDA device here; use --device cpu (or --quick)")
    device = torch.device(args.device)
    # GPU: 3 warm-ups (Triton compiles and autotunes there), 10 timed runs: both issue shapes fit a 75 s budget
    on_device = device.type == "cuda"
    args.warmup = (3 if on_device else 2) if args.warmup is None else args.warmup
    args.repeats = (10 if on_device else 5) if args.repeats is None else args.repeats
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    torch.manual_seed(0)
    rows: list[Row] = []
    references = References()
    for length in args.lengths:
        case = Case(args.batch, args.heads, args.kv_heads, args.dim, length, dtype, args.decay, args.window, device,
                    args.torch_max_length)
        for name in args.linear:
            rows += run_provider("linear", name, LINEAR_PROVIDERS[name], case, args.modes, args.warmup, args.repeats,
                                 references)
        for name in args.softmax:
            rows += run_provider("softmax", name, SOFTMAX_PROVIDERS[name], case, args.modes, args.warmup,
                                 args.repeats, references)
        references.clear()  # one length's outputs at a time
    peak = peak_for(device, dtype, args.reference_gpu)
    add_floors_and_ratios(rows, peak)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot(rows, out / "kernels.png")
    (out / "kernels.md").write_text(markdown(rows, args, device, peak, argv))
    report = {"command": shlex.join(["spindle", "bench", "kernels", *argv]), "device": _device_name(device),
              "torch": torch.__version__, "dtype": args.dtype, "batch": args.batch, "heads": args.heads,
              "kv_heads": args.kv_heads, "dim": args.dim, "decay": args.decay, "window": args.window,
              "warmup": args.warmup, "repeats": args.repeats, "peak": dataclasses.asdict(peak),
              "rows": [row.as_dict() for row in rows]}
    (out / "kernels.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out / 'kernels.md'}, {out / 'kernels.json'} and {out / 'kernels.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
