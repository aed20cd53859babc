"""The Ray path: `spindle train` on Ray Train (embedded and joined clusters), restarts after a killed
worker, `spindle submit` through the Jobs API, placement checks and hang reports.

Ray takes 10-25 s to start on the CI machines, so the slow tests share one head node started with
`ray start --head` on 127.0.0.1 (module fixture, its own temp dir and session, stopped in teardown
by signalling only its own processes), and the embedded-cluster run doubles as the reference run
of the restart test. The fast tests at the top exercise the pure placement / diagnosis logic.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from spindle.launch.ray_launcher import (
    LaunchError,
    NodeResources,
    decide_gpu,
    diagnose_stall,
    explain_failure,
    latest_checkpoint_marker,
    plan_placement,
    resolve_address,
    resume_for_attempt,
)
from spindle.launch.submit import dashboard_address, entrypoint

REPOSITORY = Path(__file__).resolve().parents[1]
TINY = REPOSITORY / "configs" / "tiny.yaml"
SPINDLE = Path(sys.executable).parent / "spindle"
STEPS, EVERY = 60, 10


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# Placement, addresses, resume and hang diagnosis (no Ray processes)
# ---------------------------------------------------------------------------------------------
def _nodes(*shapes: tuple[float, float]) -> list[NodeResources]:
    return [NodeResources(f"node{index}", f"10.0.0.{index}", cpus, gpus) for index, (cpus, gpus) in enumerate(shapes)]


def test_placement_fills_nodes_and_keeps_groups_inside_a_node() -> None:
    plan = plan_placement(16, tp=4, cp=2, nodes=_nodes((64, 8), (64, 8), (64, 8)), use_gpu=True, cpus_per_worker=4)
    assert plan.workers_per_node == (8, 8) and plan.notes == ()
    assert plan.resources_per_worker == {"CPU": 4.0, "GPU": 1.0} and plan.strategy == "PACK"


def test_placement_warns_when_a_tensor_parallel_group_spans_nodes() -> None:
    plan = plan_placement(8, tp=8, cp=1, nodes=_nodes((32, 4), (32, 4)), use_gpu=True, cpus_per_worker=1)
    assert plan.workers_per_node == (4, 4)
    assert any("tensor-parallel group of 8 ranks will span nodes" in note for note in plan.notes)


def test_placement_warns_about_an_uneven_spread() -> None:
    plan = plan_placement(12, tp=2, cp=1, nodes=_nodes((64, 8), (64, 8)), use_gpu=True, cpus_per_worker=1)
    assert plan.workers_per_node == (8, 4)
    assert any("unevenly" in note for note in plan.notes)


def test_placement_says_what_is_missing() -> None:
    with pytest.raises(LaunchError) as error:
        plan_placement(16, tp=1, cp=1, nodes=_nodes((64, 8)), use_gpu=True, cpus_per_worker=1)
    message = str(error.value)
    assert "16 worker(s)" in message and "needs 16 CPU, 16 GPU" in message and "has 64 CPU, 8 GPU" in message
    assert "launch.use_gpu=false" in message
    with pytest.raises(LaunchError, match="needs 8 CPU, has 2 CPU"):
        plan_placement(4, tp=1, cp=2, nodes=_nodes((2, 0)), use_gpu=False, cpus_per_worker=2)


def test_oversubscription_warns_for_cpus_and_refuses_gpus() -> None:
    from spindle.launch.placement import check_oversubscription
    from spindle.runtime.config import ConfigError

    warning = check_oversubscription(4, 1, use_gpu=False, cores=2, gpus=0)
    assert warning and "4 worker process(es) x 1 CPU = 4 CPU(s) on a machine with 2 core(s)" in warning
    assert "2.0x slower" in warning
    assert check_oversubscription(2, 1, use_gpu=False, cores=2, gpus=0) is None
    with pytest.raises(ConfigError, match="needs 64 GPU worker.* has 8 GPU"):
        check_oversubscription(64, 1, use_gpu=True, cores=128, gpus=8)
    assert check_oversubscription(8, 4, use_gpu=True, cores=64, gpus=8) is None


def test_gpu_choice_follows_launch_use_gpu() -> None:
    assert decide_gpu("auto", _nodes((8, 0))) is False
    assert decide_gpu("auto", _nodes((8, 0), (8, 2))) is True
    assert decide_gpu("false", _nodes((8, 2))) is False
    assert decide_gpu("true", _nodes((8, 0))) is True  # and plan_placement then reports the missing GPUs


def test_addresses_are_checked_with_clear_messages(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert resolve_address(None) is None
    with pytest.raises(LaunchError, match="dashboard .*spindle submit"):
        resolve_address("http://127.0.0.1:8265")
    with pytest.raises(LaunchError, match="not HOST:PORT"):
        resolve_address("127.0.0.1")
    with pytest.raises(LaunchError, match="GCS address HOST:PORT .* not a ray:// address"):
        resolve_address("ray://127.0.0.1:10001")
    port = free_port()
    started = time.monotonic()
    with pytest.raises(LaunchError, match=f"cannot reach a Ray cluster at 127.0.0.1:{port}"):
        resolve_address(f"127.0.0.1:{port}")
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    with pytest.raises(LaunchError, match="cannot reach"):
        resolve_address(None)
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")  # what `ray job submit` users often export
    with pytest.raises(LaunchError, match="RAY_ADDRESS=http://127.0.0.1:8265 is a dashboard"):
        resolve_address(None)
    assert time.monotonic() - started < 15
    with pytest.raises(LaunchError, match="GCS port"):
        dashboard_address("http://127.0.0.1:6379")
    with pytest.raises(LaunchError, match="cannot reach"):
        dashboard_address(f"127.0.0.1:{port}")
    assert entrypoint("/shared/runs/a b", "never") == "spindle train config.yaml --run-dir '/shared/runs/a b' --resume never"
    assert entrypoint(None, "never", overwrite=True, trust_checkpoint=True) == \
        "spindle train config.yaml --resume never --overwrite --trust-checkpoint"


def test_restarted_worker_group_resumes_from_a_checkpoint_of_this_launch(tmp_path: Path) -> None:
    job = {"run_dir": str(tmp_path), "resume": "never", "latest_at_launch": None}
    assert resume_for_attempt(job) == "never"  # first group: as the user asked
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("step_00000040\n")
    assert latest_checkpoint_marker(tmp_path) == "step_00000040"
    assert resume_for_attempt(job) == "auto"  # a later group after a commit: continue from it
    stale = {**job, "latest_at_launch": "step_00000040"}
    assert resume_for_attempt(stale) == "never"  # an older run's checkpoint is not this launch's


def _record(rank: int, collectives: dict, age_s: float = 0.0, now: float = 1000.0) -> dict:
    return {"rank": rank, "group": "g", "time": now - age_s, "collectives": collectives}


def test_stall_report_names_the_rank_and_the_collective() -> None:
    waiting = {"0": {"seq": 42, "op": "gloo:all_gather", "ranks": "[0, 1, 2, 3]"}}
    behind = {"0": {"seq": 41, "op": "gloo:all_reduce", "ranks": "[0, 1, 2, 3]"}}
    records = [_record(0, waiting), _record(1, waiting), _record(2, behind), _record(3, waiting, age_s=60)]
    report = diagnose_stall(records, now=1000.0)
    assert "collective #42 gloo:all_gather on process group 0 (ranks [0, 1, 2, 3])" in report
    assert "rank 2 (last entered #41 gloo:all_reduce; last heartbeat 0 s ago)" in report
    assert "rank(s) 3 stopped answering" in report
    assert diagnose_stall([_record(0, waiting), _record(1, waiting)], now=1000.0) is None
    # Read long after the whole group stopped (the driver, after Ray's teardown): nobody is singled out.
    assert diagnose_stall([_record(0, waiting, age_s=100), _record(1, waiting, age_s=101)], now=1000.0) is None


def test_failure_message_groups_identical_rank_errors(tmp_path: Path) -> None:
    error = RuntimeError("Training failed due to worker errors")
    error.worker_failures = {0: FloatingPointError("Traceback ...\nthe loss is nan at step 3."),
                             1: FloatingPointError("the loss is nan at step 3."), 2: OSError("disk full")}
    message = explain_failure(error, tmp_path)
    assert message.startswith("training failed: ranks 0, 1: the loss is nan at step 3; rank 2: disk full")
    assert str(tmp_path) in message


def _stalling_rank(rank: int, world_size: int, group: object, run_dir: str) -> str | None:
    """Rank 1 skips a collective; rank 0's all_gather times out and is explained by the heartbeats."""
    import datetime

    import torch
    import torch.distributed as dist

    from spindle.launch.ray_launcher import Heartbeat, diagnose_stall, read_heartbeats

    group = dist.new_group(list(range(world_size)), timeout=datetime.timedelta(seconds=3))
    with Heartbeat(run_dir, rank, "test-group", interval_s=0.5) as heartbeat:
        dist.all_reduce(torch.ones(2), group=group)
        if rank == 1:
            time.sleep(4)  # "stops answering" while rank 0 waits in the next collective
            return None
        try:
            dist.all_gather_into_tensor(torch.empty(4), torch.ones(2), group=group)
        except RuntimeError:
            heartbeat.beat()
            return diagnose_stall(read_heartbeats(run_dir))
    raise AssertionError("the all_gather should have timed out")


