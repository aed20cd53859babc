"""The q, k, v checks both op families share, and tensors that carry shapes and dtypes but no values.

`check_qkv`: the tensor type, BSHD layout, dtype, and one dtype and device for all three.

`shapes_only`: meta tensors and FakeTensorMode's fake tensors.

The planner runs the model on them with the backends of its target device forced (runtime/plan.py): the
kernels then allocate exactly the outputs and residuals they would (the fused softmax kernels through
`attn.gpu.meta_forward`, the Triton linear-attention launchers without launching) and compute nothing, so
saved-tensor hooks see what the real kernels keep for backward. Fake tensors also carry a device, so
autocast applies to them as it does to real ones.
"""

from __future__ import annotations

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_qkv(caller: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Each of q, k, v a 4-D [batch, seq, heads, head_dim] (BSHD) tensor of a supported dtype; one dtype and one
    device for the three. The shape relations between them are each op's own."""
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{caller}: {name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dim() != 4:
            raise ValueError(f"{caller}: {name} must be 4-D [batch, seq, heads, head_dim] (BSHD), "
                             f"got shape {tuple(tensor.shape)}")
        if tensor.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{caller}: {name} has dtype {tensor.dtype}; supported are float16, bfloat16, float32 "
                            "and float64 (cast the input)")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{caller}: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{caller}: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")


def shapes_only(tensor: torch.Tensor) -> bool:
    """True for a meta tensor or a FakeTensor (its values cannot be read; a kernel cannot run on it)."""
    if tensor.device.type == "meta":
        return True
    if type(tensor) in (torch.Tensor, torch.nn.Parameter):  # the common case, without importing fake tensors
        return False
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(tensor)
