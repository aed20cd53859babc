"""RAttention as a Megatron-core self-attention replacement ("R" layers of ``hybrid_block_spec``).

The same mixer as spindle's native ``RAttention`` layer: sliding-window softmax attention plus a
linear attention over the tokens that have left the window, with one q/k/v projection for both:

    x [s, b, h] -> linear_qkv (Megatron's grouped layout: per query group, its query heads, key, value)
      local    = window attention(rope(q), rope(k), v, window=w)            keys i − w < j <= i
      residual = linear attention(φ(q), φ(k), v, scale=1, delay=w)          keys j <= i − w
      -> local_norm(local) + residual_norm(residual) (per-head RMSNorms) -> linear_proj -> ([s, b, h], bias)

with φ = [softmax(x), softmax(−x)] over the head dimension. Across CP ranks both branches come from
spindle's ``rattention_branches``: one halo exchange of the window's keys/values, then LASP-2 (or
LASP-1) for the residual branch. RoPE is applied with Megatron's own ``apply_rotary_pos_emb`` to the
tables Megatron hands the layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.spec_utils import ModuleSpec

from spindle.parallel.cp import rattention_branches
from spindle.runtime.layers import RMSNorm, plus_minus_softmax, single_device_rattention

from .core_attention import MEGATRON_LAYOUT
from .self_attention import SpindleSelfAttention, head_rms_norm, local_heads


@dataclass
class RAttentionSubmodules:
    """Projections of RAttentionSelfAttention (Megatron's local tensor-parallel linears by default)."""

    linear_qkv: ModuleSpec | type = field(default=ColumnParallelLinear)
    linear_proj: ModuleSpec | type = field(default=RowParallelLinear)


class RAttentionSelfAttention(SpindleSelfAttention):
    """RAttention as a Megatron ``self_attention`` submodule.

    Args (besides Megatron's config / submodules / layer_number / pg_collection):
        window: w >= 1 tokens of the softmax branch (also the delay of the linear branch).
        scheme: "lasp2" (default) or "lasp1": the CP op of the linear branch.
    Heads: ``config.num_attention_heads`` queries and ``config.num_query_groups`` key/value heads
    (GQA) of width ``config.kv_channels``.
    """

    submodules_type = RAttentionSubmodules

    def build(self, submodules: RAttentionSubmodules, *, window: int) -> None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"RAttentionSelfAttention: window must be a positive number of tokens, got {window!r}")
        config = self.config
        self.window = window
        heads, groups, self.head_dim = config.num_attention_heads, config.num_query_groups, config.kv_channels
        local_heads(groups, self.tp_group, "num_query_groups")  # whole query groups per tensor-parallel rank
        self.local_heads, _ = local_heads(heads, self.tp_group)
        self.local_groups = groups // self.tp_group.size()
        self.linear_qkv = self.build_input_projection(submodules.linear_qkv, (heads + 2 * groups) * self.head_dim)
        self.local_norm = RMSNorm(self.head_dim, config.layernorm_epsilon)
        self.residual_norm = RMSNorm(self.head_dim, config.layernorm_epsilon)
        self.build_output_projection(submodules.linear_proj, heads * self.head_dim)

    def mix(self, hidden_states: torch.Tensor, rotary_pos_emb: Any = None) -> torch.Tensor:
        """[s, b, h] and Megatron's RoPE table(s) -> local_norm(local) + residual_norm(residual), [b, s, H_local, D]."""
        if rotary_pos_emb is None:
            raise ValueError(
                "RAttentionSelfAttention needs RoPE: build the GPTModel with position_embedding_type='rope'")
        query_pos, key_pos = rotary_pos_emb if isinstance(rotary_pos_emb, tuple) else (rotary_pos_emb, rotary_pos_emb)
        query, key, value = self._project(hidden_states)  # [s, b, H or G, D]
        local_q = apply_rotary_pos_emb(query, query_pos, config=self.config, cp_group=self.cp_group)
        local_k = apply_rotary_pos_emb(key, key_pos, config=self.config, cp_group=self.cp_group)
        # [s, b, h, d] -> [b, s, h, d]: spindle's ops take batch-first shards
        local_q, local_k, residual_q, residual_k, value = (
            tensor.transpose(0, 1).contiguous()
            for tensor in (local_q, local_k, plus_minus_softmax(query), plus_minus_softmax(key), value))
        local, residual = self._branches(local_q, local_k, residual_q, residual_k, value)  # [b, s, H, D]
        return (head_rms_norm(local, self.local_norm, self.tp_group)
                + head_rms_norm(residual, self.residual_norm, self.tp_group))

    def _project(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mixed, _ = self.linear_qkv(hidden_states)  # [s, b, G_local·(H/G + 2)·D]
        length, batch = mixed.shape[:2]
        per_group = self.local_heads // self.local_groups
        mixed = mixed.view(length, batch, self.local_groups, per_group + 2, self.head_dim)
        query, key, value = mixed.split([per_group, 1, 1], dim=3)
        return (query.reshape(length, batch, self.local_heads, self.head_dim), key.squeeze(3), value.squeeze(3))

    def _branches(self, local_q, local_k, residual_q, residual_k, value) -> tuple[torch.Tensor, torch.Tensor]:
        scales = {"window": self.window, "local_scale": self.head_dim ** -0.5, "residual_scale": 1.0}
        if self.cp_group.size() == 1:
            return single_device_rattention(local_q, local_k, residual_q, residual_k, value, **scales)
        return rattention_branches(local_q, local_k, residual_q, residual_k, value, self.cp_group,
                                   layout=MEGATRON_LAYOUT, lasp=self.lasp, **scales)
