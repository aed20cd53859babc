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
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig

from spindle.parallel.cp import lasp1, lasp2, rattention_branches
from spindle.runtime.layers import RMSNorm, plus_minus_softmax, single_device_rattention

from .core_attention import MEGATRON_LAYOUT, check_scheme, context_parallel_group
from .linear_mixer import LINEAR_SCHEMES, check_forward_arguments, local_heads, head_rms_norm


@dataclass
class RAttentionSubmodules:
    """Projections of RAttentionSelfAttention (Megatron's local tensor-parallel linears by default)."""

    linear_qkv: ModuleSpec | type = field(default=ColumnParallelLinear)
    linear_proj: ModuleSpec | type = field(default=RowParallelLinear)


class RAttentionSelfAttention(MegatronModule):
    """RAttention as a Megatron ``self_attention`` submodule.

    Args (besides Megatron's config / submodules / layer_number / pg_collection):
        window: w >= 1 tokens of the softmax branch (also the delay of the linear branch).
        scheme: "lasp2" (default) or "lasp1": the CP op of the linear branch.
    Heads: ``config.num_attention_heads`` queries and ``config.num_query_groups`` key/value heads
    (GQA) of width ``config.kv_channels``.
    """

    def __init__(
        self,
        config: TransformerConfig,
        submodules: RAttentionSubmodules | None = None,
        layer_number: int = 1,
        cp_comm_type: str | None = None,
        pg_collection: ProcessGroupCollection | None = None,
        *,
        window: int,
        scheme: str = "lasp2",
    ) -> None:
        super().__init__(config=config)
        check_scheme("cp_linear", scheme, LINEAR_SCHEMES)
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"RAttentionSelfAttention: window must be a positive number of tokens, got {window!r}")
        submodules = submodules or RAttentionSubmodules()
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        self.cp_group = context_parallel_group(pg_collection)
        self.tp_group = pg_collection.tp
        self.layer_number, self.window, self.scheme = layer_number, window, scheme
        heads, groups, self.head_dim = config.num_attention_heads, config.num_query_groups, config.kv_channels
        local_heads(groups, self.tp_group, "num_query_groups")  # whole query groups per tensor-parallel rank
        self.local_heads, _ = local_heads(heads, self.tp_group)
        self.local_groups = groups // self.tp_group.size()
        self.linear_qkv = build_module(
            submodules.linear_qkv, config.hidden_size, (heads + 2 * groups) * self.head_dim, config=config,
            init_method=config.init_method, gather_output=False,
            bias=config.add_bias_linear or config.add_qkv_bias, skip_bias_add=False, is_expert=False,
            tp_comm_buffer_name="qkv", tp_group=self.tp_group)
        self.local_norm = RMSNorm(self.head_dim, config.layernorm_epsilon)
        self.residual_norm = RMSNorm(self.head_dim, config.layernorm_epsilon)
        self.linear_proj = build_module(
            submodules.linear_proj, heads * self.head_dim, config.hidden_size, config=config,
            init_method=config.output_layer_init_method, bias=config.add_bias_linear,
            input_is_parallel=True, skip_bias_add=True, is_expert=False, tp_comm_buffer_name="proj",
            tp_group=self.tp_group)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        key_value_states: torch.Tensor | None = None,
        inference_context: Any = None,
        rotary_pos_emb: Any = None,
        rotary_pos_cos: Any = None,
        rotary_pos_sin: Any = None,
        rotary_pos_cos_sin: Any = None,
        attention_bias: Any = None,
        packed_seq_params: Any = None,
        sequence_len_offset: Any = None,
        **unused: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """hidden_states [s, b, h] (this rank's tokens in Megatron's CP order) -> (output [s, b, h], bias)."""
        check_forward_arguments(key_value_states, inference_context, packed_seq_params)
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
        output = (head_rms_norm(local, self.local_norm, self.tp_group)
                  + head_rms_norm(residual, self.residual_norm, self.tp_group))
        length, batch = hidden_states.shape[0], hidden_states.shape[1]
        return self.linear_proj(output.transpose(0, 1).reshape(length, batch, -1))

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
                                   layout=MEGATRON_LAYOUT, lasp=lasp2 if self.scheme == "lasp2" else lasp1, **scales)
