"""Sliding-window attention and delayed LASP-2 / LASP-1 (`delay=`) over CP groups against dense float64 formulas.

`window_attention`, `lasp2/lasp1(delay=)` (through `delayed_lasp`) and the one-exchange
`rattention_branches` on 2, 3 and 4 gloo ranks, both layouts, windows smaller than, equal to and larger
than a rank's chunk (up to beyond the whole sequence): outputs and every input gradient, by name. The
halo's bytes are checked to be independent of the sequence length. Every case has its own test id; the
cases share one spawn with the other CP tests (tests/cp_reference.py).
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist
from cp_reference import SpawnedCase, assert_case_passed, case_results, random_inputs, register_cases
from numerics import check_tensors

from spindle.parallel.cp import (
    delayed_lasp,
    halo_exchange,
    lasp1,
    lasp2,
    rattention_branches,
    record_comm,
    shard,
    window_attention,
)
from spindle.parallel.cp.halo import halo_tokens_received, make_halo_plan

pytestmark = pytest.mark.slow

BATCH, HEADS, KV_HEADS, HEAD_DIM = 2, 4, 2, 4
TOLERANCE = 1e-10


# --------------------------------------------------------------------------- dense float64 formulas


def _same_document(documents, length):
    """[B or 1, Ti, Tj] bool: query and key in one document (documents: [B, T] ids, or None)."""
    if documents is None:
        return torch.ones(1, length, length, dtype=torch.bool)
    return documents[:, :, None] == documents[:, None, :]


def document_ids(cu_seqlens, batch, length):
    """[B, T] document id of every token from offsets into the B·T flattened tokens."""
    flat = torch.arange(batch * length).view(batch, length)
    return torch.searchsorted(cu_seqlens, flat, right=True)


def dense_window_attention(q, k, v, window, scale, documents=None):
    """softmax over keys i − w < j <= i (in one document), GQA by repeating kv heads; [B, T, H, D]."""
    groups = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(groups, dim=2), v.repeat_interleave(groups, dim=2)
    length = q.shape[1]
    i = torch.arange(length)[:, None]
    j = torch.arange(length)[None, :]
    visible = ((j <= i) & (j > i - window))[None] & _same_document(documents, length)  # [B, Ti, Tj]
    scores = (scale * torch.einsum("bihd,bjhd->bhij", q, k)).masked_fill(~visible[:, None], float("-inf"))
    return torch.einsum("bhij,bjhd->bihd", torch.softmax(scores, dim=-1), v)


def dense_delayed_linear_attention(q, k, v, log_decay, scale, delay, documents=None):
    """o_i = scale · Σ_{j <= i − delay} exp(G_{i−delay} − G_j) (q_i·k_j) v_j, G the inclusive cumulative log-decay."""
    batch, length, heads, _ = q.shape
    if log_decay is None:
        cumulative = q.new_zeros(batch, length, heads)
    elif log_decay.dim() == 1:
        cumulative = (torch.arange(1, length + 1, dtype=q.dtype)[:, None] * log_decay[None, :]).expand(
            batch, length, heads)
    else:
        cumulative = log_decay.cumsum(dim=1)
    i = torch.arange(length)[:, None]
    j = torch.arange(length)[None, :]
    visible = (j <= i - delay)[None] & _same_document(documents, length)  # [B, Ti, Tj]
    source = (i - delay).clamp_min(0).expand(length, length)  # the state S_{i−delay}
    exponent = cumulative[:, source[:, 0]][:, :, None, :] - cumulative[:, None, :, :]  # [B, Ti, Tj, H]
    weights = torch.exp(exponent.masked_fill(~visible[:, :, :, None], float("-inf")))
    scores = torch.einsum("bihd,bjhd->bijh", q, k) * weights
    return scale * torch.einsum("bijh,bjhv->bihv", scores, v)


# --------------------------------------------------------------------------- cases


def _window_case(group, layout, window, seed):
    size = dist.get_world_size(group)
    length = 2 * size * 3  # zigzag chunk 3, contiguous chunk 6
    full = random_inputs(seed, {"q": (BATCH, length, HEADS, HEAD_DIM), "k": (BATCH, length, KV_HEADS, HEAD_DIM),
                                "v": (BATCH, length, KV_HEADS, HEAD_DIM), "do": (BATCH, length, HEADS, HEAD_DIM)})
    scale = 0.6
    leaves = {name: full[name].clone().requires_grad_() for name in ("q", "k", "v")}
    expected = dense_window_attention(leaves["q"], leaves["k"], leaves["v"], window, scale)
    expected.backward(full["do"])
    local = {name: shard(full[name], group, layout=layout).requires_grad_() for name in ("q", "k", "v")}
    output = window_attention(local["q"], local["k"], local["v"], group, window=window, layout=layout, scale=scale)
    output.backward(shard(full["do"], group, layout=layout))
    actual = {"output": output, **{"grad_" + name: local[name].grad for name in local}}
    wanted = {"output": expected.detach(), **{"grad_" + name: leaf.grad for name, leaf in leaves.items()}}
    return check_tensors(actual, {name: shard(t, group, layout=layout) for name, t in wanted.items()}, TOLERANCE)


def _decay(kind, shape, seed):
    if kind == "none":
        return None
    if kind == "constant":
        return torch.tensor([-0.1, -0.6, -0.02, -1.0], dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed + 100)
    return torch.nn.functional.logsigmoid(torch.randn(*shape, generator=generator, dtype=torch.float64))


def _decay_gradients(g, reference_grad, group, layout):
    """(actual, expected) log-decay gradients; a replicated decay's per-rank contributions are summed."""
    if g is None:
        return {}, {}
    if g.dim() == 1:  # replicated: each rank holds its contribution
        total = g.grad.clone()
        dist.all_reduce(total, group=group)
        return {"grad_log_decay": total}, {"grad_log_decay": reference_grad}
    return {"grad_log_decay": g.grad}, {"grad_log_decay": shard(reference_grad, group, layout=layout)}