@pytest.mark.slow
def test_a_rank_that_stops_answering_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from distributed_utils import run_distributed

    monkeypatch.setenv("TORCH_FR_BUFFER_SIZE", "64")  # what the launcher sets for its workers
    report = run_distributed(_stalling_rank, 2, str(tmp_path))[0]
    assert report is not None and "all_gather" in report and "rank 1 (last entered #1 gloo:all_reduce" in report, \
        report


# ---------------------------------------------------------------------------------------------
# Real Ray clusters
# ---------------------------------------------------------------------------------------------
def _environment(**extra: str) -> dict[str, str]:
    environment = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    environment.update(OMP_NUM_THREADS="1", RAY_USAGE_STATS_ENABLED="0",
                       PATH=f"{SPINDLE.parent}{os.pathsep}{os.environ.get('PATH', '')}", **extra)
    return environment


class HeadNode:
    """`ray start --head --block` on loopback in its own session and temp dir; stop() signals only
    the processes of that session."""

    def __init__(self) -> None:
        self.temp_dir = tempfile.mkdtemp(prefix="spr", dir="/tmp")  # short: Ray puts unix sockets in it
        # Token authentication with this head's own token file (never ~/.ray/auth_token, which other
        # clusters of this user would share).
        self.token_path = Path(self.temp_dir) / "auth_token"
        descriptor = os.open(self.token_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(secrets.token_hex(32))
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        ports = {name: free_port() for name in ("ray-client-server-port", "dashboard-agent-listen-port",
                                                "dashboard-agent-grpc-port", "runtime-env-agent-port",
                                                "metrics-export-port", "node-manager-port", "object-manager-port")}
        command = [str(SPINDLE.parent / "ray"), "start", "--head", "--block", f"--port={self.gcs_port}",
                   "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
                   f"--dashboard-port={self.dashboard_port}", f"--temp-dir={self.temp_dir}", "--num-cpus=2",
                   "--disable-usage-stats", *(f"--{name}={port}" for name, port in ports.items())]
        self.log = open(Path(self.temp_dir) / "head.log", "w")
        self.process = subprocess.Popen(command, env=self.client_environment(), stdout=self.log,
                                        stderr=subprocess.STDOUT, start_new_session=True)

    def client_environment(self) -> dict[str, str]:
        """What a process that talks to this head needs: its token."""
        return _environment(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(self.token_path))

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def wait_ready(self, timeout_s: float = 120) -> None:
        """The Jobs API answers (401 without a token still means it is up)."""
        import urllib.error
        import urllib.request

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ray start exited: {Path(self.log.name).read_text()[-3000:]}")
            try:
                urllib.request.urlopen(f"{self.dashboard_url}/api/version", timeout=2).read()
                return
            except urllib.error.HTTPError:
                return
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"the Ray head did not come up in {timeout_s} s")

    def session_pids(self) -> list[int]:
        pids = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    if os.getsid(int(entry)) == self.process.pid:
                        pids.append(int(entry))
                except OSError:
                    pass
        return pids

    def stop(self) -> None:
        # SIGINT makes `ray start --block` shut its processes down; whatever is left of this session
        # (and only this session) is killed.
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        for pid in self.session_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def head() -> HeadNode:
    node = HeadNode()  # starts in the background while the embedded-cluster test runs
    try:
        yield node
    finally:
        node.stop()


