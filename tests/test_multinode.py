"""Multi-host jobs: a Ray head, two worker hosts and a driver host, each in its own network namespace
with its own address (tests/netns.py), so ranks on different hosts talk over a real (virtual) network.

One bed serves the module. A dp=2 x cp=2 job (LASP-2 linear layers, all-gather attention) runs twice:
submitted through the head's Jobs API (`spindle submit`) and driven from the driver host (`spindle
train --address`). Each time the ranks must spread over both worker hosts with every context-parallel
group inside one host, the placement spindle prints must be where the rank processes really ran (the
namespace each rank's process lives in), and every step's loss must equal a single-process run's.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest

from netns import MultiHostBed, multihost_bed  # noqa: F401  (the fixture)
from spindle.launch.placement import describe_rank_hosts

REPOSITORY = Path(__file__).resolve().parents[1]
TINY = REPOSITORY / "configs" / "tiny.yaml"
SPINDLE = Path(sys.executable).parent / "spindle"
STEPS = 6
DP, CP = 2, 2
SETTINGS = [f"parallel.dp={DP}", f"parallel.cp={CP}", "parallel.cp_linear=lasp2", "parallel.cp_softmax=allgather",
            f"train.steps={STEPS}", f"checkpoint.every={STEPS}", "logging.wandb=disabled", "logging.progress=true"]
"""The multi-host job: 4 ranks, two cp groups of 2; a checkpoint at the end (written by ranks on both hosts
into the one run directory every host sees)."""
PLACEMENT = re.compile(r"spindle: placement: (\d+) rank\(s\) on (\d+) host\(s\): (.+)$", re.MULTILINE)
HOST_RANKS = re.compile(r"(\d+\.\d+\.\d+\.\d+) ranks? ([\d, -]+?)(?=, \d+\.\d+\.\d+\.\d+ |$)")


def overrides(*extra: str) -> list[str]:
    return [f"--set={item}" for item in (*SETTINGS, *extra)]


# ---------------------------------------------------------------------------------------------
# The placement line (no processes)
# ---------------------------------------------------------------------------------------------
def parse_placement(output: str) -> dict[int, str]:
    """rank -> host address, from the last placement line in ``output``."""
    lines = PLACEMENT.findall(output)
    assert lines, f"no placement line in: {output[-3000:]}"
    count, hosts, spread = lines[-1]
    placement = {}
    for host, ranks in HOST_RANKS.findall(spread):
        for piece in ranks.split(", "):
            first, _, last = piece.partition("-")
            placement.update({rank: host for rank in range(int(first), int(last or first) + 1)})
    assert sorted(placement) == list(range(int(count))) and len(set(placement.values())) == int(hosts), spread
    return placement


@pytest.mark.parametrize("hosts, expected", [
    (["10.0.0.1"], "1 rank(s) on 1 host(s): 10.0.0.1 rank 0"),
    (["10.0.0.1", "10.0.0.1", "10.0.0.2", "10.0.0.2"], "4 rank(s) on 2 host(s): 10.0.0.1 ranks 0-1, 10.0.0.2 ranks 2-3"),
    (["10.0.0.2", "10.0.0.1", "10.0.0.1", "10.0.0.2", "10.0.0.2", "10.0.0.3"],
     "6 rank(s) on 3 host(s): 10.0.0.2 ranks 0, 3-4, 10.0.0.1 ranks 1-2, 10.0.0.3 rank 5"),
], ids=["one-rank", "two-hosts", "interleaved"])
def test_placement_line_names_each_host_and_its_ranks(hosts: list[str], expected: str) -> None:
    line = describe_rank_hosts(hosts)
    assert line == f"placement: {expected}"
    assert parse_placement(f"spindle: {line}") == dict(enumerate(hosts))


# ---------------------------------------------------------------------------------------------
# The reference: the same config in one process, no Ray
# ---------------------------------------------------------------------------------------------
@dataclass
class Reference:
    process: subprocess.Popen
    run_dir: Path
    losses: dict[int, float] = field(default_factory=dict)

    def wait(self) -> dict[int, float]:
        if not self.losses:
            stdout, stderr = self.process.communicate(timeout=300)
            assert self.process.returncode == 0, stdout[-2000:] + stderr[-3000:]
            self.losses = {record["step"]: record["loss"] for record in read_metrics(self.run_dir)}
            assert sorted(self.losses) == list(range(1, STEPS + 1)), self.losses
        return self.losses


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Reference]:
    """Started first, so it runs while the bed comes up."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    command = [sys.executable, "-m", "spindle.runtime.main", str(TINY), "--run-dir", str(run_dir),
               *overrides("parallel.dp=1", "parallel.cp=1", "checkpoint.every=0", "logging.progress=false")]
    process = subprocess.Popen(command, cwd="/tmp", text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env={**_plain_environment(), "OMP_NUM_THREADS": "1"})
    yield Reference(process, run_dir)
    if process.poll() is None:  # a test failed before it needed the reference
        process.kill()
        process.communicate()


