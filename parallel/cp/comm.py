"""Communication for context parallelism: one small object per pattern, and a byte/call counter.

- `AllGatherComm`: start(tensor) -> ... -> wait() -> [P, *shape]; LASP-2 states, all-gather attention K/V.
- `RingComm`: queue sends to / receives from ring neighbours, commit() posts them in one
  batch_isend_irecv, wait() completes them; ring attention K/V (+ dK/dV) and LASP-1 states.
- `reduce_scatter`, `all_gather`, `all_to_all`: blocking helpers for the remaining collectives.

Every collective records into `comm_stats()` (process totals) and into any active `record_comm()`
block, keyed by kind: "all_gather", "reduce_scatter", "all_to_all", "send_recv" (one tensor moved one
hop), "validate" (the small shape-agreement gather). `bytes` counts what this rank RECEIVES from
other ranks (for these symmetric patterns also what it sends): an all-gather of a local buffer of
b bytes counts (P-1)·b, a reduce-scatter to a chunk of b bytes (P-1)·b, an all-to-all of b bytes
(P-1)/P·b, a ring hop the received tensor.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import weakref
from collections.abc import Iterator, Mapping

import torch
import torch.distributed as dist

# --------------------------------------------------------------------------- groups and validation


def group_rank_and_size(group: dist.ProcessGroup | None, caller: str) -> tuple[int, int]:
    """(rank, world size) within `group`, with a clear error for a missing or foreign group."""
    if group is None:
        raise ValueError(
            f"{caller}: group is None; pass the context-parallel torch.distributed ProcessGroup "
            "(e.g. device_mesh['cp'].get_group(), or torch.distributed.group.WORLD for a single CP group)"
        )
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(f"{caller}: torch.distributed is not initialized; call init_process_group first")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"{caller}: group must be a torch.distributed ProcessGroup, got {type(group).__name__}")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(f"{caller}: this process (global rank {dist.get_rank()}) is not a member of group")
    return rank, dist.get_world_size(group)


def _signature(value: object) -> list[int]:
    """A short integer description of an argument: tensors by dtype and shape, None as -1, numbers as is."""
    if value is None:
        return [-1]
    if isinstance(value, torch.Tensor):
        dtype_code = list(_DTYPE_CODES).index(value.dtype) if value.dtype in _DTYPE_CODES else 99
        return [value.dim(), dtype_code, *value.shape]
    if isinstance(value, bool):
        return [int(value)]
    if isinstance(value, int):
        return [value]
    if isinstance(value, float):
        return [int(value * 1e6)]
    # str hashes are salted per process (PYTHONHASHSEED), so strings get a deterministic code
    text = value if isinstance(value, str) else type(value).__name__
    return [sum(ord(c) * 31**i for i, c in enumerate(text)) % (2**31)]


# (caller, signature) pairs whose agreement across a group was checked, per group: a step repeats the
# same shapes, so the gather of signatures (and, on GPUs, its host sync) runs once per shape set.
_agreed: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_AGREED_LIMIT = 4096
DEBUG_CHECKS_VARIABLE = "SPINDLE_DEBUG_CHECKS"

_DTYPE_CODES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int32, torch.int64)
_SIGNATURE_LENGTH = 64


def check_ranks_agree(
    group: dist.ProcessGroup,
    caller: str,
    arguments: Mapping[str, object],
    any_rank_flags: Mapping[str, bool] | None = None,
) -> None:
    """Raise the same ValueError on every rank if the ranks disagree on argument shapes/dtypes/options.

    Collectives with mismatched sizes hang or fail deep inside the backend; this check costs one
    all-gather of 64 int64 (recorded as kind "validate") and, on GPUs, one host sync, so it runs once
    per (caller, shapes, options, group): later calls with a signature that already agreed return at
    once (set SPINDLE_DEBUG_CHECKS=1 to check every call). It runs before any local validation, so that a
    bad shape on one rank cannot leave the others waiting in a collective. `any_rank_flags` maps an error message to a local boolean; if it is true on any rank,
    every rank raises that message (for value checks, such as a positive log-decay, that could
    otherwise fail on one rank only).
    """
    _, world_size = group_rank_and_size(group, caller)
    flags = dict(any_rank_flags or {})
    names, values = [], [int(flag) for flag in flags.values()]
    for name, value in arguments.items():
        signature = _signature(value)
        names.append((name, len(values), len(signature)))
        values.extend(signature)
    if len(values) > _SIGNATURE_LENGTH:
        raise ValueError(f"{caller}: internal: argument signature too long ({len(values)})")
    key = (caller, tuple(values[len(flags):]))
    if not debug_checks() and key in _agreed.get(group, ()):
        # These shapes and options already agreed across this group: skip the gather (and its host
        # sync). A flag raised here is this rank's alone; SPINDLE_DEBUG_CHECKS=1 reports it on every rank.
        for message, flag in flags.items():
            if flag:
                raise ValueError(f"{caller}: {message} (on this rank, {dist.get_rank(group)})")
        return
    if world_size == 1:
        gathered = torch.tensor(values, dtype=torch.int64)[None]
    else:
        device = next((v.device for v in arguments.values() if isinstance(v, torch.Tensor)), torch.device("cpu"))
        if dist.get_backend(group) == "gloo":
            device = torch.device("cpu")
        local = torch.full((_SIGNATURE_LENGTH,), -7, dtype=torch.int64, device=device)
        local[: len(values)] = torch.tensor(values, dtype=torch.int64)
        gathered = _all_gather_raw(local, group, "validate").cpu()  # [P, 64]
    mismatched = (gathered != gathered[0]).any(dim=0)
    mismatched[: len(flags)] = False  # flags may differ; they are OR-ed below
    if bool(mismatched.any()):
        first = int(mismatched.nonzero()[0])
        name = next((n for n, start, size in names if start <= first < start + size), "arguments")
        if name == "arguments":
            per_rank = "; ".join(f"rank {r}: {gathered[r].tolist()}" for r in range(world_size))
        else:
            per_rank = "; ".join(
                f"rank {r}: {_describe(arguments, name, gathered[r], names)}" for r in range(world_size)
            )
        raise ValueError(
            f"{caller}: ranks of the context-parallel group disagree on {name!r} ({per_rank}). Every rank must "
            "pass tensors of the same shape and dtype (its own shard) and the same options."
        )
    for index, message in enumerate(flags):
        raising = [r for r in range(world_size) if int(gathered[r, index]) != 0]
        if raising:
            raise ValueError(f"{caller}: {message} (on rank(s) {raising})")
    agreed = _agreed.setdefault(group, set())
    if len(agreed) >= _AGREED_LIMIT:  # shapes that change every call (e.g. packed lengths): stay bounded
        agreed.clear()
    agreed.add(key)


def debug_checks() -> bool:
    """SPINDLE_DEBUG_CHECKS=1: check rank agreement on every call instead of once per (shapes, group)."""
    return os.environ.get(DEBUG_CHECKS_VARIABLE, "0") not in ("", "0", "false", "False")


def _describe(arguments: Mapping[str, object], name: str, row: torch.Tensor, names) -> str:
    _, start, size = next(entry for entry in names if entry[0] == name)
    values = row[start : start + size].tolist()
    if isinstance(arguments[name], torch.Tensor) and len(values) >= 2:
        dtype = _DTYPE_CODES[values[1]] if 0 <= values[1] < len(_DTYPE_CODES) else "?"
        return f"shape {tuple(values[2:])} {dtype}"
    return str(values)


# --------------------------------------------------------------------------- the counter


@dataclasses.dataclass
class CommStats:
    """Calls and received bytes per collective kind (see the module docstring for the conventions)."""

    calls: dict[str, int] = dataclasses.field(default_factory=dict)
    bytes: dict[str, int] = dataclasses.field(default_factory=dict)

    def record(self, kind: str, received_bytes: int) -> None:
        self.calls[kind] = self.calls.get(kind, 0) + 1
        self.bytes[kind] = self.bytes.get(kind, 0) + int(received_bytes)

    def total_bytes(self, exclude: tuple[str, ...] = ("validate",)) -> int:
        """Bytes of all kinds except bookkeeping ("validate") unless asked."""
        return sum(count for kind, count in self.bytes.items() if kind not in exclude)

    def copy(self) -> CommStats:
        return CommStats(dict(self.calls), dict(self.bytes))


_process_totals = CommStats()
_active_recorders: list[CommStats] = []


def comm_stats() -> CommStats:
    """A snapshot of everything this process has communicated through parallel.cp so far."""
    return _process_totals.copy()


def reset_comm_stats() -> None:
    global _process_totals
    _process_totals = CommStats()


@contextlib.contextmanager
def record_comm() -> Iterator[CommStats]:
    """Record the communication of the enclosed code (nested blocks each see their own)::

    with record_comm() as stats:
        out = lasp2(q, k, v, group); out.sum().backward()
    stats.bytes["all_gather"], stats.calls["all_gather"]
    """
    stats = CommStats()
    _active_recorders.append(stats)
    try:
        yield stats
    finally:
        _active_recorders.remove(stats)


def _record(kind: str, received_bytes: int) -> None:
    _process_totals.record(kind, received_bytes)
    for recorder in _active_recorders:
        recorder.record(kind, received_bytes)


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


# --------------------------------------------------------------------------- collectives


# torch 2.13 renamed all_gather_into_tensor / reduce_scatter_tensor to *_single (the old names warn);
# resolved once here so older torch keeps working
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _all_gather_raw(tensor: torch.Tensor, group: dist.ProcessGroup, kind: str, async_op: bool = False):
    """Gather into [P, *shape]; backends want the output as [P·shape[0], ...], which is the same memory."""
    world_size = dist.get_world_size(group)
    tensor = tensor.contiguous().reshape(-1) if tensor.dim() == 0 else tensor.contiguous()
    output = tensor.new_empty(world_size * tensor.shape[0], *tensor.shape[1:])
    work = _all_gather_single(output, tensor, group=group, async_op=async_op)
    _record(kind, (world_size - 1) * _nbytes(tensor))
    output = output.view(world_size, *tensor.shape)
    return (output, work) if async_op else output


def all_gather(tensor: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Blocking all-gather: [*shape] -> [P, *shape] (rank order)."""
    return _all_gather_raw(tensor, group, "all_gather")


