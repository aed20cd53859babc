"""Reference recurrence for linear attention with decay (docs/algorithms.md §1).

Token by token: S_t = exp(g_t) S_{t-1} + k_tᵀ v_t ; o_t = scale · q_t S_t.
Slow (a Python loop over T) and meant as a readable oracle; differentiable through autograd, so it
also gives reference gradients for q, k, v, log_decay and the initial state. Any floating dtype
works; the arithmetic runs in float64 for float64 inputs and float32 otherwise.
"""

from __future__ import annotations

import torch


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
    compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    batch, length, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    q32, k32, v32 = (x.to(compute_dtype) for x in (q, k, v))
    if initial_state is None:
        state = q32.new_zeros(batch, heads, key_dim, value_dim)
    else:
        state = initial_state.to(compute_dtype)
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
