"""Numerics shared by the context-parallel ops: the softmax LSE merge and the decayed state chains.

Both are pure functions on fp32 (or float64) tensors. They are isolated because their exact form
matters for overflow and error growth, and every scheme must use the same one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half/single inputs, float64 for float64 inputs (so float64 tests stay exact)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def merge_attention_block(
    out: torch.Tensor | None, lse: torch.Tensor | None, block_out: torch.Tensor, block_lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold one attention block's (O_b, L_b) into the running (O, L); returns the new (O, L).

    out / block_out: [B, Tq, H, D]; lse / block_lse: [B, H, Tq] (L = log Σ exp(scale·q·k) over the
    block's keys). The running pair is kept in fp32 (float64 for float64 inputs); pass out=None,
    lse=None for the first block.

    Why this form (docs/algorithms.md §3): the textbook merge exp(L_b − L)·O_b overflows when L_b ≫ L.
    Written with a sigmoid, O ← O − σ(L_b − L)·(O − O_b) and L ← L − logσ(L − L_b) only ever
    evaluate σ and logσ, which are bounded and stable for any finite gap. Rows a block does not see
    (L_b = −inf, or +inf as FlashAttention-2 reports fully masked rows) are normalized to L = −inf,
    O = 0 and leave the running values untouched; a running L of −inf simply takes the block's
    values, so nothing ever computes −inf − (−inf).
    """
    dtype = accumulation_dtype(block_out.dtype)
    block_lse = block_lse.to(dtype)
    empty = torch.isinf(block_lse)  # fully masked rows (−inf, or +inf from FA2)
    block_lse = block_lse.masked_fill(empty, float("-inf"))
    empty_rows = empty.transpose(1, 2).unsqueeze(-1)  # [B, H, Tq] -> [B, Tq, H, 1]
    block_out = block_out.to(dtype).masked_fill(empty_rows, 0.0)
    if out is None:
        return block_out, block_lse
    fresh = torch.isinf(lse) | empty  # running row still empty, or nothing new for it
    safe_lse = torch.where(fresh, torch.zeros_like(lse), lse)
    safe_block_lse = torch.where(fresh, torch.zeros_like(block_lse), block_lse)
    weight = torch.sigmoid(safe_block_lse - safe_lse).transpose(1, 2).unsqueeze(-1)  # [B, Tq, H, 1]
    merged_out = out - weight * (out - block_out)
    merged_lse = safe_lse - F.logsigmoid(safe_lse - safe_block_lse)
    take_block = torch.isinf(lse) & ~empty
    keep_running = empty
    merged_out = torch.where(take_block.transpose(1, 2).unsqueeze(-1), block_out, merged_out)
    merged_out = torch.where(keep_running.transpose(1, 2).unsqueeze(-1), out, merged_out)
    merged_lse = torch.where(take_block, block_lse, torch.where(keep_running, lse, merged_lse))
    return merged_out, merged_lse


def decayed_prefix_chain(states: torch.Tensor, transitions: torch.Tensor | None) -> torch.Tensor:
    """Incoming state of every chunk: S_in[0] = 0, S_in[c+1] = Γ_c · S_in[c] + M_c.

    states: M_c, [N, ...] in global chunk order (each chunk's final state from a zero initial state);
    transitions: Γ_c = exp(sum of the chunk's log-decays), broadcastable to [N, ...] after adding
    trailing dims, or None for no decay. Returns S_in, [N, ...], in the dtype of `states` (pass fp32).

    Why a sequential scan in fp32: the closed form Σ_{s<c} (Π Γ) M_s via cumulative products needs a
    division by Π Γ (or exp of differences of cumulative log-decays), which underflows to 0/0 for
    strong decay over many chunks; the chain only multiplies by Γ ≤ 1, so it cannot overflow, and N
    is the number of CP chunks (P or 2P), not tokens, so the loop is short. fp32 because the error of
    a bf16 running state compounds with every chunk (docs/algorithms.md §1-2).
    """
    incoming = torch.zeros_like(states)
    running = torch.zeros_like(states[0])
    for chunk in range(states.shape[0] - 1):
        running = apply_transition(running, transitions, chunk) + states[chunk]
        incoming[chunk + 1] = running
    return incoming


def decayed_suffix_chain(state_grads: torch.Tensor, transitions: torch.Tensor | None) -> torch.Tensor:
    """Gradient of every chunk's final state: T[N-1] = 0, T[c] = dM[c+1] + Γ_{c+1} · T[c+1].

    state_grads: dM_c = ∂L/∂S_in[c] through chunk c's own outputs only, [N, ...] in global order;
    transitions as in `decayed_prefix_chain`. This is the adjoint of that chain (the backward walks
    it in reverse), in fp32 for the same reasons.
    """
    outgoing = torch.zeros_like(state_grads)
    running = torch.zeros_like(state_grads[0])
    for chunk in range(state_grads.shape[0] - 1, 0, -1):
        running = state_grads[chunk] + apply_transition(running, transitions, chunk)
        outgoing[chunk - 1] = running
    return outgoing


def apply_transition(state: torch.Tensor, transitions: torch.Tensor | None, chunk: int) -> torch.Tensor:
    """Γ_chunk · state, with Γ [..] broadcast over the state's trailing (Dk, Dv) dims; identity for None."""
    if transitions is None:
        return state
    factor = transitions[chunk]
    return factor.reshape(*factor.shape, *([1] * (state.dim() - factor.dim()))) * state