LAYOUT = ["parallel.cp=2", "parallel.cp_linear=lasp2", "parallel.cp_softmax=allgather"]
"""Two CPU workers with context parallelism: LASP-2 on the linear layers and all-gather attention on
the softmax layers."""


def spindle(*arguments: str, environment: dict | None = None, timeout: float = 240,
            wait: bool = True) -> subprocess.CompletedProcess | subprocess.Popen:
    command = [str(SPINDLE), *arguments]
    # cwd outside the repository: its spindle/ folder must not shadow the installed package.
    options = dict(cwd=tempfile.gettempdir(), env=environment or _environment(), text=True,
                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if not wait:
        return subprocess.Popen(command, **options)
    return subprocess.run(command, timeout=timeout, **options)


def train_arguments(run_dir: Path, layout: list[str], *extra: str) -> list[str]:
    overrides = [*layout, f"train.steps={STEPS}", f"checkpoint.every={EVERY}", "checkpoint.keep=2",
                 "logging.wandb=disabled", "logging.progress=true", *extra]
    return ["train", str(TINY), "--run-dir", str(run_dir), *[f"--set={item}" for item in overrides]]


def read_metrics(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def completed_records(run_dir: Path) -> list[dict]:
    """The records of a metrics file that is still being written (a torn last line is left out)."""
    records = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            break
    return records


@dataclass
class ObservedRun:
    """A `spindle train` process and what was seen of its process tree while it ran."""

    run_dir: Path
    result: subprocess.CompletedProcess
    listening: set[tuple[str, int, str]] = field(default_factory=set)
    """(address, port, process name) of every listening socket of the job's processes."""
    token_files: dict[str, int] = field(default_factory=dict)
    """RAY_AUTH_TOKEN_PATH of the job's processes -> the file's mode."""



def _listening_sockets() -> dict[int, tuple[str, int]]:
    """Socket inode -> (address, port) of every listening TCP socket on this host (/proc/net/tcp{,6})."""
    sockets = {}
    for table, family in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 6)):
        with contextlib.suppress(OSError), open(table) as handle:
            for line in list(handle)[1:]:
                fields = line.split()
                if fields[3] != "0A":  # TCP_LISTEN
                    continue
                address, port = fields[1].split(":")
                if family == 4:
                    ip = socket.inet_ntop(socket.AF_INET, bytes.fromhex(address)[::-1])
                else:
                    words = bytes.fromhex(address)
                    ip = socket.inet_ntop(socket.AF_INET6, b"".join(words[i:i + 4][::-1] for i in range(0, 16, 4)))
                sockets[int(fields[9])] = (ip, int(port, 16))
    return sockets


