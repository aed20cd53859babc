"""Chunked PyTorch path for linear attention with decay (Lightning Attention-2 form, docs/algorithms.md §1).

The sequence is cut into blocks of `chunk_size` tokens (the tail block is zero-padded with g = 0, so
padding neither adds to the state nor decays it). Within a block the output is ordinary masked
attention with decay weights exp(G_i − G_j) ("left product"); across blocks an fp32 state carries the
prefix ("right product"). All blocks' intra terms and local states are computed at once; only the
d_k × d_v state chain is a Python loop over blocks. Gradients come from autograd.

Shapes inside this module are heads-first: [B, H, N, C, D] with N blocks of C tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .naive import starting_state


def _to_blocks(x: torch.Tensor, chunk_size: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, T, H, D] -> [B, H, N, C, D], zero-padding T up to N·C."""
    batch, length, heads, dim = x.shape
    padded = -(-length // chunk_size) * chunk_size
    x = F.pad(x.to(dtype), (0, 0, 0, 0, 0, padded - length))
    return x.view(batch, padded // chunk_size, chunk_size, heads, dim).permute(0, 3, 1, 2, 4)


def linear_attention_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor | None,
    scale: float,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """q, k: [B, T, H, Dk]; v: [B, T, H, Dv]; log_decay: None or [B, T, H] (already broadcast)."""
    compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    batch, length, heads, _ = q.shape
    value_dim = v.shape[-1]
    chunk_size = max(1, min(chunk_size, length))
    qb = _to_blocks(q, chunk_size, compute_dtype) * scale  # [B, H, N, C, Dk]
    kb = _to_blocks(k, chunk_size, compute_dtype)  # [B, H, N, C, Dk]
    vb = _to_blocks(v, chunk_size, compute_dtype)  # [B, H, N, C, Dv]
    num_blocks = qb.shape[2]
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).tril()
    strictly_causal = causal.tril(-1)

    if log_decay is None:
        scores = (qb @ kb.transpose(-1, -2)).masked_fill(~causal, 0.0)  # [B, H, N, C, C]
        query_decay = key_decay = block_decay = None
    else:
        gb = _to_blocks(log_decay[..., None], chunk_size, compute_dtype)[..., 0]  # [B, H, N, C]
        cumulative = gb.cumsum(-1)  # inclusive G_i within the block, <= 0
        # differences G_i - G_j are <= 0 where j < i; mask before exp so nothing overflows. The diagonal
        # (weight exactly 1) is added as a constant: were it exp(G_i − G_i), its large gradient terms
        # would cancel only after rounding and swamp the small decay gradient under strong decay.
        difference = cumulative[..., :, None] - cumulative[..., None, :]
        decay = torch.exp(difference.masked_fill(~strictly_causal, float("-inf")))
        decay = decay + torch.eye(chunk_size, dtype=compute_dtype, device=q.device)  # [B, H, N, C, C]
        scores = (qb @ kb.transpose(-1, -2)) * decay
        query_decay = torch.exp(cumulative)[..., None]  # [B, H, N, C, 1]
        block_decay = torch.exp(cumulative[..., -1])  # [B, H, N]
        # G_C − G_i as the exclusive suffix sum Σ_{u>i} g_u: the last token then has no dependence on g
        # at all, instead of a +1/−1 pair of large gradient terms that cancel only after rounding
        suffix = F.pad(gb.flip(-1).cumsum(-1).flip(-1)[..., 1:], (0, 1))
        key_decay = torch.exp(suffix)[..., None]  # [B, H, N, C, 1]
    output = scores @ vb  # intra-block term, [B, H, N, C, Dv]

    # local block states M_n = (K ⊙ exp(G_C − G_i))ᵀ V, then the ordered chain S_n = Γ_n S_{n-1} + M_n
    decayed_keys = kb if key_decay is None else kb * key_decay
    local_states = decayed_keys.transpose(-1, -2) @ vb  # [B, H, N, Dk, Dv]
    state = starting_state(q, v, initial_state)
    incoming = []
    for block in range(num_blocks):
        incoming.append(state)
        if block_decay is not None:
            state = block_decay[:, :, block, None, None] * state
        state = state + local_states[:, :, block]
    incoming_states = torch.stack(incoming, dim=2)  # [B, H, N, Dk, Dv]
    decayed_queries = qb if query_decay is None else qb * query_decay
    output = output + decayed_queries @ incoming_states  # inter-block term

    # [B, H, N, C, Dv] -> [B, T, H, Dv]
    output = output.permute(0, 2, 3, 1, 4).reshape(batch, num_blocks * chunk_size, heads, value_dim)
    output = output[:, :length].to(q.dtype)
    return output, (state if output_final_state else None)