def _delay_case(group, op, layout, delay, decay_kind, seed):
    length = 2 * dist.get_world_size(group) * 3
    full = random_inputs(seed, {"q": (BATCH, length, HEADS, HEAD_DIM), "k": (BATCH, length, HEADS, HEAD_DIM),
                                "v": (BATCH, length, HEADS, 3), "do": (BATCH, length, HEADS, 3)})
    full["g"] = _decay(decay_kind, (BATCH, length, HEADS), seed)
    scale = 0.8
    leaves = {name: full[name].clone().requires_grad_() for name in ("q", "k", "v")}
    g_leaf = None if full["g"] is None else full["g"].clone().requires_grad_()
    expected = dense_delayed_linear_attention(leaves["q"], leaves["k"], leaves["v"], g_leaf, scale, delay)
    expected.backward(full["do"])
    local = {name: shard(full[name], group, layout=layout).requires_grad_() for name in ("q", "k", "v")}
    g = full["g"]
    if g is not None:
        g = (g.clone() if g.dim() == 1 else shard(g, group, layout=layout)).requires_grad_()
    if delay == 0:  # delayed_lasp itself, at its trivial end
        output = delayed_lasp(local["q"], local["k"], local["v"], group, delay=0, lasp=op, layout=layout,
                              log_decay=g, scale=scale)
    else:  # the public contract: lasp2 / lasp1(..., delay=)
        output = op(local["q"], local["k"], local["v"], group, layout=layout, log_decay=g, scale=scale, delay=delay)
    output.backward(shard(full["do"], group, layout=layout))
    actual = {"output": output, **{"grad_" + name: local[name].grad for name in local}}
    wanted = {"output": expected.detach(), **{"grad_" + name: leaf.grad for name, leaf in leaves.items()}}
    wanted = {name: shard(t, group, layout=layout) for name, t in wanted.items()}
    decay_actual, decay_wanted = _decay_gradients(g, None if g_leaf is None else g_leaf.grad, group, layout)
    return check_tensors({**actual, **decay_actual}, {**wanted, **decay_wanted}, TOLERANCE)


