"""The loop LASP-2 and LASP-1 share: local states, the exchange of chunk states, local outputs and gradients.

Per chunk c of the global sequence (docs/algorithms.md, LASP; a rank holds 1 chunk on "contiguous", 2 on
"zigzag"), with G_i the inclusive cumulative log-decay inside the chunk and m its length:

    M_c    = Σ_i exp(G_m − G_i) k_iᵀ v_i          local final state from a zero initial state, with
                                                  G_m − G_i taken as the suffix sum Σ_{u>i} g_u
    Γ_c    = exp(G_m)                             how much the chunk decays an incoming state
    S_in   = chain over earlier chunks            (the scheme: one all-gather, or a P2P ring)
    o      = kernel(q, k, v; zero state) + scale · (q ⊙ exp(G_i)) S_in

Backward: dM_c = scale · Σ_i exp(G_i) q_iᵀ do_i (the gradient of S_in through the chunk's own
outputs) is exchanged, the scheme returns T_c = ∂L/∂(final state of chunk c), and the local gradients
are those of <o, do> + <Γ_c·S_in + M_c, T_c> with S_in held fixed. That sum covers every path by
which q, k, v and the decay reach the loss, including the decay's effect on later ranks (through
Γ_c and M_c). The local kernel is the public differentiable op (its gradients come from autograd);
the other terms have closed-form gradients (query_side_gradients, key_side_gradients). A scheme is an
object with start_forward / finish_forward / start_backward / finish_backward, so the communication of
LASP-2 overlaps the local kernel work in both directions.

The chunks of one rank are stacked along the batch ("slots", see layout.to_slots), so one kernel
call handles both zigzag chunks. States are fp32 (float64 for float64 inputs).
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Callable, Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F

from spindle.kernels.linear_attn import check_log_decay_values, floor_log_decay, linear_attention

from .layout import chunks_per_rank, from_slots, local_chunks, to_slots
from .merge import accumulation_dtype
from .ops import check_shards, publish
from .softmax import document_offsets


class StateExchange(Protocol):
    """How a scheme turns local chunk states into incoming states (forward) and back (backward).

    Shapes: states, incoming, state gradients and final-state gradients are [slots, B, H, Dk, Dv];
    transitions are [slots, B, H] for per-token decay and None otherwise (a constant decay's
    transition is known to every rank).
    """

    def start_forward(self, states: torch.Tensor, transitions: torch.Tensor | None) -> None: ...

    def finish_forward(self) -> torch.Tensor: ...

    def start_backward(self, state_grads: torch.Tensor) -> None: ...

    def finish_backward(self) -> torch.Tensor: ...


class ChunkStateExchange:
    """What both schemes keep: their communicator (`open_comm`, per scheme), the setup, the chunk length,
    the document tables and a constant per-head decay (every rank knows its transitions, so it never travels)."""

    def __init__(self, group: dist.ProcessGroup, setup: LinearSetup, log_decay: torch.Tensor | None,
                 chunk_length: int, documents: DocumentChunks | None) -> None:
        self.setup = setup
        self.chunk_length = chunk_length
        self.documents = documents
        self.constant_log_decay = log_decay.detach() if setup.decay_kind == "constant" else None
        # S_in of this rank's chunks, from the backward's start (AddIncomingStates) to its finish (SendLocalStates)
        self.incoming: torch.Tensor | None = None
        self.comm = self.open_comm(group)

    def open_comm(self, group: dist.ProcessGroup) -> object:
        raise NotImplementedError


def linear_context_parallel(
    lasp: Callable[..., torch.Tensor],
    exchange_type: Callable[..., StateExchange],
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup, *,
    layout: str, log_decay: torch.Tensor | None, scale: float | None, delay: int, cu_seqlens: torch.Tensor | None,
) -> torch.Tensor:
    """The body of `lasp` (lasp2 or lasp1): its scheme is `exchange_type(group, setup, floored decay,
    chunk length, documents)`; a delay becomes the undelayed op on inputs shifted by a halo exchange."""
    if delay:  # o_i = scale · q_i S_(i-delay): the same op on k, v, g shifted by a halo exchange
        from .window import delayed_lasp  # window.py imports lasp2, which imports this module

        return delayed_lasp(q, k, v, group, delay=delay, lasp=lasp, layout=layout, log_decay=log_decay, scale=scale,
                            cu_seqlens=cu_seqlens)
    setup = validate_linear_inputs(lasp.__name__, group, q, k, v, layout, log_decay, scale, cu_seqlens)
    chunk_length = q.shape[1] // setup.slots
    documents = None if cu_seqlens is None else document_chunks(cu_seqlens, setup, q.shape[0], chunk_length, q.device)
    # the floored decay, as the local kernels see it (-inf: a reset); the clamp passes no gradient below it
    floored = floor_log_decay(to_slots(log_decay, setup.slots) if setup.decay_kind == "token" else log_decay)
    exchange = exchange_type(group, setup, floored, chunk_length, documents)
    qs, ks, vs = (to_slots(x, setup.slots) for x in (q, k, v))  # [S·B, m, H, D]
    sent = SendLocalStates.apply(ks, vs, floored, setup, exchange, documents)
    # the intra-rank work overlaps the state exchange
    local = linear_attention(qs, ks, vs, log_decay=floored, scale=setup.scale,
                             **({} if documents is None else {"cu_seqlens": documents.local_offsets}))[0]
    output = AddIncomingStates.apply(qs, floored, local, sent, setup, exchange, documents)
    return from_slots(output, setup.slots)


_LASP_ARGUMENTS = """

