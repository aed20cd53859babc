"""Faults a job must survive, through the real entry point on real processes.

Preemption: SIGTERM (what Slurm or Kubernetes send) mid-run to one torchrun worker, or to one Ray
Train worker process of `spindle train`, makes both ranks finish the step, commit a checkpoint there
and exit 0 with "preempted at step N; resume with ..."; resuming continues with exactly the losses of
an uninterrupted run (one shared reference run).

Hangs: a torchrun rank stopped (SIGSTOP) before its next collective is named, with that collective,
in one error of the rank that waited, within launch.collective_timeout_s.

Storage: a full disk during a save and a read-only run directory (a small tmpfs the test mounts)
fail the save with one clear error; the previous commit stays intact and training state untouched.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from spindle.launch.ckpt import main as ckpt_main
from spindle.runtime.checkpoint import Checkpointer, CheckpointError, read_latest, read_manifest, verify_checkpoint
from spindle.runtime.config import load_config, to_dict
from spindle.runtime.preemption import (
    STOP_FILE,
    SignalCatcher,
    StopAgreement,
    resume_command,
    stopping_workers_on_sigterm,
)

REPOSITORY = Path(__file__).resolve().parents[1]
TINY = REPOSITORY / "configs" / "tiny.yaml"
STEPS = 12
OVERRIDES = [f"train.steps={STEPS}", "logging.log_every=1", "logging.progress=false", "logging.wandb=disabled",
             "checkpoint.every=0", "parallel.dp=2"]


def environment() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def torchrun_command(run_dir: Path, *extra: str) -> list[str]:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
               "-m", "spindle.runtime.main", str(TINY), "--run-dir", str(run_dir)]
    for override in OVERRIDES:
        command += ["--set", override]
    return command + list(extra)


def losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {record["step"]: record["loss"] for record in records}


def logged_steps(run_dir: Path) -> int:
    try:
        return len((run_dir / "metrics.jsonl").read_text().splitlines())
    except OSError:
        return 0


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(child) for child in (task / "children").read_text().split()]
    return found


def test_sigterm_to_one_torchrun_worker_checkpoints_and_resumes_exactly(tmp_path: Path,
                                                                       uninterrupted_losses: dict[int, float]) -> None:
    preempted_dir = tmp_path / "preempted"
    launcher = subprocess.Popen(torchrun_command(preempted_dir, "--resume", "never"), cwd=tmp_path,
                                env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while logged_steps(preempted_dir) < 2 and launcher.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    workers = sorted(children(launcher.pid))
    assert len(workers) == 2 and launcher.poll() is None, "the run ended before it could be preempted"
    signalled = time.monotonic()
    os.kill(workers[-1], signal.SIGTERM)  # one worker only: the other must learn it from the agreement
    stdout, stderr = launcher.communicate(timeout=120)
    stopped_s = time.monotonic() - signalled
    assert launcher.returncode == 0, stderr[-3000:]

    found = re.search(r"preempted at step (\d+); resume with (.+)", stdout)
    assert found, stdout + stderr[-2000:]
    step = int(found.group(1))
    assert 2 <= step < STEPS
    latest = read_latest(preempted_dir)
    assert latest is not None and read_manifest(latest)["step"] == step
    verify_checkpoint(latest)
    command = shlex.split(found.group(2))
    assert "--resume" not in command and "--overwrite" not in command
    assert command[-len(OVERRIDES) * 2:] == torchrun_command(preempted_dir)[-len(OVERRIDES) * 2:]
    print(f"SIGTERM to rank 1 after {logged_steps(preempted_dir)} logged steps: stopped at step {step}, "
          f"exit 0 after {stopped_s:.1f} s")

    resumed = subprocess.run(command, cwd=tmp_path, env=environment(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed at step {step}" in resumed.stdout
    assert losses(preempted_dir) == uninterrupted_losses  # every step, before and after the preemption


def process_state(pid: int) -> str:
    """"R", "S", "T" (stopped), "Z" (exited, not yet reaped) ...; "gone" once reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def test_a_torchrun_rank_stuck_before_a_collective_is_named_within_the_timeout(tmp_path: Path) -> None:
    run_dir, timeout_s = tmp_path / "hang", 5
    command = torchrun_command(run_dir, "--set", f"launch.collective_timeout_s={timeout_s}", "--set",
                               "train.steps=400")
    launcher = subprocess.Popen(command, cwd=tmp_path, env=environment(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while logged_steps(run_dir) < 2 and launcher.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    workers = sorted(children(launcher.pid))
    assert len(workers) == 2 and launcher.poll() is None, "the run ended before a rank could be stopped"
    stuck = workers[1]
    os.kill(stuck, signal.SIGSTOP)  # rank 1 stops wherever it is: before its next collective
    stopped = time.monotonic()
    while process_state(workers[0]) not in ("Z", "gone") and time.monotonic() - stopped < 120:
        time.sleep(0.1)
    reported_s = time.monotonic() - stopped
    os.kill(stuck, signal.SIGKILL)  # a stopped process cannot act on torchrun's SIGTERM
    stdout, stderr = launcher.communicate(timeout=120)
    assert launcher.returncode != 0
    errors = [line for line in stderr.splitlines() if line.startswith("spindle: error:")]
    assert len(errors) == 1, stderr[-3000:]
    assert "rank 0:" in errors[0] and "was never entered by rank 1" in errors[0], errors[0]
    assert re.search(r"collective #\d+ \w+", errors[0]), errors[0]
    assert reported_s < timeout_s + 30, reported_s
    print(f"rank 1 SIGSTOPped: rank 0 reported after {reported_s:.1f} s (timeout {timeout_s} s): {errors[0]}")


# ------------------------------------------------------------------------------------- storage faults
@pytest.fixture
def small_filesystem(tmp_path: Path):
    """A 4 MiB tmpfs mounted by the test (root only), unmounted afterwards."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root and mount permission): {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill(directory: Path) -> Path:
    """Write zeros until the filesystem is full."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as handle, contextlib.suppress(OSError):
        while True:
            handle.write(b"\0" * 4096)
    return filler


def test_a_full_disk_and_a_read_only_run_directory_fail_the_save_clearly_and_keep_the_last_commit(
        small_filesystem: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 64)).square().sum().backward()
    optimizer.step()
    run_dir = small_filesystem / "run"
    config = to_dict(load_config(TINY, []))
    checkpointer = Checkpointer(run_dir, config, model, optimizer)
    checkpointer.save(2, data_cursor=16)
    committed = read_latest(run_dir)
    before = {name: value.clone() for name, value in model.state_dict().items()}

    filler = fill(small_filesystem)
    with pytest.raises(CheckpointError, match=r"step_00000004.*No space left on device.*step_00000002.*intact"):
        checkpointer.save(4, data_cursor=32)
    assert read_latest(run_dir) == committed and verify_checkpoint(committed)["step"] == 2
    assert ckpt_main(["verify", str(committed)]) == 0
    assert not (run_dir / "checkpoints" / "step_00000004").exists()  # the partial save is gone
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name

    filler.unlink()  # space again: training goes on and the next save commits
    checkpointer.save(4, data_cursor=32)
    assert read_latest(run_dir).name == "step_00000004"

    subprocess.run(["mount", "-o", "remount,ro", str(small_filesystem)], check=True)
    with pytest.raises(CheckpointError, match=r"step_00000006.*Read-only file system.*step_00000004.*intact"):
        checkpointer.save(6, data_cursor=48)
    assert read_latest(run_dir).name == "step_00000004"
    assert ckpt_main(["verify", str(run_dir)]) == 0


# ------------------------------------------------------------------ preemption under `spindle train`
def test_sigterm_to_the_ray_driver_asks_the_workers_to_stop_through_the_run_directory(tmp_path: Path) -> None:
    """The driver's half of preemption on Ray (the workers' half is the trainer's StopAgreement, run
    above under torchrun): SIGTERM writes the stop file instead of exiting, workers see it, and the
    file and the previous handler are gone afterwards."""
    previous = signal.getsignal(signal.SIGTERM)
    workers_view = StopAgreement(tmp_path, SignalCatcher())  # one process: no gloo group
    with stopping_workers_on_sigterm(tmp_path):
        assert not workers_view.should_stop()
        os.kill(os.getpid(), signal.SIGTERM)
        assert (tmp_path / STOP_FILE).is_file() and workers_view.should_stop()
    assert not (tmp_path / STOP_FILE).exists() and signal.getsignal(signal.SIGTERM) is previous


def test_the_resume_command_drops_only_resume_and_overwrite() -> None:
    typed = ["spindle", "train", "c.yaml", "--resume", "never", "--overwrite", "--set", "train.steps=9",
             "--resume=auto", "--run-dir", "runs/a b"]
    assert resume_command(typed) == "spindle train c.yaml --set train.steps=9 --run-dir 'runs/a b'"


# --------------------------------------------------- preemption of one Ray worker under `spindle train`
COUNTER = Path(__file__).resolve().with_name("call_counter.py")


@pytest.fixture(scope="module")
def uninterrupted_losses(tmp_path_factory: pytest.TempPathFactory) -> dict[int, float]:
    """Every step's loss of the job run to the end without a stop (torchrun, the same dp = 2 layout)."""
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    finished = subprocess.run(torchrun_command(run_dir), cwd=run_dir.parent, env=environment(),
                              capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    return losses(run_dir)


def ray_worker_pid(run_dir: Path, rank: int) -> int:
    """The process of ``rank``, from its heartbeat file; checked to be a Ray Train worker of this job."""
    pid = json.loads((run_dir / ".spindle" / "heartbeat" / f"rank_{rank:05d}.json").read_text())["pid"]
    command = Path(f"/proc/{pid}/cmdline").read_bytes()
    assert command.startswith(b"ray::RayTrainWorker"), command
    return pid


@pytest.mark.slow
def test_sigterm_to_one_ray_worker_checkpoints_and_resumes_exactly(tmp_path: Path,
                                                                   uninterrupted_losses: dict[int, float]) -> None:
    """SIGTERM to one Ray Train worker process (not the driver, not the other worker) mid-run: that worker
    survives it (Ray's own handler would exit it: a worker failure), every rank finishes the step and a
    checkpoint is committed there, and `spindle train` exits 0 with "preempted at step N; resume with ...".
    Resuming continues at N with exactly the losses of an uninterrupted run.

    The same run shows the config parsed once: the `spindle train` process (run under a profile hook
    that counts calls, tests/call_counter.py) parses and validates the YAML once and checks the world-size
    rules once; its workers receive the typed Config (train_worker refuses anything else) and parse
    nothing (tests/test_config.py runs the same train_entry in-process under the hook)."""
    run_dir, counts = tmp_path / "run", tmp_path / "config_calls.json"
    arguments = ["train", str(TINY), "--run-dir", str(run_dir)]
    for override in OVERRIDES:
        arguments += ["--set", override]
    driver = subprocess.Popen([sys.executable, str(COUNTER), str(counts), *arguments], cwd=tmp_path,
                              env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while logged_steps(run_dir) < 2 and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if driver.poll() is not None or logged_steps(run_dir) >= STEPS:
            stdout, stderr = driver.communicate(timeout=120)
            raise AssertionError(f"the run ended before it could be preempted: {stdout[-2000:]} {stderr[-4000:]}")
        victim, logged = ray_worker_pid(run_dir, rank=1), logged_steps(run_dir)
        signalled, signalled_at = time.monotonic(), time.time()
        os.kill(victim, signal.SIGTERM)  # rank 1's process only: rank 0 learns it through the agreement
        stdout, stderr = driver.communicate(timeout=240)
        stopped_s = time.monotonic() - signalled
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.communicate()
    assert driver.returncode == 0, stdout[-2000:] + stderr[-4000:]
    assert f"SIGTERM received by process {victim}" in stderr  # spindle's handler ran in that worker
    found = re.search(r"^spindle: preempted at step (\d+); resume with (.+)$", stdout, flags=re.MULTILINE)
    assert found, stdout[-3000:] + stderr[-3000:]
    step = int(found.group(1))
    assert logged <= step < STEPS
    latest = read_latest(run_dir)
    assert latest is not None and read_manifest(latest)["step"] == step
    verify_checkpoint(latest)
    assert shlex.split(found.group(2)) == ["spindle", *arguments]
    assert not (run_dir / STOP_FILE).exists()  # the driver removes the worker's stop request
    assert json.loads(counts.read_text()) == {"parse": 1, "validate": 1, "check_world_size": 1}
    committed_s = (latest / "manifest.json").stat().st_mtime - signalled_at
    print(f"SIGTERM to rank 1's Ray worker (pid {victim}) after {logged} logged steps: stopped at step {step}, "
          f"checkpoint committed {committed_s:.1f} s and exit 0 {stopped_s:.1f} s after the signal")

    # The checkpoint is the job's: the same layout continues it (under torchrun here, one Ray start less).
    resumed = subprocess.run(torchrun_command(run_dir), cwd=tmp_path, env=environment(), capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed at step {step}" in resumed.stdout
    assert losses(run_dir) == uninterrupted_losses  # every step, before and after the preemption


def test_a_stop_request_while_ray_workers_start_is_kept_and_a_stale_one_is_not(tmp_path: Path,
                                                                                capsys: pytest.CaptureFixture) -> None:
    """The driver removes an earlier attempt's stop request before any worker starts; a request written
    after that (SIGTERM to a worker still building its model) survives the workers' start
    (train_entry(clear_stale_stop=False), as on Ray) and stops the run at the first step boundary."""
    from spindle.runtime.main import train_entry
    from spindle.runtime.preemption import request_stop

    run_dir = tmp_path / "run"
    request_stop(run_dir)  # left by an earlier, preempted attempt
    with stopping_workers_on_sigterm(run_dir):
        assert not (run_dir / STOP_FILE).exists()
        request_stop(run_dir)
        config = load_config(TINY, ["train.steps=3", "logging.wandb=disabled", "logging.progress=false",
                                    "checkpoint.every=0"], world_size=1)
        final = train_entry(config, str(run_dir), "never", clear_stale_stop=False)
    assert final.get("preempted") and final["step"] == 1 and read_latest(run_dir).name == "step_00000001"
    assert not (run_dir / STOP_FILE).exists()
