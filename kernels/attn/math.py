"""Memory-bounded softmax attention in plain PyTorch: forward returning (o, lse) and a backward that
uses a given (final) o and lse.

Queries are processed in blocks, and each block only against the band of keys it can see (causal: up to
its last row; window: from its first row minus the window; documents: from the start of its first row's
document), so a window or short documents cost O(T · (block + w)) and never a T x T mask. At most
`_MAX_SCORES_PER_BLOCK` scores (over all batches and heads) live at once.

The backward recomputes probabilities from lse: P = exp(scale·QKᵀ − L), D = rowsum(dO ⊙ O) − dL,
dS = P ⊙ (dO Vᵀ − D). Because it takes o and lse as arguments, ring and all-gather attention can call
it per key block with the final merged o and lse, which makes the blockwise backward exact
(docs/algorithms.md). Works on any device; arithmetic in fp32 (float64 for float64 inputs).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .masks import MaskSpec, key_band, visible

# scores (over all batches and heads) alive at once: bounds memory at B·H·Tq·Tk -> B·H·block·band
_MAX_SCORES_PER_BLOCK = 1 << 25
# smaller query blocks skip more of the masked causal triangle and keep a block's scores in cache
# (2x faster fwd+bwd than whole-sequence blocks at T = 4096 on a CPU)
_MAX_ROWS_PER_BLOCK = 256


def _query_block(spec: MaskSpec, query_length: int, key_length: int, batch_heads: int) -> int:
    """Rows per block: at most _MAX_ROWS_PER_BLOCK, and rows x band scores within the budget (a window
    bounds the band by rows + w - 1)."""
    budget = max(1, _MAX_SCORES_PER_BLOCK // max(1, batch_heads))
    width = key_length if spec.window is None else min(key_length, _MAX_ROWS_PER_BLOCK + spec.window)
    return max(16, min(query_length, _MAX_ROWS_PER_BLOCK, budget // max(1, width)))


def block_plan(spec: MaskSpec, query_length: int, key_length: int, batch_heads: int) -> Iterator[tuple[slice, slice]]:
    """(query rows, key band) pairs covering every visible score; rows with an empty band are skipped."""
    block = _query_block(spec, query_length, key_length, batch_heads)
    for start in range(0, query_length, block):
        rows = slice(start, min(query_length, start + block))
        yield rows, key_band(spec, rows, query_length, key_length)


def _grouped(q: torch.Tensor, kv_heads: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, T, H, D] -> [B, H_kv, G, T, D] where query head h = kv_head · G + g."""
    batch, length, heads, dim = q.shape
    return q.to(dtype).view(batch, length, kv_heads, heads // kv_heads, dim).permute(0, 2, 3, 1, 4)


def _ungrouped(x: torch.Tensor) -> torch.Tensor:
    """[B, H_kv, G, T, D] -> [B, T, H, D]."""
    batch, kv_heads, groups, length, dim = x.shape
    return x.permute(0, 3, 1, 2, 4).reshape(batch, length, kv_heads * groups, dim)


def _block_scores(spec, q_block, keys, rows, band, query_length, key_length):
    """Scores [B, H_kv, G, rows, band] (q already scaled), with invisible entries set to -inf."""
    scores = q_block @ keys[:, :, band].transpose(-1, -2)[:, :, None]
    mask = visible(spec, rows, band, query_length, key_length, q_block.device)
    if mask is not None:
        scores.masked_fill_(~mask[:, None, None], float("-inf"))
    return scores


def attention_forward_math(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float, spec: MaskSpec | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [B, Tq, H, D]; k, v: [B, Tk, H_kv, D] -> o [B, Tq, H, D] (dtype of q), lse [B, H, Tq] (fp32).

    `spec` (window, documents) overrides `causal` when given.
    """
    spec = spec if spec is not None else MaskSpec(causal)
    compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    batch, query_length, heads, _ = q.shape
    key_length, kv_heads = k.shape[1], k.shape[2]
    qg = _grouped(q, kv_heads, compute_dtype) * scale  # [B, H_kv, G, Tq, D]
    keys = k.to(compute_dtype).transpose(1, 2)  # [B, H_kv, Tk, D]
    values = v.to(compute_dtype).transpose(1, 2)  # [B, H_kv, Tk, Dv]
    output = qg.new_zeros(*qg.shape[:-1], v.shape[-1])
    lse = qg.new_full(qg.shape[:-1], float("-inf"))
    for rows, band in block_plan(spec, query_length, key_length, batch * heads):
        if band.start == band.stop:
            continue  # these rows see no key: o = 0, lse = -inf
        scores = _block_scores(spec, qg[..., rows, :], keys, rows, band, query_length, key_length)
        row_max = scores.amax(-1, keepdim=True)
        row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)  # rows that see no key
        weights = scores.sub_(row_max).exp_()  # in place: one exp pass over the block
        denominator = weights.sum(-1, keepdim=True)
        lse[..., rows] = (denominator.log() + row_max)[..., 0]  # log 0 = -inf on rows that see no key
        output[..., rows, :] = (weights @ values[:, :, None, band]) / denominator.clamp_min(
            torch.finfo(compute_dtype).tiny
        )
    # lse [B, H_kv, G, Tq] -> [B, H, Tq]
    return _ungrouped(output).to(q.dtype), lse.reshape(batch, heads, query_length)


def attention_backward_math(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    do: torch.Tensor,
    causal: bool,
    scale: float,
    dlse: torch.Tensor | None = None,
    spec: MaskSpec | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of q, k, v given the (final) o [B, Tq, H, D] and lse [B, H, Tq]; dlse is optional.

    Returns fp32 tensors (float64 for float64 inputs) so that callers summing blocks accumulate in fp32.
    """
    spec = spec if spec is not None else MaskSpec(causal)
    compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    batch, query_length, heads, _ = q.shape
    key_length, kv_heads = k.shape[1], k.shape[2]
    groups = heads // kv_heads
    qg = _grouped(q, kv_heads, compute_dtype)
    dog = _grouped(do, kv_heads, compute_dtype)
    og = _grouped(o, kv_heads, compute_dtype)
    keys = k.to(compute_dtype).transpose(1, 2)
    values = v.to(compute_dtype).transpose(1, 2)
    lse_g = lse.to(compute_dtype).reshape(batch, kv_heads, groups, query_length)
    finite_lse = torch.where(torch.isinf(lse_g), torch.zeros_like(lse_g), lse_g)
    delta = (dog * og).sum(-1)  # D = rowsum(dO ⊙ O), [B, H_kv, G, Tq]
    if dlse is not None:
        delta = delta - dlse.to(compute_dtype).reshape(batch, kv_heads, groups, query_length)
    dq = torch.zeros_like(qg)
    dk = torch.zeros_like(keys)
    dv = torch.zeros_like(values)
    scaled_q = qg * scale
    for rows, band in block_plan(spec, query_length, key_length, batch * heads):
        if band.start == band.stop:
            continue
        scores = _block_scores(spec, scaled_q[..., rows, :], keys, rows, band, query_length, key_length)
        # masked entries are -inf and rows that see no key have lse = -inf: both give probability 0
        probabilities = scores.sub_(finite_lse[..., rows, None]).exp_()
        probabilities.masked_fill_(torch.isinf(lse_g[..., rows, None]), 0.0)
        d_scores = dog[..., rows, :] @ values[:, :, band].transpose(-1, -2)[:, :, None]  # dP, then dS in place
        d_scores.sub_(delta[..., rows, None]).mul_(probabilities).mul_(scale)
        dq[..., rows, :] = d_scores @ keys[:, :, None, band]
        dk[:, :, band] += (d_scores.transpose(-1, -2) @ qg[..., rows, :]).sum(2)
        dv[:, :, band] += (probabilities.transpose(-1, -2) @ dog[..., rows, :]).sum(2)
    return _ungrouped(dq), dk.transpose(1, 2), dv.transpose(1, 2)