def _process_tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                parent = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(parent, []).append(int(entry))
    tree, pending = [], [root]
    while pending:
        pid = pending.pop()
        tree.append(pid)
        pending.extend(children.get(pid, []))
    return tree


def _sample(root: int, observed: "ObservedRun") -> None:
    listening = _listening_sockets()
    for pid in _process_tree(root):
        with contextlib.suppress(OSError):
            name = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            for descriptor in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/{pid}/fd/{descriptor}")
                    if target.startswith("socket:[") and int(target[8:-1]) in listening:
                        observed.listening.add((*listening[int(target[8:-1])], Path(name).name))
            environment = dict(item.split(b"=", 1) for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                               if b"=" in item)
            token = environment.get(b"RAY_AUTH_TOKEN_PATH", b"").decode()
            if token and token not in observed.token_files:
                observed.token_files[token] = stat.S_IMODE(os.stat(token).st_mode)


def observe(run_dir: Path, arguments: list[str], timeout_s: float = 300) -> ObservedRun:
    """Run `spindle` and, while it runs, list the listening sockets and token files of its process tree
    (the GCS, raylet, dashboard and agents an embedded cluster starts, and the workers), from /proc."""
    process = spindle(*arguments, wait=False)
    observed = ObservedRun(run_dir, None)  # type: ignore[arg-type]
    deadline = time.monotonic() + timeout_s
    while process.poll() is None and time.monotonic() < deadline:
        _sample(process.pid, observed)
        time.sleep(1.0)
    if process.poll() is None:
        process.kill()
    stdout, stderr = process.communicate()
    observed.result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    return observed


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory: pytest.TempPathFactory, head: HeadNode) -> tuple[Path, object]:
    """An uninterrupted run on an embedded cluster (the head node of the later tests starts meanwhile, so
    another Ray instance runs on this host during it)."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    observed = observe(run_dir, train_arguments(run_dir, LAYOUT))
    return run_dir, observed.result, observed


LOOPBACK_ADDRESSES = ("127.0.0.1", "::1", "::ffff:127.0.0.1")


@pytest.mark.slow
def test_train_runs_on_an_embedded_local_cluster(reference_run: tuple[Path, object, ObservedRun]) -> None:
    """One embedded-cluster run, several promises: it trains; every Ray service listens on loopback only;
    the token file is private; torch's rendezvous store too; the driver shows rank 0's progress with ETA, memory and its startup; no
    traceback of the other Ray instance reaches the console; the run directory holds signed checkpoints;
    and running it again says it is finished without starting Ray."""
    run_dir, result, observed = reference_run
    assert result.returncode == 0, result.stderr[-4000:]
    assert "embedded cluster: 2 CPU worker(s)" in result.stderr
    assert f"spindle: finished step {STEPS}" in result.stdout
    steps = [record["step"] for record in read_metrics(run_dir)]
    assert steps == list(range(1, STEPS + 1))
    parallel = yaml.safe_load((run_dir / "config.yaml").read_text())["parallel"]
    assert (parallel["dp"], parallel["cp"], parallel["cp_linear"], parallel["cp_softmax"]) == (1, 2, "lasp2", "allgather")

    names = {name for _, _, name in observed.listening}
    assert "gcs_server" in names and "raylet" in names, observed.listening  # the sampling saw the cluster
    # Every Ray service and torch's rendezvous store on rank 0 (MASTER_PORT, named in the heartbeats).
    rendezvous = {int(json.loads(path.read_text())["group"].rsplit(":", 1)[1])
                  for path in (run_dir / ".spindle" / "heartbeat").glob("rank_*.json")}
    assert rendezvous & {port for _, port, _ in observed.listening}, (rendezvous, observed.listening)
    exposed = sorted(entry for entry in observed.listening if entry[0] not in LOOPBACK_ADDRESSES)
    assert not exposed, f"listening beyond loopback: {exposed}"
    assert observed.token_files and set(observed.token_files.values()) == {0o600}, observed.token_files
    assert not any(Path(path).exists() for path in observed.token_files)  # removed with the cluster

    startup = re.search(r"starting a local Ray cluster with 2 worker\(s\) \.\.\..*\n.*local Ray cluster up in "
                        r"[\d.]+ s \(session (\S+)\)", result.stderr)
    assert startup, result.stderr[-3000:]
    assert "/tmp/ray/session_latest" not in result.stderr
    # Progress comes from the driver (no worker prefix), with tokens/s, memory and an ETA.
    lines = re.findall(rf"^step\s+(\d+)/{STEPS}  loss [\d.]+  \d+ tokens/s(?:  MFU [\d.]+%)?  peak mem [\d.]+ GB  [\d.]+ s(.*)$",
                       result.stdout, flags=re.MULTILINE)
    assert len(lines) >= 5 and lines[-1][0] == str(STEPS), result.stdout[-3000:]
    assert all(re.fullmatch(r"  ETA \d+:\d\d", eta) for step, eta in lines[:-1]), lines
    assert "RayTrainWorker" not in "".join(line for line in result.stdout.splitlines() if " tokens/s " in line)
    for noise in ("Found multiple active Ray instances", "PlacementGroupCleaner"):  # the head node's doing
        assert noise not in result.stderr, result.stderr[-4000:]

    checkpoints = {path.name for path in (run_dir / "checkpoints").iterdir()}
    assert checkpoints == {f"step_{STEPS - EVERY:08d}", f"step_{STEPS:08d}", "latest"}
    manifest = json.loads((run_dir / "checkpoints" / f"step_{STEPS:08d}" / "manifest.json").read_text())
    assert manifest["auth"]["scheme"] == "hmac-sha256"

    again = spindle(*train_arguments(run_dir, LAYOUT))
    assert again.returncode == 0, again.stderr
    assert f"already finished at step {STEPS}; nothing to do" in again.stdout
    assert "starting a local Ray cluster" not in again.stderr


def _wait_for_checkpoint_then_progress(run_dir: Path, process: subprocess.Popen, timeout_s: float = 180) -> int:
    """Wait until a checkpoint is committed and training went past it; returns that checkpoint's step."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.poll() is None:
        marker = latest_checkpoint_marker(run_dir)
        if marker is not None and (run_dir / "metrics.jsonl").exists():
            committed = int(marker.rsplit("_", 1)[-1])
            records = completed_records(run_dir)
            if records and records[-1]["step"] >= committed + 5:
                return committed
        time.sleep(0.1)
    process.kill()
    stdout, stderr = process.communicate()
    raise AssertionError(f"no checkpoint followed by progress: {stdout[-3000:]} {stderr[-3000:]}")


