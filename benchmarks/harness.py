"""One timing harness for every benchmark: warm-ups, repeats, median and spread, multi-rank runs.

- `time_function(fn, device)`: runs `fn` `warmup` times, then `repeats` timed times, and returns a `Timing`
  (median, min, max, interquartile range of the samples in milliseconds). On a CUDA device each sample is
  timed with a pair of CUDA events around the call (the way `triton.testing.do_bench` does), after
  overwriting a buffer larger than the L2 cache so no run profits from the previous run's cache; on CPU a
  sample is wall time from `time.perf_counter`.
- `time_on_ranks(fn, group)`: the multi-rank variant; every repetition starts at a barrier, and a sample
  is the slowest rank's time (a collective step is done when its slowest rank is).
- `spawn(fn, world_size, *args)`: runs `fn(rank, world_size, group, *args)` on local gloo ranks with the
  same helper the tests use (spindle.parallel.spawn.run_distributed).
- `guard_out_of_memory(fn)`: runs a case and turns only an out-of-memory error into a row note; every
  other error propagates, so a broken case can never pass as a table row.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from spindle.parallel.spawn import run_distributed

DEFAULT_WARMUP = {"cuda": 5, "cpu": 2}
DEFAULT_REPEATS = {"cuda": 20, "cpu": 5}
CACHE_FLUSH_BYTES = 256 * 2**20  # larger than the L2 cache of current data-centre GPUs (H100/H200: 50-60 MB)


@dataclass
class Timing:
    """Milliseconds per call over the timed repeats."""

    median_ms: float
    min_ms: float
    max_ms: float
    iqr_ms: float
    repeats: int
    warmup: int
    samples_ms: list[float] = field(default_factory=list)

    @classmethod
    def from_samples(cls, samples_ms: list[float], warmup: int) -> Timing:
        if not samples_ms:
            raise ValueError("Timing: no samples (repeats must be >= 1)")
        ordered = sorted(samples_ms)
        if len(ordered) >= 2:
            quartiles = statistics.quantiles(ordered, n=4, method="inclusive")
            iqr = quartiles[2] - quartiles[0]
        else:
            iqr = 0.0
        return cls(statistics.median(ordered), ordered[0], ordered[-1], iqr, len(ordered), warmup, list(samples_ms))

    def spread(self) -> str:
        """'median ± half the interquartile range' for a table cell."""
        return f"{self.median_ms:,.3f} ± {self.iqr_ms / 2:,.3f}"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_counts(device: torch.device, warmup: int | None, repeats: int | None) -> tuple[int, int]:
    """(warmup, repeats), filling in the per-device defaults for the ones not given."""
    kind = "cuda" if device.type == "cuda" else "cpu"
    warmup = DEFAULT_WARMUP[kind] if warmup is None else warmup
    repeats = DEFAULT_REPEATS[kind] if repeats is None else repeats
    if warmup < 0 or repeats < 1:
        raise ValueError(f"harness: need warmup >= 0 and repeats >= 1, got warmup={warmup}, repeats={repeats}")
    return warmup, repeats


def _cuda_samples(function: Callable[[], object], device: torch.device, repeats: int, flush: bool) -> list[float]:
    cache = torch.empty(CACHE_FLUSH_BYTES // 4, dtype=torch.int32, device=device) if flush else None
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    for start, end in zip(starts, ends):
        if cache is not None:
            cache.zero_()
        start.record()
        function()
        end.record()
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) for start, end in zip(starts, ends)]


def _wall_samples(function: Callable[[], object], repeats: int) -> list[float]:
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        samples.append((time.perf_counter() - start) * 1e3)
    return samples


def time_function(
    function: Callable[[], object],
    device: torch.device | str = "cpu",
    warmup: int | None = None,
    repeats: int | None = None,
    flush_cache: bool = True,
) -> Timing:
    """Median and spread of `function()` over `repeats` calls after `warmup` untimed ones."""
    device = torch.device(device)
    warmup, repeats = default_counts(device, warmup, repeats)
    for _ in range(warmup):
        function()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return Timing.from_samples(_cuda_samples(function, device, repeats, flush_cache), warmup)
    return Timing.from_samples(_wall_samples(function, repeats), warmup)


def time_on_ranks(
    function: Callable[[], object],
    group: dist.ProcessGroup,
    device: torch.device | str = "cpu",
    warmup: int | None = None,
    repeats: int | None = None,
) -> Timing:
    """Like `time_function` on every rank of `group`; each sample is the slowest rank's (same on all ranks)."""
    device = torch.device(device)
    warmup, repeats = default_counts(device, warmup, repeats)
    for _ in range(warmup):
        function()
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dist.barrier(group=group)
        start = time.perf_counter()
        function()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        samples.append(time.perf_counter() - start)
    # one collective for all samples: the slowest rank per repetition
    slowest = torch.tensor(samples, dtype=torch.float64, device=device if device.type == "cuda" else "cpu")
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX, group=group)
    return Timing.from_samples([value * 1e3 for value in slowest.tolist()], warmup)


def spawn(function: Callable[..., Any], world_size: int, *args: Any, timeout: float = 900.0) -> list:
    """Run `function(rank, world_size, group, *args)` on `world_size` local gloo ranks; per-rank results."""
    return run_distributed(function, world_size, *args, timeout=timeout)


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError)


def guard_out_of_memory(function: Callable[[], Any]) -> tuple[Any, str]:
    """(result, "") or (None, "out of memory"); any other error propagates."""
    try:
        return function(), ""
    except torch.OutOfMemoryError:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return None, "out of memory"


def markdown_table(header: list[str], rows: list[list[Any]], align: str | None = None) -> list[str]:
    """Lines of a markdown table; `align` is one character per column, 'l' or 'r' (default: first left)."""
    align = align or "l" + "r" * (len(header) - 1)
    if len(align) != len(header):
        raise ValueError(f"markdown_table: {len(header)} columns but align {align!r}")
    rule = ["---:" if a == "r" else "---" for a in align]
    return ["| " + " | ".join(header) + " |", "|" + "|".join(rule) + "|"] + [
        "| " + " | ".join(str(cell) for cell in row) + " |" for row in rows
    ]


class PeakLiveBytes:
    """Peak bytes of CPU tensor storages alive at once inside the block (an allocator view for CPU runs).

    A dispatch mode sees every op's outputs; each new storage is counted until its last reference goes
    away (a weak reference per storage). Storages made before the block are not counted, so build the
    model inside it to count parameters, gradients and optimizer states too.
    """

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                output = func(*args, **(kwargs or {}))
                tracker._record(output)
                return output

        self._mode = _Mode()
        self._live: dict[int, tuple[Any, int]] = {}
        self.current = 0
        self.peak = 0

    def _record(self, output: object) -> None:
        from torch.multiprocessing.reductions import StorageWeakRef
        from torch.utils._pytree import tree_flatten

        for key, (reference, size) in list(self._live.items()):
            if reference.expired():
                del self._live[key]
                self.current -= size
        for tensor in tree_flatten(output)[0]:
            if isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu":
                storage = tensor.untyped_storage()
                if storage._cdata not in self._live:
                    self._live[storage._cdata] = (StorageWeakRef(storage), storage.nbytes())
                    self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)

    def __enter__(self) -> PeakLiveBytes:
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._mode.__exit__(*exc)