def _branches_case(group, layout, window, seed):
    """One exchange for both branches equals the two dense formulas (GQA repeat on the residual branch)."""
    size = dist.get_world_size(group)
    length = 2 * size * 3
    full = random_inputs(seed, {"lq": (BATCH, length, HEADS, HEAD_DIM), "lk": (BATCH, length, KV_HEADS, HEAD_DIM),
                                "rq": (BATCH, length, HEADS, 2 * HEAD_DIM),
                                "rk": (BATCH, length, KV_HEADS, 2 * HEAD_DIM),
                                "v": (BATCH, length, KV_HEADS, HEAD_DIM), "dl": (BATCH, length, HEADS, HEAD_DIM),
                                "dr": (BATCH, length, HEADS, HEAD_DIM)})
    full["g"] = _decay("token", (BATCH, length, HEADS), seed)
    names = ("lq", "lk", "rq", "rk", "v", "g")
    leaves = {name: full[name].clone().requires_grad_() for name in names}
    groups = HEADS // KV_HEADS
    local_expected = dense_window_attention(leaves["lq"], leaves["lk"], leaves["v"], window, 0.5)
    residual_expected = dense_delayed_linear_attention(
        leaves["rq"], leaves["rk"].repeat_interleave(groups, dim=2), leaves["v"].repeat_interleave(groups, dim=2),
        leaves["g"], 1.0, window)
    (local_expected * full["dl"] + residual_expected * full["dr"]).sum().backward()
    local = {name: shard(full[name], group, layout=layout).requires_grad_() for name in names}
    with record_comm() as stats:
        local_out, residual_out = rattention_branches(
            local["lq"], local["lk"], local["rq"], local["rk"], local["v"], group, window=window, layout=layout,
            log_decay=local["g"], local_scale=0.5)
    (local_out * shard(full["dl"], group, layout=layout) + residual_out * shard(full["dr"], group, layout=layout)
     ).sum().backward()
    actual = {"local": local_out, "residual": residual_out, **{"grad_" + name: local[name].grad for name in names}}
    wanted = {"local": local_expected.detach(), "residual": residual_expected.detach(),
              **{"grad_" + name: leaves[name].grad for name in names}}
    failure = check_tensors(actual, {name: shard(t, group, layout=layout) for name, t in wanted.items()}, TOLERANCE)
    if stats.calls.get("send_recv", 0) > size:  # one message per peer for k, k, v and g together
        failure = f"{failure or ''} send_recv calls {stats.calls} > one per peer".strip()
    return failure


def _documents_case(group, layout, window, seed):
    """Packed documents (one-token documents, a long one across chunks and ranks): window_attention,
    lasp2(delay=, cu_seqlens=) and rattention_branches against the dense formulas with a document mask."""
    length = 2 * dist.get_world_size(group) * 3
    # row-relative document starts: one-token documents at both ends, a long one across chunks and ranks
    cuts = [0, 1, 4, length - 1]
    cu_seqlens = torch.tensor([row * length + cut for row in range(BATCH) for cut in cuts] + [BATCH * length])
    documents = document_ids(cu_seqlens, BATCH, length)
    full = random_inputs(seed, {"q": (BATCH, length, HEADS, HEAD_DIM), "k": (BATCH, length, KV_HEADS, HEAD_DIM),
                                "v": (BATCH, length, KV_HEADS, HEAD_DIM), "do": (BATCH, length, HEADS, HEAD_DIM),
                                "rq": (BATCH, length, HEADS, 2 * HEAD_DIM),
                                "rk": (BATCH, length, KV_HEADS, 2 * HEAD_DIM), "dr": (BATCH, length, HEADS, HEAD_DIM)})
    full["g"] = _decay("token", (BATCH, length, HEADS), seed)
    names = ("q", "k", "v", "rq", "rk", "g")
    leaves = {name: full[name].clone().requires_grad_() for name in names}
    groups = HEADS // KV_HEADS
    window_expected = dense_window_attention(leaves["q"], leaves["k"], leaves["v"], window, 0.5, documents)
    residual_expected = dense_delayed_linear_attention(
        leaves["rq"], leaves["rk"].repeat_interleave(groups, dim=2), leaves["v"].repeat_interleave(groups, dim=2),
        leaves["g"], 1.0, window, documents)
    (window_expected * full["do"] + residual_expected * full["dr"]).sum().backward()

    local = {name: shard(full[name], group, layout=layout).requires_grad_() for name in names}
    window_out, residual_out = rattention_branches(
        local["q"], local["k"], local["rq"], local["rk"], local["v"], group, window=window, layout=layout,
        log_decay=local["g"], local_scale=0.5, cu_seqlens=cu_seqlens)
    (window_out * shard(full["do"], group, layout=layout) + residual_out * shard(full["dr"], group, layout=layout)
     ).sum().backward()
    failures = []
    for name in names:
        # relative to the whole gradient: with short documents a rank's share may be exactly zero
        expected, scale = shard(leaves[name].grad, group, layout=layout), leaves[name].grad.norm()
        if not scale > 0:
            failures.append(f"the grad_{name} reference is zero; the case tests nothing")
            continue
        error = float((local[name].grad - expected).norm() / scale)
        if not error <= TOLERANCE:
            failures.append(f"branches grad_{name}: error {error:.3e} relative to the full gradient")

    # the public ops one by one (outputs; their gradients share the code checked above)
    local = {name: shard(full[name], group, layout=layout) for name in names}
    output = window_attention(local["q"], local["k"], local["v"], group, window=window, layout=layout, scale=0.5,
                              cu_seqlens=cu_seqlens)
    delayed = lasp2(local["rq"], local["rk"].repeat_interleave(groups, dim=2), local["v"].repeat_interleave(groups, dim=2),
                    group, layout=layout, log_decay=local["g"], scale=1.0, delay=window, cu_seqlens=cu_seqlens)
    actual = {"branches local": window_out, "branches residual": residual_out, "window_attention": output,
              "lasp2(delay)": delayed}
    wanted = {"branches local": window_expected, "branches residual": residual_expected,
              "window_attention": window_expected, "lasp2(delay)": residual_expected}
    failures.append(check_tensors(actual, {name: shard(t.detach(), group, layout=layout) for name, t in wanted.items()},
                                  TOLERANCE))
    return "; ".join(failure for failure in failures if failure) or None


