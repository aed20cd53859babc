"""A Megatron-core self-attention replacement: spindle's linear attention with decay, LASP-2 over CP.

The same mixer as spindle's native ``LinearAttention`` layer (TransNormerLLM / Lightning Attention
style), written against Megatron's conventions:

    x [s, b, h] -> linear_qkvg (column-parallel) -> per head q, k, v, gate
      -> feature map on q, k -> causal linear attention with decay (LASP-2 / LASP-1 across CP ranks)
      -> RMSNorm per head -> * sigmoid|silu(gate) -> linear_proj (row-parallel) -> ([s, b, h], bias)

The fused projection stores its output features head-major, ``[heads, (q, k, v, gate), head_dim]``,
so a column split over tensor-parallel ranks hands each rank whole heads (like Megatron's grouped
``linear_qkv``). RoPE is not used by linear layers; Megatron's rotary tables are accepted and ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from spindle import kernels
from spindle.runtime.layers import (
    DECAY_KINDS,
    FEATURE_MAPS,
    OUTPUT_GATES,
    RMSNorm,
    constant_log_decay,
    data_decay_bias,
)

from .core_attention import MEGATRON_LAYOUT, check_scheme
from .self_attention import LINEAR_SCHEMES, SpindleSelfAttention, head_rms_norm, local_heads

_FEATURE_MAPS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "identity": lambda x: x,
    "silu": F.silu,
    "relu": F.relu,
    "elu1": lambda x: F.elu(x) + 1.0,
}


@dataclass
class LinearAttentionSubmodules:
    """Projections of LinearSelfAttention (Megatron's local tensor-parallel linears by default)."""

    linear_qkvg: ModuleSpec | type = field(default=ColumnParallelLinear)
    linear_decay: ModuleSpec | type = field(default=ColumnParallelLinear)
    linear_proj: ModuleSpec | type = field(default=RowParallelLinear)


class LinearSelfAttention(SpindleSelfAttention):
    """Linear attention with decay as a Megatron ``self_attention`` submodule.

    Args (besides Megatron's config / submodules / layer_number / pg_collection):
        scheme: "lasp2" (default) or "lasp1": the CP op across ``pg_collection.cp``.
        decay: "none", "constant" (per-head slopes fading with depth, from ``layer_number`` and
            ``config.num_layers``) or "data" (a per-token gate ``linear_decay`` -> logsigmoid).
        feature_map: on q and k: "identity", "silu", "relu" or "elu1".
        output_gate: "sigmoid" or "silu".
    Heads: ``config.num_attention_heads`` of width ``config.kv_channels`` (``num_query_groups`` is a
    softmax-attention setting and is not used).
    """

    submodules_type = LinearAttentionSubmodules

    def build(self, submodules: LinearAttentionSubmodules, *, decay: str = "constant", feature_map: str = "identity",
              output_gate: str = "sigmoid") -> None:
        check_scheme("linear_decay", decay, DECAY_KINDS)
        check_scheme("feature_map", feature_map, FEATURE_MAPS)
        check_scheme("output_gate", output_gate, OUTPUT_GATES)
        config = self.config
        self.decay, self.output_gate = decay, output_gate
        self.feature_map = _FEATURE_MAPS[feature_map]
        heads, self.head_dim = config.num_attention_heads, config.kv_channels
        self.local_heads, head_offset = local_heads(heads, self.tp_group)
        projection = heads * self.head_dim
        self.linear_qkvg = self.build_input_projection(submodules.linear_qkvg, 4 * projection)
        self.linear_decay = None
        if decay == "data":
            self.linear_decay = build_module(
                submodules.linear_decay, config.hidden_size, heads, config=config,
                init_method=config.init_method, gather_output=False, bias=True, skip_bias_add=False,
                is_expert=False, tp_comm_buffer_name="decay", tp_group=self.tp_group)
            if config.perform_initialization:
                with torch.no_grad():  # start at slow decay, as the native layer does
                    bias = data_decay_bias(heads)[head_offset:head_offset + self.local_heads]
                    self.linear_decay.bias.copy_(bias)
        if decay == "constant":
            slopes = constant_log_decay(heads, self.layer_number - 1, config.num_layers)
            # derived from the layer's position: kept out of checkpoints, like the native layer
            self.register_buffer("log_decay_slopes", slopes[head_offset:head_offset + self.local_heads],
                                 persistent=False)
        else:
            self.log_decay_slopes = None
        self.output_norm = RMSNorm(self.head_dim, config.layernorm_epsilon)
        self.build_output_projection(submodules.linear_proj, projection)

    def mix(self, hidden_states: torch.Tensor, rotary_pos_emb: Any = None) -> torch.Tensor:
        """[s, b, h] -> gated, normed heads [b, s, H_local, D]; linear layers carry no RoPE (ignored)."""
        mixed, _ = self.linear_qkvg(hidden_states)  # [s, b, H_local·4·D]
        length, batch = mixed.shape[:2]
        # [s, b, H, 4, D] -> [b, s, H, 4, D]: spindle's ops take batch-first shards
        mixed = mixed.view(length, batch, -1, 4, self.head_dim).transpose(0, 1)
        q, k, v, gate = (part.contiguous() for part in mixed.unbind(dim=3))  # each [b, s, H, D]
        q, k = self.feature_map(q), self.feature_map(k)
        output = self._sequence_op(q, k, v, self._log_decay(hidden_states))  # [b, s, H, D]
        gate = torch.sigmoid(gate) if self.output_gate == "sigmoid" else F.silu(gate)
        return head_rms_norm(output, self.output_norm, self.tp_group) * gate

    def _sequence_op(self, q, k, v, log_decay: torch.Tensor | None) -> torch.Tensor:
        scale = self.head_dim ** -0.5
        if self.cp_group.size() == 1:
            return kernels.linear_attention(q, k, v, log_decay=log_decay, scale=scale)[0]
        return self.lasp(q, k, v, self.cp_group, layout=MEGATRON_LAYOUT, log_decay=log_decay, scale=scale)

    def _log_decay(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        """None, the constant [H_local] slopes, or the per-token gate [b, s, H_local], all <= 0."""
        if self.decay == "constant":
            return self.log_decay_slopes
        if self.decay != "data":
            return None
        # The gate is summed over the whole sequence by the kernel: keep it in at least fp32.
        logits, _ = self.linear_decay(hidden_states)  # [s, b, H_local]
        compute_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        return F.logsigmoid(logits.to(compute_dtype)).transpose(0, 1).contiguous()
