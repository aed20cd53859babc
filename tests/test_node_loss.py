"""Node loss, the parts that need no second host: which dp a restart runs with (launch.min_workers),
how long it waits for room (launch.capacity_timeout_s) and what it says meanwhile, which hosts and ranks
a failure lost, and the error of a job that will not restart.

The cluster is given to ``restart_layout`` as plain node lists (what ``ray.nodes()`` becomes in
cluster.py), so the waiting and its timeout run in real time without a Ray cluster. A real lost host
(every process of a worker host killed in its own network namespace) is in tests/test_multinode.py.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from spindle.launch.cluster import WorkerHost, clear_worker_nodes, worker_hosts, WORKER_NODES_DIR
from spindle.launch.errors import LaunchError
from spindle.launch.placement import NodeResources, restart_data_parallel
from spindle.launch import ray_launcher
from spindle.launch.ray_launcher import final_failure, restart_layout
from spindle.runtime.config import Config, LaunchConfig, ParallelConfig, TrainConfig, validate


def job(dp: int, cp: int = 1, tp: int = 1, *, global_batch: int = 8, micro_batch: int = 0, min_workers: int = 0,
        timeout_s: float = 600.0, cpus_per_worker: int = 1) -> Config:
    config = Config(parallel=ParallelConfig(dp=dp, cp=cp, tp=tp),
                    train=TrainConfig(global_batch=global_batch, micro_batch=micro_batch),
                    launch=LaunchConfig(max_failures=1, min_workers=min_workers, capacity_timeout_s=timeout_s,
                                        cpus_per_worker=cpus_per_worker))
    validate(config, world_size=dp * cp * tp)  # every case is a valid job
    return config


# (job, worker slots left, dp of the restart or None = wait)
RESTART_CASES = {
    "room-for-all-keeps-dp": (job(2, min_workers=1), 2, 2),
    "more-room-never-grows-dp": (job(2, min_workers=1), 5, 2),
    "one-slot-left-shrinks-to-min": (job(2, min_workers=1), 1, 1),
    "no-min-workers-waits": (job(2), 1, None),
    "no-room-waits": (job(2, min_workers=1), 0, None),
    "whole-cp-groups-only": (job(4, cp=2, min_workers=2), 5, 2),
    "dp-3-skipped-global-batch-8": (job(4, cp=2, min_workers=2), 7, 2),
    "below-min-waits": (job(4, cp=2, min_workers=6), 5, None),
    "micro-batch-must-divide": (job(4, global_batch=12, micro_batch=3, min_workers=1), 3, 2),
    "cp-tp-group-larger-than-room": (job(2, cp=2, tp=2, min_workers=4), 3, None),
}


@pytest.mark.parametrize("config, capacity, expected", RESTART_CASES.values(), ids=RESTART_CASES.keys())
def test_restart_picks_the_largest_dp_that_fits_and_min_workers_allows(config: Config, capacity: int,
                                                                        expected: int | None) -> None:
    assert restart_data_parallel(config, capacity) == expected


def test_min_workers_values_that_are_accepted() -> None:
    for dp, cp, minimum in [(2, 2, 2), (2, 2, 4), (4, 1, 1), (1, 1, 1), (3, 1, 0)]:
        validate(job(dp, cp, global_batch=12, min_workers=minimum), world_size=dp * cp)


def _nodes(*cpus: float) -> list[NodeResources]:
    return [NodeResources(f"node{index}", f"10.0.0.{index + 11}", count, 0.0) for index, count in enumerate(cpus)]


LOST = WorkerHost("ab" * 28, "10.0.0.12", "w2", (1,))


def test_restart_on_fewer_workers_once_ray_registers_the_loss(capsys: pytest.CaptureFixture) -> None:
    """The lost host first still counts as alive for Ray (unreachable); once it is dead the restart
    continues on the one host left with dp 1."""
    states = iter([{LOST.node_id: "unreachable"}, {LOST.node_id: "unreachable"}, {LOST.node_id: "dead"}])
    config, plan = restart_layout(job(2, min_workers=1, cpus_per_worker=2), False, [LOST],
                                  nodes_now=lambda: _nodes(2), states_now=lambda ids: next(states))
    assert config.parallel.dp == 1 and plan.workers == 1 and plan.workers_per_node == (1,)
    err = capsys.readouterr().err
    assert "waiting for Ray to register the loss of 10.0.0.12 (its health checks)" in err
    assert "continuing on 1 of 2 worker(s): parallel.dp 2 -> 1 (cp 1, tp 1 kept; launch.min_workers = 1)" in err


def test_restart_waits_for_capacity_then_fails_with_a_clear_error(capsys: pytest.CaptureFixture,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["/venv/bin/spindle", "train", "c.yaml", "--run-dir", "/runs/a", "--resume",
                                      "never"])
    started = time.monotonic()
    with pytest.raises(LaunchError) as error:
        restart_layout(job(2, timeout_s=1.5), False, [LOST], nodes_now=lambda: _nodes(1),
                       states_now=lambda ids: {LOST.node_id: "dead"})
    assert 1.5 <= time.monotonic() - started < 5
    message = str(error.value)
    for fragment in ["no capacity to restart after 1.5 s (launch.capacity_timeout_s)",
                     "room for the job's 2 worker(s) of 1 CPU each (launch.min_workers = 0 allows no fewer)",
                     "the cluster now has room for 1", "launch.min_workers", "launch.capacity_timeout_s",
                     "`spindle train c.yaml --run-dir /runs/a`"]:
        assert fragment in message, message
    assert "(launch.capacity_timeout_s = 1.5) for room for the job's 2 worker(s)" in capsys.readouterr().err


def test_the_capacity_timeout_starts_once_ray_registered_the_loss(capsys: pytest.CaptureFixture) -> None:
    """launch.capacity_timeout_s = 0: no waiting for room, but Ray's own registration of the loss first
    (a restart placed before it could land on the dead host)."""
    states = iter([{LOST.node_id: "unreachable"}, {LOST.node_id: "dead"}])
    with pytest.raises(LaunchError, match=r"no capacity to restart after 0 s .*room for the job's 2 worker"):
        restart_layout(job(2, timeout_s=0), False, [LOST], nodes_now=lambda: _nodes(1),
                       states_now=lambda ids: next(states))
    assert "waiting for Ray to register the loss of 10.0.0.12" in capsys.readouterr().err


def test_a_loss_ray_never_registers_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ray_launcher, "LOSS_REGISTRATION_TIMEOUT_S", 1.5)
    with pytest.raises(LaunchError, match=r"Ray still counts 10.0.0.12 as alive 1.5 s after its raylet stopped "
                                          r"answering.*`ray stop`"):
        restart_layout(job(2, min_workers=1), False, [LOST], nodes_now=lambda: _nodes(2, 2),
                       states_now=lambda ids: {LOST.node_id: "unreachable"})


def test_restart_continues_on_the_full_layout_when_the_host_comes_back() -> None:
    seen = iter([_nodes(2), _nodes(2), _nodes(2, 2)])
    config, plan = restart_layout(job(2, timeout_s=30, cpus_per_worker=2), False, [LOST],
                                  nodes_now=lambda: next(seen), states_now=lambda ids: {LOST.node_id: "dead"})
    assert config.parallel.dp == 2 and plan.workers_per_node == (1, 1)


def test_worker_hosts_group_ranks_by_node(tmp_path: Path) -> None:
    directory = tmp_path / WORKER_NODES_DIR
    directory.mkdir(parents=True)
    for rank, node in [(0, "a"), (1, "b"), (2, "a"), (3, "b")]:
        record = {"rank": rank, "node_id": node * 56, "address": f"10.0.0.{ord(node)}", "hostname": f"h{node}",
                  "pid": 100 + rank}
        (directory / f"rank_{rank:05d}.json").write_text(json.dumps(record))
    (directory / ".rank_00004.json.tmp").write_text("{half")  # a record being written is not read
    hosts = worker_hosts(tmp_path)
    assert [(host.address, host.ranks) for host in hosts] == [("10.0.0.97", (0, 2)), ("10.0.0.98", (1, 3))]
    assert hosts[1].describe() == f"10.0.0.98 (Ray node {'b' * 12}, hostname hb)"
    assert hosts[1].ranks_text() == "ranks 1, 3" and replace(hosts[1], ranks=(1,)).ranks_text() == "rank 1"
    clear_worker_nodes(tmp_path)
    assert worker_hosts(tmp_path) == []


def test_a_job_without_restarts_names_the_lost_host_its_ranks_and_the_resume_command(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["/venv/bin/spindle", "train", "c.yaml", "--run-dir", "/runs/a", "--overwrite"])
    config = job(2, cpus_per_worker=2)
    config = replace(config, launch=replace(config.launch, max_failures=0))
    message = final_failure("training failed: rank 0: connection reset", [LOST], config, tmp_path, capacity=1)
    for fragment in [f"lost host 10.0.0.12 (Ray node {LOST.node_id[:12]}, hostname w2) with rank 1",
                     "without restarts (launch.max_failures = 0)", "Nothing committed is lost",
                     "the start (no checkpoint committed yet)", "`spindle train c.yaml --run-dir /runs/a`",
                     "room for 1 worker(s): add --set parallel.dp=1"]:
        assert fragment in message, message
    # A failure with every host still alive keeps the workers' own errors.
    assert final_failure("training failed: rank 1: nan", [], config, tmp_path, capacity=2) == \
        "training failed: rank 1: nan"