def _plain_environment() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------
# Running a job on the bed and watching where its ranks run
# ---------------------------------------------------------------------------------------------
@dataclass
class Job:
    result: subprocess.CompletedProcess
    hosts_by_rank: dict[int, str]
    """rank -> bed host ("w1", ...) of the process that wrote the rank's heartbeat, seen while it ran."""


def run_job(bed: MultiHostBed, run_dir: Path, argv: list[str], timeout_s: float = 480) -> Job:
    """Run ``argv`` on the driver host; while it runs, find each rank's process (its heartbeat names the
    pid) and the namespace, i.e. the host, it lives in."""
    process = bed.popen("drv", argv, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    hosts_by_rank: dict[int, str] = {}
    deadline = time.monotonic() + timeout_s
    while process.poll() is None and time.monotonic() < deadline:
        for path in (run_dir / ".spindle" / "heartbeat").glob("rank_*.json"):
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError):  # being replaced
                continue
            if record["rank"] not in hosts_by_rank and (host := bed.host_of_pid(record["pid"])) is not None:
                hosts_by_rank[record["rank"]] = host
        time.sleep(0.1)
    if process.poll() is None:
        process.kill()
    stdout, stderr = process.communicate()
    return Job(subprocess.CompletedProcess(argv, process.returncode, stdout, stderr), hosts_by_rank)


def check_job(bed: MultiHostBed, job: Job, run_dir: Path, reference: Reference) -> None:
    output = job.result.stdout + job.result.stderr
    assert job.result.returncode == 0, output[-6000:]
    # Where the ranks really ran: both worker hosts, two ranks each, a cp group (consecutive ranks,
    # mesh order dp, cp) never split across hosts, nothing on the head or the driver host.
    assert sorted(job.hosts_by_rank) == list(range(DP * CP)), job.hosts_by_rank
    assert sorted(job.hosts_by_rank.values()) == ["w1", "w1", "w2", "w2"], job.hosts_by_rank
    for group in range(DP):
        members = {job.hosts_by_rank[group * CP + position] for position in range(CP)}
        assert len(members) == 1, f"context-parallel group {group} spans hosts: {job.hosts_by_rank}"
    # What spindle printed is where they ran.
    printed = parse_placement(output)
    assert printed == {rank: bed.ip(host) for rank, host in job.hosts_by_rank.items()}, (printed, job.hosts_by_rank)
    # The same losses as one process, step by step.
    expected = reference.wait()
    records = read_metrics(run_dir)
    assert [record["step"] for record in records] == list(range(1, STEPS + 1))
    for record in records:
        assert math.isclose(record["loss"], expected[record["step"]], rel_tol=0, abs_tol=1e-5), \
            (record["step"], record["loss"], expected[record["step"]])
    # Ranks on both hosts wrote one committed checkpoint into the shared run directory.
    assert (run_dir / "checkpoints" / f"step_{STEPS:08d}" / "manifest.json").is_file()


# ---------------------------------------------------------------------------------------------
# The bed
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_submit_runs_dp_cp_across_two_hosts(reference: Reference, multihost_bed: MultiHostBed) -> None:
    """`spindle submit` from the driver host to the head's Jobs API; the job's driver runs on the head."""
    bed = multihost_bed
    run_dir = bed.root / "submitted"
    job = run_job(bed, run_dir, [str(SPINDLE), "submit", str(TINY), "--address", bed.dashboard_url,
                                 "--run-dir", str(run_dir), *overrides()])
    check_job(bed, job, run_dir, reference)
    assert re.search(r"job spindle-tiny-\S+ succeeded", job.result.stdout), job.result.stdout[-3000:]


