"""Which keys a query sees: bottom-right causal alignment, a sliding window and document boundaries.

Every backend takes the same three knobs; this module holds their one definition and the checks of
user input, so the dense reference, the banded math path and the fused-kernel shims cannot disagree.

    position of query i in key coordinates:   p_i = i + (Tk - Tq)             (bottom-right aligned)
    causal:        j <= p_i
    window w:      p_i - w < j <= p_i                                           (implies causal)
    documents:     doc(j) == doc(p_i), with doc() read from cu_seqlens over the B·T flattened tokens
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MaskSpec:
    """The visibility rule of one attention call (window None = unbounded; documents None = one per row)."""

    causal: bool
    window: int | None = None
    query_documents: torch.Tensor | None = None  # [B, Tq] int64 document id of each query (aligned position)
    key_documents: torch.Tensor | None = None  # [B, Tk] int64 document id of each key
    key_document_starts: torch.Tensor | None = None  # CPU [B, Tk]: first key of the document of key j
    key_document_ends: torch.Tensor | None = None  # CPU [B, Tk]: one past the last key of that document

    @property
    def has_documents(self) -> bool:
        return self.key_documents is not None


def check_window(window: int | None, causal: bool) -> int | None:
    """window must be a positive int and comes with causal=True (the window is counted backwards)."""
    if window is None:
        return None
    if isinstance(window, bool) or not isinstance(window, int):
        raise TypeError(f"attention: window must be a positive int or None, got {window!r}")
    if window < 1:
        raise ValueError(f"attention: window must be >= 1 (query i sees keys i - window < j <= i), got {window}")
    if not causal:
        raise ValueError("attention: window needs causal=True (it keeps keys i - window < j <= i); "
                         "pass causal=True or drop window")
    return window


def check_cu_seqlens(cu_seqlens: torch.Tensor | None, batch: int, query_length: int, key_length: int) -> None:
    """Shape and dtype always; values (0, B·T, row starts, non-decreasing) when they live on the CPU.

    Checking values of a CUDA tensor would cost a host sync on every call, so that check is skipped there.
    """
    if cu_seqlens is None:
        return
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError("attention: cu_seqlens must be a 1-D int tensor of document offsets [N + 1] "
                         f"(0, ..., B·T), got {cu_seqlens!r:.80}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"attention: cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if query_length != key_length:
        raise ValueError(f"attention: cu_seqlens needs as many queries as keys per row, got Tq={query_length}, "
                         f"Tk={key_length}; split the call per document or drop cu_seqlens")
    if cu_seqlens.device.type != "cpu":
        return
    offsets = cu_seqlens.tolist()
    total = batch * key_length
    if offsets[0] != 0 or offsets[-1] != total:
        raise ValueError(f"attention: cu_seqlens must start at 0 and end at B·T = {total}, got "
                         f"{offsets[0]} ... {offsets[-1]}")
    if any(later < earlier for earlier, later in zip(offsets, offsets[1:])):
        raise ValueError("attention: cu_seqlens must be non-decreasing")
    missing = sorted(set(range(0, total, key_length)) - set(offsets)) if key_length else []
    if missing:
        raise ValueError(f"attention: cu_seqlens must contain every row start (multiples of T = {key_length}); "
                         f"missing {missing[:4]} (a document never spans two rows)")


def document_ids(cu_seqlens: torch.Tensor, batch: int, length: int, device: torch.device) -> torch.Tensor:
    """[B, T] int64: the index of the document each token belongs to (empty documents take no token)."""
    offsets = cu_seqlens.to(device=device, dtype=torch.int64)
    positions = torch.arange(batch * length, device=device)
    return (torch.searchsorted(offsets, positions, right=True) - 1).view(batch, length)


def build_mask_spec(
    cu_seqlens: torch.Tensor | None, causal: bool, window: int | None, batch: int, query_length: int,
    key_length: int, device: torch.device,
) -> MaskSpec:
    """The MaskSpec of a call (document tensors built on `device`; document starts kept on the host)."""
    if cu_seqlens is None:
        return MaskSpec(causal, window)
    keys = document_ids(cu_seqlens, batch, key_length, device)
    offsets = cu_seqlens.to("cpu", torch.int64)  # the math path plans its key bands on the host
    host_ids = document_ids(offsets, batch, key_length, torch.device("cpu"))
    row_starts = torch.arange(batch)[:, None] * key_length
    starts = offsets[host_ids] - row_starts
    ends = offsets[host_ids + 1] - row_starts
    # Tq == Tk is enforced with cu_seqlens, so query i sits at key position i
    return MaskSpec(causal, window, keys, keys, starts, ends)


def visible(spec: MaskSpec, query_rows: slice, key_columns: slice, query_length: int, key_length: int,
            device: torch.device) -> torch.Tensor | None:
    """Bool [B or 1, rows, columns]: True where a query row of the block may see a key; None if all visible."""
    offset = key_length - query_length
    queries = torch.arange(query_rows.start, query_rows.stop, device=device)[:, None] + offset
    keys = torch.arange(key_columns.start, key_columns.stop, device=device)[None, :]
    mask = None
    if spec.causal:
        mask = keys <= queries
        if spec.window is not None:
            mask = mask & (keys > queries - spec.window)
    if spec.has_documents:
        same = spec.query_documents[:, query_rows, None] == spec.key_documents[:, None, key_columns]
        mask = same if mask is None else same & mask[None]
    elif mask is not None:
        mask = mask[None]
    return mask


def dense_mask(spec: MaskSpec, query_length: int, key_length: int, device: torch.device) -> torch.Tensor | None:
    """Bool [B or 1, Tq, Tk] for the whole score matrix (the dense reference only)."""
    return visible(spec, slice(0, query_length), slice(0, key_length), query_length, key_length, device)


def key_band(spec: MaskSpec, query_rows: slice, query_length: int, key_length: int) -> slice:
    """The keys [start, stop) that any query of `query_rows` may see; outside it every score is masked.

    Causal: up to the last row's aligned position; window: from the first row's position - w + 1;
    documents: from the start of the first row's document to the end of the last row's (document bounds
    never decrease along a row).
    """
    offset = key_length - query_length
    start, stop = 0, key_length
    if spec.causal:
        stop = max(0, min(key_length, query_rows.stop + offset))
        if spec.window is not None:
            start = max(0, query_rows.start + offset - spec.window + 1)
    if spec.key_document_starts is not None and query_rows.start < query_rows.stop:
        first, last = query_rows.start + offset, query_rows.stop - 1 + offset
        if 0 <= first < key_length:
            start = max(start, int(spec.key_document_starts[:, first].min()))
        if 0 <= last < key_length:
            stop = min(stop, int(spec.key_document_ends[:, last].max()))
    return slice(min(start, stop), stop)
