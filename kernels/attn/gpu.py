"""Fused softmax-attention kernels on CUDA, each behind one forward and one backward-given-(o, lse) call.

- `flash_attn3`: FlashAttention-3 (`flash_attn_interface`, Hopper) forward through its public functions
  with the LSE; backward through its registered op `torch.ops.flash_attn_3._flash_attn_backward`.
- `flash_attn`: flash-attn 2.6+ forward through the public `flash_attn_func` / `flash_attn_varlen_func`
  with `return_attn_probs=True` (which returns the LSE); backward through the registered op
  `torch.ops.flash_attn._flash_attn_(varlen_)backward` (2.7+), or for 2.6, whose private backward is a
  plain function, through that function with 2.6's argument names.
- `sdpa`: PyTorch's own FlashAttention-2 kernel, `aten::_flash_attention_forward/backward`: native GQA
  (no K/V copies), bottom-right causal, sliding window, varlen (cu_seqlens) and the LSE.
- `sdpa_efficient`: PyTorch's memory-efficient kernel (fp32 and head dims flash does not take); no
  native GQA, so K/V are repeated; no window or documents.
- `sdpa_cpu`: PyTorch's fused CPU kernel `aten::_scaled_dot_product_flash_attention_for_cpu(_backward)`:
  native GQA, fp16/bf16/fp32 (float64 stays on `math`), the LSE; no window or documents, causal only
  with Tq == Tk.

Every call binds its arguments by name against the installed op's schema (op_binding.py), so a changed
argument list is a clear error rather than a silently wrong call. Inputs given here have every query
row seeing at least one key (api.py strips the leading empty rows of a causal Tq > Tk call). Only sdpa_cpu
runs on CPU; the CUDA tests are GPU-marked and the binding is tested on CPU against ops of the same schema.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from typing import Any

import torch

from .op_binding import Parameter, bind_arguments, call_op, has_parameter, registered_op, schema_parameters

_LSE_ALIGNMENT = 32  # the memory-efficient kernel stores lse padded to a multiple of 32 queries
_MASK_NONE, _MASK_BOTTOM_RIGHT = 0, 2  # custom_mask_type values of aten::_efficient_attention_forward
_HALF_DTYPES = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Documents:
    """Packed documents for a varlen kernel: int32 offsets on the device and the longest document."""

    cu_seqlens: torch.Tensor
    max_seqlen: int


def window_sizes(causal: bool, window: int | None) -> tuple[int, int]:
    """(left, right) in flash-attn's convention: query i sees keys [i - left, i + right] (-1: unbounded)."""
    if window is None:
        return (-1, 0) if causal else (-1, -1)
    return (window - 1, 0)


