"""Public softmax attention: argument checks, the backend switch, and the autograd Function."""

from __future__ import annotations

import contextlib

import torch

from ..backend_switch import BackendSwitch
from ..shapes import check_qkv, shapes_only
from . import gpu
from .masks import MaskSpec, build_mask_spec, check_cu_seqlens, check_window
from .math import attention_backward_math, attention_forward_math
from .naive import attention_naive

BACKENDS = ("auto", "flash_attn3", "flash_attn", "sdpa", "sdpa_efficient", "sdpa_cpu", "math", "naive")
AUTO_ORDER = ("flash_attn3", "flash_attn", "sdpa", "sdpa_efficient", "sdpa_cpu", "math")  # first that can run a call
ENVIRONMENT_VARIABLE = "SPINDLE_ATTN_BACKEND"


_switch = BackendSwitch(BACKENDS, ENVIRONMENT_VARIABLE, "backend")


def force_backend(name: str) -> contextlib.AbstractContextManager[None]:
    """Within the block, backend="auto" resolves to `name` (tests drive every path this way).

    Outside any block the environment variable SPINDLE_ATTN_BACKEND does the same for a whole process.
    """
    return _switch.force(name)


def unsupported_reason(name: str, q: torch.Tensor, window: int | None = None, documents: bool = False,
                       key_length: int | None = None, causal: bool = True) -> str | None:
    """Why backend `name` cannot run this call (key_length None: as many keys as queries), or None if it can."""
    if name in ("math", "naive"):
        return None
    if name in ("sdpa_efficient", "sdpa_cpu") and (window is not None or documents):
        return "has no sliding window or document mask (use 'sdpa' or 'math')"
    if name == "sdpa_efficient" and not gpu.sdpa_efficient_supports(q):
        return f"needs CUDA fp16/bf16/fp32 inputs with head_dim divisible by 8; got {q.dtype} on {q.device}"
    if name == "sdpa_cpu":
        key_length = q.shape[1] if key_length is None else key_length
        if not gpu.sdpa_cpu_supports(q):
            return f"needs CPU fp16/bf16/fp32 inputs (float64 uses 'math'); got {q.dtype} on {q.device}"
        if key_length == 0 or (causal and key_length != q.shape[1]):
            return "aligns its causal mask top-left, so it needs as many keys as queries (and at least one key)"
        return None
    if name == "sdpa_efficient":
        return None
    if name == "sdpa" and window is not None and not gpu.sdpa_supports_window():
        return f"needs a PyTorch whose aten flash kernel takes a window (this is {torch.__version__})"
    supports = {"flash_attn3": gpu.flash_attn3_supports, "flash_attn": gpu.flash_attn_supports,
                "sdpa": gpu.sdpa_supports}[name]
    if not supports(q):
        installed = {"flash_attn3": "FlashAttention-3 (flash_attn_interface) installed and a Hopper GPU, ",
                     "flash_attn": "flash-attn installed, ", "sdpa": "an sm80+ GPU, "}[name]
        return (f"needs {installed}CUDA fp16/bf16 inputs with head_dim <= 256 and divisible by 8; got {q.dtype} "
                f"on {q.device}, head_dim {q.shape[-1]}")
    return None


