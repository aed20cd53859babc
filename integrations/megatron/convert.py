"""Weights of spindle's native hybrid model in the layout of the Megatron-core layers of this package.

``native_block_state_dict(block)`` maps one native DecoderBlock onto the state-dict keys of the
TransformerLayer that ``hybrid_block_spec`` builds for the same letter; ``native_model_state_dict``
maps a whole native HybridModel onto a GPTModel (rope, untied or tied embeddings) built with that
spec. Both produce full (tensor-parallel size 1) tensors; load them with ``load_state_dict`` and the
Megatron model computes the same function (the tests check this in float64).

The Megatron config must match the native model: ``hidden_size=dim``, ``num_attention_heads=heads``,
``num_query_groups=kv_heads``, ``ffn_hidden_size=ffn_dim``, ``gated_linear_unit=True``,
``activation_func=F.silu``, ``add_bias_linear=False``, ``normalization="RMSNorm"``,
``layernorm_epsilon=norm_eps``, and GPTModel's ``rotary_base=rope_theta``.
"""

from __future__ import annotations

import torch
from torch import nn

from spindle.runtime.layers import (
    DecoderBlock,
    LinearAttention,
    RAttention,
    SlidingWindowAttention,
    SoftmaxAttention,
)


def native_block_state_dict(block: DecoderBlock) -> dict[str, torch.Tensor]:
    """State dict of the Megatron TransformerLayer equivalent to a native DecoderBlock (L, A, R or S)."""
    state = {
        "input_layernorm.weight": block.mixer_norm.weight,
        "pre_mlp_layernorm.weight": block.mlp_norm.weight,
        # Megatron's gated MLP splits linear_fc1's output as [gate, up]: silu(gate) * up
        "mlp.linear_fc1.weight": torch.cat([block.mlp.gate_proj.weight, block.mlp.up_proj.weight], dim=0),
        "mlp.linear_fc2.weight": block.mlp.down_proj.weight,
    }
    if isinstance(block.mixer, LinearAttention):
        state.update(_linear_mixer_state(block.mixer))
    elif isinstance(block.mixer, (SoftmaxAttention, SlidingWindowAttention)):
        state.update(_softmax_mixer_state(block.mixer))
    elif isinstance(block.mixer, RAttention):
        state.update(_softmax_mixer_state(block.mixer))  # the same grouped q/k/v and output projections
        state["self_attention.local_norm.weight"] = block.mixer.local_norm.weight
        state["self_attention.residual_norm.weight"] = block.mixer.residual_norm.weight
    else:
        raise TypeError(f"native_block_state_dict: unknown mixer {type(block.mixer).__name__}")
    return {key: value.detach().clone() for key, value in state.items()}


def native_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict of the Megatron GPTModel equivalent to a native spindle HybridModel."""
    state = {"embedding.word_embeddings.weight": model.embedding.weight.detach().clone(),
             "decoder.final_layernorm.weight": model.norm.weight.detach().clone()}
    for index, block in enumerate(model.layers):
        for key, value in native_block_state_dict(block).items():
            state[f"decoder.layers.{index}.{key}"] = value
    if model.output.weight is not model.embedding.weight:
        state["output_layer.weight"] = model.output.weight.detach().clone()
    return state


def _linear_mixer_state(mixer: LinearAttention) -> dict[str, torch.Tensor]:
    head_dim = mixer.head_dim
    projections = [mixer.q_proj.weight, mixer.k_proj.weight, mixer.v_proj.weight, mixer.gate_proj.weight]
    hidden = projections[0].shape[1]
    # [4, H·D, h] -> [H, 4, D, h]: whole heads stay together under a column (tensor-parallel) split
    fused = torch.stack([weight.view(-1, head_dim, hidden) for weight in projections], dim=1)
    state = {
        "self_attention.linear_qkvg.weight": fused.reshape(-1, hidden),
        "self_attention.output_norm.weight": mixer.output_norm.weight,
        "self_attention.linear_proj.weight": mixer.out_proj.weight,
    }
    if mixer.decay_proj is not None:
        state["self_attention.linear_decay.weight"] = mixer.decay_proj.weight
        state["self_attention.linear_decay.bias"] = mixer.decay_proj.bias
    return state


def _softmax_mixer_state(mixer: nn.Module) -> dict[str, torch.Tensor]:
    head_dim = mixer.head_dim
    hidden = mixer.q_proj.weight.shape[1]
    query = mixer.q_proj.weight.view(-1, head_dim, hidden)  # [H, D, h]
    key = mixer.k_proj.weight.view(-1, head_dim, hidden)  # [G, D, h]
    value = mixer.v_proj.weight.view(-1, head_dim, hidden)
    groups = key.shape[0]
    # Megatron's linear_qkv: per query group g, its H/G query heads, then key g, then value g
    grouped = torch.cat([query.view(groups, -1, head_dim, hidden), key[:, None], value[:, None]], dim=1)
    return {
        "self_attention.linear_qkv.weight": grouped.reshape(-1, hidden),
        "self_attention.linear_proj.weight": mixer.out_proj.weight,
    }
