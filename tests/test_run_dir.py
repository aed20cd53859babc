"""Run directories and --resume are checked before any process starts: one message, exit 2, nothing in
an existing run directory overwritten. Uses one real finished run (python -m spindle.runtime.main) and
drives `spindle train` in-process: every case here ends before Ray would start."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from spindle.launch.cli import main
from spindle.runtime.config import load_config
from spindle.runtime.run_dir import prepare_run

REPOSITORY = Path(__file__).resolve().parents[1]
TINY = REPOSITORY / "configs" / "tiny.yaml"
STEPS, EVERY = 4, 2
OVERRIDES = [f"train.steps={STEPS}", f"checkpoint.every={EVERY}", "logging.wandb=disabled"]


def sets(*overrides: str) -> list[str]:
    return [f"--set={item}" for item in (*OVERRIDES, *overrides)]


def run_main(run_dir: Path, *arguments: str, wait: bool = True) -> subprocess.CompletedProcess | subprocess.Popen:
    command = [sys.executable, "-m", "spindle.runtime.main", str(TINY), "--run-dir", str(run_dir), *arguments]
    options = dict(cwd=run_dir.parent, env={**os.environ, "OMP_NUM_THREADS": "1"}, text=True,
                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return subprocess.run(command, timeout=300, **options) if wait else subprocess.Popen(command, **options)


FINISHED_OUTPUT: dict[str, str] = {}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    result = run_main(run_dir, *sets("logging.progress=true"))
    assert result.returncode == 0, result.stderr
    FINISHED_OUTPUT["stdout"] = result.stdout
    return run_dir


def snapshot(run_dir: Path) -> dict[str, bytes]:
    return {str(path.relative_to(run_dir)): path.read_bytes() for path in sorted(run_dir.rglob("*")) if path.is_file()}


def copy_run(finished_run: Path, tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir, symlinks=True)
    return run_dir


def train(capsys: pytest.CaptureFixture, *arguments: str) -> tuple[int, str, str]:
    code = main(["train", str(TINY), *arguments])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_rank_0_shows_progress_with_eta(finished_run: Path) -> None:
    """Without Ray (python -m spindle.runtime.main, as under torchrun) rank 0 prints the progress lines."""
    stdout = FINISHED_OUTPUT["stdout"]
    lines = [line for line in stdout.splitlines() if line.startswith("step ")]
    assert len(lines) == STEPS and all("tokens/s" in line and "peak mem" in line for line in lines), stdout
    assert all("ETA " in line for line in lines[:-1]) and "ETA" not in lines[-1]


def test_resume_path_that_is_not_a_checkpoint(tmp_path: Path, finished_run: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    not_checkpoint = tmp_path / "notes"
    not_checkpoint.mkdir()
    (not_checkpoint / "readme.txt").write_text("hello")
    new_run = tmp_path / "new"
    for path in (not_checkpoint, not_checkpoint / "readme.txt", finished_run / "checkpoints"):
        code, _, error = train(capsys, "--run-dir", str(new_run), "--resume", str(path), *sets())
        assert code == 2 and error.startswith("spindle: error: ") and error.count("\n") == 1, error
        assert "is not a checkpoint" in error and "step_<8 digits>" in error
    assert not new_run.exists()
    # An existing run directory keeps every file (config.yaml included).
    before = snapshot(finished_run)
    code, _, error = train(capsys, "--run-dir", str(finished_run), "--resume", str(not_checkpoint), *sets())
    assert code == 2 and snapshot(finished_run) == before


def test_run_directory_of_another_config_is_refused(finished_run: Path, capsys: pytest.CaptureFixture) -> None:
    before = snapshot(finished_run)
    code, _, error = train(capsys, "--run-dir", str(finished_run), *sets("train.lr=0.01", "model.dim=32"))
    assert code == 2 and error.count("\n") == 1, error
    assert "belongs to a different config" in error
    assert "model.dim: 64 in the run, 32 now" in error and "train.lr: 0.003 in the run, 0.01 now" in error
    assert snapshot(finished_run) == before  # config.yaml and metrics untouched


def test_incompatible_model_shape_is_refused_before_launch(tmp_path: Path, finished_run: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    checkpoint = finished_run / "checkpoints" / f"step_{STEPS:08d}"
    new_run = tmp_path / "new"
    code, _, error = train(capsys, "--run-dir", str(new_run), "--resume", str(checkpoint), *sets("model.dim=32"))
    assert code == 2 and error.count("\n") == 1, error
    assert "does not fit the model" in error and "embedding.weight has shape (32, 64) in the checkpoint and (32, 32)" \
        in error
    assert not new_run.exists()


def test_resume_never_on_a_run_refuses_and_overwrite_moves_it_aside(tmp_path: Path, finished_run: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    run_dir = copy_run(finished_run, tmp_path)
    before = snapshot(run_dir)
    code, _, error = train(capsys, "--run-dir", str(run_dir), "--resume", "never", *sets())
    assert code == 2 and "holds a run (metrics up to step 4; checkpoints at step 2, 4)" in error, error
    assert "--overwrite" in error and snapshot(run_dir) == before
    code, _, error = train(capsys, "--run-dir", str(run_dir), "--overwrite", *sets())
    assert code == 2 and "needs --resume never" in error
    decision = prepare_run(load_config(TINY, OVERRIDES), run_dir, "never", overwrite=True)
    assert decision.resume == "never" and not run_dir.exists()
    assert decision.moved_aside.name.startswith("run.old-") and snapshot(decision.moved_aside) == before


def test_finished_run_says_so_and_does_nothing(finished_run: Path, capsys: pytest.CaptureFixture) -> None:
    before = snapshot(finished_run)
    started = time.monotonic()
    code, out, error = train(capsys, "--run-dir", str(finished_run), *sets())
    assert code == 0, error
    assert f"already finished at step {STEPS}; nothing to do" in out
    assert "starting a local Ray cluster" not in error and time.monotonic() - started < 20
    assert snapshot(finished_run) == before
    # Training longer is a change a resume allows: it gets to the launch (stopped here by a GPU check).
    code, _, error = train(capsys, "--run-dir", str(finished_run), *sets("train.steps=6", "launch.use_gpu=true"))
    assert code == 2 and "GPU" in error and "different config" not in error, error


def test_run_stopped_without_a_checkpoint_is_not_restarted_in_place(tmp_path: Path, finished_run: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    run_dir = copy_run(finished_run, tmp_path)
    shutil.rmtree(run_dir / "checkpoints")
    code, _, error = train(capsys, "--run-dir", str(run_dir), *sets("train.steps=8"))
    assert code == 2 and "stopped at step 4 without a committed checkpoint" in error, error


def test_gpu_workers_beyond_the_gpus_are_an_error_before_launch(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("checks the refusal on a machine with fewer GPUs than workers; this one has GPUs")
    code, _, error = train(capsys, "--run-dir", str(tmp_path / "run"), *sets("launch.use_gpu=true"))
    assert code == 2 and "needs 1 GPU worker(s)" in error and "has 0 GPU(s)" in error, error
    assert not (tmp_path / "run").exists()


def test_uint32_tokens_read_as_uint16_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    tokens = np.random.default_rng(0).integers(1, 32, size=4096).astype(np.uint32)
    path = tmp_path / "tokens.bin"
    tokens.tofile(path)
    code, _, error = train(capsys, "--run-dir", str(tmp_path / "run"),
                           *sets(f"data.source={path}", "data.dtype=uint16"))
    assert code == 2 and "every other token id is 0" in error and "data.dtype = 'uint32'" in error, error


def test_ctrl_c_says_where_the_last_commit_is(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    process = run_main(run_dir, *sets("train.steps=100000", "checkpoint.every=3", "logging.progress=false"),
                       wait=False)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (run_dir / "checkpoints" / "latest").exists():
        assert process.poll() is None, process.communicate()
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, error = process.communicate(timeout=60)
    assert process.returncode == 130, error
    assert "interrupted; the last committed checkpoint is" in error and "checkpoints/step_" in error, error
    assert f"--run-dir {run_dir}" in error and "Traceback" not in error
