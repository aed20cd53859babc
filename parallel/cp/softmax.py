"""Pieces the softmax-attention schemes share: argument validation, K/V packing, local chunk geometry."""

from __future__ import annotations

import dataclasses
import weakref

import torch
import torch.distributed as dist

from .comm import check_ranks_agree, group_rank_and_size
from .layout import check_layout, chunks_per_rank, local_chunks


@dataclasses.dataclass
class AttentionSetup:
    """Validated arguments of a softmax CP call."""

    rank: int
    world_size: int
    layout: str
    causal: bool
    scale: float

    @property
    def slots(self) -> int:
        return chunks_per_rank(self.layout)

    def local_chunk_ids(self) -> list[int]:
        return local_chunks(self.rank, self.world_size, self.layout)


def validate_attention_inputs(
    caller: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: dist.ProcessGroup,
    layout: str,
    causal: bool,
    scale: float | None,
    extra: dict[str, object] | None = None,
) -> AttentionSetup:
    """Cross-rank agreement first (so no rank is left waiting in a collective), then local checks."""
    rank, world_size = group_rank_and_size(group, caller)
    check_layout(layout, caller)
    arguments = {"q": q, "k": k, "v": v, "layout": layout, "causal": bool(causal), "scale": scale, **(extra or {})}
    check_ranks_agree(group, caller, arguments)
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 4:
            raise ValueError(f"{caller}: {name} must be a 4-D tensor [batch, local_seq, heads, head_dim]")
    if k.shape != v.shape:
        raise ValueError(f"{caller}: k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if q.shape[0] != k.shape[0] or q.shape[1] != k.shape[1] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"{caller}: q {tuple(q.shape)} and k {tuple(k.shape)} must agree on batch, local_seq and head_dim"
        )
    if k.shape[2] == 0 or q.shape[2] % k.shape[2] != 0:
        raise ValueError(
            f"{caller}: query heads ({q.shape[2]}) must be a multiple of key/value heads ({k.shape[2]}) (GQA)"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{caller}: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if layout == "zigzag" and q.shape[1] % 2 != 0:
        raise ValueError(
            f"{caller}: local length {q.shape[1]} is odd, but layout 'zigzag' holds two equal chunks per rank; "
            f"the global length must be divisible by 2 x {world_size} ranks"
        )
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return AttentionSetup(rank, world_size, layout, bool(causal), scale)


# cu_seqlens tensor -> its values: every softmax layer of a micro-batch receives the same tensor, so
# only the first one reads it back from the device (a host sync on GPUs); entries die with the tensor.
_host_offsets: dict[int, list[int]] = {}  # by id(tensor); a finalizer drops the entry with the tensor


def document_offsets(caller: str, cu_seqlens: torch.Tensor | None, batch: int, total: int) -> list[int] | None:
    """Packed documents: the GLOBAL cu_seqlens on the host, checked (0, B·T, every row start,
    non-decreasing). Read once per cu_seqlens tensor (see _host_offsets); the backward reuses the list."""
    if cu_seqlens is None:
        return None
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.dtype not in (
            torch.int32, torch.int64):
        raise ValueError(f"{caller}: cu_seqlens must be a 1-D int32/int64 tensor of document offsets [N + 1]")
    offsets = _host_offsets.get(id(cu_seqlens))
    if offsets is None:
        offsets = _host_offsets[id(cu_seqlens)] = cu_seqlens.tolist()
        weakref.finalize(cu_seqlens, _host_offsets.pop, id(cu_seqlens), None)
    missing_rows = set(range(0, batch * total, total)) - set(offsets)
    if (len(offsets) < 2 or offsets[0] != 0 or offsets[-1] != batch * total or missing_rows
            or any(later < earlier for earlier, later in zip(offsets, offsets[1:]))):
        raise ValueError(f"{caller}: cu_seqlens {offsets[:8]}{'...' if len(offsets) > 8 else ''} must be "
                         f"non-decreasing offsets into the B·T = {batch * total} tokens of the GLOBAL batch, "
                         f"holding 0, B·T and every row start (multiples of T = {total})")
    return offsets


def row_documents(offsets: list[int], row: int, total: int) -> list[tuple[int, int]]:
    """(start, end) of the non-empty documents of batch row ``row``, in global token positions."""
    bounds = sorted({offset - row * total for offset in offsets if row * total <= offset <= (row + 1) * total})
    return [(start, end) for start, end in zip(bounds[:-1], bounds[1:])]


def pack(*tensors: torch.Tensor) -> torch.Tensor:
    """One contiguous 1-D buffer holding the tensors (one message instead of several)."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unpack(buffer: torch.Tensor, *shapes: torch.Size) -> list[torch.Tensor]:
    """Views of `buffer` with the given shapes (inverse of `pack`)."""
    views, offset = [], 0
    for shape in shapes:
        size = int(torch.Size(shape).numel())
        views.append(buffer[offset : offset + size].view(shape))
        offset += size
    return views
