"""Sliding-window softmax attention and delayed linear attention over a context-parallel group.

Both need, for each local chunk, only the `window` tokens before it (docs/rattention.md):

- window attention: query i sees keys j with i − w < j <= i. A chunk's queries see its own keys and
  the w keys before it, so after one halo exchange (parallel/cp/halo.py) each chunk runs ONE local
  windowed attention of its queries over [halo ; chunk] keys, bottom-right aligned. No merge, no ring.
- delayed linear attention: o_i = scale · q_i S_{i−w}. That is the undelayed op on k, v (and a
  per-token log-decay, padded with 0) shifted right by w along the global sequence; a shifted chunk of
  m tokens is the first m positions of [zeros(w − h) ; halo (h tokens) ; chunk], i.e. it needs the same
  halo. Then LASP-2 / LASP-1 runs unchanged on the shifted tensors.
- `rattention_branches` does both with ONE exchange of the packed keys/values (the RAttention mixer).

Gradients flow back through the halo exchange to the ranks owning those tokens. Bytes per rank and
direction: at most slots·w·B·(features) elements, independent of the sequence length T.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from spindle.kernels import attention

from .comm import check_ranks_agree
from .halo import halo_exchange_many
from .lasp2 import lasp2
from .layout import chunks_per_rank, layout_positions, local_chunks
from .softmax import validate_attention_inputs


def check_window(window: object, caller: str, name: str = "window", minimum: int = 1) -> int:
    """A window (or delay) in tokens: an int >= minimum, not a bool."""
    if isinstance(window, bool) or not isinstance(window, int) or window < minimum:
        raise ValueError(f"{caller}: {name} must be an integer >= {minimum} (tokens), got {window!r}")
    return window


def _split_slots(x: torch.Tensor, slots: int) -> list[torch.Tensor]:
    return list(x.chunk(slots, dim=1)) if slots > 1 else [x]


def _block_offsets(cu_seqlens: torch.Tensor, batch: int, total: int, start: int, length: int) -> torch.Tensor:
    """Document offsets of the key block at global positions [start, start + length) of every row.

    cu_seqlens indexes the B·T tokens of the global batch; the block's own offsets index its B·length
    keys. Every global offset is clamped into each row's block (empty documents are harmless), so the
    result keeps a fixed size and stays on the device.
    """
    rows = torch.arange(batch, device=cu_seqlens.device, dtype=torch.int64)[:, None]
    local = (cu_seqlens.to(torch.int64)[None, :] - rows * total - start).clamp(0, length) + rows * length
    return local.reshape(-1)


def _local_window(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_halos: list[torch.Tensor],
                  value_halos: list[torch.Tensor], window: int, scale: float | None, slots: int,
                  documents: tuple[torch.Tensor, list[int], int] | None = None) -> torch.Tensor:
    """Per slot: the chunk's queries over [halo ; chunk] keys, bottom-right aligned.

    documents: (global cu_seqlens, the slots' chunk ids, global length T) to keep documents apart.
    """
    outputs = []
    for slot, (q_chunk, k_chunk, v_chunk, key_halo, value_halo) in enumerate(zip(
            _split_slots(q, slots), _split_slots(k, slots), _split_slots(v, slots), key_halos, value_halos)):
        keys = torch.cat([key_halo, k_chunk], dim=1)
        values = torch.cat([value_halo, v_chunk], dim=1)
        if documents is None:
            outputs.append(attention(q_chunk, keys, values, causal=True, window=window, scale=scale))
            continue
        cu_seqlens, chunk_ids, total = documents
        halo = key_halo.shape[1]
        offsets = _block_offsets(cu_seqlens, q.shape[0], total, chunk_ids[slot] * q_chunk.shape[1] - halo,
                                 keys.shape[1])
        # the document kernels want as many queries as keys: placeholder queries for the halo rows,
        # whose outputs are dropped (they reach no gradient)
        queries = torch.cat([q_chunk.new_zeros(q_chunk.shape[0], halo, *q_chunk.shape[2:]), q_chunk], dim=1)
        output = attention(queries, keys, values, causal=True, window=window, scale=scale, cu_seqlens=offsets)
        outputs.append(output[:, halo:])
    return torch.cat(outputs, dim=1)


def _same_document_as_delayed(cu_seqlens: torch.Tensor, group: dist.ProcessGroup, layout: str, batch: int,
                              length: int, delay: int) -> torch.Tensor:
    """[B, n] bool: local token p and token p − delay exist and lie in one document (global cu_seqlens)."""
    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    total = length * world_size
    positions = layout_positions(total, rank, world_size, layout, cu_seqlens.device)  # [n]
    flat = torch.arange(batch, device=cu_seqlens.device)[:, None] * total + positions[None, :]  # [B, n]
    offsets = cu_seqlens.to(torch.int64)
    document = torch.searchsorted(offsets, flat, right=True)
    source = torch.searchsorted(offsets, flat - delay, right=True)
    return (positions[None, :] >= delay) & (document == source)


def _shift_right(x: torch.Tensor, halos: list[torch.Tensor], delay: int, slots: int) -> torch.Tensor:
    """x shifted right by `delay` along the global sequence (zeros before the start), sharded like x.

    Per slot of m tokens: the first m of [zeros(delay − h) ; halo (h) ; chunk].
    """
    shifted = []
    for chunk, halo in zip(_split_slots(x, slots), halos):
        missing = delay - halo.shape[1]
        extended = torch.cat([halo, chunk], dim=1)
        if missing:
            extended = F.pad(extended, (0, 0) * (x.dim() - 2) + (missing, 0))
        shifted.append(extended[:, : chunk.shape[1]])
    return torch.cat(shifted, dim=1)


def window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: dist.ProcessGroup,
    *,
    window: int,
    layout: str = "zigzag",
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal sliding-window softmax attention over a CP group: one halo exchange, one local kernel per chunk.

    Args:
        q: this rank's shard [B, n, H, D]; k, v: [B, n, H_kv, D] with H % H_kv == 0 (GQA).
        group: the CP process group; rank and world size come from it.
        window: w >= 1; query i sees keys j with i − w < j <= i (global positions). May exceed a
            rank's chunk: the halo then spans several preceding chunks.
        layout: "zigzag" (default) or "contiguous".
        scale: softmax scale, default D ** -0.5.
        cu_seqlens: packed documents: int [N + 1] offsets into the B·T tokens of the GLOBAL (unsharded)
            batch, the same on every rank; the window then stays inside each document.

    Returns:
        o [B, n, H, D], equal to spindle.kernels.attention(q, k, v, causal=True, window=window) on
        the unsharded tensors, sharded the same way. Differentiable in q, k, v.
    """
    setup = validate_attention_inputs("window_attention", group, {
        "q": q, "k": k, "v": v, "layout": layout, "causal": True, "scale": scale, "window": window,
        "cu_seqlens": cu_seqlens})
    check_window(window, "window_attention")
    key_halos, value_halos = halo_exchange_many([k, v], group, window=window, layout=layout)
    documents = _documents(cu_seqlens, setup.rank, setup.world_size, layout, q.shape[1])
    return _local_window(q, k, v, key_halos, value_halos, window, setup.scale, setup.slots, documents)


def _documents(cu_seqlens: torch.Tensor | None, rank: int, world_size: int, layout: str, length: int):
    if cu_seqlens is None:
        return None
    return cu_seqlens, local_chunks(rank, world_size, layout), length * world_size


def _shift_halo_inputs(tensors: list[torch.Tensor], group: dist.ProcessGroup, delay: int,
                       layout: str) -> list[torch.Tensor]:
    """Each tensor shifted right by `delay` along the global sequence (zeros in front), one exchange per dtype."""
    slots = chunks_per_rank(layout)
    halos = halo_exchange_many(tensors, group, window=delay, layout=layout)
    return [_shift_right(tensor, halo, delay, slots) for tensor, halo in zip(tensors, halos)]


def _token_decay(log_decay: torch.Tensor | None) -> bool:
    """A per-token decay [B, n, H] moves with the tokens; a constant [H] one needs no shift."""
    return isinstance(log_decay, torch.Tensor) and log_decay.dim() == 3


def delayed_lasp(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: dist.ProcessGroup,
    *,
    delay: int,
    lasp: Callable[..., torch.Tensor] = lasp2,
    layout: str = "zigzag",
    log_decay: torch.Tensor | None = None,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Linear attention delayed by `delay` tokens over a CP group: o_i = scale · q_i S_{i−delay}, 0 for i < delay.

    Shifts k, v and a per-token log_decay (padded with 0, i.e. no decay before the start; a constant
    [H] decay needs no shift) right by `delay` along the global sequence with one halo exchange, then
    runs `lasp` (lasp2 or lasp1) unchanged. Arguments and result as `lasp2`; equal to
    spindle.kernels.linear_attention(..., delay=delay) on the unsharded tensors. With cu_seqlens
    (packed documents, global offsets as for lasp2) a shifted token from another document is zeroed,
    so the delay counts inside each document.
    """
    caller = getattr(lasp, "__name__", "delayed_lasp")
    check_ranks_agree(group, caller, {"q": q, "k": k, "v": v, "log_decay": log_decay, "layout": layout,
                                      "delay": delay, "cu_seqlens": cu_seqlens})
    check_window(delay, caller, "delay", minimum=0)
    documents = {} if cu_seqlens is None else {"cu_seqlens": cu_seqlens}
    if delay > 0:
        moving = [k, v] + ([log_decay] if _token_decay(log_decay) else [])
        shifted = _shift_halo_inputs(moving, group, delay, layout)
        if cu_seqlens is not None:
            keep = _same_document_as_delayed(cu_seqlens, group, layout, q.shape[0], q.shape[1], delay)
            shifted = [_keep_tokens(tensor, keep) for tensor in shifted]
        k, v = shifted[0], shifted[1]
        log_decay = shifted[2] if _token_decay(log_decay) else log_decay
    return lasp(q, k, v, group, layout=layout, log_decay=log_decay, scale=scale, **documents)


def _keep_tokens(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """x [B, n, ...] with the tokens where keep [B, n] is False set to 0."""
    return x * keep.view(*keep.shape, *([1] * (x.dim() - 2))).to(x.dtype)


def rattention_branches(
    local_q: torch.Tensor,
    local_k: torch.Tensor,
    residual_q: torch.Tensor,
    residual_k: torch.Tensor,
    v: torch.Tensor,
    group: dist.ProcessGroup,
    *,
    window: int,
    layout: str = "zigzag",
    lasp: Callable[..., torch.Tensor] = lasp2,
    log_decay: torch.Tensor | None = None,
    local_scale: float | None = None,
    residual_scale: float = 1.0,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both branches of an RAttention mixer over a CP group with ONE halo exchange (docs/rattention.md).

    Args:
        local_q [B, n, H, D], local_k [B, n, H_kv, D]: RoPE'd queries/keys of the window branch.
        residual_q [B, n, H, Dr], residual_k [B, n, H_kv, Dr]: feature-mapped queries/keys of the
            linear branch; k (and v) heads are repeated to H for it (GQA as in the window branch).
        v [B, n, H_kv, D]: values, shared by both branches.
        window: w >= 1. log_decay: None, [H] or this rank's [B, n, H] shard (residual branch).
        cu_seqlens: packed documents (global offsets, as for window_attention): both branches stay
            inside each document.

    Returns:
        (window attention of (local_q, local_k, v) with window w,
         linear attention of (residual_q, residual_k, v) delayed by w with scale residual_scale),
        each [B, n, H, D] and sharded like the inputs.
    """
    check_ranks_agree(group, "rattention_branches", {
        "local_q": local_q, "local_k": local_k, "residual_q": residual_q, "residual_k": residual_k, "v": v,
        "log_decay": log_decay, "layout": layout, "window": window, "cu_seqlens": cu_seqlens})
    check_window(window, "rattention_branches")
    slots = chunks_per_rank(layout)
    moving = [local_k, residual_k, v] + ([log_decay] if _token_decay(log_decay) else [])
    halos = halo_exchange_many(moving, group, window=window, layout=layout)
    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    documents = _documents(cu_seqlens, rank, world_size, layout, v.shape[1])
    local = _local_window(local_q, local_k, v, halos[0], halos[2], window, local_scale, slots, documents)
    shifted = [_shift_right(tensor, halo, window, slots) for tensor, halo in zip(moving[1:], halos[1:])]
    if cu_seqlens is not None:
        keep = _same_document_as_delayed(cu_seqlens, group, layout, v.shape[0], v.shape[1], window)
        shifted = [_keep_tokens(tensor, keep) for tensor in shifted]
    groups = residual_q.shape[2] // residual_k.shape[2]
    shifted_k, shifted_v = (x.repeat_interleave(groups, dim=2) for x in shifted[:2])
    shifted_decay = shifted[2] if _token_decay(log_decay) else log_decay
    extra = {} if cu_seqlens is None else {"cu_seqlens": cu_seqlens}
    residual = lasp(residual_q, shifted_k, shifted_v, group, layout=layout, log_decay=shifted_decay,
                    scale=residual_scale, **extra)
    return local, residual