def _windows(size, layout):
    """Smaller than, equal to and larger than one chunk of the layout, several chunks, beyond T."""
    chunk = 3 if layout == "zigzag" else 6
    return sorted({1, chunk - 1, chunk, chunk + 1, 2 * chunk + 1, 2 * size * 3 + 2})


def _delay_cases(chunk):
    """lasp2 on every decay kind below / at / above a chunk; lasp1 where its ring crosses several chunks."""
    cases = [(lasp2, delay, "token") for delay in (chunk - 1, chunk, 2 * chunk + 1)]
    cases += [(lasp2, chunk + 1, "none"), (lasp2, chunk + 1, "constant")]
    return cases + [(lasp1, chunk, "constant"), (lasp1, 2 * chunk + 1, "token")]


def _distributed_cases() -> dict[str, SpawnedCase]:
    """window_attention, lasp2/lasp1(delay=) and rattention_branches on 2, 3 and 4 ranks; halo bytes on 2."""
    cases = {"halo-bytes-P2": SpawnedCase(2, _check_halo_bytes)}
    for size, layout in itertools.product((2, 3, 4), ("zigzag", "contiguous")):
        windows = _windows(size, layout)
        for seed, window in enumerate(windows):
            cases[f"window-P{size}-{layout}-w{window}"] = SpawnedCase(
                size, _window_case, dict(layout=layout, window=window, seed=seed))
        for seed, window in enumerate(windows[1::2]):  # both branches with one exchange: every other window
            cases[f"branches-P{size}-{layout}-w{window}"] = SpawnedCase(
                size, _branches_case, dict(layout=layout, window=window, seed=seed))
        chunk = 3 if layout == "zigzag" else 6
        for seed, (op, delay, decay_kind) in enumerate(_delay_cases(chunk)):
            cases[f"{op.__name__}-delay{delay}-P{size}-{layout}-{decay_kind}"] = SpawnedCase(
                size, _delay_case, dict(op=op, layout=layout, delay=delay, decay_kind=decay_kind, seed=seed))
        cases[f"delayed_lasp-delay0-P{size}-{layout}-token"] = SpawnedCase(
            size, _delay_case, dict(op=lasp2, layout=layout, delay=0, decay_kind="token", seed=7))
        for seed, window in enumerate((2, 4)):  # below a zigzag chunk (3), above it, below a contiguous one (6)
            cases[f"documents-P{size}-{layout}-w{window}"] = SpawnedCase(
                size, _documents_case, dict(layout=layout, window=window, seed=20 + seed))
    return cases


# --------------------------------------------------------------------------- the halo itself


