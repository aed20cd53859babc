"""Pieces the softmax-attention schemes share: their public op (arguments, docs, validation), K/V packing,
local chunk geometry and packed documents."""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable, Mapping

import torch
import torch.distributed as dist

from .layout import chunks_per_rank, local_chunks
from .ops import check_shards, publish, scheme_options


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


def validate_attention_inputs(caller: str, group: dist.ProcessGroup, arguments: Mapping[str, object]) -> AttentionSetup:
    """The setup of a softmax CP call from its `arguments` (q, k, v, layout, causal, scale and the
    scheme's options, as the ranks must agree on them): the shared shard checks, then GQA shapes."""
    rank, world_size = check_shards(caller, group, arguments)
    q, k, v, scale = (arguments[name] for name in ("q", "k", "v", "scale"))
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
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return AttentionSetup(rank, world_size, arguments["layout"], bool(arguments["causal"]), scale)


_ATTENTION_ARGUMENTS = """

Args:
    q: this rank's shard [B, n, H, D]; k, v: [B, n, H_kv, D] with H % H_kv == 0 (GQA).
    group: the CP process group; rank and world size come from it.
    layout: how the sequence is sharded: "zigzag" (default, balanced causal work) or "contiguous".
    causal: causal masking in global token order; False attends to the whole sequence.
    scale: softmax scale, default D ** -0.5.
    cu_seqlens: packed documents, int [N + 1] offsets into the B·T tokens of the GLOBAL (unsharded)
        batch, identical on every rank; queries see keys of their own document only.
{options}
Returns:
    o [B, n, H, D] in the dtype of q, equal to spindle.kernels.attention on the unsharded tensors,
    sharded the same way. Differentiable in q, k, v.
"""


def attention_op(name: str, scheme: Callable[..., torch.Tensor], summary: str,
                 options: Mapping[str, tuple[object, str]] | None = None) -> Callable[..., torch.Tensor]:
    """The public op `name` of one softmax CP scheme.

    Every scheme takes the arguments documented in _ATTENTION_ARGUMENTS, checked here; `options` adds the
    scheme's own keywords (name -> (default, the text of its Args entry)). The op runs
    `scheme(q, k, v, group, setup, cu_seqlens, **options)` with the validated AttentionSetup.
    """
    defaults = {key: default for key, (default, _) in (options or {}).items()}

    def op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup, *, layout: str = "zigzag",
           causal: bool = True, scale: float | None = None, cu_seqlens: torch.Tensor | None = None,
           **given: object) -> torch.Tensor:
        chosen = scheme_options(name, given, defaults)
        arguments = {"q": q, "k": k, "v": v, "layout": layout, "causal": bool(causal), "scale": scale, **chosen,
                     "documents": cu_seqlens is not None}
        return scheme(q, k, v, group, validate_attention_inputs(name, group, arguments), cu_seqlens, **chosen)

    entries = "".join(f"    {key}: {text}\n" for key, (_, text) in (options or {}).items())
    return publish(op, name, scheme.__module__, summary + _ATTENTION_ARGUMENTS.format(options=entries), defaults)


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
