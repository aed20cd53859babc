"""Dense float64 references and helpers shared by the context-parallel tests (tests/test_cp_*.py).

The references are the parallel forms of docs/algorithms.md §1 and §3, written directly (no chunking, no
communication), so they are independent of every path under test. `SpawnedCase` / `spawned_case_results`
run a module's parametrized distributed cases in one spawn (starting processes dominates a small case's
cost) while each case keeps its own test id and its own pass or fail.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist
from distributed_utils import run_distributed, subgroup
from numerics import assert_close, nan_poisoned_allocations, relative_error

__all__ = ["SpawnedCase", "assert_close", "data_calls", "dense_attention", "dense_linear_attention",
           "random_inputs", "relative_rmse", "spawned_case_results", "assert_case_passed"]

relative_rmse = relative_error  # the name the CP tests use


def dense_linear_attention(q, k, v, log_decay, scale):
    """O = scale · ((Q Kᵀ) ⊙ D) V with D_ij = exp(G_i − G_j) for j <= i; q, k, v: [B, T, H, d]."""
    batch, length, heads, _ = q.shape
    if log_decay is None:
        cumulative = q.new_zeros(batch, length, heads)
    elif log_decay.dim() == 1:
        steps = torch.arange(1, length + 1, dtype=q.dtype)
        cumulative = (steps[:, None] * log_decay[None, :]).expand(batch, length, heads)
    else:
        cumulative = log_decay.cumsum(dim=1)
    difference = cumulative[:, :, None, :] - cumulative[:, None, :, :]  # [B, Ti, Tj, H]
    causal = torch.ones(length, length, dtype=torch.bool).tril()[None, :, :, None]
    decay = torch.exp(difference.masked_fill(~causal, float("-inf")))
    scores = torch.einsum("bihd,bjhd->bijh", q, k) * decay
    return scale * torch.einsum("bijh,bjhv->bihv", scores, v)


def dense_attention(q, k, v, causal, scale):
    """Softmax attention with GQA and bottom-right causal alignment; q: [B, Tq, H, D], k, v: [B, Tk, H_kv, D]."""
    groups = q.shape[2] // k.shape[2]
    k = k.repeat_interleave(groups, dim=2)
    v = v.repeat_interleave(groups, dim=2)
    scores = scale * torch.einsum("bihd,bjhd->bhij", q, k)
    if causal:
        query_length, key_length = q.shape[1], k.shape[1]
        mask = torch.ones(query_length, key_length, dtype=torch.bool).tril(key_length - query_length)
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("bhij,bjhd->bihd", torch.softmax(scores, dim=-1), v)


def random_inputs(seed: int, shapes: dict[str, tuple], dtype=torch.float64) -> dict[str, torch.Tensor]:
    """The same random tensors on every rank (seeded generator)."""
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(*shape, generator=generator, dtype=dtype) for name, shape in shapes.items()}


def data_calls(stats) -> dict[str, int]:
    """Collective calls except the bookkeeping shape check ("validate"), whose count depends on the cache."""
    return {kind: count for kind, count in stats.calls.items() if kind != "validate"}


@dataclasses.dataclass(frozen=True)
class SpawnedCase:
    """One distributed check: `check(group, **options)` on a CP group of `size` ranks returns None when it
    passes or a message naming what failed. It returns instead of raising so that every rank finishes its
    collectives; an exception (not a comparison) fails the whole spawn with the rank's traceback."""

    size: int
    check: Callable[..., str | None]
    options: dict = dataclasses.field(default_factory=dict)


def _run_cases(rank: int, world_size: int, world_group, cases: list[tuple[str, SpawnedCase]]) -> dict:
    results: dict[str, str | None] = {}
    with nan_poisoned_allocations():  # receive buffers and outputs start NaN: an unwritten element fails
        for size in sorted({case.size for _, case in cases}):
            group = subgroup(size)  # collective: every rank calls it for every size, in the same order
            # one group per size runs the cases (the one holding the top rank, so group ranks differ from
            # global ranks); on two cores the other groups would only repeat the same work
            if group is None or world_size - 1 not in dist.get_process_group_ranks(group):
                continue
            for case_id, case in cases:
                if case.size != size:
                    continue
                try:
                    results[case_id] = case.check(group, **case.options)
                except AssertionError as error:  # a check that asserts inline; the ranks stay in step
                    results[case_id] = f"AssertionError: {error}"
    return results


def spawned_case_results(request: pytest.FixtureRequest, cases: dict[str, SpawnedCase]) -> dict[str, str | None]:
    """Runs, in one spawn of as many ranks as the largest selected case needs, every case of `cases` that
    this session selected (a test of the requesting module parametrized as `case`), and returns per case
    id None or the failure messages of the ranks that failed it. Under `-k` only the selected cases run."""
    selected = set()
    for item in request.session.items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and item.module is request.module and "case" in callspec.params:
            selected.add(callspec.params["case"])
    chosen = [(case_id, case) for case_id, case in cases.items() if case_id in selected]
    if not chosen:
        return {}
    per_rank = run_distributed(_run_cases, max(case.size for _, case in chosen), chosen)
    failures: dict[str, list[str]] = {case_id: [] for case_id, _ in chosen}
    for rank, results in enumerate(per_rank):
        for case_id, message in results.items():
            if message is not None:
                failures[case_id].append(f"rank {rank}: {message}")
    return {case_id: "\n".join(messages) or None for case_id, messages in failures.items()}


def assert_case_passed(results: dict[str, str | None], case: str) -> None:
    assert case in results, f"{case} did not run on any rank"
    assert results[case] is None, results[case]