@pytest.mark.parametrize("window", [1, 2, 3, 5, 13], ids=lambda window: f"w{window}")
@pytest.mark.parametrize("chunk", [1, 3], ids=lambda chunk: f"chunk{chunk}")
@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4], ids=lambda size: f"P{size}")
def test_halo_plan_covers_every_window_token_once(world_size: int, layout: str, chunk: int, window: int) -> None:
    """Each chunk's halo is exactly the min(w, start) tokens before it, taken from their owners."""
    plan = make_halo_plan(world_size, layout, chunk, window)
    slots = plan.slots
    owners = {}
    for piece in plan.pieces:
        chunk_id = [c for c, (r, s) in enumerate(_owners(world_size, layout))
                    if (r, s) == (piece.target_rank, piece.target_slot)][0]
        source_id = _owners(world_size, layout).index((piece.source_rank, piece.source_slot))
        for offset in range(piece.length):
            position = source_id * chunk + piece.source_start + offset
            owners.setdefault(chunk_id, []).append((piece.target_start + offset, position))
    for chunk_id in range(slots * world_size):
        halo = min(window, chunk_id * chunk)
        expected = [(t, chunk_id * chunk - halo + t) for t in range(halo)]
        assert sorted(owners.get(chunk_id, [])) == expected, (world_size, layout, chunk, window, chunk_id)
    # the planner's count: the busiest rank's received tokens, bounded by one window per chunk it holds
    forward, backward = halo_tokens_received(world_size, layout, chunk, window)
    received = [sum(p.length for p in plan.pieces if p.target_rank == r and p.source_rank != r)
                for r in range(world_size)]
    assert forward == max(received) <= slots * window
    assert backward <= slots * window * world_size and (backward == 0) == (forward == 0)


def _owners(world_size, layout):
    from spindle.parallel.cp.layout import chunk_order

    return chunk_order(world_size, layout)


def _halo_bytes(group, length, window, layout):
    x = torch.randn(BATCH, length // dist.get_world_size(group), KV_HEADS, 2 * HEAD_DIM, requires_grad=True)
    with record_comm() as forward:
        halos = halo_exchange(x, group, window=window, layout=layout)
    with record_comm() as backward:
        torch.cat([h.reshape(-1) for h in halos]).sum().backward()
    return forward.bytes.get("send_recv", 0), backward.bytes.get("send_recv", 0)


def _check_halo_bytes(group):
    """Exact halo bytes on 2 ranks, the same for T = 32 and T = 256 (window 5 below the chunk)."""
    rank, window, element = dist.get_rank(group), 5, BATCH * KV_HEADS * 2 * HEAD_DIM * 4
    window_bytes = window * element
    # contiguous: rank 1 receives w tokens from rank 0 and sends their gradient back. zigzag: chunk 1
    # (rank 1) takes w from chunk 0 (rank 0), chunk 3 (rank 0) takes w from chunk 2 (rank 1); chunk 2
    # takes its halo from chunk 1 on its own rank
    expected = {"contiguous": [(0, window_bytes), (window_bytes, 0)][rank],
                "zigzag": (window_bytes, window_bytes)}
    failures = []
    for layout in ("zigzag", "contiguous"):
        for length in (32, 256):
            measured = _halo_bytes(group, length, window, layout)
            if measured != expected[layout]:
                failures.append(f"{layout} T={length}: (forward, backward) bytes {measured} != {expected[layout]}")
    # the op itself: window_attention's point-to-point bytes do not grow with T either
    traffic = []
    for length in (32, 256):
        q, k, v = (torch.randn(BATCH, length // 2, heads, HEAD_DIM, requires_grad=True)
                   for heads in (HEADS, KV_HEADS, KV_HEADS))
        with record_comm() as stats:
            window_attention(q, k, v, group, window=window).sum().backward()
        traffic.append(stats.bytes["send_recv"])
    if not traffic[0] == traffic[1] == 2 * window_bytes:
        failures.append(f"window_attention bytes at T = 32, 256: {traffic} != {2 * window_bytes}")
    return "; ".join(failures) or None


# --------------------------------------------------------------------------- the distributed cases


DISTRIBUTED_CASES = register_cases(__name__, _distributed_cases())


@pytest.mark.parametrize("case", list(DISTRIBUTED_CASES))
def test_window_and_delayed_lasp_match_dense_formulas(case: str, case_results: dict[str, str | None]) -> None:
    """On a CP group against the dense float64 formulas: outputs and every input gradient, by name (all CP
    cases of the suite share one spawn, with NaN-poisoned allocations)."""
    assert_case_passed(case_results, case)
