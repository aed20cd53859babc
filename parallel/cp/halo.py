"""Halo exchange: the `window` tokens that precede each of a rank's chunks, in global order.

Sliding-window attention and a linear attention delayed by `window` tokens (RAttention, see
docs/rattention.md) need, for a chunk c of m tokens starting at global position c·m, only the tokens
at [c·m − h, c·m) with h = min(window, c·m): its halo. The halo may reach back over several
preceding chunks (window > m), which live on other ranks, or on the same rank (zigzag: chunks P−1
and P both belong to rank P−1; any chunk of a group of one).

Every rank computes the same static plan (which slice of which chunk lands where in which halo),
so one batch of point-to-point messages (one per pair of ranks that talk, each piece of one rank's
tensor packed into it) moves everything; pieces that stay on a rank are copied. Backward runs the
plan in reverse: each halo gradient goes back to the owner of those tokens and is added there.

Bytes received per rank and direction: Σ over its chunks of (h − locally held part)·B·F·itemsize
≤ slots·window·B·F·itemsize, independent of the sequence length (counted as "send_recv" by
parallel.cp.comm).
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import torch.distributed as dist

from .comm import RingComm, group_rank_and_size
from .layout import check_layout, chunk_order, chunks_per_rank, local_chunks


@dataclasses.dataclass(frozen=True)
class HaloPiece:
    """A run of tokens copied from one chunk into one halo (offsets in tokens)."""

    source_rank: int
    source_slot: int
    source_start: int  # inside the source chunk
    length: int
    target_rank: int
    target_slot: int
    target_start: int  # inside the target halo


@dataclasses.dataclass(frozen=True)
class HaloPlan:
    """Where every halo token comes from, for one (world size, layout, chunk length, window)."""

    world_size: int
    layout: str
    chunk_length: int
    window: int
    pieces: tuple[HaloPiece, ...]

    @property
    def slots(self) -> int:
        return chunks_per_rank(self.layout)

    def halo_lengths(self, rank: int) -> list[int]:
        """Halo length of each of `rank`'s slots: min(window, tokens before the chunk)."""
        return [min(self.window, chunk * self.chunk_length) for chunk in local_chunks(rank, self.world_size, self.layout)]

    def received_tokens(self, rank: int) -> int:
        """Halo tokens `rank` receives from other ranks (what the byte counter sees, per feature)."""
        return sum(p.length for p in self.pieces if p.target_rank == rank and p.source_rank != rank)


def halo_tokens_received(world_size: int, layout: str, chunk_length: int, window: int) -> tuple[int, int]:
    """(forward, backward) halo tokens received by the busiest rank: the planner's byte count.

    Multiply by batch · features · itemsize (features: what travels per token, e.g. 2·H_kv·D for k and v).
    At most slots·window each, whatever the sequence length.
    """
    plan = make_halo_plan(world_size, layout, chunk_length, window)
    forward = max(plan.received_tokens(rank) for rank in range(world_size))
    backward = max(sum(p.length for p in plan.pieces if p.source_rank == rank and p.target_rank != rank)
                   for rank in range(world_size))
    return forward, backward


