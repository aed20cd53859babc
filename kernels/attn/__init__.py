"""Softmax attention: dense reference, memory-bounded math path, flash-attn / SDPA shims."""

from .api import (
    BACKENDS,
    attention,
    attention_backward,
    attention_forward,
    empty_query_rows,
    force_backend,
    resolve_backend,
)
from .math import attention_backward_math, attention_forward_math
from .naive import attention_naive, causal_mask

__all__ = [
    "BACKENDS",
    "attention",
    "attention_backward",
    "attention_forward",
    "attention_backward_math",
    "attention_forward_math",
    "attention_naive",
    "causal_mask",
    "empty_query_rows",
    "force_backend",
    "resolve_backend",
]
