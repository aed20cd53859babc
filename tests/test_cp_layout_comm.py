"""Layouts (shard / unshard / positions), the comm objects, the LSE merge and the decayed chains."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from cp_reference import SpawnedCase, assert_case_passed, assert_close, case_results, dense_attention, register_cases
from numerics import assert_tensors_close

from spindle.kernels import attention
from spindle.parallel.cp import (
    AllGatherComm,
    RingComm,
    decayed_prefix_chain,
    decayed_suffix_chain,
    layout_positions,
    local_positions,
    merge_attention_block,
    record_comm,
    shard,
    unshard,
)
from spindle.parallel.cp.comm import all_to_all, reduce_scatter
from spindle.parallel.cp.layout import chunk_order, from_slots, to_slots

# --------------------------------------------------------------------------- pure functions (no processes)


def test_zigzag_positions_and_chunk_order():
    assert layout_positions(8, 0, 2, "zigzag").tolist() == [0, 1, 6, 7]
    assert layout_positions(8, 1, 2, "zigzag").tolist() == [2, 3, 4, 5]
    assert layout_positions(6, 2, 3, "contiguous").tolist() == [4, 5]
    assert chunk_order(3, "zigzag") == [(0, 0), (1, 0), (2, 0), (2, 1), (1, 1), (0, 1)]
    assert chunk_order(3, "contiguous") == [(0, 0), (1, 0), (2, 0)]
    with pytest.raises(ValueError, match=r"\(10\) is not divisible by 4"):
        layout_positions(10, 0, 2, "zigzag")


def test_slots_round_trip():
    x = torch.randn(3, 8, 2, 5)
    slotted = to_slots(x, 2)
    assert slotted.shape == (6, 4, 2, 5)
    assert torch.equal(slotted[3:], x[:, 4:])  # slot 1 = the second chunk of every batch row
    assert torch.equal(from_slots(slotted, 2), x)


def _split_attention(q, k, v, pieces, scale):
    """Merge per-key-block (o, lse) with merge_attention_block, in a scrambled order."""
    out = lse = None
    bounds = torch.linspace(0, k.shape[1], pieces + 1).long().tolist()
    for index in reversed(range(pieces)):
        start, stop = bounds[index], bounds[index + 1]
        block_out, block_lse = attention(
            q, k[:, start:stop], v[:, start:stop], causal=False, scale=scale, return_lse=True, backend="math"
        )
        out, lse = merge_attention_block(out, lse, block_out, block_lse)
    return out, lse


@pytest.mark.parametrize("scale", [0.5, 400.0], ids=["moderate-scores", "huge-scores"])
def test_lse_merge_equals_full_softmax_even_with_huge_scores(scale: float) -> None:
    """At scale 400 the scores reach ~1e3: exp would overflow in a naive merge."""
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 5, 2, 4, generator=generator, dtype=torch.float64) for _ in range(3))
    out, lse = _split_attention(q, k, v, 3, scale)
    expected, expected_lse = attention(q, k, v, causal=False, scale=scale, return_lse=True, backend="math")
    assert_tensors_close({"output": out, "lse": lse},
                         {"output": dense_attention(q, k, v, False, scale), "lse": expected_lse}, 1e-12)


def test_lse_merge_skips_fully_masked_rows():
    out = torch.randn(1, 3, 1, 2, dtype=torch.float64)
    lse = torch.tensor([[[0.5, float("-inf"), 1.0]]], dtype=torch.float64)
    out[:, 1] = 0.0
    block_out = torch.randn(1, 3, 1, 2, dtype=torch.float64)
    # row 0: the block has nothing (FA2 reports +inf); row 1: running empty; row 2: both valid
    block_lse = torch.tensor([[[float("inf"), 2.0, 1.0]]], dtype=torch.float64)
    merged_out, merged_lse = merge_attention_block(out, lse, block_out, block_lse)
    assert torch.equal(merged_out[:, 0], out[:, 0]) and merged_lse[0, 0, 0] == 0.5
    assert torch.equal(merged_out[:, 1], block_out[:, 1]) and merged_lse[0, 0, 1] == 2.0
    assert torch.allclose(merged_out[:, 2], (out[:, 2] + block_out[:, 2]) / 2)
    assert torch.isclose(merged_lse[0, 0, 2], torch.tensor(1.0 + torch.log(torch.tensor(2.0)).item(), dtype=torch.float64))
    # a first block that is entirely masked normalizes to (0, -inf)
    first_out, first_lse = merge_attention_block(None, None, block_out, torch.full_like(block_lse, float("inf")))
    assert torch.equal(first_out, torch.zeros_like(first_out)) and torch.isneginf(first_lse).all()


def test_decayed_chains_match_the_closed_form_and_are_adjoint():
    generator = torch.Generator().manual_seed(1)
    chunks = 5
    states = torch.randn(chunks, 2, 3, 4, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    gammas = torch.rand(chunks, 2, 3, generator=generator, dtype=torch.float64)
    gammas[2] = 0.0  # a chunk whose decay underflowed: must give zeros, not NaN
    incoming = decayed_prefix_chain(states, gammas)
    assert torch.equal(incoming[0], torch.zeros_like(incoming[0]))
    for chunk in range(1, chunks):
        expected = torch.zeros_like(states[0])
        for source in range(chunk):
            product = torch.ones_like(gammas[0])
            for between in range(source + 1, chunk):
                product = product * gammas[between]
            expected = expected + product[..., None, None] * states[source]
        assert_close(f"prefix chain chunk {chunk}", incoming[chunk], expected, 1e-14)
    # the suffix chain is the adjoint: d<S_in, dM>/dM_s = T_s
    state_grads = torch.randn(chunks, 2, 3, 4, 4, generator=generator, dtype=torch.float64)
    (autograd_grads,) = torch.autograd.grad((incoming * state_grads).sum(), states)
    assert_close("suffix chain", decayed_suffix_chain(state_grads, gammas), autograd_grads, 1e-14)
    assert torch.isfinite(decayed_suffix_chain(state_grads, gammas)).all()
    assert_close("no decay", decayed_prefix_chain(states, None)[3], states[:3].sum(0), 1e-14)


# --------------------------------------------------------------------------- distributed (one spawn for every CP test)


def _check_layouts(group, layout):
    """shard / unshard round trips along every dim; positions and labels follow the token permutation."""
    size = dist.get_world_size(group)
    generator = torch.Generator().manual_seed(size)
    x = torch.randn(4 * size, 4 * size, 3, 2 * size, generator=generator)
    for dim in (1, 3, -1, 0):
        local = shard(x, group, layout=layout, dim=dim)
        assert local.shape[dim] == x.shape[dim] // size, dim
        assert torch.equal(unshard(local, group, layout=layout, dim=dim), x), dim
    positions = local_positions(x.shape[1], group, layout=layout)
    assert torch.equal(shard(x, group, layout=layout), x.index_select(1, positions))
    labels = torch.arange(x.shape[1])  # labels follow the same permutation as the tokens
    assert torch.equal(shard(labels, group, layout=layout, dim=0), positions)


def _check_ring(group):
    """Each rank receives its predecessor's tensor; received bytes are counted once per hop; misuse raises."""
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    ring = RingComm(group)
    mine = torch.full((3,), float(rank))
    with record_comm() as stats:
        received = ring.send_recv(mine)
        ring.commit()
        ring.wait()
    assert received.tolist() == [float((rank - 1) % size)] * 3
    assert stats.calls == {"send_recv": 1} and stats.bytes == {"send_recv": 12}
    for misuse, message in ((ring.wait, "nothing committed"), (ring.commit, "nothing queued")):
        with pytest.raises(RuntimeError, match=message):
            misuse()
    ring.send_recv(mine)
    ring.commit()
    with pytest.raises(RuntimeError, match="in flight"):
        ring.send_recv(mine)
    with pytest.raises(RuntimeError, match="in flight"):
        ring.commit()
    ring.wait()


