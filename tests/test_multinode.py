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
def reference(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    """Started first, so it runs while the bed comes up."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    command = [sys.executable, "-m", "spindle.runtime.main", str(TINY), "--run-dir", str(run_dir),
               *overrides("parallel.dp=1", "parallel.cp=1", "checkpoint.every=0", "logging.progress=false")]
    process = subprocess.Popen(command, cwd="/tmp", text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env={**_plain_environment(), "OMP_NUM_THREADS": "1"})
    return Reference(process, run_dir)


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


def run_job(bed: MultiHostBed, run_dir: Path, argv: list[str], timeout_s: float = 240) -> Job:
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
