"""Metrics: the RUN_DIR/metrics.jsonl writer, peak memory and model FLOPs utilization (MFU)."""
from __future__ import annotations

import json
import math
import os
import resource
import sys
from pathlib import Path

import torch

# The peaks live in runtime/hardware.py (one table for metrics, planner and benchmarks).
from spindle.runtime.hardware import peak_flops_per_second  # noqa: F401  (re-exported)

METRICS_FILE = "metrics.jsonl"


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory in GB (1e9 bytes): allocated GPU memory on CUDA, the process's max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kilobytes, macOS bytes.
    return max_rss / 1e9 if sys.platform == "darwin" else max_rss * 1024 / 1e9


def model_flops_utilization(flops_per_token: float, tokens_per_s: float,
                            peak_flops: float | None) -> float | None:
    """Achieved model FLOP/s over the vendor's dense peak (the field's MFU); None when the peak is unknown (CPU)."""
    if peak_flops is None:
        return None
    return flops_per_token * tokens_per_s / peak_flops


def _json_number(value: object) -> object:
    # JSON has no NaN/Infinity; a diverged loss is written as null rather than an invalid file.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsWriter:
    """Appends one JSON object per logged step to RUN_DIR/metrics.jsonl, flushed line by line so a
    crashed run keeps everything it logged. ``append=False`` starts the file afresh."""

    def __init__(self, run_dir: str | os.PathLike, *, append: bool = False) -> None:
        self.path = Path(run_dir) / METRICS_FILE
        self._handle = open(self.path, "a" if append else "w", encoding="utf-8")

    def write(self, record: dict) -> None:
        self._handle.write(json.dumps({key: _json_number(value) for key, value in record.items()}) + "\n")
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """All records of a metrics.jsonl file (blank lines skipped)."""
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]