@pytest.mark.slow
def test_train_from_a_driver_host(reference: Reference, multihost_bed: MultiHostBed) -> None:
    """`spindle train --address HEAD:6379` on a machine outside the cluster is refused at once with what
    to do; once that machine is a Ray node without CPUs it drives the job, and no rank runs on it."""
    bed = multihost_bed
    run_dir = bed.root / "driven"
    argv = [str(SPINDLE), "train", str(TINY), "--address", bed.gcs_address, "--run-dir", str(run_dir), *overrides()]
    started = time.monotonic()
    refused = bed.run("drv", argv, timeout=120)
    assert refused.returncode == 1, refused.stdout[-2000:] + refused.stderr[-3000:]
    assert f"this machine is not a node of the Ray cluster at {bed.gcs_address}" in refused.stderr, refused.stderr
    assert f"ray start --address {bed.gcs_address} --num-cpus 0" in refused.stderr
    assert f"spindle submit CONFIG --address {bed.dashboard_url}" in refused.stderr
    assert time.monotonic() - started < 60
    assert not (run_dir / "metrics.jsonl").exists()

    bed.join_driver_node("drv")
    job = run_job(bed, run_dir, argv)
    check_job(bed, job, run_dir, reference)
    assert f"spindle: finished step {STEPS}" in job.result.stdout, job.result.stdout[-3000:]
    assert f"Ray cluster {bed.gcs_address}: 4 CPU worker(s) on 2 node(s) (2 + 2)" in job.result.stderr


# ---------------------------------------------------------------------------------------------
# Node loss (H2): every process of one worker host killed mid-run (a machine that lost power)
#
# (b) launch.max_failures = 0: one error naming the lost host, its rank and the resume command.
# (a) launch.max_failures = 1, launch.min_workers = 1: the job restarts from the last committed checkpoint
#     on the host left, dp 2 -> 1, and finishes; the losses after the restart equal a clean one-process
#     run (no Ray) resumed from that checkpoint on dp 1.
# (c) no room for the job and launch.capacity_timeout_s = 2: a clear error after Ray registered the loss.
# The jobs run 2 CPUs per worker, so each worker host (2 CPUs) holds one rank; the tests run in this
# order and restart a killed host only when they need more hosts than are alive.
# ---------------------------------------------------------------------------------------------
import threading  # noqa: E402

from spindle.launch.cluster import worker_hosts  # noqa: E402
from spindle.runtime.checkpoint import read_latest  # noqa: E402

LOSS_STEPS, LOSS_EVERY = 60, 10
LOSS_JOB = ["launch.cpus_per_worker=2", f"train.steps={LOSS_STEPS}", f"checkpoint.every={LOSS_EVERY}",
            "checkpoint.keep=10", "logging.wandb=disabled", "logging.progress=false", "launch.collective_timeout_s=60"]
LOSS_MESSAGES = ("lost host", "waiting for Ray to register", "waiting up to", "continuing on", "spindle: error")


@dataclass
class LossRun:
    """A `spindle train --address` job on the driver host, and what was seen around the host kill."""

    base: Path
    process: subprocess.Popen
    committed: int = 0
    victim: str = ""
    """The bed host killed."""
    killed_at: float = 0.0
    first_step_after_restart_at: float | None = None
    seen_at: dict[str, float] = field(default_factory=dict)
    """Seconds after the kill at which the driver's messages appeared (for the report)."""

    @property
    def run_dir(self) -> Path:
        return self.base / "run"

    @property
    def stdout(self) -> str:
        return (self.base / "stdout").read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return (self.base / "stderr").read_text(errors="replace")


def _loss_hosts_alive(bed: MultiHostBed, count: int) -> list[str]:
    """At least ``count`` worker hosts alive (restarting killed ones) and the driver host joined."""
    alive = bed.alive_nodes()
    if bed.ip("drv") not in alive:
        bed.join_driver_node("drv")
    up = [host for host in bed.worker_hosts if bed.ip(host) in alive]
    for host in [host for host in bed.worker_hosts if host not in up][:max(0, count - len(up))]:
        bed.restart_host(host)
        up.append(host)
    return up


