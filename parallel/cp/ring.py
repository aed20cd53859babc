"""Ring attention: K/V travel around the CP ring; each rank merges block results with the LSE merge.

Forward, step t = 0..P-1 (docs/algorithms.md §3): rank r holds the K/V of rank j = (r - t) mod P; it posts
the exchange for step t+1 (double buffering: send the current K/V to r+1, receive the next from r-1),
computes its blocks against the current K/V, folds them into the running fp32 (O, L), then waits.

Which blocks a step computes (`ring_blocks`):
- causal, zigzag: t = 0 local causal; j < r all local queries vs the received chunk c_j (no mask);
  j > r the second local chunk c_{2P-1-r} vs both received chunks (no mask). Equal work every step.
- causal, contiguous: t = 0 local causal; j < r everything (no mask); j > r nothing.
- non-causal: everything, every step.

Packed documents (cu_seqlens over the global batch, read on the host once per call): a block is cut
into (row, document) pieces whose queries and keys share a document; a piece on the diagonal chunk is
causal, one against an earlier chunk unmasked, and K/V blocks with no key of a query's document are
skipped, so no mask is built. The running (O, L) start empty (O = 0, L = −inf) and every piece merges.

Backward is exact blockwise: every block's gradients use the FINAL merged O and L. K/V travel the ring
again (P-1 hops) and an fp32 dK/dV accumulator for each source rides behind them (P-1 hops: it
starts at rank j+1 and arrives home at rank j, which adds its own local part); dQ accumulates locally
in fp32.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from spindle.kernels import attention, attention_backward

from .comm import RingComm
from .merge import accumulation_dtype, merge_attention_block
from .layout import local_chunks
from .softmax import AttentionSetup, attention_op, document_offsets, pack, row_documents, unpack

_ALL = slice(None)


def ring_blocks(setup: AttentionSetup, source: int, length: int) -> list[tuple[slice, slice, bool]]:
    """(query rows, key rows, causal) of the blocks rank `setup.rank` computes against `source`'s K/V."""
    if not setup.causal:
        return [(_ALL, _ALL, False)]
    if source == setup.rank:
        # zigzag: a plain causal mask on the concatenation [c_r, c_{2P-1-r}] is exactly right, since
        # every token of c_r precedes every token of c_{2P-1-r}
        return [(_ALL, _ALL, True)]
    if setup.layout == "contiguous":
        return [(_ALL, _ALL, False)] if source < setup.rank else []
    half = length // 2
    if source < setup.rank:
        return [(_ALL, slice(0, half), False)]  # c_j precedes both local chunks; c_{2P-1-j} follows both
    return [(slice(half, None), _ALL, False)]  # only c_{2P-1-r} follows c_j and c_{2P-1-j}


def document_blocks(setup: AttentionSetup, source: int, length: int, batch: int,
                    offsets: list[int]) -> list[tuple[slice, slice, slice, bool]]:
    """(batch rows, query rows, key rows, causal) of the pieces rank `setup.rank` computes against
    `source`'s K/V when documents are packed: every (row, document) that has queries here and keys there."""
    chunk, total = length // setup.slots, length * setup.world_size
    pieces = []
    for query_slot, query_chunk in enumerate(local_chunks(setup.rank, setup.world_size, setup.layout)):
        for key_slot, key_chunk in enumerate(local_chunks(source, setup.world_size, setup.layout)):
            if setup.causal and key_chunk > query_chunk:
                continue  # every key of that chunk follows every query of this one
            diagonal = setup.causal and key_chunk == query_chunk
            query_first, key_first = query_chunk * chunk, key_chunk * chunk
            for row in range(batch):
                for start, end in row_documents(offsets, row, total):
                    query_start, query_end = max(start, query_first), min(end, query_first + chunk)
                    key_start, key_end = max(start, key_first), min(end, key_first + chunk)
                    if query_start < query_end and key_start < key_end:
                        pieces.append((slice(row, row + 1),
                                       slice(query_slot * chunk + query_start - query_first,
                                             query_slot * chunk + query_end - query_first),
                                       slice(key_slot * chunk + key_start - key_first,
                                             key_slot * chunk + key_end - key_first), diagonal))
    return pieces


def _blocks(setup: AttentionSetup, source: int, length: int, batch: int,
            offsets: list[int] | None) -> list[tuple[slice, slice, slice, bool]]:
    if offsets is None:
        return [(_ALL, rows, columns, causal) for rows, columns, causal in ring_blocks(setup, source, length)]
    return document_blocks(setup, source, length, batch, offsets)


class RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, setup: AttentionSetup, group: dist.ProcessGroup, offsets: list[int] | None):
        comm = RingComm(group) if setup.world_size > 1 else None
        current = pack(k, v)
        output = lse = None
        if offsets is not None:  # pieces cover the rows unevenly: start every row empty
            output = torch.zeros(*q.shape[:3], v.shape[-1], dtype=accumulation_dtype(q.dtype), device=q.device)
            lse = torch.full((q.shape[0], q.shape[2], q.shape[1]), float("-inf"), dtype=output.dtype, device=q.device)
        for step in range(setup.world_size):
            if step < setup.world_size - 1:
                incoming = comm.send_recv(current)
                comm.commit()
            source = (setup.rank - step) % setup.world_size
            keys, values = unpack(current, k.shape, v.shape)
            for batch_rows, rows, columns, causal in _blocks(setup, source, q.shape[1], q.shape[0], offsets):
                block_output, block_lse = attention(
                    q[batch_rows, rows], keys[batch_rows, columns], values[batch_rows, columns], causal=causal,
                    scale=setup.scale, return_lse=True,
                )
                if output is None:  # step 0 covers every query row
                    output, lse = merge_attention_block(None, None, block_output, block_lse)
                else:
                    output[batch_rows, rows], lse[batch_rows, :, rows] = merge_attention_block(
                        output[batch_rows, rows], lse[batch_rows, :, rows], block_output, block_lse
                    )
            if step < setup.world_size - 1:
                comm.wait()
                current = incoming
        output = output.to(q.dtype)
        ctx.save_for_backward(q, k, v, output, lse)
        ctx.setup, ctx.group, ctx.offsets = setup, group, offsets
        return output

    @staticmethod
    def backward(ctx, d_output):
        q, k, v, output, lse = ctx.saved_tensors
        setup, world_size = ctx.setup, ctx.setup.world_size
        kv_comm = RingComm(ctx.group) if world_size > 1 else None
        dkv_comm = RingComm(ctx.group) if world_size > 1 else None
        dtype = accumulation_dtype(q.dtype)
        dq = torch.zeros(q.shape, dtype=dtype, device=q.device)
        current = pack(k, v)
        home = incoming_dkv = None
        for step in range(world_size):
            if step < world_size - 1:
                incoming_kv = kv_comm.send_recv(current)
                kv_comm.commit()
            source = (setup.rank - step) % world_size
            keys, values = unpack(current, k.shape, v.shape)
            partial = torch.zeros(2 * k.numel(), dtype=dtype, device=q.device)  # fp32 [dk | dv] for `source`
            dk, dv = unpack(partial, k.shape, v.shape)
            for batch_rows, rows, columns, causal in _blocks(setup, source, q.shape[1], q.shape[0], ctx.offsets):
                block_dq, block_dk, block_dv = attention_backward(
                    q[batch_rows, rows], keys[batch_rows, columns], values[batch_rows, columns],
                    output[batch_rows, rows], lse[batch_rows, :, rows], d_output[batch_rows, rows],
                    causal=causal, scale=setup.scale,
                )  # fmt: skip
                dq[batch_rows, rows] += block_dq
                dk[batch_rows, columns] += block_dk
                dv[batch_rows, columns] += block_dv
            if step == 0:
                home = partial
            else:
                if step >= 2:  # the accumulator for this step's source, sent by r-1 at the end of its step
                    dkv_comm.wait()
                    partial += incoming_dkv
                incoming_dkv = dkv_comm.send_recv(partial)
                dkv_comm.commit()
            if step < world_size - 1:
                kv_comm.wait()
                current = incoming_kv
        if world_size > 1:
            dkv_comm.wait()  # our own accumulator, back home with everyone else's contributions
            home += incoming_dkv
        dk, dv = unpack(home, k.shape, v.shape)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


def _ring(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup, setup: AttentionSetup,
          cu_seqlens: torch.Tensor | None) -> torch.Tensor:
    offsets = document_offsets("ring_attention", cu_seqlens, q.shape[0], q.shape[1] * setup.world_size)
    return RingAttention.apply(q, k, v, setup, group, offsets)


ring_attention = attention_op(
    "ring_attention", _ring, "Softmax attention over a CP group with K/V passed around a ring (zigzag-balanced "
    "when causal).")
