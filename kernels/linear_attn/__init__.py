"""Linear attention with decay: reference recurrence, chunked PyTorch path, chunk-parallel Triton kernels.

Public: `linear_attention` (the op), `linear_attention_fwd` / `linear_attention_bwd` (the split forward and
backward that context parallelism calls directly), `force_backend` (tests drive every path with it).
"""

from .api import (
    BACKEND_ENVIRONMENT_VARIABLE,
    BACKENDS,
    LOG_DECAY_FLOOR,
    LinearAttentionFunction,
    LinearAttentionResiduals,
    check_log_decay_values,
    floor_log_decay,
    force_backend,
    linear_attention,
    linear_attention_bwd,
    linear_attention_fwd,
    resolve_backend,
    triton_available,
)
from .chunked import linear_attention_chunked
from .naive import linear_attention_naive

__all__ = [
    "BACKENDS",
    "BACKEND_ENVIRONMENT_VARIABLE",
    "LOG_DECAY_FLOOR",
    "LinearAttentionFunction",
    "LinearAttentionResiduals",
    "check_log_decay_values",
    "floor_log_decay",
    "force_backend",
    "linear_attention",
    "linear_attention_bwd",
    "linear_attention_chunked",
    "linear_attention_fwd",
    "linear_attention_naive",
    "resolve_backend",
    "triton_available",
]
