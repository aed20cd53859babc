"""End to end: a run that dies in the middle of a checkpoint resumes from the previous one and
continues with exactly the losses, learning rates, gradient norms and weights of an uninterrupted run.

Drives the real entry point (``python -m spindle.runtime.main``) on configs/tiny.yaml; the crash is
the checkpoint fault hook (SPINDLE_CHECKPOINT_FAULT), raised after the shards of step 6 are written
and before their manifest, so step 4 is the last committed checkpoint.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from spindle.runtime.checkpoint import FAULT_ENV, list_checkpoints, read_latest

REPOSITORY = Path(__file__).resolve().parents[1]
TINY = REPOSITORY / "configs" / "tiny.yaml"
STEPS, EVERY = 6, 2


def train(run_dir: Path, *arguments: str, fault: str | None = None) -> subprocess.CompletedProcess:
    overrides = [f"train.steps={STEPS}", f"checkpoint.every={EVERY}", "checkpoint.keep=2",
                 "logging.wandb=disabled", "logging.progress=false"]
    command = [sys.executable, "-m", "spindle.runtime.main", str(TINY), "--run-dir", str(run_dir)]
    for override in overrides:
        command += ["--set", override]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    environment.pop(FAULT_ENV, None)
    if fault is not None:
        environment[FAULT_ENV] = fault
    # cwd outside the repository: its spindle/ folder must not shadow the installed package.
    return subprocess.run(command + list(arguments), cwd=run_dir.parent, env=environment, capture_output=True,
                          text=True, timeout=300)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def checkpoint_state(directory: Path, scratch: Path) -> dict:
    """Model and optimizer state of a DCP checkpoint, read back through DCP's own converter."""
    dcp_to_torch_save(directory, scratch)
    state = torch.load(scratch, weights_only=False)
    return {key: state[key] for key in ("model", "optimizer")}


def assert_bitwise_equal(left, right, where: str = "") -> None:
    if isinstance(left, torch.Tensor):
        assert torch.equal(left, right), f"{where} differs"
    elif isinstance(left, dict):
        assert left.keys() == right.keys(), where
        for key in left:
            assert_bitwise_equal(left[key], right[key], f"{where}.{key}")
    elif isinstance(left, (list, tuple)):
        for index, (a, b) in enumerate(zip(left, right, strict=True)):
            assert_bitwise_equal(a, b, f"{where}[{index}]")
    else:
        assert left == right, where


@pytest.mark.slow
def test_interrupted_run_resumes_with_identical_losses(tmp_path: Path) -> None:
    reference_dir, interrupted_dir = tmp_path / "reference", tmp_path / "interrupted"
    reference = train(reference_dir)
    assert reference.returncode == 0, reference.stderr

    # Asynchronous saves here: the fault surfaces on the training thread when the last save is awaited.
    crashed = train(interrupted_dir, "--set", "checkpoint.async_save=true", fault=f"before_manifest@{STEPS}")
    assert crashed.returncode != 0 and "InjectedCheckpointFault" in crashed.stderr, crashed.stderr
    assert read_latest(interrupted_dir).name == "step_00000004"
    assert not (interrupted_dir / "checkpoints" / "step_00000006" / "manifest.json").exists()

    resumed = train(interrupted_dir)  # --resume auto is the default
    assert resumed.returncode == 0, resumed.stderr
    expected = {record["step"]: record for record in metrics(reference_dir)}
    rerun = metrics(interrupted_dir)[-(STEPS - 4):]  # the resumed process appended steps 5 and 6
    assert [record["step"] for record in rerun] == [5, 6]
    for record in rerun:
        for key in ("loss", "lr", "grad_norm"):
            assert record[key] == expected[record["step"]][key], (record["step"], key)

    assert [info.step for info in list_checkpoints(interrupted_dir)] == [4, 6]
    assert_bitwise_equal(checkpoint_state(interrupted_dir / "checkpoints" / "step_00000006", tmp_path / "a.pt"),
                         checkpoint_state(reference_dir / "checkpoints" / "step_00000006", tmp_path / "b.pt"))


@pytest.mark.slow
def test_resume_from_a_missing_path_is_a_clear_error(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = train(run_dir, "--resume", str(tmp_path / "nowhere"))
    assert result.returncode == 2
    assert "nowhere" in result.stderr and "no such file or directory" in result.stderr
