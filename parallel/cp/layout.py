"""Sequence layouts for context parallelism: which global tokens each rank of a CP group owns.

Two layouts (docs/design.md):

- "contiguous": rank r owns tokens [r·n, (r+1)·n) with n = T / P.
- "zigzag": the sequence is cut into 2P equal chunks; rank r owns chunk r followed by chunk 2P-1-r.
  Causal work is then balanced: every rank holds one early and one late chunk.

A rank's local tensor is the concatenation of its chunks in the order above ("slots"). Everything
that has to follow the token permutation (RoPE positions, labels, loss masks, per-token decays) uses
the same chunk bookkeeping, exposed here as `chunk_order`, `local_chunks` and `local_positions`.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist

from .comm import all_gather, group_rank_and_size

LAYOUTS = ("contiguous", "zigzag")


def check_layout(layout: str, caller: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"{caller}: unknown layout {layout!r}; choose one of {', '.join(map(repr, LAYOUTS))}")


def chunks_per_rank(layout: str) -> int:
    """How many contiguous chunks of the global sequence one rank holds (its "slots")."""
    return 2 if layout == "zigzag" else 1


def local_chunks(rank: int, world_size: int, layout: str) -> list[int]:
    """Global chunk ids held by `rank`, in the order they are concatenated locally."""
    if layout == "zigzag":
        return [rank, 2 * world_size - 1 - rank]
    return [rank]


def chunk_order(world_size: int, layout: str) -> list[tuple[int, int]]:
    """(rank, slot) of every global chunk, in global sequence order."""
    owners = [(0, 0)] * (chunks_per_rank(layout) * world_size)
    for rank in range(world_size):
        for slot, chunk in enumerate(local_chunks(rank, world_size, layout)):
            owners[chunk] = (rank, slot)
    return owners


def check_divisible(length: int, world_size: int, layout: str, caller: str, what: str = "sequence length") -> None:
    """A global length must split into P (contiguous) or 2P (zigzag) equal chunks."""
    parts = chunks_per_rank(layout) * world_size
    if length % parts != 0:
        raise ValueError(
            f"{caller}: {what} ({length}) is not divisible by {parts} "
            f"({'2 x ' if layout == 'zigzag' else ''}{world_size} ranks) as layout {layout!r} requires; "
            f"pad the sequence to a multiple of {parts}"
        )


def layout_positions(
    length: int, rank: int, world_size: int, layout: str, device: torch.device | str | None = None
) -> torch.Tensor:
    """Global positions (int64 [length / P]) of the tokens held by `rank`, in local order."""
    check_layout(layout, "layout_positions")
    check_divisible(length, world_size, layout, "layout_positions")
    chunk = length // (chunks_per_rank(layout) * world_size)
    pieces = [torch.arange(c * chunk, (c + 1) * chunk, device=device) for c in local_chunks(rank, world_size, layout)]
    return torch.cat(pieces)


def gathered_to_global_index(length: int, world_size: int, layout: str, device=None) -> torch.Tensor:
    """Index i such that `concat_over_ranks(local)[i]` is global token order (the inverse permutation).

    A concatenation of all ranks' local shards in rank order (what an all-gather or an all-to-all over
    the sequence produces) is a permutation of the sequence; indexing it with this tensor restores the
    global order. Built once per (length, P, layout, device) and cached on the device: read-only.
    """
    return _gathered_to_global_index(length, world_size, layout, torch.device(device or "cpu"))


@functools.lru_cache(maxsize=256)
def _gathered_to_global_index(length: int, world_size: int, layout: str, device: torch.device) -> torch.Tensor:
    positions = torch.cat([layout_positions(length, r, world_size, layout, device) for r in range(world_size)])
    return torch.argsort(positions)


def chunk_index(world_size: int, layout: str, device: torch.device | str | None = None) -> torch.Tensor:
    """int64 [slots·P]: flat index rank·slots + slot of every global chunk, in global order.

    Reorders a gather of per-chunk tensors ([P, slots, ...] flattened) into sequence order. Built once
    per (P, layout, device) and cached on the device (no host-to-device copy per call): read-only.
    """
    return _chunk_index(world_size, layout, torch.device(device or "cpu"))


@functools.lru_cache(maxsize=256)
def _chunk_index(world_size: int, layout: str, device: torch.device) -> torch.Tensor:
    slots = chunks_per_rank(layout)
    order = [rank * slots + slot for rank, slot in chunk_order(world_size, layout)]
    return torch.tensor(order, dtype=torch.int64, device=device)


def local_chunk_index(
    rank: int, world_size: int, layout: str, device: torch.device | str | None = None
) -> torch.Tensor:
    """int64 [slots]: `local_chunks` as a tensor, built once per (rank, P, layout, device): read-only."""
    return _local_chunk_index(rank, world_size, layout, torch.device(device or "cpu"))


@functools.lru_cache(maxsize=256)
def _local_chunk_index(rank: int, world_size: int, layout: str, device: torch.device) -> torch.Tensor:
    return torch.tensor(local_chunks(rank, world_size, layout), dtype=torch.int64, device=device)


def local_positions(
    length: int, group: dist.ProcessGroup, *, layout: str = "zigzag", device: torch.device | str | None = None
) -> torch.Tensor:
    """Global token positions of this rank's shard: int64 [length / P].

    Use it for RoPE positions and to shard labels / masks consistently with `shard` (or simply call
    `shard` on them). `length` is the global sequence length T.
    """
    rank, world_size = group_rank_and_size(group, "local_positions")
    return layout_positions(length, rank, world_size, layout, device)


def shard(x: torch.Tensor, group: dist.ProcessGroup, *, layout: str = "zigzag", dim: int = 1) -> torch.Tensor:
    """This rank's shard of the full tensor `x` along `dim` (no communication; differentiable).

    Every rank passes the same full tensor. The result is the concatenation of the rank's chunks in
    local order (see the module docstring); its length along `dim` is x.shape[dim] / P.
    """
    rank, world_size = group_rank_and_size(group, "shard")
    check_layout(layout, "shard")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"shard: x must be a torch.Tensor, got {type(x).__name__}")
    dim = _normalize_dim(dim, x.dim(), "shard")
    check_divisible(x.shape[dim], world_size, layout, "shard", f"size of dim {dim}")
    chunk = x.shape[dim] // (chunks_per_rank(layout) * world_size)
    pieces = [x.narrow(dim, c * chunk, chunk) for c in local_chunks(rank, world_size, layout)]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=dim)


def unshard(x_local: torch.Tensor, group: dist.ProcessGroup, *, layout: str = "zigzag", dim: int = 1) -> torch.Tensor:
    """The full tensor on every rank, from each rank's shard (one all-gather; not differentiable).

    Inverse of `shard`: `unshard(shard(x, g), g)` equals x. Meant for evaluation, tests and
    checkpoint tooling; training code keeps activations sharded.
    """
    rank, world_size = group_rank_and_size(group, "unshard")
    check_layout(layout, "unshard")
    if not isinstance(x_local, torch.Tensor):
        raise TypeError(f"unshard: x_local must be a torch.Tensor, got {type(x_local).__name__}")
    dim = _normalize_dim(dim, x_local.dim(), "unshard")
    slots = chunks_per_rank(layout)
    if x_local.shape[dim] % slots != 0:
        raise ValueError(
            f"unshard: local size {x_local.shape[dim]} of dim {dim} must be even for layout 'zigzag' "
            "(two chunks per rank); was it produced by shard(..., layout='zigzag')?"
        )
    gathered = all_gather(x_local.detach().movedim(dim, 0).contiguous(), group)  # [P, n, ...]
    chunk = x_local.shape[dim] // slots
    # [P, n, ...] -> [P·slots, chunk, ...]: flat index rank·slots + slot
    pieces = gathered.reshape(world_size * slots, chunk, *gathered.shape[2:])
    full = pieces[chunk_index(world_size, layout, pieces.device)].reshape(-1, *gathered.shape[2:])
    return full.movedim(0, dim)


def to_slots(x: torch.Tensor, slots: int) -> torch.Tensor:
    """[B, n, ...] -> [slots·B, n/slots, ...]: a rank's chunks stacked along the batch (slot-major).

    Lets one kernel call process both zigzag chunks as independent sequences.
    """
    if slots == 1:
        return x
    batch, length = x.shape[:2]
    x = x.reshape(batch, slots, length // slots, *x.shape[2:])  # [B, slots, n/slots, ...]
    return x.transpose(0, 1).reshape(slots * batch, length // slots, *x.shape[3:])


def from_slots(x: torch.Tensor, slots: int) -> torch.Tensor:
    """Inverse of `to_slots`: [slots·B, m, ...] -> [B, slots·m, ...]."""
    if slots == 1:
        return x
    batch = x.shape[0] // slots
    x = x.reshape(slots, batch, *x.shape[1:]).transpose(0, 1)  # [B, slots, m, ...]
    return x.reshape(batch, slots * x.shape[2], *x.shape[3:])


def _normalize_dim(dim: int, ndim: int, caller: str) -> int:
    if not -ndim <= dim < ndim:
        raise ValueError(f"{caller}: dim {dim} is out of range for a {ndim}-D tensor")
    return dim % ndim
