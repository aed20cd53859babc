"""Dense reference for softmax attention with GQA, bottom-right-aligned causal masking, a sliding window
and document masks.

Materializes the full [B, H, Tq, Tk] score matrix: a readable oracle for small shapes only.
Differentiable through autograd (gradients of o and of lse).
"""

from __future__ import annotations

import torch

from .masks import MaskSpec, dense_mask


def causal_mask(query_length: int, key_length: int, device: torch.device) -> torch.Tensor:
    """[Tq, Tk] bool, True where query i may see key j: j <= i + (Tk - Tq) (bottom-right aligned)."""
    rows = torch.arange(query_length, device=device)[:, None]
    columns = torch.arange(key_length, device=device)[None, :]
    return columns <= rows + (key_length - query_length)


def attention_naive(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float, spec: MaskSpec | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [B, Tq, H, D]; k, v: [B, Tk, H_kv, D]. Returns o [B, Tq, H, D] and lse [B, H, Tq].

    `spec` (window, documents) overrides `causal` when given. Rows that see no key get o = 0, lse = -inf.
    """
    spec = spec if spec is not None else MaskSpec(causal)
    compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    groups = q.shape[2] // k.shape[2]
    # [B, T, H, D] -> [B, H, T, D], with each kv head repeated for its group of query heads
    qh = q.to(compute_dtype).transpose(1, 2)
    kh = k.to(compute_dtype).transpose(1, 2).repeat_interleave(groups, dim=1)
    vh = v.to(compute_dtype).transpose(1, 2).repeat_interleave(groups, dim=1)
    scores = scale * qh @ kh.transpose(-1, -2)  # [B, H, Tq, Tk]
    mask = dense_mask(spec, q.shape[1], k.shape[1], q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # -inf on empty rows
    finite_lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    probabilities = torch.exp(scores - finite_lse[..., None])  # exactly 0 on masked entries
    output = (probabilities @ vh).transpose(1, 2).to(q.dtype)
    return output, lse
