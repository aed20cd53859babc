"""Dense float64 references and helpers shared by the context-parallel tests (tests/test_cp_*.py).

The references are the parallel forms of docs/algorithms.md §1 and §3, written directly (no chunking, no
communication), so they are independent of every path under test. `SpawnedCase`, `register_cases` and the
`case_results` fixture run the CP modules' parametrized distributed cases in one spawn (starting processes
dominates a small case's cost) while each case keeps its own test id and its own pass or fail.
"""

from __future__ import annotations

import dataclasses
import traceback
from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist
from distributed_utils import run_distributed, subgroup
from numerics import assert_close, nan_poisoned_allocations, relative_error

__all__ = ["SpawnedCase", "assert_case_passed", "assert_close", "case_results", "data_calls", "dense_attention",
           "dense_linear_attention", "random_inputs", "register_cases", "relative_rmse"]

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
    passes or a message naming what failed. It returns instead of raising, after all its collectives, so
    that the ranks stay in step; an exception is recorded as that case's failure, with its traceback."""

    size: int
    check: Callable[..., str | None]
    options: dict = dataclasses.field(default_factory=dict)


CaseKey = tuple[str, str]  # (test module, case id)
_REGISTERED: dict[str, dict[str, SpawnedCase]] = {}
_PREPARE: dict[str, Callable[[], None]] = {}
_RESULTS: dict[CaseKey, str | None] = {}


def register_cases(module: str, cases: dict[str, SpawnedCase], prepare: Callable[[], None] | None = None):
    """Declares distributed cases of a test module (returns them, for its parametrize; ids unique within the
    module). `prepare` runs in the test process before the spawn (e.g. a build the ranks then only load)."""
    owned = _REGISTERED.setdefault(module, {})
    clashes = sorted(set(owned) & set(cases))
    if clashes:
        raise ValueError(f"{module}: case ids registered twice: {clashes}")
    owned.update(cases)
    if prepare is not None:
        _PREPARE[module] = prepare
    return cases


def _run_cases(rank: int, world_size: int, world_group, cases: list[tuple[CaseKey, SpawnedCase]]) -> dict:
    results: dict[CaseKey, str | None] = {}
    with nan_poisoned_allocations():  # receive buffers and outputs start NaN: an unwritten element fails
        for size in sorted({case.size for _, case in cases}):
            group = subgroup(size)  # collective: every rank calls it for every size, in the same order
            # one group per size runs the cases (the one holding the top rank, so group ranks differ from
            # global ranks); on two cores the other groups would only repeat the same work
            if group is None or world_size - 1 not in dist.get_process_group_ranks(group):
                continue
            for key, case in cases:
                if case.size != size:
                    continue
                try:
                    results[key] = case.check(group, **case.options)
                except (Exception, pytest.fail.Exception):  # the case fails, with where; the others still run
                    results[key] = traceback.format_exc(limit=-8)
    return results


def _selected_keys(session: pytest.Session) -> list[CaseKey]:
    keys = []
    for item in session.items:
        callspec, module = getattr(item, "callspec", None), getattr(item, "module", None)
        if callspec is not None and module is not None and module.__name__ in _REGISTERED:
            if "case" in callspec.params:
                keys.append((module.__name__, callspec.params["case"]))
    return keys


SPAWN_TIMEOUT_S = 600.0  # every CP case of the suite in one spawn, on two busy cores


def _run_spawn(chosen: list[tuple[CaseKey, SpawnedCase]]) -> dict[CaseKey, str | None]:
    """None or the failure messages per case; a spawn that fails as a whole fails each of its cases (once:
    the next module does not start it again)."""
    try:
        per_rank = run_distributed(_run_cases, max(case.size for _, case in chosen), chosen, timeout=SPAWN_TIMEOUT_S)
    except Exception as error:  # a hang (TimeoutError) or a rank that died outside any case
        return {key: f"the shared spawn failed: {type(error).__name__}: {error}" for key, _ in chosen}
    failures: dict[CaseKey, list[str]] = {key: [] for key, _ in chosen}
    ran: set[CaseKey] = set()
    for rank, results in enumerate(per_rank):
        for key, message in results.items():
            ran.add(key)
            if message is not None:
                failures[key].append(f"rank {rank}: {message}")
    return {key: "\n".join(messages) or (None if key in ran else "ran on no rank")
            for key, messages in failures.items()}


@pytest.fixture(scope="module")
def case_results(request: pytest.FixtureRequest) -> dict[str, str | None]:
    """None or the failure messages per case id of the requesting module's registered cases.

    The first request runs every selected case of every registered module (tests/test_cp_*.py, the packing
    and RAttention tests) in one spawn of as many gloo ranks as the largest case needs: starting four
    processes on two cores costs more than most cases. Under -k only the selected cases run. Import this
    fixture into a test module to use it."""
    pending = list(dict.fromkeys(key for key in _selected_keys(request.session) if key not in _RESULTS))
    if pending:
        for module in dict.fromkeys(module for module, _ in pending):
            if module in _PREPARE:
                _PREPARE[module]()
        _RESULTS.update(_run_spawn([(key, _REGISTERED[key[0]][key[1]]) for key in pending]))
    module = request.module.__name__
    return {case_id: message for (owner, case_id), message in _RESULTS.items() if owner == module}


def assert_case_passed(results: dict[str, str | None], case: str) -> None:
    assert case in results, f"{case} was not run"
    assert results[case] is None, results[case]
