"""Public softmax attention: argument checks, the backend switch, and the autograd Function."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from . import gpu
from .math import attention_backward_math, attention_forward_math
from .naive import attention_naive

BACKENDS = ("auto", "flash_attn", "sdpa", "math", "naive")
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_forced_backend: str | None = None


@contextlib.contextmanager
def force_backend(name: str) -> Iterator[None]:
    """Within the block, backend="auto" resolves to `name` (tests drive every path this way)."""
    global _forced_backend
    if name not in BACKENDS:
        raise ValueError(f"force_backend: unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    previous, _forced_backend = _forced_backend, (None if name == "auto" else name)
    try:
        yield
    finally:
        _forced_backend = previous


def resolve_backend(backend: str, q: torch.Tensor) -> str:
    """"auto": a forced backend if any, else flash-attn, else PyTorch's efficient SDPA kernel on CUDA, else math."""
    if backend not in BACKENDS:
        raise ValueError(f"attention: unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        if _forced_backend is not None:
            backend = _forced_backend
        elif gpu.flash_attn_supports(q):
            return "flash_attn"
        elif gpu.sdpa_supports(q):
            return "sdpa"
        else:
            return "math"
    if backend == "flash_attn" and not gpu.flash_attn_supports(q):
        raise ValueError(
            "attention: backend='flash_attn' needs flash-attn installed and CUDA fp16/bf16 inputs with "
            f"head_dim <= 256 and divisible by 8; got {q.dtype} on {q.device}, head_dim {q.shape[-1]}"
        )
    if backend == "sdpa" and not gpu.sdpa_supports(q):
        raise ValueError(
            f"attention: backend='sdpa' needs CUDA inputs with head_dim divisible by 8; got {q.device}, "
            f"head_dim {q.shape[-1]}"
        )
    return backend


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"attention: {name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dim() != 4:
            raise ValueError(
                f"attention: {name} must be 4-D [batch, seq, heads, head_dim] (BSHD), got {tuple(tensor.shape)}"
            )
        if tensor.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(f"attention: {name} has dtype {tensor.dtype}; use float16, bfloat16, float32 or float64")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"attention: k and v must agree on [batch, seq, kv_heads], got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"attention: q {tuple(q.shape)} and k {tuple(k.shape)} must agree on batch and head_dim"
        )
    if k.shape[2] == 0 or q.shape[2] % k.shape[2] != 0:
        raise ValueError(
            f"attention: query heads ({q.shape[2]}) must be a multiple of key/value heads ({k.shape[2]}) for GQA"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"attention: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"attention: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")


def empty_query_rows(query_length: int, key_length: int, causal: bool) -> int:
    """Leading query rows that see no key: all when Tk = 0; Tq - Tk when causal and Tq > Tk."""
    if key_length == 0:
        return query_length
    return max(0, query_length - key_length) if causal else 0


def _kernel_forward(backend, q, k, v, causal, scale):
    """(o, lse) from a fused kernel, with leading empty rows set to o = 0, lse = -inf."""
    if backend == "math":
        return attention_forward_math(q, k, v, causal, scale)
    skip = empty_query_rows(q.shape[1], k.shape[1], causal)
    output = torch.zeros(*q.shape[:3], v.shape[-1], dtype=q.dtype, device=q.device)
    lse = torch.full((q.shape[0], q.shape[2], q.shape[1]), float("-inf"), dtype=torch.float32, device=q.device)
    if skip < q.shape[1]:
        forward = gpu.flash_attn_forward if backend == "flash_attn" else gpu.sdpa_forward
        output[:, skip:], lse[..., skip:] = forward(q[:, skip:], k, v, causal, scale)
    return output, lse


def _kernel_backward(backend, q, k, v, o, lse, do, causal, scale, dlse=None):
    """fp32 (dq, dk, dv) given the final o and lse; a gradient for lse goes through the math path."""
    if backend == "math" or dlse is not None:
        return attention_backward_math(q, k, v, o, lse, do, causal, scale, dlse)
    skip = empty_query_rows(q.shape[1], k.shape[1], causal)
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    if skip == q.shape[1]:
        return dq, torch.zeros_like(k, dtype=torch.float32), torch.zeros_like(v, dtype=torch.float32)
    backward = gpu.flash_attn_backward if backend == "flash_attn" else gpu.sdpa_backward
    rows = slice(skip, None)
    dq_rows, dk, dv = backward(q[:, rows], k, v, o[:, rows], lse[..., rows], do[:, rows].to(q.dtype), causal, scale)
    dq[:, rows] = dq_rows.float()
    return dq, dk.float(), dv.float()


class _AttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, scale, backend):
        output, lse = _kernel_forward(backend, q, k, v, causal, scale)
        ctx.save_for_backward(q, k, v, output, lse)
        ctx.causal, ctx.scale, ctx.backend = causal, scale, backend
        ctx.set_materialize_grads(False)  # lets backward tell "lse unused" (None) from a zero gradient
        return output, lse

    @staticmethod
    def backward(ctx, d_output, d_lse):
        q, k, v, output, lse = ctx.saved_tensors
        if d_output is None:
            d_output = torch.zeros_like(output)
        dq, dk, dv = _kernel_backward(ctx.backend, q, k, v, output, lse, d_output, ctx.causal, ctx.scale, d_lse)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
    return_lse: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention with GQA and bottom-right-aligned causal masking.

    Args:
        q: [B, Tq, H, D]; k, v: [B, Tk, H_kv, D] with H % H_kv == 0 (query head h uses kv head h // (H / H_kv)).
            float16 / bfloat16 / float32 (float64 for "math" / "naive").
        causal: query i sees key j iff j <= i + (Tk - Tq) (bottom-right aligned, as flash-attn >= 2.1).
            Rows that see no key (Tq > Tk) give o = 0 and lse = -inf, with zero gradients.
        scale: softmax scale, default D ** -0.5.
        return_lse: also return lse = log Σ_j exp(scale · q_i · k_j), fp32 [B, H, Tq] (float64 for float64
            inputs). Differentiable (a gradient of lse is computed by the math backward on any device).
        backend: "auto" (forceable with force_backend), "flash_attn", "sdpa", "math" or "naive".

    Returns:
        o [B, Tq, H, D] in the dtype of q, or (o, lse).
    """
    _check_inputs(q, k, v)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    chosen = resolve_backend(backend, q)
    if chosen == "naive":
        output, lse = attention_naive(q, k, v, bool(causal), float(scale))
    else:
        output, lse = _AttentionFunction.apply(q, k, v, bool(causal), float(scale), chosen)
    return (output, lse) if return_lse else output


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(o, lse) of one attention block without recording autograd (the per-block call of ring attention).

    Same semantics as attention(..., return_lse=True); pair it with attention_backward.
    """
    _check_inputs(q, k, v)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    chosen = resolve_backend(backend, q)
    with torch.no_grad():
        if chosen == "naive":
            return attention_naive(q, k, v, bool(causal), float(scale))
        return _kernel_forward(chosen, q, k, v, bool(causal), float(scale))


def attention_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    do: torch.Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
    dlse: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv) of one attention block, computed with a GIVEN o [B, Tq, H, D] and lse [B, H, Tq].

    Ring and all-gather attention pass the final merged o and lse of the full attention: then
    P = exp(scale·QKᵀ − lse) and D = rowsum(dO ⊙ o) are the global ones and the per-block gradients
    sum to the exact total (ALGORITHMS.md §3). Returned in fp32 (float64 for float64 inputs), ready
    for accumulation; dk, dv have the kv-head shape of k, v.
    """
    _check_inputs(q, k, v)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    chosen = resolve_backend(backend, q)
    if chosen == "naive":
        chosen = "math"
    return _kernel_backward(chosen, q, k, v, o, lse, do, bool(causal), float(scale), dlse)
