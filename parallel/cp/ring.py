"""Ring attention: K/V travel around the CP ring; each rank merges block results with the LSE merge.

Forward, step t = 0..P-1 (ALGORITHMS.md §3): rank r holds the K/V of rank j = (r - t) mod P; it posts
the exchange for step t+1 (double buffering: send the current K/V to r+1, receive the next from r-1),
computes its blocks against the current K/V, folds them into the running fp32 (O, L), then waits.

Which blocks a step computes (`ring_blocks`):
- causal, zigzag: t = 0 local causal; j < r all local queries vs the received chunk c_j (no mask);
  j > r the second local chunk c_{2P-1-r} vs both received chunks (no mask). Equal work every step.
- causal, contiguous: t = 0 local causal; j < r everything (no mask); j > r nothing.
- non-causal: everything, every step.

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
from .softmax import AttentionSetup, pack, unpack, validate_attention_inputs

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


class RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, setup: AttentionSetup, group: dist.ProcessGroup):
        comm = RingComm(group) if setup.world_size > 1 else None
        current = pack(k, v)
        output = lse = None
        for step in range(setup.world_size):
            if step < setup.world_size - 1:
                incoming = comm.send_recv(current)
                comm.commit()
            source = (setup.rank - step) % setup.world_size
            keys, values = unpack(current, k.shape, v.shape)
            for rows, columns, causal in ring_blocks(setup, source, q.shape[1]):
                block_output, block_lse = attention(
                    q[:, rows], keys[:, columns], values[:, columns], causal=causal, scale=setup.scale, return_lse=True
                )
                if output is None:  # step 0 covers every query row
                    output, lse = merge_attention_block(None, None, block_output, block_lse)
                else:
                    output[:, rows], lse[..., rows] = merge_attention_block(
                        output[:, rows], lse[..., rows], block_output, block_lse
                    )
            if step < setup.world_size - 1:
                comm.wait()
                current = incoming
        output = output.to(q.dtype)
        ctx.save_for_backward(q, k, v, output, lse)
        ctx.setup, ctx.group = setup, group
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
            for rows, columns, causal in ring_blocks(setup, source, q.shape[1]):
                block_dq, block_dk, block_dv = attention_backward(
                    q[:, rows], keys[:, columns], values[:, columns], output[:, rows], lse[..., rows],
                    d_output[:, rows], causal=causal, scale=setup.scale,
                )  # fmt: skip
                dq[:, rows] += block_dq
                dk[:, columns] += block_dk
                dv[:, columns] += block_dv
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
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: dist.ProcessGroup,
    *,
    layout: str = "zigzag",
    causal: bool = True,
    scale: float | None = None,
) -> torch.Tensor:
    """Softmax attention over a CP group with K/V passed around a ring (zigzag-balanced when causal).

    Args:
        q: this rank's shard [B, n, H, D]; k, v: [B, n, H_kv, D] with H % H_kv == 0 (GQA).
        group: the CP process group; rank and world size come from it.
        layout: "zigzag" (default, balanced causal work) or "contiguous".
        causal: causal masking in global token order; False attends to the whole sequence.
        scale: softmax scale, default D ** -0.5.

    Returns:
        o [B, n, H, D] in the dtype of q, equal to spindle.kernels.attention on the unsharded tensors,
        sharded the same way. Differentiable in q, k, v.
    """
    setup = validate_attention_inputs("ring_attention", q, k, v, group, layout, causal, scale)
    return RingAttention.apply(q, k, v, setup, group)