def _loss_start(bed: MultiHostBed, name: str, dp: int, *extra: str) -> LossRun:
    base = bed.root / name
    base.mkdir()
    argv = [str(SPINDLE), "train", str(TINY), "--run-dir", str(base / "run"), "--address", bed.gcs_address,
            *[f"--set={item}" for item in (*LOSS_JOB, f"parallel.dp={dp}", *extra)]]
    with open(base / "stdout", "w") as stdout, open(base / "stderr", "w") as stderr:
        process = bed.popen("drv", argv, stdout=stdout, stderr=stderr, text=True)
    return LossRun(base, process)


def _loss_records(run_dir: Path) -> list[dict]:
    records, path = [], run_dir / "metrics.jsonl"
    for line in (path.read_text().splitlines() if path.exists() else []):
        try:
            records.append(json.loads(line))
        except ValueError:  # the line being written
            break
    return records


def _loss_kill_after_a_commit(bed: MultiHostBed, run: LossRun, rank: int, timeout_s: float = 300) -> None:
    """Once a checkpoint is committed and 3 more steps are logged, kill every process of ``rank``'s host
    (each rank on its own host); a thread then notes the driver's messages and the first step of the
    restarted group (the metrics file is cut back to the checkpoint's step first, then grows again)."""
    deadline = time.monotonic() + timeout_s
    while run.process.poll() is None and time.monotonic() < deadline and not run.committed:
        latest, records = read_latest(run.run_dir), _loss_records(run.run_dir)
        if latest is not None and records and records[-1]["step"] >= int(latest.name.rsplit("_", 1)[1]) + 3:
            run.committed = int(latest.name.rsplit("_", 1)[1])
        time.sleep(0.05)
    assert run.committed, f"no checkpoint followed by progress: {run.stdout[-2000:]} {run.stderr[-3000:]}"
    ranks_by_ip = {host.address: host.ranks for host in worker_hosts(run.run_dir)}
    by_ip = {bed.ip(name): name for name in bed.worker_hosts}
    assert all(len(ranks) == 1 for ranks in ranks_by_ip.values()) and set(ranks_by_ip) <= set(by_ip), ranks_by_ip
    run.victim = by_ip[next(ip for ip, ranks in ranks_by_ip.items() if ranks == (rank,))]
    run.killed_at = time.monotonic()
    bed.kill_host(run.victim)
    threading.Thread(target=_loss_watch, args=(run,), daemon=True).start()


def _loss_watch(run: LossRun) -> None:
    cut_back = False
    while run.process.poll() is None and run.first_step_after_restart_at is None:
        steps = [record["step"] for record in _loss_records(run.run_dir)]
        cut_back = cut_back or (bool(steps) and steps[-1] <= run.committed)
        if cut_back and steps and steps[-1] > run.committed:
            run.first_step_after_restart_at = time.monotonic()
        stderr = run.stderr
        for message in LOSS_MESSAGES:
            if message not in run.seen_at and message in stderr:
                run.seen_at[message] = time.monotonic() - run.killed_at
        time.sleep(0.05)


def _loss_finish(name: str, run: LossRun, timeout_s: float = 400) -> None:
    try:
        run.process.wait(timeout=timeout_s)
    finally:
        if run.process.poll() is None:
            run.process.kill()
            run.process.wait()
    recover = (f"{run.first_step_after_restart_at - run.killed_at:.1f} s" if run.first_step_after_restart_at
               else "no restart")
    events = ", ".join(f"'{message}' +{at:.1f} s" for message, at in run.seen_at.items())
    last = max((record["step"] for record in _loss_records(run.run_dir)), default=0)
    print(f"\n[node loss: {name}] killed host {run.victim} after the commit of step {run.committed}; steps "
          f"logged {last}; from the kill to the first step after the restart: {recover}; driver: {events}")


