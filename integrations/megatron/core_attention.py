"""Megatron-core ``core_attention`` running spindle's softmax attention over Megatron's CP group.

Megatron's SelfAttention computes q, k, v (RoPE applied for each token's global position) and calls
``core_attention(query, key, value, attention_mask, ...)`` with ``[s, b, heads, head_dim]`` tensors
holding this rank's tokens in Megatron's context-parallel order: 2·cp chunks, rank r owning chunks
r and 2·cp−1−r. That is spindle's "zigzag" layout exactly, so the tensors go to spindle's CP ops
as they are (only [s, b] is transposed to [b, s]).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from spindle import kernels
from spindle.parallel.cp import allgather_attention, ring_attention, ulysses_attention, window_attention

SOFTMAX_SCHEMES = ("allgather", "ring", "ulysses")
"""Context-parallel schemes of softmax layers (``cp_softmax``)."""

MEGATRON_LAYOUT = "zigzag"
"""spindle's name for Megatron's load-balanced CP split (see the module docstring)."""

_SCHEME_OPS: dict[str, Callable[..., torch.Tensor]] = {
    "allgather": allgather_attention,
    "ring": ring_attention,
    "ulysses": ulysses_attention,
}


def context_parallel_group(pg_collection: ProcessGroupCollection | None) -> torch.distributed.ProcessGroup:
    """The CP group from the collection Megatron hands the layer (Megatron's own global groups when None)."""
    if pg_collection is None:
        # Megatron's modules fall back the same way when built outside a TransformerLayer.
        pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["cp"])
    if not hasattr(pg_collection, "cp"):
        raise ValueError(
            "spindle's Megatron layers need the context-parallel group: the pg_collection passed to the "
            "layer has no 'cp' group; build it with ProcessGroupCollection(..., cp=<group>) or "
            "ProcessGroupCollection.use_mpu_process_groups()"
        )
    return pg_collection.cp


def check_scheme(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {', '.join(map(repr, allowed))}")


class SpindleCoreAttention(MegatronModule):
    """Causal softmax attention (GQA) over the CP group with spindle's all-gather, ring or Ulysses op.

    A drop-in ``core_attention`` for Megatron's SelfAttention: same constructor arguments as
    Megatron's DotProductAttention, plus ``scheme`` and ``window``. Megatron's ``cp_comm_type`` is
    accepted and ignored: the scheme is chosen by ``scheme`` (``cp_softmax`` of ``hybrid_block_spec``).
    With ``window`` = w (sliding-window attention, "S" layers) query i sees keys i − w < j <= i and the
    CP op is spindle's window_attention (one halo exchange), whatever ``scheme`` says. With one CP
    rank it calls spindle.kernels.attention (flash-attn / SDPA / math, whichever applies).
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection: ProcessGroupCollection | None = None,
        *,
        scheme: str = "allgather",
        window: int | None = None,
    ) -> None:
        super().__init__(config=config)
        check_scheme("cp_softmax", scheme, SOFTMAX_SCHEMES)
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
            raise ValueError(
                f"SpindleCoreAttention: window must be a positive number of tokens or None, got {window!r}")
        self.window = window
        _check_supported_config(config, attn_mask_type, attention_dropout)
        self.layer_number = layer_number
        self.scheme = scheme
        self.softmax_scale = softmax_scale
        self.cp_group = context_parallel_group(pg_collection)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: Any = None,
    ) -> torch.Tensor:
        """query [s, b, H, D], key/value [s, b, H_kv, D] (this rank's tokens) -> context [s, b, H·D].

        ``attention_mask`` is ignored: the attention is causal over global positions, which the
        CP op derives from the layout (Megatron's causal mask says the same for unpacked batches).
        """
        if packed_seq_params is not None:
            raise NotImplementedError(
                "SpindleCoreAttention does not support packed (THD) sequences; pass unpacked [s, b] batches "
                "(packed_seq_params=None)"
            )
        if attention_bias is not None:
            raise NotImplementedError("SpindleCoreAttention does not support an attention_bias; pass None")
        if attn_mask_type not in (None, AttnMaskType.causal):
            raise ValueError(f"SpindleCoreAttention is causal only, got attn_mask_type={attn_mask_type}")
        # [s, b, h, d] -> [b, s, h, d]: spindle's ops take batch-first shards
        q, k, v = (tensor.transpose(0, 1).contiguous() for tensor in (query, key, value))
        if self.window is not None:
            window = {"window": self.window}
            if self.cp_group.size() == 1:
                output = kernels.attention(q, k, v, causal=True, scale=self.softmax_scale, **window)
            else:
                output = window_attention(q, k, v, self.cp_group, layout=MEGATRON_LAYOUT, scale=self.softmax_scale,
                                          **window)
        elif self.cp_group.size() == 1:
            output = kernels.attention(q, k, v, causal=True, scale=self.softmax_scale)
        else:
            output = _SCHEME_OPS[self.scheme](
                q, k, v, self.cp_group, layout=MEGATRON_LAYOUT, causal=True, scale=self.softmax_scale
            )
        length, batch = query.shape[:2]
        return output.transpose(0, 1).reshape(length, batch, -1)  # [s, b, H·D]


def _check_supported_config(
    config: TransformerConfig, attn_mask_type: AttnMaskType, attention_dropout: float | None
) -> None:
    """Megatron options this core attention does not implement: one clear error at build time."""
    dropout = config.attention_dropout if attention_dropout is None else attention_dropout
    problems = []
    if attn_mask_type != AttnMaskType.causal:
        problems.append(f"attn_mask_type={attn_mask_type} (only AttnMaskType.causal)")
    if dropout:
        problems.append(f"attention_dropout={dropout} (set TransformerConfig(attention_dropout=0.0))")
    if config.apply_query_key_layer_scaling:
        problems.append("apply_query_key_layer_scaling=True (set it to False)")
    if getattr(config, "softmax_type", "vanilla") != "vanilla":
        problems.append(f"softmax_type={config.softmax_type!r} (only 'vanilla')")
    if getattr(config, "window_size", None) is not None:
        problems.append(f"window_size={config.window_size} (use 'S' layers with hybrid_block_spec(window=...) "
                        "for sliding-window attention; leave config.window_size unset)")
    if problems:
        raise ValueError("SpindleCoreAttention cannot run with " + "; ".join(problems))
