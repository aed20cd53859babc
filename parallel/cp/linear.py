"""The loop LASP-2 and LASP-1 share: local states, the exchange of chunk states, local outputs and gradients.

Per chunk c of the global sequence (ALGORITHMS.md §2; a rank holds 1 chunk on "contiguous", 2 on
"zigzag"), with G_i the inclusive cumulative log-decay inside the chunk and m its length:

    M_c    = Σ_i exp(G_m − G_i) k_iᵀ v_i          local final state from a zero initial state
    Γ_c    = exp(G_m)                             how much the chunk decays an incoming state
    S_in   = chain over earlier chunks            (the scheme: one all-gather, or a P2P ring)
    o      = kernel(q, k, v; zero state) + scale · (q ⊙ exp(G_i)) S_in

Backward: dM_c = scale · Σ_i exp(G_i) q_iᵀ do_i (the gradient of S_in through the chunk's own
outputs) is exchanged, the scheme returns T_c = ∂L/∂(final state of chunk c), and the local gradients
are those of <o, do> + <Γ_c·S_in + M_c, T_c> with S_in held fixed. That sum covers every path by
which q, k, v and the decay reach the loss, including the decay's effect on later ranks (through
Γ_c and M_c). A scheme is an object with start_forward / finish_forward / start_backward /
finish_backward, so the communication of LASP-2 overlaps the local kernel work in both directions.

The chunks of one rank are stacked along the batch ("slots", see layout.to_slots), so one kernel
call handles both zigzag chunks. States are fp32 (float64 for float64 inputs).
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import torch
import torch.distributed as dist

from spindle.kernels import linear_attention

from .comm import check_ranks_agree, group_rank_and_size
from .layout import check_layout, chunks_per_rank, from_slots, to_slots
from .merge import accumulation_dtype


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


@dataclasses.dataclass
class LinearSetup:
    """Validated arguments of a linear CP call."""

    rank: int
    world_size: int
    layout: str
    slots: int
    scale: float
    decay_kind: str  # "none" | "constant" | "token"


def validate_linear_inputs(
    caller: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: dist.ProcessGroup,
    layout: str,
    log_decay: torch.Tensor | None,
    scale: float | None,
) -> LinearSetup:
    """Cross-rank agreement first (so no rank is left waiting in a collective), then local checks."""
    rank, world_size = group_rank_and_size(group, caller)
    check_layout(layout, caller)
    positive_decay = isinstance(log_decay, torch.Tensor) and bool((log_decay.detach() > 0).any())
    check_ranks_agree(
        group,
        caller,
        {"q": q, "k": k, "v": v, "log_decay": log_decay, "layout": layout, "scale": scale},
        any_rank_flags={"log_decay has positive values; it must be <= 0 (log of a decay in (0, 1])": positive_decay},
    )
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 4:
            raise ValueError(f"{caller}: {name} must be a 4-D tensor [batch, local_seq, heads, head_dim]")
    if k.shape != q.shape:
        raise ValueError(f"{caller}: k {tuple(k.shape)} must have the shape of q {tuple(q.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"{caller}: v {tuple(v.shape)} must match q {tuple(q.shape)} in [batch, local_seq, heads] "
            "(linear attention has no grouped kv heads: repeat k/v heads first)"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{caller}: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    batch, length, heads, _ = q.shape
    if layout == "zigzag" and length % 2 != 0:
        raise ValueError(
            f"{caller}: local length {length} is odd, but layout 'zigzag' holds two equal chunks per rank; "
            f"the global length must be divisible by 2 x {world_size} ranks"
        )
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
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return LinearSetup(rank, world_size, layout, chunks_per_rank(layout), scale, decay_kind)


# --------------------------------------------------------------------------- local math (slot-stacked)


def cumulative_log_decay(log_decay: torch.Tensor | None, kind: str, length: int, dtype: torch.dtype):
    """Inclusive G_i inside each chunk: [SB, m, H] (per token), [1, m, H] (constant) or None."""
    if kind == "none":
        return None
    if kind == "constant":
        steps = torch.arange(1, length + 1, device=log_decay.device, dtype=dtype)
        return steps[None, :, None] * log_decay.to(dtype)[None, None, :]
    return log_decay.to(dtype).cumsum(dim=1)


def local_states(k: torch.Tensor, v: torch.Tensor, cumulative: torch.Tensor | None) -> torch.Tensor:
    """M = Σ_i exp(G_m − G_i) k_iᵀ v_i: [SB, m, H, Dk] x [SB, m, H, Dv] -> [SB, H, Dk, Dv]."""
    dtype = accumulation_dtype(k.dtype)
    keys = k.to(dtype)
    if cumulative is not None:
        # G_m − G_i <= 0: no overflow
        keys = keys * torch.exp(cumulative[:, -1:] - cumulative)[..., None]
    return torch.einsum("bthk,bthv->bhkv", keys, v.to(dtype))


def transitions(cumulative: torch.Tensor | None) -> torch.Tensor | None:
    """Γ = exp(G_m): [SB, H] (per token), [1, H] (constant) or None."""
    return None if cumulative is None else torch.exp(cumulative[:, -1])


def inter_output(q: torch.Tensor, cumulative: torch.Tensor | None, incoming: torch.Tensor, scale: float):
    """scale · (q ⊙ exp(G_i)) S_in: [SB, m, H, Dk] x [SB, H, Dk, Dv] -> [SB, m, H, Dv] (state dtype)."""
    queries = q.to(incoming.dtype) * scale
    if cumulative is not None:
        queries = queries * torch.exp(cumulative)[..., None]
    return torch.einsum("bthk,bhkv->bthv", queries, incoming)


def state_gradients(q: torch.Tensor, d_output: torch.Tensor, cumulative, scale: float) -> torch.Tensor:
    """dM = ∂<inter_output, do>/∂S_in = scale · Σ_i exp(G_i) q_iᵀ do_i -> [SB, H, Dk, Dv]."""
    dtype = accumulation_dtype(q.dtype)
    queries = q.to(dtype) * scale
    if cumulative is not None:
        queries = queries * torch.exp(cumulative)[..., None]
    return torch.einsum("bthk,bthv->bhkv", queries, d_output.to(dtype))


# --------------------------------------------------------------------------- the autograd Function


def _slot_view(x: torch.Tensor, slots: int) -> torch.Tensor:
    """[SB, ...] <-> [S, B, ...] (slot-major, as to_slots stacks them)."""
    return x.reshape(slots, x.shape[0] // slots, *x.shape[1:])


class LinearContextParallel(torch.autograd.Function):
    """Linear attention over a CP group; the scheme's `exchange` object does all communication."""

    @staticmethod
    def forward(ctx, q, k, v, log_decay, setup: LinearSetup, exchange: StateExchange):
        slots, kind = setup.slots, setup.decay_kind
        qs, ks, vs = (to_slots(x, slots) for x in (q, k, v))  # [S·B, m, H, D]
        gs = to_slots(log_decay, slots) if kind == "token" else log_decay
        dtype = accumulation_dtype(q.dtype)
        cumulative = cumulative_log_decay(gs, kind, qs.shape[1], dtype)
        states = local_states(ks, vs, cumulative)
        gamma = transitions(cumulative) if kind == "token" else None
        exchange.start_forward(_slot_view(states, slots), None if gamma is None else _slot_view(gamma, slots))
        # the intra-rank work overlaps the state exchange
        output, _ = linear_attention(qs, ks, vs, log_decay=gs, scale=setup.scale)
        incoming = exchange.finish_forward().reshape(states.shape)  # [S·B, H, Dk, Dv]
        output = output + inter_output(qs, cumulative, incoming, setup.scale).to(output.dtype)
        ctx.save_for_backward(q, k, v, log_decay, incoming)
        ctx.setup, ctx.exchange = setup, exchange
        return from_slots(output, slots)

    @staticmethod
    def backward(ctx, d_output):
        q, k, v, log_decay, incoming = ctx.saved_tensors
        setup, exchange = ctx.setup, ctx.exchange
        slots, kind = setup.slots, setup.decay_kind
        d_output = to_slots(d_output, slots)
        qs, ks, vs = (to_slots(x, slots).detach().requires_grad_() for x in (q, k, v))
        gs = None
        if log_decay is not None:
            gs = (to_slots(log_decay, slots) if kind == "token" else log_decay).detach().requires_grad_()
        dtype = accumulation_dtype(q.dtype)
        with torch.no_grad():
            cumulative = cumulative_log_decay(gs, kind, qs.shape[1], dtype)
            exchange.start_backward(_slot_view(state_gradients(qs, d_output, cumulative, setup.scale), slots))
        inputs = [x for x in (qs, ks, vs, gs) if x is not None]
        # overlapped with the exchange: gradients of <o, do> with the incoming state held fixed
        with torch.enable_grad():
            cumulative = cumulative_log_decay(gs, kind, qs.shape[1], dtype)
            output, _ = linear_attention(qs, ks, vs, log_decay=gs, scale=setup.scale)
            output = output + inter_output(qs, cumulative, incoming, setup.scale).to(output.dtype)
            grads = torch.autograd.grad(output, inputs, d_output, allow_unused=True)
        final_grads = exchange.finish_backward().reshape(incoming.shape)
        # gradients of <Γ·S_in + M, T>: how this rank's chunks shape every later chunk's incoming state
        with torch.enable_grad():
            cumulative = cumulative_log_decay(gs, kind, qs.shape[1], dtype)  # the first graph is freed
            final_state = local_states(ks, vs, cumulative)
            gamma = transitions(cumulative)
            if gamma is not None:
                final_state = final_state + gamma[..., None, None] * incoming
            state_inputs = inputs[1:]  # k, v (, g)
            state_grads = torch.autograd.grad(final_state, state_inputs, final_grads, allow_unused=True)
        grads = [grads[0]] + [_add(a, b) for a, b in zip(grads[1:], state_grads)]
        dq, dk, dv = (from_slots(g, slots) for g in grads[:3])
        d_decay = None
        if log_decay is not None:
            d_decay = grads[3] if kind == "constant" else from_slots(grads[3], slots)
        return dq, dk, dv, d_decay, None, None


def _add(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None:
        return b
    return a if b is None else a + b.to(a.dtype)
