"""Public entry point for linear attention: argument checks and backend dispatch."""

from __future__ import annotations

import os

import torch

from .chunked import linear_attention_chunked
from .naive import linear_attention_naive

BACKENDS = ("auto", "triton", "torch", "naive")
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TRITON_HEAD_DIMS = (16, 256)


def triton_available(device: torch.device) -> bool:
    """Triton runs on CUDA devices, and on CPU tensors under the interpreter (TRITON_INTERPRET=1)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1"


def _check_tensors(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"linear_attention: {name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dim() != 4:
            raise ValueError(
                f"linear_attention: {name} must be 4-D [batch, seq, heads, head_dim] (BSHD), "
                f"got shape {tuple(tensor.shape)}"
            )
        if tensor.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(
                f"linear_attention: {name} has dtype {tensor.dtype}; supported are float16, bfloat16, "
                "float32 and float64 (cast the input)"
            )
    if k.shape != q.shape:
        raise ValueError(f"linear_attention: k must have the shape of q {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"linear_attention: v must be [batch, seq, heads, value_dim] = {tuple(q.shape[:3])} + [Dv], "
            f"got {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"linear_attention: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"linear_attention: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")


def _broadcast_log_decay(log_decay: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor | None:
    """Checks log_decay and returns it as [B, T, H] (an expand, so a [H] tensor still gets its gradient)."""
    if log_decay is None:
        return None
    batch, length, heads, _ = q.shape
    if not isinstance(log_decay, torch.Tensor):
        raise TypeError(f"linear_attention: log_decay must be a torch.Tensor or None, got {type(log_decay).__name__}")
    if not log_decay.is_floating_point():
        raise TypeError(f"linear_attention: log_decay must be a floating tensor, got {log_decay.dtype}")
    if log_decay.device != q.device:
        raise ValueError(f"linear_attention: log_decay is on {log_decay.device}, q on {q.device}")
    if tuple(log_decay.shape) == (heads,):
        log_decay = log_decay.view(1, 1, heads).expand(batch, length, heads)
    elif tuple(log_decay.shape) != (batch, length, heads):
        raise ValueError(
            f"linear_attention: log_decay must be [heads] = [{heads}] (constant per head) or "
            f"[batch, seq, heads] = {[batch, length, heads]} (per token), got {tuple(log_decay.shape)}"
        )
    # a value check needs a host sync on CUDA; only CPU tensors are checked here
    if log_decay.device.type == "cpu" and bool((log_decay.detach() > 0).any()):
        raise ValueError(
            "linear_attention: log_decay must be <= 0 (it is the log of a decay factor in (0, 1]); "
            f"got a maximum of {log_decay.max().item():.4g}. Use e.g. -softplus(x) or logsigmoid(x)."
        )
    return log_decay


def _check_initial_state(initial_state: torch.Tensor | None, q: torch.Tensor, v: torch.Tensor) -> None:
    if initial_state is None:
        return
    expected = (q.shape[0], q.shape[2], q.shape[3], v.shape[3])
    if not isinstance(initial_state, torch.Tensor):
        raise TypeError(
            f"linear_attention: initial_state must be a torch.Tensor or None, got {type(initial_state).__name__}"
        )
    if tuple(initial_state.shape) != expected:
        raise ValueError(
            f"linear_attention: initial_state must be [batch, heads, key_dim, value_dim] = {list(expected)}, "
            f"got {tuple(initial_state.shape)}"
        )
    if not initial_state.is_floating_point():
        raise TypeError(f"linear_attention: initial_state must be floating (fp32), got {initial_state.dtype}")
    if initial_state.device != q.device:
        raise ValueError(f"linear_attention: initial_state is on {initial_state.device}, q on {q.device}")


def _resolve_backend(backend: str, q: torch.Tensor, v: torch.Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"linear_attention: unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "triton" if q.device.type == "cuda" and q.dtype in _TRITON_DTYPES and triton_available(q.device) else "torch"
    if backend == "triton":
        if not triton_available(q.device):
            raise ValueError(
                f"linear_attention: backend='triton' needs CUDA tensors or TRITON_INTERPRET=1 for CPU tensors "
                f"(and an installed triton); got a tensor on {q.device}. Use backend='torch'."
            )
        if q.dtype not in _TRITON_DTYPES:
            raise TypeError(f"linear_attention: backend='triton' supports float16/bfloat16/float32, got {q.dtype}")
        low, high = TRITON_HEAD_DIMS
        for name, dim in (("q/k head_dim", q.shape[-1]), ("v head_dim", v.shape[-1])):
            if not low <= dim <= high:
                raise ValueError(f"linear_attention: backend='triton' supports {name} in [{low}, {high}], got {dim}")
    return backend


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    log_decay: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal linear attention with an optional scalar decay per head or per token.

    Recurrence, per batch and head (ALGORITHMS.md §1)::

        S_t = exp(g_t) · S_{t-1} + k_tᵀ v_t        o_t = scale · q_t S_t

    Args:
        q, k: [B, T, H, Dk]; v: [B, T, H, Dv]. float16, bfloat16, float32 (float64 for "torch"/"naive").
        log_decay: None (no decay), [H] (constant per head) or [B, T, H] (per token); values g <= 0.
            Gradients flow to it when it requires grad.
        scale: multiplies q; defaults to Dk ** -0.5.
        initial_state: S_0, [B, H, Dk, Dv] (fp32); zeros when None. Differentiable.
        output_final_state: also return S_T, fp32 [B, H, Dk, Dv] (float64 for float64 inputs); its
            gradient flows back into q, k, v, log_decay and initial_state.
        backend: "auto" (triton on CUDA, torch elsewhere), "triton", "torch" (chunked) or "naive".

    Returns:
        (o, final_state): o has the dtype of q and shape [B, T, H, Dv]; final_state is None unless
        output_final_state.
    """
    _check_tensors(q, k, v)
    full_log_decay = _broadcast_log_decay(log_decay, q)
    _check_initial_state(initial_state, q, v)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    elif not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise TypeError(f"linear_attention: scale must be a float or None, got {type(scale).__name__}")
    chosen = _resolve_backend(backend, q, v)
    state_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32

    if q.shape[1] == 0:  # nothing to attend: the state passes through unchanged
        batch, _, heads, key_dim = q.shape
        output = v.new_zeros(v.shape)
        if not output_final_state:
            return output, None
        if initial_state is None:
            return output, q.new_zeros(batch, heads, key_dim, v.shape[-1], dtype=state_dtype)
        return output, initial_state.to(state_dtype)

    if chosen == "naive":
        return linear_attention_naive(q, k, v, full_log_decay, float(scale), initial_state, output_final_state)
    if chosen == "torch":
        return linear_attention_chunked(q, k, v, full_log_decay, float(scale), initial_state, output_final_state)
    from .triton_chunk import linear_attention_triton

    return linear_attention_triton(q, k, v, full_log_decay, float(scale), initial_state, output_final_state)
