"""Run a function on several gloo ranks in fresh processes, for multi-process tests (CPU, no GPU needed).

    from distributed_utils import run_distributed

    def _worker(rank, world_size, group, size):   # module level, so spawned processes can import it
        x = torch.full((size,), float(rank))
        torch.distributed.all_reduce(x, group=group)
        assert x[0] == sum(range(world_size))
        return x.tolist()                           # optional; must be picklable

    def test_all_reduce():
        results = run_distributed(_worker, 3, 4)    # [rank 0's return, rank 1's, rank 2's]

Each rank runs `fn(rank, world_size, group, *args)` where `group` is the default (WORLD) gloo process
group, with one intra-op thread (the CI machines have two cores). An exception on any rank fails
the call with that rank's traceback; a run longer than `timeout` seconds (a hang) is killed and
raises TimeoutError. Collectives also time out on their own after `timeout` seconds.

Starting processes dominates the cost of a small test (several seconds per spawn on two cores), so
loop over cases inside one spawn, and cover several group sizes in one spawn with `subgroup(size)`,
which also checks that code derives ranks from the group it is given rather than from WORLD. For
checks that fit a CP group, tests/cp_reference.py's `register_cases` does this for you: each case keeps
its own test id, and the cases of every module that registers share one spawn.
"""

from __future__ import annotations

# The implementation lives in the package so multi-rank benchmarks use the very same helper.
from spindle.parallel.spawn import DEFAULT_TIMEOUT_S, free_port, run_distributed, subgroup

__all__ = ["DEFAULT_TIMEOUT_S", "free_port", "run_distributed", "subgroup"]