def _check_all_gather(group):
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    mine = torch.full((3,), float(rank))
    gather = AllGatherComm(group)
    with pytest.raises(RuntimeError, match="nothing in flight"):
        gather.wait()
    gather.start(mine)
    with pytest.raises(RuntimeError, match="already in flight"):
        gather.start(mine)
    assert gather.wait()[:, 0].tolist() == [float(r) for r in range(size)]


def _check_reduce_scatter_and_all_to_all(group):
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    rows = torch.arange(size, dtype=torch.float64)[:, None] * 10 + rank  # row p for rank p
    expected_sum = [p * 10.0 * size + sum(range(size)) for p in range(size)]
    assert reduce_scatter(rows, group).tolist() == [expected_sum[rank]]
    assert all_to_all(rows, group)[:, 0].tolist() == [rank * 10.0 + p for p in range(size)]


def _distributed_cases() -> dict[str, SpawnedCase]:
    cases = {}
    for size in (1, 2, 3, 4):
        for layout in ("zigzag", "contiguous"):
            cases[f"layouts-P{size}-{layout}"] = SpawnedCase(size, _check_layouts, dict(layout=layout))
        if size > 1:
            cases[f"ring-comm-P{size}"] = SpawnedCase(size, _check_ring)
            cases[f"all-gather-comm-P{size}"] = SpawnedCase(size, _check_all_gather)
            cases[f"reduce-scatter-all-to-all-P{size}"] = SpawnedCase(size, _check_reduce_scatter_and_all_to_all)
    return cases


DISTRIBUTED_CASES = register_cases(__name__, _distributed_cases())


@pytest.mark.slow
@pytest.mark.parametrize("case", list(DISTRIBUTED_CASES))
def test_layouts_and_comm_objects(case: str, case_results: dict[str, str | None]) -> None:
    """On CP groups of 1-4 gloo ranks (all cases of the CP tests share one spawn, with NaN-poisoned buffers)."""
    assert_case_passed(case_results, case)
