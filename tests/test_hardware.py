"""One table of accelerator figures, used by metrics (MFU) and the planner alike."""

from __future__ import annotations

import pytest
import torch

from spindle.runtime import hardware, metrics, plan


@pytest.mark.parametrize(("device_name", "key"), [
    ("NVIDIA H200", "h200"), ("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H100 PCIe", "h100-pcie"),
    ("NVIDIA GH200 480GB", "gh200"), ("NVIDIA A100-SXM4-80GB", "a100"), ("NVIDIA L40S", "l40s"),
    ("NVIDIA L4", "l4"),
], ids=lambda value: str(value).replace(" ", "_"))
def test_device_names_resolve_to_one_spec(device_name: str, key: str) -> None:
    assert hardware.spec_for_device_name(device_name) is hardware.GPUS[key]


def test_unknown_gpu_and_cpu_have_no_peak() -> None:
    assert hardware.spec_for_device_name("Some Future Accelerator") is None
    assert metrics.peak_flops_per_second(torch.device("cpu"), torch.bfloat16) is None
    with pytest.raises(ValueError, match="expected one of"):
        hardware.gpu_spec("tpu")


def test_planner_and_metrics_share_the_dense_peak() -> None:
    h200 = hardware.GPUS["h200"]
    assert plan.gpu_spec("h200") is h200 and plan.GPUS is hardware.GPUS
    assert h200.peak_flops == pytest.approx(989.4e12)  # dense bf16, vendor data sheet
    assert h200.peak_for(torch.float16) == h200.peak_flops
    assert h200.peak_for("fp32") < h200.peak_for("tf32") < h200.peak_flops
    # the planner's MFU is its own throughput against the same dense peak the trainer uses
    assert 0 < plan.DEFAULT_EFFICIENCY < 1


def test_no_second_copy_of_the_peaks_in_the_tree() -> None:
    import pathlib
    import re

    root = pathlib.Path(hardware.__file__).resolve().parent.parent
    pattern = re.compile(r"\b(989(\.4)?e12|790e12|312e12)\b")
    offenders = [str(path.relative_to(root)) for folder in ("runtime", "parallel", "launch")
                 for path in (root / folder).rglob("*.py")
                 if path.name != "hardware.py" and pattern.search(path.read_text())]
    assert offenders == []
