"""Run a function on several gloo ranks in fresh local processes (tests and multi-rank benchmarks, CPU).

Each rank runs `fn(rank, world_size, group, *args)` where `group` is the default (WORLD) gloo process
group, with one intra-op thread. An exception on any rank fails the call with that rank's traceback; a run
longer than `timeout` seconds (a hang) is killed and raises TimeoutError. Collectives also time out on their
own after `timeout` seconds. `fn` must be defined at module level so spawned processes can import it.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

DEFAULT_TIMEOUT_S = 180.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _rank_main(rank, fn, world_size, port, timeout, results, args):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout),
    )
    try:
        result = fn(rank, world_size, dist.group.WORLD, *args)
        results.put((rank, result))  # SimpleQueue.put writes to the pipe synchronously
    finally:
        dist.destroy_process_group()
    # Skip interpreter teardown once the work is done and reported: after DeepSpeed's comm backend has
    # been initialized, a C++ static destructor occasionally aborts at exit ("terminate called without
    # an active exception"), which would fail a run that passed. Failures never get here: they
    # propagate, and torch writes the traceback before the process ends.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def subgroup(size: int) -> dist.ProcessGroup | None:
    """Split WORLD into groups of `size` ranks counted from the top rank down, interleaved.

    With 4 ranks: size 2 -> {1, 3} and {0, 2}; size 3 -> {1, 2, 3} (rank 0 sits out); size 1 -> one group
    per rank; size 4 -> all. Returns this rank's group, or None if it sits this size out. Collective:
    every rank must call it with the same size, in the same order.
    """
    world_size, rank = dist.get_world_size(), dist.get_rank()
    if not 1 <= size <= world_size:
        raise ValueError(f"subgroup: size {size} must be in [1, {world_size}]")
    count = world_size // size
    mine = None
    for index in range(count):
        members = sorted(world_size - 1 - index - step * count for step in range(size))
        group = dist.new_group(members)
        if rank in members:
            mine = group
    return mine


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = DEFAULT_TIMEOUT_S) -> list:
    """Run fn(rank, world_size, group, *args) on `world_size` gloo ranks; returns the per-rank results."""
    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    process_context = mp.start_processes(
        _rank_main,
        args=(fn, world_size, free_port(), timeout, results, args),
        nprocs=world_size,
        join=False,
        start_method="spawn",
    )
    collected: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    while True:
        while not results.empty():  # drain as we go so a large result never blocks a child's exit
            rank, result = results.get()
            collected[rank] = result
        if process_context.join(timeout=0.2):  # raises ProcessRaisedException with the rank's traceback
            break
        if time.monotonic() > deadline:
            for process in process_context.processes:
                if process.is_alive():
                    process.terminate()
            running = [r for r, p in enumerate(process_context.processes) if p.exitcode is None]
            raise TimeoutError(f"run_distributed: {fn.__name__} on {world_size} ranks exceeded {timeout:.0f} s "
                               f"(ranks {running} still running: a hang?)")
    while not results.empty():
        rank, result = results.get()
        collected[rank] = result
    return [collected.get(rank) for rank in range(world_size)]