def _worker_pid(run_dir: Path, rank: int) -> int:
    record = json.loads((run_dir / ".spindle" / "heartbeat" / f"rank_{rank:05d}.json").read_text())
    command = Path(f"/proc/{record['pid']}/cmdline").read_bytes()
    assert command.startswith(b"ray::"), command  # a Ray worker of this job, nothing else
    return record["pid"]


@pytest.mark.slow
def test_submitted_job_survives_a_killed_worker(head: HeadNode, reference_run: tuple[Path, object],
                                                tmp_path: Path) -> None:
    """`spindle submit` runs `spindle train` on the cluster (joining it through RAY_ADDRESS); SIGKILL of
    one worker mid-run restarts the worker group from the last committed checkpoint, the job succeeds,
    and every step's loss equals the uninterrupted run's. A second job that fails returns 1."""
    reference_dir, reference, _ = reference_run
    assert reference.returncode == 0, reference.stderr[-4000:]
    head.wait_ready()
    environment = head.client_environment()
    failing_arguments = ["submit", str(TINY), "--address", head.dashboard_url, "--run-dir", str(tmp_path / "bad"),
                         "--resume", "/nonexistent/checkpoint"]
    failing = spindle(*failing_arguments, environment=environment, wait=False)
    detached = spindle(*failing_arguments, "--no-wait", environment=environment, timeout=60)
    assert detached.returncode == 0 and "ray job stop" in detached.stdout, detached.stdout + detached.stderr
    detached_id = re.search(r"submitted job (\S+)", detached.stdout).group(1)
    run_dir = tmp_path / "run"
    submitted = spindle("submit", *train_arguments(run_dir, LAYOUT, "launch.max_failures=1")[1:],
                        "--address", head.dashboard_url, environment=environment, wait=False)
    try:
        committed = _wait_for_checkpoint_then_progress(run_dir, submitted)
        victim = _worker_pid(run_dir, rank=1)
        os.kill(victim, signal.SIGKILL)
        stdout, stderr = submitted.communicate(timeout=240)
        failing_out, _ = failing.communicate(timeout=120)
    finally:
        for process in (submitted, failing):
            if process.poll() is None:
                process.kill()
    assert submitted.returncode == 0, stdout[-4000:] + stderr[-2000:]
    assert "submitted job spindle-tiny-" in stdout and "succeeded" in stdout
    resumed = re.search(r"resumed at step (\d+)", stdout)  # the job's logs streamed back, restart included
    assert resumed and int(resumed.group(1)) >= committed, stdout[-4000:]
    assert _worker_pid_or_none(run_dir, 1) != victim  # a new worker group ran after the kill
    expected = {record["step"]: record["loss"] for record in read_metrics(reference_dir)}
    records = read_metrics(run_dir)
    assert [record["step"] for record in records] == list(range(1, STEPS + 1)), \
        "metrics.jsonl must hold each step once: lines after the resumed step from the failed attempt are dropped"
    for record in records:
        assert math.isclose(record["loss"], expected[record["step"]], rel_tol=1e-6, abs_tol=0.0), record

    assert failing.returncode == 1 and "no such file or directory" in failing_out and "failed" in failing_out, failing_out
    status = subprocess.run([str(SPINDLE.parent / "ray"), "job", "status", detached_id, "--address", head.dashboard_url],
                            env=environment, capture_output=True, text=True, timeout=60)
    assert f"job '{detached_id}' failed" in (status.stdout + status.stderr).lower(), status.stdout + status.stderr


def _worker_pid_or_none(run_dir: Path, rank: int) -> int | None:
    path = run_dir / ".spindle" / "heartbeat" / f"rank_{rank:05d}.json"
    return json.loads(path.read_text())["pid"] if path.exists() else None


@pytest.mark.slow
def test_unreachable_addresses_fail_within_seconds(tmp_path: Path) -> None:
    closed = free_port()
    started = time.monotonic()
    processes = [spindle("submit", str(TINY), "--address", f"http://127.0.0.1:{closed}", wait=False),
                 spindle("train", str(TINY), "--run-dir", str(tmp_path / "run"), "--address", f"127.0.0.1:{closed}",
                         wait=False)]
    for process in processes:
        _, stderr = process.communicate(timeout=60)
        assert process.returncode == 1, stderr
        assert "cannot reach a Ray cluster at" in stderr and str(closed) in stderr, stderr
    assert time.monotonic() - started < 60  # the CLI's imports included; Ray alone would retry for minutes
    assert not (tmp_path / "run").exists()
