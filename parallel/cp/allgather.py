"""All-gather attention (the softmax half of LASP-2H; Llama-3's context parallelism).

Forward: all-gather K and V (only the H_kv heads) over the CP group, put them in global token order,
and run ONE kernel call per local query chunk against the keys it may see: with causal masking the
prefix up to the chunk's end, bottom-right aligned, so no merge is needed. Backward: gather K/V again,
compute dK/dV for the gathered keys in fp32 and reduce-scatter them back to their owners.

Packed documents (cu_seqlens over the global batch): each local chunk is cut at document starts, and
each piece's queries run against the keys of their own document only (from the document's start to
the piece's end, bottom-right aligned), so no mask is built and no merge is needed either; the
offsets are read on the host once per call (a host sync on GPUs) and reused by the backward.

`head_groups` > 1 gathers the K/V heads in that many sequential groups, bounding the transient
memory at 2·B·T·(H_kv / head_groups)·D elements; the gather of the next group overlaps the kernels
of the current one. The bytes moved are the same for any number of groups.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from spindle.kernels import attention, attention_backward

from .comm import AllGatherComm, reduce_scatter
from .layout import gathered_to_global_index
from .merge import accumulation_dtype
from .softmax import AttentionSetup, attention_op, document_offsets, row_documents


class _HeadGroups:
    """K/V head ranges (and the matching query heads under GQA) of each gathered group."""

    def __init__(self, heads: int, kv_heads: int, groups: int) -> None:
        per_group = kv_heads // groups
        ratio = heads // kv_heads  # query head h uses kv head h // ratio
        self.kv = [slice(g * per_group, (g + 1) * per_group) for g in range(groups)]
        self.query = [slice(s.start * ratio, s.stop * ratio) for s in self.kv]


def _global_kv(gathered: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """[P, 2, B, n, h, D] (rank order) -> [2, B, T, h, D] in global token order."""
    world_size, _, batch, length = gathered.shape[:4]
    stacked = gathered.permute(1, 2, 0, 3, 4, 5).reshape(2, batch, world_size * length, *gathered.shape[4:])
    return stacked.index_select(2, index)


def _chunk_plan(setup: AttentionSetup, length: int, total: int, batch: int,
                offsets: list[int] | None) -> list[tuple[slice, slice, slice]]:
    """(batch rows, local query rows, visible keys in global order) per kernel call.

    Without documents: one call per local chunk over all rows. With documents (``offsets``, the
    global cu_seqlens): one call per (row, document piece of a local chunk), whose queries see keys
    from the document's start to the piece's end (causal) or to the document's end.
    """
    chunk = length // setup.slots
    plan = []
    for slot, chunk_id in enumerate(setup.local_chunk_ids()):
        first, last = chunk_id * chunk, (chunk_id + 1) * chunk  # the chunk's global positions
        if offsets is None:
            keys = slice(0, last if setup.causal else total)
            plan.append((slice(None), slice(slot * chunk, (slot + 1) * chunk), keys))
            continue
        for row in range(batch):
            for start, end in row_documents(offsets, row, total):
                piece_start, piece_end = max(start, first), min(end, last)
                if piece_start < piece_end:
                    rows = slice(slot * chunk + piece_start - first, slot * chunk + piece_end - first)
                    plan.append((slice(row, row + 1), rows, slice(start, piece_end if setup.causal else end)))
    return plan


class _KVGatherer:
    """Gathers the K/V of each head group in turn, prefetching the next group while one is used."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, groups: _HeadGroups, group, index) -> None:
        self.k, self.v, self.groups, self.index = k, v, groups, index
        self.comm = AllGatherComm(group)

    def __iter__(self):
        self.comm.start(torch.stack([self.k[:, :, self.groups.kv[0]], self.v[:, :, self.groups.kv[0]]]))
        for number in range(len(self.groups.kv)):
            gathered = self.comm.wait()  # [P, 2, B, n, h, D]
            if number + 1 < len(self.groups.kv):
                heads = self.groups.kv[number + 1]
                self.comm.start(torch.stack([self.k[:, :, heads], self.v[:, :, heads]]))
            keys, values = _global_kv(gathered, self.index)
            yield number, keys, values


class AllGatherAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, setup: AttentionSetup, group: dist.ProcessGroup, head_groups: int,
                offsets: list[int] | None):
        total = q.shape[1] * setup.world_size
        index = gathered_to_global_index(total, setup.world_size, setup.layout, q.device)
        groups = _HeadGroups(q.shape[2], k.shape[2], head_groups)
        output = torch.full((*q.shape[:3], v.shape[-1]), float("nan"), dtype=q.dtype, device=q.device)
        lse = torch.full((q.shape[0], q.shape[2], q.shape[1]), float("nan"), dtype=torch.float32, device=q.device)
        lse = lse.to(accumulation_dtype(q.dtype))
        for number, keys, values in _KVGatherer(k, v, groups, group, index):
            heads = groups.query[number]
            for batch_rows, rows, visible in _chunk_plan(setup, q.shape[1], total, q.shape[0], offsets):
                block_output, block_lse = attention(
                    q[batch_rows, rows, heads], keys[batch_rows, visible], values[batch_rows, visible],
                    causal=setup.causal, scale=setup.scale, return_lse=True,
                )  # fmt: skip
                output[batch_rows, rows, heads] = block_output
                lse[batch_rows, heads, rows] = block_lse.to(lse.dtype)
        ctx.save_for_backward(q, k, v, output, lse, index)
        ctx.setup, ctx.group, ctx.head_groups, ctx.offsets = setup, group, head_groups, offsets
        return output

    @staticmethod
    def backward(ctx, d_output):
        q, k, v, output, lse, index = ctx.saved_tensors
        setup = ctx.setup
        total = q.shape[1] * setup.world_size
        groups = _HeadGroups(q.shape[2], k.shape[2], ctx.head_groups)
        dtype = accumulation_dtype(q.dtype)
        dq = torch.zeros(q.shape, dtype=dtype, device=q.device)
        dk = torch.zeros(k.shape, dtype=dtype, device=q.device)
        dv = torch.zeros(v.shape, dtype=dtype, device=q.device)
        for number, keys, values in _KVGatherer(k, v, groups, ctx.group, index):
            heads = groups.query[number]
            d_keys = torch.zeros(2, *keys.shape, dtype=dtype, device=q.device)  # fp32 [2, B, T, h, D]
            for batch_rows, rows, visible in _chunk_plan(setup, q.shape[1], total, q.shape[0], ctx.offsets):
                block_dq, block_dk, block_dv = attention_backward(
                    q[batch_rows, rows, heads], keys[batch_rows, visible], values[batch_rows, visible],
                    output[batch_rows, rows, heads], lse[batch_rows, heads, rows], d_output[batch_rows, rows, heads],
                    causal=setup.causal, scale=setup.scale,
                )  # fmt: skip
                dq[batch_rows, rows, heads] += block_dq
                d_keys[0, batch_rows, visible] += block_dk
                d_keys[1, batch_rows, visible] += block_dv
            # global order -> rank order [P, 2, B, n, h, D], then each owner receives the sum of its rows
            rank_order = torch.empty_like(d_keys).index_copy_(2, index, d_keys)
            rank_order = rank_order.reshape(2, k.shape[0], setup.world_size, k.shape[1], *keys.shape[2:])
            mine = reduce_scatter(rank_order.permute(2, 0, 1, 3, 4, 5), ctx.group)  # [2, B, n, h, D]
            dk[:, :, groups.kv[number]] = mine[0]
            dv[:, :, groups.kv[number]] = mine[1]
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def _allgather(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup, setup: AttentionSetup,
               cu_seqlens: torch.Tensor | None, head_groups: int) -> torch.Tensor:
    if not isinstance(head_groups, int) or head_groups < 1 or k.shape[2] % head_groups != 0:
        raise ValueError(
            f"allgather_attention: head_groups must be a positive divisor of the kv heads ({k.shape[2]}), "
            f"got {head_groups!r}"
        )
    offsets = document_offsets("allgather_attention", cu_seqlens, q.shape[0], q.shape[1] * setup.world_size)
    return AllGatherAttention.apply(q, k, v, setup, group, head_groups, offsets)


allgather_attention = attention_op(
    "allgather_attention", _allgather, "Softmax attention over a CP group by all-gathering K/V (LASP-2H's "
    "softmax layers).",
    {"head_groups": (1, "gather the K/V heads in this many sequential groups (H_kv % head_groups == 0)\n"
                        "        to bound the gathered memory to 2·B·T·(H_kv / head_groups)·D elements.")},
)
