"""Fused softmax-attention kernels on CUDA: flash-attn when installed, else PyTorch's memory-efficient
SDPA kernel (the one that takes a bottom-right causal mask, returns the log-sum-exp and has a
backward that accepts a given o and lse).

Both entry points take inputs whose every query row sees at least one key (callers strip the
leading empty rows of a causal Tq > Tk call; see api.py), so no kernel-specific convention for empty
rows leaks out. Neither runs on CPU; tests for them are GPU-marked.
"""

from __future__ import annotations

import functools
import inspect

import torch

_LSE_ALIGNMENT = 32  # the memory-efficient kernel stores lse padded to a multiple of 32 queries
_MASK_NONE, _MASK_BOTTOM_RIGHT = 0, 2  # custom_mask_type values of aten::_efficient_attention_forward


@functools.lru_cache(maxsize=1)
def flash_attn_module():
    """The flash_attn interface module, or None when flash-attn is not installed."""
    try:
        from flash_attn import flash_attn_interface
    except ImportError:
        return None
    return flash_attn_interface


def flash_attn_supports(q: torch.Tensor) -> bool:
    return (
        flash_attn_module() is not None
        and q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
        and q.shape[-1] <= 256
        and q.shape[-1] % 8 == 0
    )


def sdpa_supports(q: torch.Tensor) -> bool:
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16, torch.float32) and q.shape[-1] % 8 == 0


def flash_attn_forward(q, k, v, causal: bool, scale: float):
    """BSHD in and out; GQA native; causal is bottom-right aligned in flash-attn >= 2.1."""
    output, lse, _ = flash_attn_module().flash_attn_func(
        q, k, v, dropout_p=0.0, softmax_scale=scale, causal=causal, return_attn_probs=True
    )
    return output, lse.float()


def flash_attn_backward(q, k, v, o, lse, do, causal: bool, scale: float):
    interface = flash_attn_module()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    # the private backward changed signature at 2.7 (window_size tuple -> left/right ints); read it once
    parameters = inspect.signature(interface._flash_attn_backward).parameters
    window = (
        {"window_size_left": -1, "window_size_right": -1}
        if "window_size_left" in parameters
        else {"window_size": (-1, -1)}
    )
    extra = {"softcap": 0.0} if "softcap" in parameters else {}
    interface._flash_attn_backward(
        do.contiguous(), q, k, v, o.contiguous(), lse.contiguous(), dq, dk, dv,
        dropout_p=0.0, softmax_scale=scale, causal=causal, alibi_slopes=None, deterministic=False,
        rng_state=None, **window, **extra,
    )
    return dq, dk, dv


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, T, H_kv, D] -> [B, T, H, D]: the efficient kernel has no native GQA."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=2)


def sdpa_forward(q, k, v, causal: bool, scale: float):
    groups = q.shape[2] // k.shape[2]
    output, lse, *_ = torch.ops.aten._efficient_attention_forward(
        q, _repeat_kv(k, groups), _repeat_kv(v, groups), None, None, None, None, None, 0.0,
        _MASK_BOTTOM_RIGHT if causal else _MASK_NONE, True, scale=scale,
    )
    return output, lse[..., : q.shape[1]].float()


def sdpa_backward(q, k, v, o, lse, do, causal: bool, scale: float):
    groups = q.shape[2] // k.shape[2]
    query_length = q.shape[1]
    padded = -(-query_length // _LSE_ALIGNMENT) * _LSE_ALIGNMENT
    padded_lse = torch.zeros(*lse.shape[:-1], padded, dtype=torch.float32, device=lse.device)
    padded_lse[..., :query_length] = lse
    unused_rng = torch.zeros((), dtype=torch.int64, device=q.device)
    dq, dk, dv, _ = torch.ops.aten._efficient_attention_backward(
        do.contiguous(), q, _repeat_kv(k, groups), _repeat_kv(v, groups), None, o.contiguous(), None, None,
        query_length, k.shape[1], padded_lse, 0.0, unused_rng, unused_rng,
        _MASK_BOTTOM_RIGHT if causal else _MASK_NONE, False, scale=scale,
    )
    if groups > 1:  # sum the repeated heads back onto their kv head: [B, Tk, H, D] -> [B, Tk, H_kv, D]
        dk = dk.view(*k.shape[:3], groups, k.shape[3]).sum(3)
        dv = dv.view(*v.shape[:3], groups, v.shape[3]).sum(3)
    return dq, dk, dv