@functools.lru_cache(maxsize=256)
def make_halo_plan(world_size: int, layout: str, chunk_length: int, window: int) -> HaloPlan:
    """The static plan; every rank builds the same one, so sends and receives pair up.

    Cached: a step repeats the same shapes, so each plan is built once (it is immutable).
    """
    check_layout(layout, "make_halo_plan")
    owners = chunk_order(world_size, layout)  # (rank, slot) per global chunk
    pieces = []
    for chunk, (target_rank, target_slot) in enumerate(owners):
        start = chunk * chunk_length
        halo_start = start - min(window, start)
        # source chunks overlapping [halo_start, start), earliest first
        for source in range(halo_start // chunk_length, chunk):
            begin = max(source * chunk_length, halo_start)
            end = (source + 1) * chunk_length
            source_rank, source_slot = owners[source]
            pieces.append(HaloPiece(source_rank, source_slot, begin - source * chunk_length, end - begin,
                                    target_rank, target_slot, begin - halo_start))
    return HaloPlan(world_size, layout, chunk_length, window, tuple(pieces))


def _exchange(pieces_out, pieces_in, read, group: dist.ProcessGroup, rank: int, like: torch.Tensor):
    """Send the tokens `read(piece)` of every outgoing piece, receive every incoming one.

    One message per peer (pieces concatenated along dim 1 in plan order, which both sides share).
    Returns {piece: tensor [B, length, F]} for the incoming pieces.
    """
    outgoing: dict[int, list[HaloPiece]] = {}
    incoming: dict[int, list[HaloPiece]] = {}
    for piece, peer in pieces_out:
        outgoing.setdefault(peer, []).append(piece)
    for piece, peer in pieces_in:
        incoming.setdefault(peer, []).append(piece)
    if not outgoing and not incoming:
        return {}
    comm = RingComm(group)
    for peer, pieces in outgoing.items():
        comm.send(torch.cat([read(piece) for piece in pieces], dim=1), peer - rank)
    buffers = {}
    for peer, pieces in incoming.items():
        total = sum(piece.length for piece in pieces)
        buffers[peer] = comm.recv(like.new_empty(like.shape[0], total, *like.shape[2:]), peer - rank)
    comm.commit()
    comm.wait()
    received = {}
    for peer, pieces in incoming.items():
        for piece, part in zip(pieces, buffers[peer].split([p.length for p in pieces], dim=1)):
            received[piece] = part
    return received


class HaloExchange(torch.autograd.Function):
    """x [B, n, F] (this rank's slots) -> one halo [B, h_slot, F] per slot; backward sends gradients home."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, plan: HaloPlan, group: dist.ProcessGroup, rank: int):
        m = plan.chunk_length
        halos = [x.new_zeros(x.shape[0], length, *x.shape[2:]) for length in plan.halo_lengths(rank)]

        def read(piece: HaloPiece) -> torch.Tensor:
            start = piece.source_slot * m + piece.source_start
            return x[:, start : start + piece.length]

        sends = [(p, p.target_rank) for p in plan.pieces if p.source_rank == rank and p.target_rank != rank]
        receives = [(p, p.source_rank) for p in plan.pieces if p.target_rank == rank and p.source_rank != rank]
        received = _exchange(sends, receives, read, group, rank, x)
        for piece in plan.pieces:
            if piece.target_rank != rank:
                continue
            part = read(piece) if piece.source_rank == rank else received[piece]
            halos[piece.target_slot][:, piece.target_start : piece.target_start + piece.length] = part
        ctx.plan, ctx.group, ctx.rank, ctx.shape = plan, group, rank, x.shape
        return tuple(halos)

    @staticmethod
    def backward(ctx, *halo_grads):
        plan, rank, m = ctx.plan, ctx.rank, ctx.plan.chunk_length
        like = next(g for g in halo_grads if g is not None)
        grad_x = like.new_zeros(ctx.shape)

        def read(piece: HaloPiece) -> torch.Tensor:
            gradient = halo_grads[piece.target_slot]
            return gradient[:, piece.target_start : piece.target_start + piece.length]

        # reversed roles: the target of a piece sends its gradient, the source receives it
        sends = [(p, p.source_rank) for p in plan.pieces if p.target_rank == rank and p.source_rank != rank]
        receives = [(p, p.target_rank) for p in plan.pieces if p.source_rank == rank and p.target_rank != rank]
        received = _exchange(sends, receives, read, ctx.group, rank, grad_x)
        for piece in plan.pieces:
            if piece.source_rank != rank:
                continue
            part = read(piece) if piece.target_rank == rank else received[piece]
            start = piece.source_slot * m + piece.source_start
            grad_x[:, start : start + piece.length] += part
        return grad_x, None, None, None


def halo_exchange(x: torch.Tensor, group: dist.ProcessGroup, *, window: int, layout: str = "zigzag") -> list[torch.Tensor]:
    """The `window` tokens before each of this rank's chunks (fewer at the start of the sequence).

    Args:
        x: this rank's shard [B, n, ...] in `layout` order (n = T / P). Pack several tensors into one
            (e.g. k and v concatenated on the last dim) to move them in one message.
        group: the CP process group; rank and world size come from it.
        window: tokens wanted before each chunk (>= 1; may exceed the chunk length).
        layout: "zigzag" (two chunks per rank) or "contiguous".

    Returns:
        One tensor per local chunk (slot), [B, h, ...] with h = min(window, tokens before the chunk):
        the tokens at global positions [start − h, start), oldest first. Differentiable in x.
    """
    rank, world_size = group_rank_and_size(group, "halo_exchange")
    check_layout(layout, "halo_exchange")
    slots = chunks_per_rank(layout)
    if x.dim() < 2 or x.shape[1] == 0 or x.shape[1] % slots:
        raise ValueError(f"halo_exchange: x must be [batch, local_seq, ...] with local_seq a positive multiple of {slots} "
                         f"for layout {layout!r}, got {tuple(x.shape)}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"halo_exchange: window must be an integer >= 1, got {window!r}")
    plan = make_halo_plan(world_size, layout, x.shape[1] // slots, window)
    flat = x.reshape(x.shape[0], x.shape[1], -1)
    halos = HaloExchange.apply(flat, plan, group, rank)
    return [halo.reshape(halo.shape[0], halo.shape[1], *x.shape[2:]) for halo in halos]


def halo_exchange_many(tensors: list[torch.Tensor], group: dist.ProcessGroup, *, window: int,
                       layout: str = "zigzag") -> list[list[torch.Tensor]]:
    """`halo_exchange` of several tensors sharing [B, n]: result[i][slot] is tensor i's halo of that slot.

    Tensors of one dtype are packed into one message (flattened after [B, n] and concatenated), so
    k and v, say, cost one exchange; a tensor of another dtype (an fp32 log-decay next to bf16 k/v)
    keeps its precision in a message of its own.
    """
    by_dtype: dict[torch.dtype, list[int]] = {}
    for index, tensor in enumerate(tensors):
        by_dtype.setdefault(tensor.dtype, []).append(index)
    result: list[list[torch.Tensor]] = [[] for _ in tensors]
    for indices in by_dtype.values():
        flat = [tensors[i].reshape(tensors[i].shape[0], tensors[i].shape[1], -1) for i in indices]
        sizes = [piece.shape[-1] for piece in flat]
        for halo in halo_exchange(torch.cat(flat, dim=-1), group, window=window, layout=layout):
            for index, part in zip(indices, halo.split(sizes, dim=-1)):
                result[index].append(part.reshape(part.shape[0], part.shape[1], *tensors[index].shape[2:]))
    return result
