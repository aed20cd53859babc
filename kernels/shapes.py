"""Tensors that carry shapes and dtypes but no values: meta tensors and FakeTensorMode's fake tensors.

The planner runs the model on them with the backends of its target device forced (runtime/plan.py): the
kernels then allocate exactly the outputs and residuals they would (the fused softmax kernels through
`attn.gpu.meta_forward`, the Triton linear-attention launchers without launching) and compute nothing, so
saved-tensor hooks see what the real kernels keep for backward. Fake tensors also carry a device, so
autocast applies to them as it does to real ones.
"""

from __future__ import annotations

import torch


def shapes_only(tensor: torch.Tensor) -> bool:
    """True for a meta tensor or a FakeTensor (its values cannot be read; a kernel cannot run on it)."""
    if tensor.device.type == "meta":
        return True
    if type(tensor) in (torch.Tensor, torch.nn.Parameter):  # the common case, without importing fake tensors
        return False
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(tensor)
