"""Reference recurrence for linear attention with decay (docs/algorithms.md §1).

Token by token: S_t = exp(g_t) S_{t-1} + k_tᵀ v_t ; o_t = scale · q_t S_t.
Slow (a Python loop over T) and meant as a readable oracle; differentiable through autograd, so it
also gives reference gradients for q, k, v, log_decay and the initial state. Any floating dtype
works; the arithmetic runs in float64 for float64 inputs and float32 otherwise.
"""

from __future__ import annotations

import torch


def starting_state(q: torch.Tensor, v: torch.Tensor, initial_state: torch.Tensor | None) -> torch.Tensor:
    """S_{-1} in the compute dtype (float64 for float64 inputs, else float32): initial_state, or zeros
    [B, H, Dk, Dv]."""
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    if initial_state is None:
        return torch.zeros(q.shape[0], q.shape[2], q.shape[3], v.shape[-1], dtype=dtype, device=q.device)
    return initial_state.to(dtype)


def linear_attention_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor | None,
    scale: float,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """q, k: [B, T, H, Dk]; v: [B, T, H, Dv]; log_decay: None or [B, T, H] (already broadcast)."""
    state = starting_state(q, v, initial_state)
    compute_dtype = state.dtype
    batch, length, heads, _ = q.shape
    value_dim = v.shape[-1]
    q32, k32, v32 = (x.to(compute_dtype) for x in (q, k, v))
    outputs = []
    for t in range(length):
        if log_decay is not None:
            state = torch.exp(log_decay[:, t].to(compute_dtype))[:, :, None, None] * state
        # outer product k_tᵀ v_t per (batch, head): [B, H, Dk, 1] * [B, H, 1, Dv]
        state = state + k32[:, t, :, :, None] * v32[:, t, :, None, :]
        outputs.append(scale * torch.einsum("bhk,bhkv->bhv", q32[:, t], state))
    if length:
        output = torch.stack(outputs, dim=1)
    else:
        output = v32.new_zeros(batch, 0, heads, value_dim)
    return output.to(q.dtype), (state if output_final_state else None)
