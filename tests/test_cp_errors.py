"""Bad input to the context-parallel ops gives one clear error on every rank, never a hang or garbage."""

from __future__ import annotations

import re

import pytest
import torch
import torch.distributed as dist
from cp_reference import SpawnedCase, assert_case_passed, case_results, register_cases

from spindle.parallel.cp import allgather_attention, lasp1, lasp2, ring_attention, shard, ulysses_attention

pytestmark = pytest.mark.slow

SOFTMAX_OPS = (ring_attention, allgather_attention, ulysses_attention)
LINEAR_OPS = (lasp2, lasp1)


def _tensors(length=4, heads=3, kv_heads=3, dim=4, dtype=torch.float64):
    q = torch.randn(2, length, heads, dim, dtype=dtype)
    k = torch.randn(2, length, kv_heads, dim, dtype=dtype)
    return q, k, torch.randn_like(k)


def _raises(error, match, call, label):
    try:
        call()
    except error as raised:
        assert re.search(match, str(raised)), f"{label}: message {str(raised)!r} lacks {match!r}"
        return
    raise AssertionError(f"{label}: expected {error.__name__} matching {match!r}, nothing was raised")


def _bad_arguments(group, op):
    """Each bad argument raises one clear error on every rank (uneven lengths included: nobody waits)."""
    rank, name = dist.get_rank(group), op.__name__
    q, k, v = _tensors()
    _raises(ValueError, "group is None", lambda: op(q, k, v, None), name)
    _raises(TypeError, "ProcessGroup", lambda: op(q, k, v, "world"), name)
    _raises(ValueError, "unknown layout", lambda: op(q, k, v, group, layout="striped"), name)
    odd = _tensors(length=3)
    _raises(ValueError, "odd.*zigzag", lambda: op(*odd, group, layout="zigzag"), name)
    # ranks disagreeing on the local length: every rank raises, nobody waits in a collective
    uneven = _tensors(length=4 if rank == 0 else 6)
    _raises(ValueError, "disagree on 'q'.*rank 0: shape \\(2, 4, 3, 4\\)", lambda: op(*uneven, group), name)
    _raises(ValueError, "4-D", lambda: op(q[0], k[0], v[0], group), name)
    _raises(TypeError, "dtype", lambda: op(q.float(), k, v, group), name)


def _softmax_heads(group, op):
    q, k, v = _tensors(heads=3, kv_heads=2)
    _raises(ValueError, "multiple of key/value heads", lambda: op(q, k, v, group), op.__name__)


def _linear_shapes_and_decay(group, op):
    """Heads and value shapes that do not fit; a decay of the wrong shape, and a positive decay on one rank
    only: every rank raises."""
    world_size = dist.get_world_size(group)
    q, k, v = _tensors(heads=3, kv_heads=2)
    _raises(ValueError, "shape of q", lambda: op(q, k, v, group), op.__name__)
    q3, k3, _ = _tensors()
    _raises(ValueError, "v .* must match q", lambda: op(q3, k3, torch.randn(2, 4, 2, 5, dtype=torch.float64), group),
            op.__name__)  # fmt: skip
    _raises(ValueError, "log_decay must be", lambda: op(q3, k3, k3, group, log_decay=torch.zeros(2, 4)), op.__name__)
    decay = torch.full((2, 4, 3), -0.1, dtype=torch.float64)
    decay[0, 0, 0] = 0.5 if dist.get_rank(group) == world_size - 1 else -0.1
    _raises(ValueError, f"positive values.*rank\\(s\\) \\[{world_size - 1}\\]",
            lambda: op(q3, k3, k3, group, log_decay=decay), op.__name__)  # fmt: skip


def _scheme_options(group):
    q, k, v = _tensors(heads=4, kv_heads=2)
    _raises(ValueError, "divisible by the CP group size", lambda: ulysses_attention(q, k, v, group), "ulysses")
    _raises(ValueError, "all_to_all must be", lambda: ulysses_attention(*_tensors(heads=3), group, all_to_all="mpi"), "u")
    _raises(ValueError, "head_groups", lambda: allgather_attention(*_tensors(), group, head_groups=2), "allgather")
    _raises(ValueError, "\\(10\\) is not divisible by 6", lambda: shard(torch.zeros(1, 10), group), "shard")


def _group_still_usable(group):
    """After every error above, nothing was left half-done in a collective."""
    total = torch.ones(1)
    dist.all_reduce(total, group=group)
    assert total.item() == dist.get_world_size(group)


def _error_cases() -> dict[str, SpawnedCase]:
    """On a group of 3 ranks (inside a world of 4: group ranks differ from global ranks)."""
    cases = {f"{op.__name__}-bad-arguments": SpawnedCase(3, _bad_arguments, dict(op=op))
             for op in LINEAR_OPS + SOFTMAX_OPS}
    cases.update({f"{op.__name__}-heads-mismatch": SpawnedCase(3, _softmax_heads, dict(op=op)) for op in SOFTMAX_OPS})
    cases.update({f"{op.__name__}-shapes-and-decay": SpawnedCase(3, _linear_shapes_and_decay, dict(op=op))
                  for op in LINEAR_OPS})
    cases["scheme-options-and-shard"] = SpawnedCase(3, _scheme_options)
    cases["group-still-usable-afterwards"] = SpawnedCase(3, _group_still_usable)
    return cases


ERROR_CASES = register_cases(__name__, _error_cases())


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_bad_input_raises_clear_errors(case: str, case_results: dict[str, str | None]) -> None:
    """Run in the CP tests' shared spawn (tests/cp_reference.py)."""
    assert_case_passed(case_results, case)