Args:
    q, k: this rank's shard [B, n, H, Dk]; v: [B, n, H, Dv] (n = T / P tokens, in `layout` order).
    group: the CP process group; rank and world size come from it.
    layout: "zigzag" (the two chunks are chained in global order) or "contiguous"; default "{layout}".
    log_decay: None, [H] (constant per head; replicated, its gradient on each rank is this
        rank's contribution, summed by the usual gradient reduction), or this rank's shard
        [B, n, H] of a per-token decay (sharded like q). Values <= 0.
    scale: multiplies q; default Dk ** -0.5.
    delay: d >= 0; token i reads the state S_(i-d) (keys j <= i - d), 0 for i < d (window.py).
    cu_seqlens: packed documents, int [N + 1] offsets into the B·T tokens of the GLOBAL (unsharded)
        batch (0, B·T and every row start; identical on every rank): the state restarts at every
        document start, wherever it falls (inside a chunk, on a rank or zigzag seam). Same bytes
        exchanged; offsets stay on the device. With delay the shift stays inside each document.

Returns:
    o, [B, n, H, Dv] in the dtype of q: equal to spindle.kernels.linear_attention on the
    unsharded tensors, sharded the same way. Differentiable in q, k, v and log_decay.
"""


def lasp_op(name: str, exchange_type: Callable[..., StateExchange], default_layout: str,
            summary: str) -> Callable[..., torch.Tensor]:
    """The public op `name` of one LASP scheme: linear_context_parallel with `exchange_type` as its state
    exchange and `default_layout` as its default (the arguments in _LASP_ARGUMENTS, the same for every scheme)."""

    def op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup, *,
           layout: str = default_layout, log_decay: torch.Tensor | None = None, scale: float | None = None,
           delay: int = 0, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        return linear_context_parallel(op, exchange_type, q, k, v, group, layout=layout, log_decay=log_decay,
                                       scale=scale, delay=delay, cu_seqlens=cu_seqlens)

    return publish(op, name, exchange_type.__module__, summary + _LASP_ARGUMENTS.format(layout=default_layout))


@dataclasses.dataclass
class LinearSetup:
    """Validated arguments of a linear CP call."""

    rank: int
    world_size: int
    layout: str
    slots: int
    scale: float
    decay_kind: str  # "none" | "constant" | "token"


def validate_linear_inputs(caller: str, group: dist.ProcessGroup, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           layout: str, log_decay: torch.Tensor | None, scale: float | None,
                           cu_seqlens: torch.Tensor | None) -> LinearSetup:
    """The shared shard checks (ranks agree first), then linear attention's shapes, decay and documents."""
    bad_decay = False
    if isinstance(log_decay, torch.Tensor) and log_decay.is_floating_point():
        if log_decay.device.type == "cpu":  # checked here so every rank raises together; no device sync
            bad_decay = not bool((log_decay.detach() <= 0).all())
        else:  # on the device, no host sync: a bad value stops the program at the next synchronization
            check_log_decay_values(log_decay, caller)
    rank, world_size = check_shards(
        caller,
        group,
        # only whether documents are packed: N changes every batch, and a new signature costs a gather
        {"q": q, "k": k, "v": v, "log_decay": log_decay, "layout": layout, "scale": scale,
         "documents": cu_seqlens is not None},
        any_rank_flags={
            "log_decay has NaN or positive values; it must be <= 0 (log of a decay in [0, 1]; -inf resets)": bad_decay
        },
    )
    if k.shape != q.shape:
        raise ValueError(f"{caller}: k {tuple(k.shape)} must have the shape of q {tuple(q.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"{caller}: v {tuple(v.shape)} must match q {tuple(q.shape)} in [batch, local_seq, heads] "
            "(linear attention has no grouped kv heads: repeat k/v heads first)"
        )
    batch, length, heads, _ = q.shape
    decay_kind = "none"
    if log_decay is not None:
        if not isinstance(log_decay, torch.Tensor) or not log_decay.is_floating_point():
            raise TypeError(f"{caller}: log_decay must be None or a floating tensor")
        if tuple(log_decay.shape) == (heads,):
            decay_kind = "constant"
        elif tuple(log_decay.shape) == (batch, length, heads):
            decay_kind = "token"
        else:
            raise ValueError(
                f"{caller}: log_decay must be [heads] = [{heads}] (constant) or this rank's shard "
                f"[batch, local_seq, heads] = {[batch, length, heads]} (per token, sharded like q), "
                f"got {tuple(log_decay.shape)}"
            )
    if cu_seqlens is not None:
        check_document_offsets(caller, cu_seqlens, batch, length * world_size)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return LinearSetup(rank, world_size, layout, chunks_per_rank(layout), scale, decay_kind)


def check_document_offsets(caller: str, cu_seqlens: torch.Tensor, batch: int, total: int) -> None:
    """The GLOBAL cu_seqlens: checked on the host for CPU offsets (read once per tensor), on the device
    otherwise (torch._assert_async: no host sync; a bad value stops the program at the next sync)."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.device.type == "cpu":
        document_offsets(caller, cu_seqlens, batch, total)
        return
    if cu_seqlens.dim() != 1 or cu_seqlens.dtype not in (torch.int32, torch.int64) or cu_seqlens.numel() < 2:
        raise ValueError(f"{caller}: cu_seqlens must be a 1-D int32/int64 tensor of document offsets [N + 1]")
    offsets = cu_seqlens.to(torch.int64)
    row_starts = torch.arange(0, batch * total, total, device=offsets.device)
    valid = (offsets[0] == 0) & (offsets[-1] == batch * total) & (offsets[1:] >= offsets[:-1]).all()
    torch._assert_async(valid & torch.isin(row_starts, offsets).all(),
                        f"{caller}: cu_seqlens must be non-decreasing offsets into the B·T = {batch * total} tokens "
                        f"of the GLOBAL batch, holding 0, B·T and every row start (multiples of T = {total})")


# --------------------------------------------------------------------------- packed documents


def check_no_delay_with_documents(caller: str, delay: int, cu_seqlens: torch.Tensor | None) -> None:
    if delay and cu_seqlens is not None:
        raise NotImplementedError(
            f"{caller}: delay={delay} together with cu_seqlens (packed documents) is not supported in this build "
            "(the delayed keys would have to be shifted inside each document across ranks); pass one of the two, "
            "or run the layer on one device (spindle.kernels.linear_attention takes both)")


@dataclasses.dataclass
class DocumentChunks:
    """Where documents start inside the CP chunks (positions 0..m within a chunk of m tokens; m: none).

    first / last: [C, B] (C = slots·P chunks per row, global order) the first document start at or
    after the chunk start, and the last one before its end (0 when the chunk has none). A chunk passes
    its incoming state on only when no document starts in it (`keep`); its tokens before `first` read the
    incoming state; its state contribution onward is its last document's, from `last` on. local_offsets:
    cu_seqlens of this rank's slot-stacked chunks [S·B, m] flattened (every chunk row starts a document).
    """

    first: torch.Tensor
    last: torch.Tensor
    keep: torch.Tensor  # [C, B] bool
    mine: list[int]  # this rank's global chunk ids, by slot
    local_offsets: torch.Tensor  # int64 [N + S·B + 2], with empty documents where global ones are elsewhere

    def __post_init__(self) -> None:
        self.local_first, self.local_last = self.local(self.first), self.local(self.last)

    def local(self, values: torch.Tensor) -> torch.Tensor:
        """[C, B] -> this rank's [S·B] (slot-major, as to_slots stacks the chunks)."""
        return values[self.mine].reshape(-1)


# id(cu_seqlens) -> {(rank, P, layout, B, m, device): its tables}: every linear layer of a micro-batch gets the
# same tensor, so the tables are built once; a finalizer drops the entry with the tensor (as softmax.py does)
_document_tables: dict[int, dict[tuple, DocumentChunks]] = {}


def document_chunks(cu_seqlens: torch.Tensor, setup: LinearSetup, batch: int, chunk_length: int,
                    device: torch.device) -> DocumentChunks:
    """The tables of `cu_seqlens` for this call's geometry, built once per tensor (see _build_document_chunks)."""
    key = (setup.rank, setup.world_size, setup.layout, batch, chunk_length, torch.device(device))
    tables = _document_tables.get(id(cu_seqlens))
    if tables is None:
        tables = _document_tables[id(cu_seqlens)] = {}
        weakref.finalize(cu_seqlens, _document_tables.pop, id(cu_seqlens), None)
    if key not in tables:
        tables[key] = _build_document_chunks(cu_seqlens, setup, batch, chunk_length, device)
    return tables[key]


def _build_document_chunks(cu_seqlens: torch.Tensor, setup: LinearSetup, batch: int, chunk_length: int,
                           device: torch.device) -> DocumentChunks:
    """All on the device from the global offsets (searchsorted; no host sync)."""
    offsets = cu_seqlens.to(device=device, dtype=torch.int64)
    chunks = setup.slots * setup.world_size
    total = chunks * chunk_length  # T
    starts = (torch.arange(batch, device=device)[None, :] * total
              + torch.arange(chunks, device=device)[:, None] * chunk_length)  # [C, B]
    first = offsets[torch.searchsorted(offsets, starts)] - starts  # offsets[-1] = B·T >= every start
    first = first.clamp(max=chunk_length)
    last = (offsets[torch.searchsorted(offsets, starts + chunk_length) - 1] - starts).clamp(min=0)
    mine = local_chunks(setup.rank, setup.world_size, setup.layout)
    # global offset -> its place among this rank's stacked chunks, or 0 (an empty document) elsewhere
    slot_of_chunk = torch.full((chunks,), -1, dtype=torch.int64, device=device)
    slot_of_chunk[mine] = torch.arange(len(mine), device=device)
    inner = offsets[:-1]
    row, within = inner // total, inner % total
    slot = slot_of_chunk[within // chunk_length]
    mapped = torch.where(slot >= 0, (slot * batch + row) * chunk_length + within % chunk_length, 0)
    chunk_rows = torch.arange(setup.slots * batch + 1, device=device) * chunk_length
    local_offsets = torch.sort(torch.cat([mapped, chunk_rows])).values
    return DocumentChunks(first, last, first == chunk_length, mine, local_offsets)


def document_decay(decay: LocalDecay | None, documents: DocumentChunks, length: int, dtype: torch.dtype
                   ) -> LocalDecay:
    """The chunk-local decay factors with the document cuts: a query reads the incoming state only before
    the chunk's first document start, a key counts toward the chunk's state only from its last one on,
    and a chunk with a document start passes no incoming state on (Γ = 0)."""
    positions = torch.arange(length, device=documents.first.device)
    query_mask = (positions[None, :] < documents.local_first[:, None]).to(dtype)[..., None]
    key_mask = (positions[None, :] >= documents.local_last[:, None]).to(dtype)[..., None]
    keep = (documents.local_first == length).to(dtype)[:, None]  # [S·B, 1]: no document starts in the chunk
    if decay is None:
        return LocalDecay(query_mask, key_mask, keep)
    return LocalDecay(decay.query * query_mask, decay.key * key_mask, decay.transition * keep)


# --------------------------------------------------------------------------- local math (slot-stacked)


@dataclasses.dataclass
class LocalDecay:
    """Decay factors inside each chunk, all <= 1 and none from a difference of two long cumulative sums.

    query: e^{G_i} [SB or 1, m, H] (G_i inclusive prefix); key: e^{Σ_{u>i} g_u} (the exclusive suffix sum,
    the key's weight in the chunk's final state); transition: Γ = e^{G_m} [SB or 1, H].
    """

    query: torch.Tensor
    key: torch.Tensor
    transition: torch.Tensor


def local_decay(log_decay: torch.Tensor | None, kind: str, length: int, dtype: torch.dtype) -> LocalDecay | None:
    """From the (floored) decay: [H] (constant) or the slot-stacked [SB, m, H] (per token)."""
    if kind == "none":
        return None
    if kind == "constant":
        steps = torch.arange(1, length + 1, device=log_decay.device, dtype=dtype)[None, :, None]
        rate = log_decay.to(dtype)[None, None, :]
        # (m − i − 1)·g directly: exact, where e^{G_m − G_i} from two cumulative sums would not be
        return LocalDecay(torch.exp(steps * rate), torch.exp((length - steps) * rate), torch.exp(length * rate[:, 0]))
    g = log_decay.to(dtype)
    prefix = g.cumsum(dim=1)
    suffix = F.pad(g.flip(1).cumsum(1).flip(1)[:, 1:], (0, 0, 0, 1))  # Σ_{u>i} g_u
    return LocalDecay(torch.exp(prefix), torch.exp(suffix), torch.exp(prefix[:, -1]))


def local_states(k: torch.Tensor, v: torch.Tensor, decay: LocalDecay | None) -> torch.Tensor:
    """M = Σ_i e^{Σ_{u>i} g_u} k_iᵀ v_i: [SB, m, H, Dk] x [SB, m, H, Dv] -> [SB, H, Dk, Dv]."""
    dtype = accumulation_dtype(k.dtype)
    keys = k.to(dtype)
    if decay is not None:
        keys = keys * decay.key[..., None]
    return torch.einsum("bthk,bthv->bhkv", keys, v.to(dtype))


def inter_output(q: torch.Tensor, decay: LocalDecay | None, incoming: torch.Tensor, scale: float) -> torch.Tensor:
    """scale · (q ⊙ e^{G_i}) S_in: [SB, m, H, Dk] x [SB, H, Dk, Dv] -> [SB, m, H, Dv] (state dtype)."""
    queries = q.to(incoming.dtype) * scale
    if decay is not None:
        queries = queries * decay.query[..., None]
    return torch.einsum("bthk,bhkv->bthv", queries, incoming)


def state_gradients(q: torch.Tensor, d_output: torch.Tensor, decay: LocalDecay | None, scale: float) -> torch.Tensor:
    """dM = ∂<inter_output, do>/∂S_in = scale · Σ_i e^{G_i} q_iᵀ do_i -> [SB, H, Dk, Dv]."""
    dtype = accumulation_dtype(q.dtype)
    queries = q.to(dtype) * scale
    if decay is not None:
        queries = queries * decay.query[..., None]
    return torch.einsum("bthk,bthv->bhkv", queries, d_output.to(dtype))


def query_side_gradients(q, d_output, decay: LocalDecay | None, kind: str, incoming, scale: float):
    """Gradients of <inter_output, do> with S_in held fixed: (dq, dg | None) in the state dtype.

        dq_i = scale·e^{G_i} do_i S_inᵀ        dg_t = Σ_{i≥t} scale·e^{G_i}⟨q_i S_in, do_i⟩

    dg is [SB, m, H] (per token), [H] (constant) or None. Each sum has terms of one kind, so no two large
    terms cancel (the fp32 drift of long chunks).
    """
    dtype = incoming.dtype
    q, d_output = q.to(dtype), d_output.to(dtype)
    grad_q = scale * torch.einsum("bthv,bhkv->bthk", d_output, incoming)
    if decay is None:
        return grad_q, None
    grad_q = grad_q * decay.query[..., None]
    if kind == "none":  # the factors are document masks only
        return grad_q, None
    terms = scale * decay.query * (torch.einsum("bthk,bhkv->bthv", q, incoming) * d_output).sum(-1)
    return grad_q, _per_decay(terms.flip(1).cumsum(1).flip(1), kind)  # Σ_{i≥t}


def key_side_gradients(k, v, decay: LocalDecay | None, kind: str, incoming, final_grads):
    """Gradients of <Γ·S_in + M, T> with S_in held fixed: (dk, dv, dg | None) in the state dtype.

        dk_i = w_i v_i Tᵀ        dv_i = w_i k_i T        dg_t = Σ_{i<t} w_i⟨k_i T, v_i⟩ + Γ⟨S_in, T⟩

    with w_i = e^{Σ_{u>i} g_u}; dg as in query_side_gradients.
    """
    dtype = final_grads.dtype
    k, v = k.to(dtype), v.to(dtype)
    grad_k = torch.einsum("bthv,bhkv->bthk", v, final_grads)  # v_i Tᵀ
    grad_v = torch.einsum("bthk,bhkv->bthv", k, final_grads)  # k_i T
    if decay is None:
        return grad_k, grad_v, None
    grad_k, grad_v = grad_k * decay.key[..., None], grad_v * decay.key[..., None]
    if kind == "none":
        return grad_k, grad_v, None
    terms = F.pad((k * grad_k).sum(-1).cumsum(1)[:, :-1], (0, 0, 1, 0))  # Σ_{i<t} w_i⟨k_i T, v_i⟩
    terms = terms + (decay.transition * (incoming * final_grads).sum((-1, -2)))[:, None]
    return grad_k, grad_v, _per_decay(terms, kind)


def _per_decay(per_token: torch.Tensor, kind: str) -> torch.Tensor:
    """[SB, m, H] -> the gradient of the decay as given: itself (per token) or summed to [H] (constant)."""
    return per_token.sum((0, 1)) if kind == "constant" else per_token


def chunk_decay(log_decay: torch.Tensor | None, setup: LinearSetup, length: int, dtype: torch.dtype,
                documents: DocumentChunks | None) -> LocalDecay | None:
    """The decay factors of this rank's slot-stacked chunks, with the document cuts (cheap: recomputed
    in backward instead of kept)."""
    decay = local_decay(log_decay, setup.decay_kind, length, dtype)
    return decay if documents is None else document_decay(decay, documents, length, dtype)


# --------------------------------------------------------------------------- the autograd Functions
#
# o = local kernel (zero incoming state) + inter term. The local kernel is the public differentiable op,
# so its residuals are ordinary saved tensors of the step's autograd graph: under torch.utils.checkpoint
# the recompute restores them with everything else and the layer's forward runs twice, not three times
# (a nested autograd replay inside a custom backward would trigger a second recompute). The two
# Functions around it own the communication: SendLocalStates starts the state exchange before the
# kernel runs, AddIncomingStates finishes it after; in backward AddIncomingStates starts the exchange
# of dM, the kernel's backward runs (autograd runs the later-created nodes first), and SendLocalStates
# finishes it. The empty tensor SendLocalStates returns orders the two in both directions.


def _slot_view(x: torch.Tensor, slots: int) -> torch.Tensor:
    """[SB, ...] <-> [S, B, ...] (slot-major, as to_slots stacks them)."""
    return x.reshape(slots, x.shape[0] // slots, *x.shape[1:])


class SendLocalStates(torch.autograd.Function):
    """Local chunk states M (and Γ) into the scheme's exchange; backward: the gradients of <Γ·S_in + M, T>."""

    @staticmethod
    def forward(ctx, k, v, log_decay, setup: LinearSetup, exchange: StateExchange, documents: DocumentChunks | None):
        decay = chunk_decay(log_decay, setup, k.shape[1], accumulation_dtype(k.dtype), documents)
        gamma = decay.transition if setup.decay_kind == "token" else None
        exchange.start_forward(_slot_view(local_states(k, v, decay), setup.slots),
                               None if gamma is None else _slot_view(gamma, setup.slots))
        ctx.save_for_backward(k, v, log_decay)
        ctx.setup, ctx.exchange, ctx.documents = setup, exchange, documents
        return k.new_empty(0)

    @staticmethod
    def backward(ctx, _):
        k, v, log_decay = ctx.saved_tensors
        setup, exchange = ctx.setup, ctx.exchange
        incoming, exchange.incoming = exchange.incoming, None  # handed over by AddIncomingStates.backward
        final_grads = exchange.finish_backward().reshape(incoming.shape)
        decay = chunk_decay(log_decay, setup, k.shape[1], incoming.dtype, ctx.documents)
        grad_k, grad_v, grad_decay = key_side_gradients(k, v, decay, setup.decay_kind, incoming, final_grads)
        grad_decay = None if grad_decay is None else grad_decay.to(log_decay.dtype)
        return grad_k.to(k.dtype), grad_v.to(v.dtype), grad_decay, None, None, None


class AddIncomingStates(torch.autograd.Function):
    """local_output + scale·(q ⊙ e^{G_i}) S_in once the exchange delivers S_in; backward: starts the
    exchange of dM and returns the gradients of the inter term with S_in held fixed."""

    @staticmethod
    def forward(ctx, q, log_decay, local_output, sent, setup: LinearSetup, exchange: StateExchange,
                documents: DocumentChunks | None):
        incoming = exchange.finish_forward().reshape(q.shape[0], q.shape[2], q.shape[3], local_output.shape[-1])
        decay = chunk_decay(log_decay, setup, q.shape[1], incoming.dtype, documents)
        ctx.save_for_backward(q, log_decay, incoming)
        ctx.setup, ctx.exchange, ctx.documents = setup, exchange, documents
        return local_output + inter_output(q, decay, incoming, setup.scale).to(local_output.dtype)

    @staticmethod
    def backward(ctx, d_output):
        q, log_decay, incoming = ctx.saved_tensors
        setup = ctx.setup
        decay = chunk_decay(log_decay, setup, q.shape[1], incoming.dtype, ctx.documents)
        if ctx.needs_input_grad[3]:  # k, v or the decay need the final-state gradients T of every rank
            ctx.exchange.incoming = incoming
            ctx.exchange.start_backward(_slot_view(state_gradients(q, d_output, decay, setup.scale), setup.slots))
        grad_q, grad_decay = query_side_gradients(q, d_output, decay, setup.decay_kind, incoming, setup.scale)
        grad_decay = None if grad_decay is None else grad_decay.to(log_decay.dtype)
        return grad_q.to(q.dtype), grad_decay, d_output, d_output.new_zeros(0), None, None, None
