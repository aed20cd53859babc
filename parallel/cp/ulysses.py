"""Ulysses attention: all-to-all from sequence shards to head shards, a local kernel, and back.

[B, n, H, D] per rank -> all-to-all -> [B, T, H/P, D] (the full sequence, a slice of the heads) ->
spindle.kernels.attention -> inverse all-to-all -> [B, n, H, D]. Needs H and H_kv divisible by P.

The exchange goes through DeepSpeed's sequence-parallel layer (deepspeed.sequence.layer.
DistributedAttention) when DeepSpeed is installed. DeepSpeed is an optional extra of spindle
(pyproject `[deepspeed]`, and `make setup` tolerates its absence), so this module is the one shim for
it (docs/design.md, conventions): `all_to_all="torch"` uses our own all_to_all_single-based exchange with
the same layout, and tests force both paths.

After the exchange the sequence is in rank order (rank 0's shard, rank 1's, ...); with the zigzag
layout that is a permutation of the tokens, so the gathered sequence is put into global order before
the causal kernel runs and back afterwards.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist

from spindle.kernels import attention

from .comm import all_to_all as exchange_all_to_all
from .comm import record_all_to_all
from .layout import gathered_to_global_index
from .softmax import AttentionSetup, attention_op

ALL_TO_ALL_CHOICES = ("auto", "deepspeed", "torch")


@functools.lru_cache(maxsize=1)
def deepspeed_available() -> bool:
    try:
        import deepspeed.sequence.layer  # noqa: F401
    except ImportError:
        return False
    return True


def _deepspeed_distributed_attention(local_attention, group: dist.ProcessGroup):
    """DeepSpeed's Ulysses module around `local_attention`, wiring deepspeed.comm to the running torch.distributed."""
    import deepspeed.comm
    from deepspeed.sequence.layer import DistributedAttention

    if not deepspeed.comm.is_initialized():
        # torch.distributed is already up: DeepSpeed only wraps it (no new process group, no MPI discovery)
        deepspeed.comm.init_distributed(dist_backend=dist.get_backend(group), auto_mpi_discovery=False, verbose=False)
    # BSHD: scatter the heads (dim 2), gather the sequence (dim 1)
    return DistributedAttention(local_attention, group, scatter_idx=2, gather_idx=1)


class _Exchange(torch.autograd.Function):
    """One all-to-all re-layout (`_sequence_to_heads` or `_heads_to_sequence`); backward is the other.

    [B, n, H, D] <-> [B, P·n, H/P, D] (sequence in rank order)."""

    @staticmethod
    def forward(ctx, x, group, exchange, inverse):
        ctx.group, ctx.inverse = group, inverse
        return exchange(x, group)

    @staticmethod
    def backward(ctx, grad):
        return ctx.inverse(grad, ctx.group), None, None, None


def _sequence_to_heads(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    world_size = dist.get_world_size(group)
    batch, length, heads, dim = x.shape
    # [B, n, H, D] -> [P, B, n, H/P, D]: row block p holds the heads rank p will own
    send = x.reshape(batch, length, world_size, heads // world_size, dim).permute(2, 0, 1, 3, 4)
    received = exchange_all_to_all(send, group)  # row block p: rank p's tokens of our heads
    # [P, B, n, H/P, D] -> [B, P·n, H/P, D]
    return received.permute(1, 0, 2, 3, 4).reshape(batch, world_size * length, heads // world_size, dim)


def _heads_to_sequence(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    world_size = dist.get_world_size(group)
    batch, total, local_heads, dim = x.shape
    # [B, P·n, h, D] -> [P, B, n, h, D]: row block p holds rank p's tokens
    send = x.reshape(batch, world_size, total // world_size, local_heads, dim).permute(1, 0, 2, 3, 4)
    received = exchange_all_to_all(send, group)  # row block p: our tokens of rank p's heads
    # [P, B, n, h, D] -> [B, n, P·h, D]
    return received.permute(1, 2, 0, 3, 4).reshape(batch, total // world_size, world_size * local_heads, dim)


class _CountOnBackward(torch.autograd.Function):
    """Identity that records, in backward, the all-to-all DeepSpeed runs there on this tensor's gradient."""

    @staticmethod
    def forward(ctx, x, world_size):
        ctx.world_size = world_size
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        record_all_to_all(grad, ctx.world_size)
        return grad, None


def _ulysses(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup, setup: AttentionSetup,
             cu_seqlens: torch.Tensor | None, all_to_all: str) -> torch.Tensor:
    layout = setup.layout
    world_size = setup.world_size
    for name, heads in (("query heads", q.shape[2]), ("key/value heads", k.shape[2])):
        if heads % world_size != 0:
            raise ValueError(
                f"ulysses_attention: {name} ({heads}) must be divisible by the CP group size ({world_size}); "
                "use ring_attention or allgather_attention for this head count"
            )
    if all_to_all not in ALL_TO_ALL_CHOICES:
        raise ValueError(f"ulysses_attention: all_to_all must be one of {ALL_TO_ALL_CHOICES}, got {all_to_all!r}")
    if all_to_all == "deepspeed" and not deepspeed_available():
        raise ValueError("ulysses_attention: all_to_all='deepspeed' needs deepspeed installed (pip install deepspeed)")
    use_deepspeed = all_to_all == "deepspeed" or (all_to_all == "auto" and deepspeed_available())

    total = q.shape[1] * world_size
    index = gathered_to_global_index(total, world_size, layout, q.device)
    inverse = torch.argsort(index)

    def local_attention(query, key, value):
        # rank order -> global order for the causal mask, and back
        if layout != "contiguous":
            query, key, value = (x.index_select(1, index) for x in (query, key, value))
        documents = {} if cu_seqlens is None else {"cu_seqlens": cu_seqlens}
        output = attention(query, key, value, causal=setup.causal, scale=setup.scale, **documents)
        return output if layout == "contiguous" else output.index_select(1, inverse)

    if not use_deepspeed:
        query, key, value = (_Exchange.apply(x, group, _sequence_to_heads, _heads_to_sequence) for x in (q, k, v))
        return _Exchange.apply(local_attention(query, key, value), group, _heads_to_sequence, _sequence_to_heads)

    for x in (q, k, v):
        record_all_to_all(x, world_size)
    q, k, v = (_CountOnBackward.apply(x, world_size) for x in (q, k, v))
    output = _deepspeed_distributed_attention(local_attention, group)(q, k, v, 0)  # batch is dim 0
    record_all_to_all(output, world_size)
    return _CountOnBackward.apply(output, world_size)


ulysses_attention = attention_op(
    "ulysses_attention", _ulysses,
    "Softmax attention over a CP group with Ulysses all-to-alls (sequence shards <-> head shards).\n\n"
    "H and H_kv must be divisible by P. With cu_seqlens, each rank holds whole sequences in global order\n"
    "after the exchange, so the local kernel applies the document mask as on one device.",
    {"all_to_all": ("auto", "'auto' (DeepSpeed's sequence-parallel layer when installed, else 'torch'),\n"
                            "        'deepspeed', or 'torch' (our all_to_all_single exchange).")},
)