def resolve_backend(backend: str, q: torch.Tensor, window: int | None = None, documents: bool = False,
                    key_length: int | None = None, causal: bool = True) -> str:
    """"auto": a forced backend if any (force_backend, then SPINDLE_ATTN_BACKEND), else the first of
    flash_attn3, flash_attn, sdpa, sdpa_efficient, sdpa_cpu, math that supports the call. A named backend that
    cannot run the call is an error, never a silent fallback."""
    if backend not in BACKENDS:
        raise ValueError(f"attention: unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        backend = _switch.forced("attention") or "auto"
    if backend == "auto":  # meta tensors have no device to choose for: math (which runs, and counts FLOPs, on them)
        order = ("math",) if q.device.type == "meta" else AUTO_ORDER
        return next(name for name in order if unsupported_reason(name, q, window, documents, key_length, causal) is None)
    reason = unsupported_reason(backend, q, window, documents, key_length, causal)
    if reason is not None and shapes_only(q) and backend in gpu.KERNELS and "window" not in reason:
        # a fused kernel named for shapes-only tensors (kernels/shapes.py): they stand for its device, so only
        # its dtype and head-dim limits apply
        reason = None if gpu.meta_supports(backend, q) else f"cannot take {q.dtype} inputs with head_dim {q.shape[-1]}"
    if reason is not None:
        raise ValueError(f"attention: backend={backend!r} {reason}")
    return backend


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    check_qkv("attention", q, k, v)
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


def empty_query_rows(query_length: int, key_length: int, causal: bool) -> int:
    """Leading query rows that see no key: all when Tk = 0; Tq - Tk when causal and Tq > Tk."""
    if key_length == 0:
        return query_length
    return max(0, query_length - key_length) if causal else 0


class _Call:
    """One call's settings: the chosen backend, the mask, and (for fused kernels) the varlen documents."""

    def __init__(self, q, k, causal, scale, window, cu_seqlens, max_seqlen, backend):
        self.causal, self.window = bool(causal), check_window(window, bool(causal))
        check_cu_seqlens(cu_seqlens, q.shape[0], q.shape[1], k.shape[1])
        self.scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
        self.backend = resolve_backend(backend, q, self.window, cu_seqlens is not None, k.shape[1], self.causal)
        self.cu_seqlens, self.max_seqlen = cu_seqlens, max_seqlen
        self._spec: MaskSpec | None = None
        self._documents: gpu.Documents | None = None
        self.query_length, self.key_length, self.batch = q.shape[1], k.shape[1], q.shape[0]
        self.device = q.device

    @property
    def fused(self) -> bool:
        return self.backend in gpu.KERNELS

    @property
    def spec(self) -> MaskSpec:
        """The mask for the math and naive paths (document ids are built once, on first use)."""
        if self._spec is None:
            self._spec = build_mask_spec(self.cu_seqlens, self.causal, self.window, self.batch,
                                         self.query_length, self.key_length, self.device)
        return self._spec

    @property
    def documents(self) -> gpu.Documents | None:
        """int32 offsets on the device and the longest document (a host sync unless max_seqlen is given)."""
        if self.cu_seqlens is None:
            return None
        if self._documents is None:
            offsets = self.cu_seqlens.to(device=self.device, dtype=torch.int32, non_blocking=True)
            longest = self.max_seqlen
            if longest is None:
                longest = int((offsets[1:] - offsets[:-1]).max()) if offsets.numel() > 1 else 0
            self._documents = gpu.Documents(offsets, int(longest))
        return self._documents


def _kernel_forward(call: _Call, q, k, v):
    """(o, lse) from the chosen backend, with leading empty rows set to o = 0, lse = -inf."""
    if call.backend == "math":
        return attention_forward_math(q, k, v, call.causal, call.scale, call.spec)
    forward = gpu.meta_forward if shapes_only(q) else gpu.KERNELS[call.backend][0]
    skip = empty_query_rows(q.shape[1], k.shape[1], call.causal)
    if skip == 0:  # the common case: no copies around the kernel
        return forward(q.contiguous(), k.contiguous(), v.contiguous(), call.causal, call.scale, call.window,
                       call.documents)
    output = torch.zeros(*q.shape[:3], v.shape[-1], dtype=q.dtype, device=q.device)
    lse = torch.full((q.shape[0], q.shape[2], q.shape[1]), float("-inf"), dtype=torch.float32, device=q.device)
    if skip < q.shape[1]:
        output[:, skip:], lse[..., skip:] = forward(q[:, skip:].contiguous(), k.contiguous(), v.contiguous(),
                                                    call.causal, call.scale, call.window, call.documents)
    return output, lse


def _kernel_backward(call: _Call, q, k, v, o, lse, do, dlse=None, accumulate_fp32=True):
    """(dq, dk, dv) given the final o and lse: fp32 for attention_backward's callers (who sum blocks), else the
    kernel's own dtype. A gradient for lse goes through the math path."""
    if call.backend == "math" or call.backend == "naive" or dlse is not None:
        return attention_backward_math(q, k, v, o, lse, do, call.causal, call.scale, dlse, call.spec)
    skip = empty_query_rows(q.shape[1], k.shape[1], call.causal)
    backward = gpu.meta_backward if shapes_only(q) else gpu.KERNELS[call.backend][1]
    if skip == q.shape[1]:
        return tuple(torch.zeros(t.shape, dtype=torch.float32, device=t.device) for t in (q, k, v))
    rows = slice(skip, None)
    dq_rows, dk, dv = backward(
        q[:, rows].contiguous(), k.contiguous(), v.contiguous(), o[:, rows].to(q.dtype).contiguous(),
        lse[..., rows].float().contiguous(), do[:, rows].to(q.dtype).contiguous(), call.causal, call.scale,
        call.window, call.documents,
    )
    if skip == 0 and not accumulate_fp32:
        return dq_rows, dk, dv
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dq[:, rows] = dq_rows.float()
    return dq, dk.float(), dv.float()


class _AttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, call):
        output, lse = _kernel_forward(call, q, k, v)
        ctx.save_for_backward(q, k, v, output, lse)
        ctx.call = call
        ctx.set_materialize_grads(False)  # lets backward tell "lse unused" (None) from a zero gradient
        return output, lse

    @staticmethod
    def backward(ctx, d_output, d_lse):
        q, k, v, output, lse = ctx.saved_tensors
        if d_output is None:
            d_output = torch.zeros_like(output)
        dq, dk, dv = _kernel_backward(ctx.call, q, k, v, output, lse, d_output, d_lse, accumulate_fp32=False)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    window: int | None = None,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention with GQA, bottom-right-aligned causal masking, a sliding window and packed documents.

    Args:
        q: [B, Tq, H, D]; k, v: [B, Tk, H_kv, D] with H % H_kv == 0 (query head h uses kv head h // (H / H_kv)).
            float16 / bfloat16 / float32 (float64 for "math" / "naive").
        causal: query i sees key j iff j <= i + (Tk - Tq) (bottom-right aligned, as flash-attn >= 2.1).
            Rows that see no key (Tq > Tk) give o = 0 and lse = -inf, with zero gradients.
        window: w >= 1 keeps only keys i + (Tk - Tq) - w < j <= i + (Tk - Tq) (needs causal=True);
            None: no window. Never builds a Tq x Tk mask (flash kernels skip, the math path bands).
        cu_seqlens: int [N + 1] document offsets into the B·T tokens flattened row-major, containing 0, B·T
            and every row start (needs Tq == Tk): a query sees only keys of its own document (combined with
            causal and window). lse keeps the [B, H, Tq] layout.
        max_seqlen: the longest document, if known; spares fused kernels a host sync to find it.
        scale: softmax scale, default D ** -0.5.
        return_lse: also return lse = log Σ_j exp(scale · q_i · k_j), fp32 [B, H, Tq] (float64 for float64
            inputs). Differentiable (a gradient of lse is computed by the math backward on any device).
        backend: "auto" (forceable with force_backend or SPINDLE_ATTN_BACKEND), "flash_attn3", "flash_attn",
            "sdpa", "sdpa_efficient", "sdpa_cpu", "math" or "naive".

    Returns:
        o [B, Tq, H, D] in the dtype of q, or (o, lse).
    """
    _check_inputs(q, k, v)
    call = _Call(q, k, causal, scale, window, cu_seqlens, max_seqlen, backend)
    if call.backend == "naive":
        output, lse = attention_naive(q, k, v, call.causal, call.scale, call.spec)
    else:
        output, lse = _AttentionFunction.apply(q, k, v, call)
    return (output, lse) if return_lse else output


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    window: int | None = None,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    scale: float | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(o, lse) of one attention block without recording autograd (the per-block call of ring attention).

    Same semantics as attention(..., return_lse=True); pair it with attention_backward.
    """
    _check_inputs(q, k, v)
    call = _Call(q, k, causal, scale, window, cu_seqlens, max_seqlen, backend)
    with torch.no_grad():
        if call.backend == "naive":
            return attention_naive(q, k, v, call.causal, call.scale, call.spec)
        return _kernel_forward(call, q, k, v)


def attention_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    do: torch.Tensor,
    *,
    causal: bool = True,
    window: int | None = None,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    scale: float | None = None,
    dlse: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv) of one attention block, computed with a GIVEN o [B, Tq, H, D] and lse [B, H, Tq].

    Ring and all-gather attention pass the final merged o and lse of the full attention: then
    P = exp(scale·QKᵀ − lse) and D = rowsum(dO ⊙ o) are the global ones and the per-block gradients
    sum to the exact total (docs/algorithms.md). Returned in fp32 (float64 for float64 inputs), ready
    for accumulation; dk, dv have the kv-head shape of k, v.
    """
    _check_inputs(q, k, v)
    call = _Call(q, k, causal, scale, window, cu_seqlens, max_seqlen, backend)
    return _kernel_backward(call, q, k, v, o, lse, do, dlse)
