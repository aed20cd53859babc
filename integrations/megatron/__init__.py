"""spindle's context parallelism inside Megatron-core models.

    from spindle.integrations.megatron import hybrid_block_spec
    model = GPTModel(config, transformer_layer_spec=hybrid_block_spec("LLLA", config=config), ...)

- ``hybrid_block_spec(pattern, *, cp_linear="lasp2", cp_softmax="allgather", ...)``: the block spec
  of a hybrid of linear-attention ("L") and softmax-attention ("A") layers;
- ``SpindleCoreAttention``: a ``core_attention`` running all-gather / ring / Ulysses (or, with a
  window, sliding-window) attention over the CP group Megatron hands the layer;
- ``LinearSelfAttention``: a ``self_attention`` replacement, linear attention with decay over LASP-2;
- ``RAttentionSelfAttention``: a ``self_attention`` replacement, RAttention (sliding-window softmax
  plus residual linear attention) over one halo exchange;
- ``use_host_rotary``: Megatron's RoPE table without CUDA (CPU runs only);
- ``native_block_state_dict`` / ``native_model_state_dict``: spindle's native weights in this layout.

Supported megatron-core: see ``SUPPORTED_RANGE`` (checked when this package is imported). See
integrations/megatron/README.md for the example and the checkpoint path.
"""

from .version import MegatronVersionError, SUPPORTED_RANGE, check_version

check_version()

from .convert import native_block_state_dict, native_model_state_dict  # noqa: E402
from .core_attention import SOFTMAX_SCHEMES, SpindleCoreAttention  # noqa: E402
from .linear_mixer import LinearAttentionSubmodules, LinearSelfAttention  # noqa: E402
from .self_attention import LINEAR_SCHEMES  # noqa: E402
from .rattention import RAttentionSelfAttention, RAttentionSubmodules  # noqa: E402
from .rotary import HostRotaryEmbedding, use_host_rotary  # noqa: E402
from .spec import LAYER_LETTERS, hybrid_block_spec, resolve_pattern  # noqa: E402

__all__ = [
    "LAYER_LETTERS",
    "LINEAR_SCHEMES",
    "SOFTMAX_SCHEMES",
    "SUPPORTED_RANGE",
    "HostRotaryEmbedding",
    "LinearAttentionSubmodules",
    "LinearSelfAttention",
    "MegatronVersionError",
    "RAttentionSelfAttention",
    "RAttentionSubmodules",
    "SpindleCoreAttention",
    "check_version",
    "hybrid_block_spec",
    "native_block_state_dict",
    "native_model_state_dict",
    "resolve_pattern",
    "use_host_rotary",
]
