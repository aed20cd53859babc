"""Linear attention with decay: reference recurrence, chunked PyTorch path, Triton kernels."""

from .api import BACKENDS, linear_attention, triton_available
from .chunked import linear_attention_chunked
from .naive import linear_attention_naive

__all__ = ["BACKENDS", "linear_attention", "linear_attention_chunked", "linear_attention_naive", "triton_available"]