def _packed(x: torch.Tensor) -> torch.Tensor:
    """[B, T, H, D] -> [B·T, H, D] (varlen kernels take the tokens of all rows back to back)."""
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def _lse_from_packed(lse: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """Varlen LSE [H, B·T] -> [B, H, T]."""
    return lse.view(lse.shape[0], batch, length).permute(1, 0, 2).float()


def _lse_to_packed(lse: torch.Tensor) -> torch.Tensor:
    """[B, H, T] -> varlen LSE [H, B·T]."""
    return lse.permute(1, 0, 2).reshape(lse.shape[1], -1).float().contiguous()


def _half_kernel_supports(q: torch.Tensor) -> bool:
    return q.is_cuda and q.dtype in _HALF_DTYPES and q.shape[-1] <= 256 and q.shape[-1] % 8 == 0


# ----------------------------------------------------------------------------------------------------
# flash-attn 2 (the flash_attn package)


@functools.lru_cache(maxsize=1)
def flash_attn_module() -> Any | None:
    """flash_attn.flash_attn_interface, or None when flash-attn is not installed."""
    try:
        return importlib.import_module("flash_attn.flash_attn_interface")
    except ImportError:
        return None


# flash-attn 2.6's private backward is a plain Python function with these parameters (2.7 turned it into
# a torch op whose schema we read instead); only used when no op is registered.
FLASH_ATTN_26_BACKWARD = ("dout", "q", "k", "v", "out", "softmax_lse", "dq", "dk", "dv", "dropout_p",
                          "softmax_scale", "causal", "window_size", "softcap", "alibi_slopes", "deterministic")
FLASH_ATTN_26_VARLEN_BACKWARD = FLASH_ATTN_26_BACKWARD[:9] + (
    "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k") + FLASH_ATTN_26_BACKWARD[9:]


def flash_attn_backward_callable(varlen: bool) -> tuple[Any, list[Parameter]]:
    """(callable, its parameters): the registered op when there is one (2.7+), else 2.6's function."""
    name = "_flash_attn_varlen_backward" if varlen else "_flash_attn_backward"
    op = registered_op("flash_attn", name)
    if op is not None:
        return op, schema_parameters(op)
    names = FLASH_ATTN_26_VARLEN_BACKWARD if varlen else FLASH_ATTN_26_BACKWARD
    return getattr(flash_attn_module(), name), [Parameter(n, False) for n in names]


def flash_attn_supports(q: torch.Tensor) -> bool:
    return flash_attn_module() is not None and _half_kernel_supports(q)


def flash_attn_forward(q, k, v, causal: bool, scale: float, window: int | None = None,
                       documents: Documents | None = None):
    """BSHD in; (o [B, Tq, H, D], lse fp32 [B, H, Tq]). GQA native; bottom-right causal (flash-attn >= 2.1)."""
    interface = flash_attn_module()
    options = dict(dropout_p=0.0, softmax_scale=scale, causal=causal, window_size=window_sizes(causal, window),
                   return_attn_probs=True)  # the public way to get the LSE; no probabilities without dropout
    if documents is None:
        output, lse, _ = interface.flash_attn_func(q, k, v, **options)
        return output, lse.float()
    batch, length = q.shape[:2]
    output, lse, _ = interface.flash_attn_varlen_func(
        _packed(q), _packed(k), _packed(v), documents.cu_seqlens, documents.cu_seqlens,
        documents.max_seqlen, documents.max_seqlen, **options,
    )
    return output.view(q.shape[:3] + v.shape[-1:]), _lse_from_packed(lse, batch, length)


def flash_attn_backward(q, k, v, o, lse, do, causal: bool, scale: float, window: int | None = None,
                        documents: Documents | None = None):
    """(dq, dk, dv) in the input dtype, given the final o and lse; dk, dv in the kv-head shape."""
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    left, right = window_sizes(causal, window)
    values = dict(dout=do.contiguous(), q=q, k=k, v=v, out=o.contiguous(), softmax_lse=lse.float().contiguous(),
                  dq=dq, dk=dk, dv=dv, dropout_p=0.0, softmax_scale=scale, causal=causal,
                  window_size_left=left, window_size_right=right, window_size=(left, right), softcap=0.0,
                  alibi_slopes=None, deterministic=False, rng_state=None, zero_tensors=False)
    if documents is not None:
        packed = {name: _packed(values[name]) for name in ("dout", "q", "k", "v", "out", "dq", "dk", "dv")}
        values.update(packed, softmax_lse=_lse_to_packed(lse), cu_seqlens_q=documents.cu_seqlens,
                      cu_seqlens_k=documents.cu_seqlens, max_seqlen_q=documents.max_seqlen,
                      max_seqlen_k=documents.max_seqlen)
    function, parameters = flash_attn_backward_callable(documents is not None)
    function(**bind_arguments(parameters, values, where="flash-attn backward"))
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------------
# FlashAttention-3 (Hopper)


@functools.lru_cache(maxsize=1)
def flash_attn3_module() -> Any | None:
    """The FlashAttention-3 interface module, or None (not installed, or too old to register torch ops)."""
    for name in ("flash_attn_interface", "flash_attn_3.flash_attn_interface"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if registered_op("flash_attn_3", "_flash_attn_backward") is not None:
            return module
    return None


def flash_attn3_supports(q: torch.Tensor) -> bool:
    return (
        flash_attn3_module() is not None
        and _half_kernel_supports(q)
        and torch.cuda.get_device_capability(q.device)[0] == 9
    )


def flash_attn3_forward(q, k, v, causal: bool, scale: float, window: int | None = None,
                        documents: Documents | None = None):
    interface = flash_attn3_module()
    options = dict(softmax_scale=scale, causal=causal, window_size=window_sizes(causal, window),
                   return_attn_probs=True)
    if documents is None:
        result = interface.flash_attn_func(q, k, v, **options)
        return result[0], result[1].float()
    result = interface.flash_attn_varlen_func(
        _packed(q), _packed(k), _packed(v), documents.cu_seqlens, documents.cu_seqlens,
        documents.max_seqlen, documents.max_seqlen, **options,
    )
    return result[0].view(q.shape[:3] + v.shape[-1:]), _lse_from_packed(result[1], *q.shape[:2])


def flash_attn3_backward(q, k, v, o, lse, do, causal: bool, scale: float, window: int | None = None,
                         documents: Documents | None = None):
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    left, right = window_sizes(causal, window)
    values = dict(dout=do.contiguous(), q=q, k=k, v=v, out=o.contiguous(), softmax_lse=lse.float().contiguous(),
                  dq=dq, dk=dk, dv=dv, softmax_scale=scale, is_causal=causal, window_size_left=left,
                  window_size_right=right, softcap=0.0, deterministic=False, sm_margin=0)
    if documents is not None:
        packed = {name: _packed(values[name]) for name in ("dout", "q", "k", "v", "out", "dq", "dk", "dv")}
        values.update(packed, softmax_lse=_lse_to_packed(lse), cu_seqlens_q=documents.cu_seqlens,
                      cu_seqlens_k=documents.cu_seqlens, max_seqlen_q=documents.max_seqlen,
                      max_seqlen_k=documents.max_seqlen)
    call_op(registered_op("flash_attn_3", "_flash_attn_backward"), values, where="FlashAttention-3 backward")
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------------
# PyTorch's FlashAttention-2 kernel (aten), native GQA, window and varlen


def aten_op(name: str) -> Any:
    """torch.ops.aten.<name>; one lookup point, so CPU tests can stand in ops of the same schema."""
    return getattr(torch.ops.aten, name)


def sdpa_supports(q: torch.Tensor) -> bool:
    return _half_kernel_supports(q) and torch.cuda.get_device_capability(q.device) >= (8, 0)


def sdpa_supports_window() -> bool:
    return has_parameter(aten_op("_flash_attention_forward"), "window_size_left") and has_parameter(
        aten_op("_flash_attention_backward"), "window_size_left"
    )


@functools.lru_cache(maxsize=None)
def _sdpa_varlen_lse_is_packed(device: torch.device | None = None) -> bool:
    """Whether aten's varlen forward returns the LSE as [H, total] (else [N, H, max_seqlen]): read from the
    op's meta kernel (no GPU work); if this torch has none, from one tiny forward on `device`."""
    for where in ("meta", device):
        if where is None:
            continue
        try:
            tokens = torch.zeros(8, 1, 8, device=where, dtype=torch.float16)
            offsets = torch.tensor([0, 8], dtype=torch.int32, device=where)
            lse = torch.ops.aten._flash_attention_forward(tokens, tokens, tokens, offsets, offsets, 8, 8, 0.0, True,
                                                          False)[1]
            return lse.dim() == 2
        except (NotImplementedError, RuntimeError):
            continue
    raise RuntimeError("attention: cannot tell the LSE layout of aten::_flash_attention_forward's varlen path on "
                       f"torch {torch.__version__}; use backend='math' (or SPINDLE_ATTN_BACKEND=math) for cu_seqlens")


def _padded_positions(documents: Documents, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(document, position inside it) of each packed token, for the [N, H, max_seqlen] LSE layout."""
    offsets = documents.cu_seqlens.long()
    tokens = torch.arange(total, device=offsets.device)
    document = torch.searchsorted(offsets, tokens, right=True) - 1
    return document, tokens - offsets[document]


def _sdpa_lse_from_kernel(lse, documents: Documents, batch: int, length: int) -> torch.Tensor:
    if lse.dim() == 3:  # [N, H, max_seqlen] -> [H, total]
        document, position = _padded_positions(documents, batch * length)
        lse = lse[document, :, position].transpose(0, 1)
    return _lse_from_packed(lse, batch, length)


def _sdpa_lse_to_kernel(lse, documents: Documents) -> torch.Tensor:
    packed = _lse_to_packed(lse)  # [H, total]
    if _sdpa_varlen_lse_is_packed(lse.device):
        return packed
    count = documents.cu_seqlens.numel() - 1
    document, position = _padded_positions(documents, packed.shape[1])
    padded = packed.new_zeros(count, packed.shape[0], documents.max_seqlen)
    padded[document, :, position] = packed.transpose(0, 1)
    return padded


def sdpa_forward(q, k, v, causal: bool, scale: float, window: int | None = None,
                 documents: Documents | None = None):
    left, right = window_sizes(causal, window)
    values = dict(query=q, key=k, value=v, cum_seq_q=None, cum_seq_k=None, max_q=q.shape[1], max_k=k.shape[1],
                  dropout_p=0.0, is_causal=causal, return_debug_mask=False, scale=scale)
    required = ()
    if window is not None:
        values.update(window_size_left=left, window_size_right=right)
        required = ("window_size_left", "window_size_right")
    if documents is not None:
        values.update(query=_packed(q), key=_packed(k), value=_packed(v), cum_seq_q=documents.cu_seqlens,
                      cum_seq_k=documents.cu_seqlens, max_q=documents.max_seqlen, max_k=documents.max_seqlen)
    output, lse = call_op(aten_op("_flash_attention_forward"), values, where="aten flash attention",
                          required=required)[:2]
    if documents is None:
        return output, lse.float()
    return output.view(q.shape[:3] + v.shape[-1:]), _sdpa_lse_from_kernel(lse, documents, *q.shape[:2])


def sdpa_backward(q, k, v, o, lse, do, causal: bool, scale: float, window: int | None = None,
                  documents: Documents | None = None):
    left, right = window_sizes(causal, window)
    unused_rng = torch.zeros(2, dtype=torch.uint64, device=q.device)  # dropout is 0: never read
    values = dict(grad_out=do.contiguous(), query=q, key=k, value=v, out=o.contiguous(),
                  logsumexp=lse.float().contiguous(), cum_seq_q=None, cum_seq_k=None, max_q=q.shape[1],
                  max_k=k.shape[1], dropout_p=0.0, is_causal=causal, rng_state=unused_rng,
                  unused=torch.empty(0, device=q.device), scale=scale)
    required = ()
    if window is not None:
        values.update(window_size_left=left, window_size_right=right)
        required = ("window_size_left", "window_size_right")
    if documents is not None:
        values.update(grad_out=_packed(values["grad_out"]), query=_packed(q), key=_packed(k), value=_packed(v),
                      out=_packed(values["out"]), logsumexp=_sdpa_lse_to_kernel(lse, documents),
                      cum_seq_q=documents.cu_seqlens, cum_seq_k=documents.cu_seqlens,
                      max_q=documents.max_seqlen, max_k=documents.max_seqlen)
    dq, dk, dv = call_op(aten_op("_flash_attention_backward"), values, where="aten flash attention backward",
                         required=required)[:3]
    return dq.view(q.shape), dk.view(k.shape), dv.view(v.shape)


# ----------------------------------------------------------------------------------------------------
# PyTorch's memory-efficient kernel (no window, no documents, K/V repeated for GQA)


def sdpa_efficient_supports(q: torch.Tensor) -> bool:
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16, torch.float32) and q.shape[-1] % 8 == 0


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, T, H_kv, D] -> [B, T, H, D]: the efficient kernel has no native GQA."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=2)


def sdpa_efficient_forward(q, k, v, causal: bool, scale: float, window=None, documents=None):
    groups = q.shape[2] // k.shape[2]
    output, lse = call_op(aten_op("_efficient_attention_forward"), dict(
        query=q, key=_repeat_kv(k, groups), value=_repeat_kv(v, groups), bias=None, cu_seqlens_q=None,
        cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None, dropout_p=0.0,
        custom_mask_type=_MASK_BOTTOM_RIGHT if causal else _MASK_NONE, compute_log_sumexp=True, scale=scale,
    ), where="aten efficient attention")[:2]
    return output, lse[..., : q.shape[1]].float()


def sdpa_efficient_backward(q, k, v, o, lse, do, causal: bool, scale: float, window=None, documents=None):
    groups = q.shape[2] // k.shape[2]
    query_length = q.shape[1]
    padded = -(-query_length // _LSE_ALIGNMENT) * _LSE_ALIGNMENT
    padded_lse = torch.zeros(*lse.shape[:-1], padded, dtype=torch.float32, device=lse.device)
    padded_lse[..., :query_length] = lse
    unused_rng = torch.zeros((), dtype=torch.int64, device=q.device)
    dq, dk, dv = call_op(aten_op("_efficient_attention_backward"), dict(
        grad_out_=do.contiguous(), query=q, key=_repeat_kv(k, groups), value=_repeat_kv(v, groups), bias=None,
        out=o.contiguous(), cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=query_length,
        max_seqlen_k=k.shape[1], logsumexp=padded_lse, dropout_p=0.0, philox_seed=unused_rng,
        philox_offset=unused_rng, custom_mask_type=_MASK_BOTTOM_RIGHT if causal else _MASK_NONE,
        bias_requires_grad=False, scale=scale,
    ), where="aten efficient attention backward")[:3]
    if groups > 1:  # sum the repeated heads back onto their kv head: [B, Tk, H, D] -> [B, Tk, H_kv, D]
        dk = dk.view(*k.shape[:3], groups, k.shape[3]).sum(3)
        dv = dv.view(*v.shape[:3], groups, v.shape[3]).sum(3)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------------
# PyTorch's fused CPU kernel (no window, no documents; its causal mask is top-left, so Tq == Tk only)


def sdpa_cpu_supports(q: torch.Tensor) -> bool:
    # not float64: its backward loses precision there (4.7e-8 relative in dq); float64 is for oracles (math)
    return q.device.type == "cpu" and q.dtype in (torch.float16, torch.bfloat16, torch.float32)


def _lse_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def sdpa_cpu_forward(q, k, v, causal: bool, scale: float, window=None, documents=None):
    """BSHD in and out (the kernel works on BHSD views); native GQA; lse [B, H, Tq]."""
    output, lse = call_op(aten_op("_scaled_dot_product_flash_attention_for_cpu"), dict(
        query=q.transpose(1, 2), key=k.transpose(1, 2), value=v.transpose(1, 2), dropout_p=0.0, is_causal=causal,
        scale=scale,
    ), where="aten CPU flash attention")
    return output.transpose(1, 2).contiguous(), lse.to(_lse_dtype(q))


def sdpa_cpu_backward(q, k, v, o, lse, do, causal: bool, scale: float, window=None, documents=None):
    grads = call_op(aten_op("_scaled_dot_product_flash_attention_for_cpu_backward"), dict(
        grad_out=do.transpose(1, 2), query=q.transpose(1, 2), key=k.transpose(1, 2), value=v.transpose(1, 2),
        out=o.transpose(1, 2), logsumexp=lse.to(_lse_dtype(q)).contiguous(), dropout_p=0.0, is_causal=causal,
        scale=scale,
    ), where="aten CPU flash attention backward")
    return tuple(grad.transpose(1, 2).contiguous() for grad in grads[:3])


# ----------------------------------------------------------------------------------------------------
# Shapes-only tensors (kernels/shapes.py): what every kernel above returns, allocated and not computed. The
# planner runs the model on such tensors with a fused backend forced, so the autograd Function saves exactly
# the tensors (o and the fp32 lse beside q, k, v) it saves on the GPU.


def meta_supports(name: str, q: torch.Tensor) -> bool:
    """The dtype and head-dim limits of kernel `name` on the device it runs on (shapes-only inputs stand for it)."""
    if name in ("flash_attn3", "flash_attn", "sdpa"):
        return q.dtype in _HALF_DTYPES and q.shape[-1] <= 256 and q.shape[-1] % 8 == 0
    if name == "sdpa_efficient":
        return q.dtype in (torch.float16, torch.bfloat16, torch.float32) and q.shape[-1] % 8 == 0
    return q.dtype in (torch.float16, torch.bfloat16, torch.float32)  # sdpa_cpu


def meta_forward(q, k, v, causal: bool, scale: float, window=None, documents=None):
    """(o [B, Tq, H, Dv] in the dtype of q, lse fp32 [B, H, Tq]), as every fused forward returns them."""
    output = torch.empty(*q.shape[:3], v.shape[-1], dtype=q.dtype, device=q.device)
    return output, torch.empty(q.shape[0], q.shape[2], q.shape[1], dtype=torch.float32, device=q.device)


def meta_backward(q, k, v, o, lse, do, causal: bool, scale: float, window=None, documents=None):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


KERNELS = {
    "flash_attn3": (flash_attn3_forward, flash_attn3_backward),
    "flash_attn": (flash_attn_forward, flash_attn_backward),
    "sdpa": (sdpa_forward, sdpa_backward),
    "sdpa_efficient": (sdpa_efficient_forward, sdpa_efficient_backward),
    "sdpa_cpu": (sdpa_cpu_forward, sdpa_cpu_backward),
}
