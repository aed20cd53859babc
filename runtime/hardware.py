"""Accelerator figures in one place: dense peak FLOP/s per dtype, memory, memory and link bandwidth.

Every number is the vendor's data-sheet figure for dense math (no 2:4 structured sparsity), per GPU:
- H100 SXM5 80 GB: NVIDIA H100 Tensor Core GPU data sheet: BF16/FP16 989.4 TFLOP/s, TF32 494.7,
  FP32 66.9; HBM3 3.35 TB/s; NVLink 900 GB/s (bidirectional, so 450 GB/s per direction).
- H100 PCIe 80 GB: same data sheet, PCIe column: BF16/FP16 756.5, TF32 378, FP32 51.2; HBM2e 2.0 TB/s;
  NVLink bridge 600 GB/s (300 per direction).
- H200 SXM 141 GB: NVIDIA H200 Tensor Core GPU data sheet: compute as H100 SXM (BF16 989.4 dense);
  HBM3e 4.8 TB/s; NVLink 900 GB/s.
- GH200 (Hopper GPU of the Grace Hopper superchip, 96 GB HBM3): NVIDIA GH200 data sheet: compute as
  H100 SXM; 4.0 TB/s; NVLink 900 GB/s.
- A100 SXM 80 GB: NVIDIA A100 Tensor Core GPU data sheet: BF16/FP16 312, TF32 156, FP32 19.5;
  HBM2e 2.039 TB/s; NVLink 600 GB/s (300 per direction).
- B200 (HGX B200, 180 GB): NVIDIA HGX B200 data sheet: BF16/FP16 2.25 PFLOP/s dense (4.5 sparse),
  TF32 1.1 PFLOP/s dense, FP32 75 TFLOP/s; HBM3e 7.7 TB/s; NVLink 1.8 TB/s (900 per direction).
- L40S 48 GB: NVIDIA L40S data sheet: BF16/FP16 362.05 dense, TF32 183, FP32 91.6; 864 GB/s; PCIe only.
- L4 24 GB: NVIDIA L4 data sheet: BF16/FP16 121 dense, TF32 60, FP32 30.3; 300 GB/s; PCIe only.

Model FLOPs utilization (MFU) is reported against these peaks, as the field does; the planner divides work
by peak × an achievable fraction it states (runtime/plan.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

TERA = 1e12
GIB = 1024**3
PCIE_GEN4_BYTES_PER_S = 32e9  # x16, per direction: the link of GPUs without NVLink


@dataclass(frozen=True)
class GpuSpec:
    """One accelerator's data-sheet figures."""

    name: str
    peak_flops_by_dtype: dict[str, float] = field(repr=False)
    """Dense peak FLOP/s per matmul input dtype: "bf16", "fp16", "tf32", "fp32"."""
    hbm_bytes_per_s: float
    memory_bytes: float
    nvlink_bytes_per_s: float
    """Per-GPU, per-direction bandwidth to GPUs in the same node."""
    device_names: tuple[str, ...] = ()
    """Substrings of torch.cuda.get_device_name() that identify this GPU."""

    @property
    def peak_flops(self) -> float:
        """Dense bf16 matmul peak, FLOP/s (what training in bf16 is measured against)."""
        return self.peak_flops_by_dtype["bf16"]

    def peak_for(self, dtype: torch.dtype | str) -> float:
        """Dense peak FLOP/s for matmuls in ``dtype``; fp32 counts as TF32 only when PyTorch allows it."""
        return self.peak_flops_by_dtype[dtype_key(dtype)]

    @property
    def usable_bytes(self) -> float:
        """Memory a training step may plan for: 5% for allocator fragmentation and 2 GiB for the
        CUDA context, NCCL buffers and library workspaces stay free."""
        return 0.95 * self.memory_bytes - 2 * GIB


def _peaks(bf16: float, tf32: float, fp32: float) -> dict[str, float]:
    return {"bf16": bf16 * TERA, "fp16": bf16 * TERA, "tf32": tf32 * TERA, "fp32": fp32 * TERA}


_HOPPER = _peaks(989.4, 494.7, 66.9)
# Order matters for name matching: the first entry whose substring occurs in the device name wins
# ("H100 PCIe" before "H100", "GH200" before "H200", "L40S" before "L4").
GPUS: dict[str, GpuSpec] = {
    "gh200": GpuSpec("GH200", _HOPPER, 4.0e12, 96e9, 450e9, ("GH200",)),
    "h200": GpuSpec("H200", _HOPPER, 4.8e12, 141e9, 450e9, ("H200",)),
    "h100-pcie": GpuSpec("H100 PCIe", _peaks(756.5, 378.0, 51.2), 2.0e12, 80e9, 300e9, ("H100 PCIe",)),
    "h100": GpuSpec("H100", _HOPPER, 3.35e12, 80e9, 450e9, ("H100",)),
    "a100": GpuSpec("A100", _peaks(312.0, 156.0, 19.5), 2.039e12, 80e9, 300e9, ("A100",)),
    "b200": GpuSpec("B200", _peaks(2250.0, 1100.0, 75.0), 7.7e12, 180e9, 900e9, ("B200",)),
    "l40s": GpuSpec("L40S", _peaks(362.05, 183.0, 91.6), 0.864e12, 48e9, PCIE_GEN4_BYTES_PER_S, ("L40S",)),
    "l4": GpuSpec("L4", _peaks(121.0, 60.0, 30.3), 0.3e12, 24e9, PCIE_GEN4_BYTES_PER_S, ("L4",)),
}


def dtype_key(dtype: torch.dtype | str) -> str:
    """"bf16" / "fp16" / "tf32" / "fp32" for a matmul dtype (fp32 is TF32 when PyTorch allows TF32)."""
    if isinstance(dtype, str):
        if dtype not in ("bf16", "fp16", "tf32", "fp32"):
            raise ValueError(f"dtype {dtype!r}: expected one of bf16, fp16, tf32, fp32")
        return dtype
    if dtype == torch.bfloat16:
        return "bf16"
    if dtype == torch.float16:
        return "fp16"
    if dtype == torch.float32:
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32"
    raise ValueError(f"no peak FLOP/s for dtype {dtype}: expected bfloat16, float16 or float32")


def gpu_spec(name: str | GpuSpec) -> GpuSpec:
    """The spec for a key of GPUS (case-insensitive), or the spec itself."""
    if isinstance(name, GpuSpec):
        return name
    key = str(name).lower()
    if key not in GPUS:
        raise ValueError(f"gpu={name!r} is not a known GPU: expected one of {', '.join(GPUS)}.")
    return GPUS[key]


def spec_for_device_name(device_name: str) -> GpuSpec | None:
    """The spec whose name occurs in a CUDA device name ("NVIDIA H200" -> H200); None if unknown."""
    return next((spec for spec in GPUS.values() if any(part in device_name for part in spec.device_names)), None)


def peak_flops_per_second(device: torch.device, dtype: torch.dtype) -> float | None:
    """The device's dense peak FLOP/s for ``dtype`` matmuls; None on CPU or for an unknown GPU."""
    if device.type != "cuda":
        return None
    spec = spec_for_device_name(torch.cuda.get_device_name(device))
    return None if spec is None else spec.peak_for(dtype)