@pytest.mark.slow
def test_node_loss_without_restarts_names_the_lost_host(multihost_bed: MultiHostBed) -> None:
    bed = multihost_bed
    _loss_hosts_alive(bed, 2)
    run = _loss_start(bed, "loss-no-restart", 2, "launch.max_failures=0")
    _loss_kill_after_a_commit(bed, run, rank=1)
    _loss_finish("no restarts", run)
    assert run.process.returncode == 1, run.stdout[-3000:] + run.stderr[-5000:]
    error = next((line for line in run.stderr.splitlines() if line.startswith("spindle: error: ")), "")
    for fragment in [f"lost host {bed.ip(run.victim)} (Ray node ", "with rank 1: the job stopped without restarts "
                     "(launch.max_failures = 0)", "Nothing committed is lost: resume from the last committed "
                     f"checkpoint ({run.run_dir}/checkpoints/step_", f"with `spindle train {TINY} --run-dir",
                     "room for 1 worker(s): add --set parallel.dp=1", "launch.max_failures > 0"]:
        assert fragment in error, run.stderr[-5000:]
    assert int(read_latest(run.run_dir).name.rsplit("_", 1)[1]) >= run.committed  # nothing committed was lost


@pytest.mark.slow
def test_node_loss_restarts_on_fewer_workers_from_the_last_commit(multihost_bed: MultiHostBed,
                                                                   tmp_path: Path) -> None:
    bed = multihost_bed
    _loss_hosts_alive(bed, 2)
    run = _loss_start(bed, "loss-shrink", 2, "launch.max_failures=1", "launch.min_workers=1")
    _loss_kill_after_a_commit(bed, run, rank=1)
    _loss_finish("restart on dp 1", run)
    assert run.process.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    assert re.search(rf"spindle: lost host {re.escape(bed.ip(run.victim))} \(Ray node \w+, hostname \S+\) with "
                     rf"rank 1; restart 1 of 1 from the last committed checkpoint \(\S+/step_{run.committed:08d}\)",
                     run.stderr), run.stderr[-5000:]
    assert "continuing on 1 of 2 worker(s): parallel.dp 2 -> 1 (cp 1, tp 1 kept; launch.min_workers = 1)" in \
        run.stderr
    assert re.search(rf"resumed at step {run.committed} from \S+ \(written on dp 2, cp 1, tp 1: resharded\)",
                     run.stdout), run.stdout[-3000:]
    records = _loss_records(run.run_dir)
    assert [record["step"] for record in records] == list(range(1, LOSS_STEPS + 1))  # each step once

    # The reference: one process without Ray, resumed from the same checkpoint on dp 1.
    checkpoint = run.run_dir / "checkpoints" / f"step_{run.committed:08d}"
    command = [sys.executable, "-m", "spindle.runtime.main", str(TINY), "--run-dir", str(tmp_path / "reference"),
               "--resume", str(checkpoint), *[f"--set={item}" for item in (*LOSS_JOB, "parallel.dp=1")]]
    result = subprocess.run(command, cwd=tmp_path, env={**_plain_environment(), "OMP_NUM_THREADS": "1"},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    expected = {record["step"]: record["loss"] for record in read_metrics(tmp_path / "reference")}
    after = [record for record in records if record["step"] > run.committed]
    assert [record["step"] for record in after] == sorted(expected)
    worst = max(abs(record["loss"] - expected[record["step"]]) / abs(expected[record["step"]]) for record in after)
    print(f"[node loss: restart on dp 1] largest relative loss difference to the reference: {worst:.2e}")
    assert worst <= 1e-6


@pytest.mark.slow
def test_node_loss_waits_for_capacity_then_fails_clearly(multihost_bed: MultiHostBed) -> None:
    bed = multihost_bed
    _loss_hosts_alive(bed, 1)
    run = _loss_start(bed, "loss-no-room", 1, "launch.max_failures=1", "launch.capacity_timeout_s=2")
    _loss_kill_after_a_commit(bed, run, rank=0)
    _loss_finish("no room within launch.capacity_timeout_s", run)
    assert run.process.returncode == 1, run.stdout[-3000:] + run.stderr[-5000:]
    ip = bed.ip(run.victim)
    for fragment in [f"spindle: lost host {ip} (Ray node ", "with rank 0; restart 1 of 1 from the last committed "
                     "checkpoint", "waiting up to 2 s more (launch.capacity_timeout_s = 2) for room for the job's 1 "
                     "worker(s) of 2 CPU each (launch.min_workers = 0 allows no fewer); the cluster now has room for 0",
                     "spindle: error: no capacity to restart after 2 s (launch.capacity_timeout_s)",
                     "bring the lost host back or add nodes", f"resume with `spindle train {TINY} --run-dir"]:
        assert fragment in run.stderr, run.stderr[-5000:]
