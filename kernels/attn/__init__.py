"""Softmax attention: dense reference, memory-bounded banded math path, flash-attn / FA3 / SDPA shims."""

from .api import (
    AUTO_ORDER,
    BACKENDS,
    ENVIRONMENT_VARIABLE,
    attention,
    attention_backward,
    attention_forward,
    empty_query_rows,
    force_backend,
    resolve_backend,
    unsupported_reason,
)
from .masks import MaskSpec, build_mask_spec
from .math import attention_backward_math, attention_forward_math
from .naive import attention_naive, causal_mask

__all__ = [
    "AUTO_ORDER",
    "BACKENDS",
    "ENVIRONMENT_VARIABLE",
    "MaskSpec",
    "attention",
    "attention_backward",
    "attention_forward",
    "attention_backward_math",
    "attention_forward_math",
    "attention_naive",
    "build_mask_spec",
    "causal_mask",
    "empty_query_rows",
    "force_backend",
    "resolve_backend",
    "unsupported_reason",
]
