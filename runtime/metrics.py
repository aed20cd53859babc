"""Metrics: the RUN_DIR/metrics.jsonl writer, peak memory and model FLOPs utilization (MFU)."""
from __future__ import annotations

import json
import math
import os
import resource
import sys
from pathlib import Path

import torch

METRICS_FILE = "metrics.jsonl"

# Dense peak throughput per GPU in FLOP/s (vendor data sheets, no sparsity), keyed by a substring of
# torch.cuda.get_device_name(). Order matters: the first matching name wins ("H100 PCIe" before "H100").
_PEAK_FLOPS_BF16 = [
    ("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("GH200", 989e12), ("B200", 2250e12),
    ("A100", 312e12), ("A10G", 70e12), ("L40S", 362e12), ("L4", 121e12), ("RTX 4090", 165e12),
]
# fp32 matmuls run on TF32 tensor cores only when allowed; MFU in fp32 is against plain FP32 peak.
_PEAK_FLOPS_FP32 = [
    ("H200", 67e12), ("H100 PCIe", 51e12), ("H100", 67e12), ("GH200", 67e12), ("B200", 80e12),
    ("A100", 19.5e12), ("A10G", 31e12), ("L40S", 91.6e12), ("L4", 30e12), ("RTX 4090", 82.6e12),
]


def peak_flops_per_second(device: torch.device, dtype: torch.dtype) -> float | None:
    """The device's peak FLOP/s for ``dtype`` matmuls; None on CPU or for an unknown GPU."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    table = _PEAK_FLOPS_BF16 if dtype in (torch.bfloat16, torch.float16) else _PEAK_FLOPS_FP32
    return next((flops for key, flops in table if key in name), None)


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory in GB (1e9 bytes): allocated GPU memory on CUDA, the process's max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kilobytes, macOS bytes.
    return max_rss / 1e9 if sys.platform == "darwin" else max_rss * 1024 / 1e9


def model_flops_utilization(flops_per_token: float, tokens_per_s: float,
                            peak_flops: float | None) -> float | None:
    """Achieved model FLOP/s over peak; None when the peak is unknown (CPU)."""
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
