"""Single-device ops of spindle: linear attention with decay, softmax attention, chunked cross-entropy.

One folder per op family (naive reference, chunked PyTorch path, Triton kernel where it applies, one
dispatching public function). Importable without torch.distributed.
"""

from .attn import attention, attention_backward, attention_forward, force_backend
from .cross_entropy import chunked_cross_entropy
from .linear_attn import linear_attention

__all__ = [
    "attention",
    "attention_backward",
    "attention_forward",
    "chunked_cross_entropy",
    "force_backend",
    "linear_attention",
]