class AllGatherComm:
    """Asynchronous all-gather with an explicit lifecycle: start(tensor), overlap work, wait().

    One gather in flight per object; starting twice or waiting without a start is a bug in the
    caller and raises instead of deadlocking or returning a stale buffer.
    """

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        self._output: torch.Tensor | None = None
        self._work = None

    def start(self, tensor: torch.Tensor) -> None:
        if self._output is not None:
            raise RuntimeError("AllGatherComm.start: a gather is already in flight; call wait() first")
        self._output, self._work = _all_gather_raw(tensor, self.group, "all_gather", async_op=True)

    def wait(self) -> torch.Tensor:
        """The gathered [P, *shape] tensor (rank order)."""
        if self._output is None:
            raise RuntimeError("AllGatherComm.wait: nothing in flight; call start(tensor) first")
        self._work.wait()
        output, self._output, self._work = self._output, None, None
        return output


def reduce_scatter(tensor: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Blocking sum reduce-scatter: [P, *shape] -> [*shape], this rank's row summed over all ranks."""
    world_size = dist.get_world_size(group)
    if tensor.shape[0] != world_size:
        raise ValueError(f"reduce_scatter: leading dim must be the group size {world_size}, got {tuple(tensor.shape)}")
    output = tensor.new_empty(tensor.shape[1:])
    # backends want the input as [P·shape[0], ...]: the same memory as [P, *shape]
    flat_input = tensor.contiguous().reshape(-1, *tensor.shape[2:]) if tensor.dim() > 1 else tensor.contiguous()
    _reduce_scatter_single(output, flat_input, op=dist.ReduceOp.SUM, group=group)
    _record("reduce_scatter", (world_size - 1) * _nbytes(output))
    return output


def all_to_all(tensor: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Blocking all-to-all over dim 0: row block p of the input goes to rank p; output row block p came from rank p."""
    world_size = dist.get_world_size(group)
    if tensor.shape[0] % world_size != 0:
        raise ValueError(f"all_to_all: dim 0 ({tensor.shape[0]}) must be divisible by the group size {world_size}")
    output = torch.empty_like(tensor, memory_format=torch.contiguous_format)
    dist.all_to_all_single(output, tensor.contiguous(), group=group)
    record_all_to_all(tensor, world_size)
    return output


def record_all_to_all(tensor: torch.Tensor, world_size: int) -> None:
    """Count an all-to-all of `tensor` made elsewhere (e.g. inside DeepSpeed's sequence-parallel op)."""
    _record("all_to_all", _nbytes(tensor) * (world_size - 1) // world_size)


class RingComm:
    """Point-to-point exchange with ring neighbours: queue send()/recv(), commit(), compute, wait().

    Offsets are relative ranks in the group: send(t, +1) goes to rank r+1 (mod P), recv(like, -1)
    receives from r-1. `send_recv(t)` is the ring step: send to the next rank, receive the same
    shape from the previous one. All queued operations are posted together by commit() in one
    batch_isend_irecv (so sends and receives between the same pair cannot deadlock), and finished
    by wait(). Received buffers are valid only after wait(). Queuing while a batch is in flight,
    committing nothing, or waiting without a commit raise RuntimeError.
    """

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        self.rank, self.world_size = group_rank_and_size(group, "RingComm")
        self._queued: list[dist.P2POp] = []
        self._received: list[torch.Tensor] = []
        self._requests: list | None = None

    def _peer(self, offset: int) -> int:
        return dist.get_global_rank(self.group, (self.rank + offset) % self.world_size)

    def _check_idle(self, what: str) -> None:
        if self._requests is not None:
            raise RuntimeError(f"RingComm.{what}: a batch is in flight; call wait() before queuing more")
        if self.world_size == 1:
            raise RuntimeError(f"RingComm.{what}: a group of one rank has no neighbour to talk to")

    def send(self, tensor: torch.Tensor, offset: int = 1) -> None:
        self._check_idle("send")
        self._queued.append(dist.P2POp(dist.isend, tensor.contiguous(), self._peer(offset), self.group))

    def recv(self, like: torch.Tensor, offset: int = -1) -> torch.Tensor:
        """Queue a receive of a tensor shaped like `like`; returns the buffer (valid after wait())."""
        self._check_idle("recv")
        buffer = torch.empty_like(like, memory_format=torch.contiguous_format)
        self._queued.append(dist.P2POp(dist.irecv, buffer, self._peer(offset), self.group))
        self._received.append(buffer)
        return buffer

    def send_recv(self, tensor: torch.Tensor) -> torch.Tensor:
        """Ring step: send `tensor` to rank r+1, receive the same shape from r-1 (buffer valid after wait())."""
        self.send(tensor, +1)
        return self.recv(tensor, -1)

    def commit(self) -> None:
        if self._requests is not None:
            raise RuntimeError("RingComm.commit: the previous batch is still in flight; call wait() first")
        if not self._queued:
            raise RuntimeError("RingComm.commit: nothing queued; call send()/recv()/send_recv() first")
        self._requests = dist.batch_isend_irecv(self._queued)
        for buffer in self._received:
            _record("send_recv", _nbytes(buffer))
        self._queued, self._received = [], []

    def wait(self) -> None:
        if self._requests is None:
            raise RuntimeError("RingComm.wait: nothing committed; call commit() first")
        for request in self._requests:
            request.wait()
        self._requests = None
