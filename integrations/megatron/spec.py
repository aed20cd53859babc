"""`hybrid_block_spec`: a Megatron-core block spec of a spindle hybrid from a pattern such as "LLLA".

Every layer is Megatron's own TransformerLayer (input norm, self-attention, bias-dropout-add,
pre-MLP norm, MLP) from the local (non-Transformer-Engine) spec; only the token mixer changes:

- "A": Megatron's SelfAttention (its fused q/k/v projection, RoPE, GQA) with ``core_attention``
  replaced by SpindleCoreAttention (all-gather / ring / Ulysses attention across CP ranks);
- "S": the same with a sliding window (spindle's window_attention across CP ranks: one halo exchange);
- "L": the whole self-attention replaced by LinearSelfAttention (linear attention with decay,
  LASP-2 / LASP-1 across CP ranks);
- "R": the whole self-attention replaced by RAttentionSelfAttention (window attention plus linear
  attention over the tokens that left the window; rattention_branches across CP ranks).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
    get_transformer_layer_offset,
)

from spindle.runtime import model
from spindle.runtime.layers import DECAY_KINDS, FEATURE_MAPS, OUTPUT_GATES

from .core_attention import SOFTMAX_SCHEMES, SpindleCoreAttention, check_scheme
from .linear_mixer import LinearAttentionSubmodules, LinearSelfAttention
from .self_attention import LINEAR_SCHEMES
from .rattention import RAttentionSelfAttention, RAttentionSubmodules

NORMALIZATIONS = ("RMSNorm", "LayerNorm")

LAYER_LETTERS = model.LAYER_KINDS
"""Letters of a pattern, the native model's (spindle.runtime.config). Extension point: a new layer kind
adds its letter there and its builder to ``_LAYER_BUILDERS`` (a function returning the layer's ModuleSpec)."""
WINDOW_LETTERS = "RS"
"""Layer kinds that need ``window``."""


def hybrid_block_spec(
    pattern: str,
    *,
    cp_linear: str = "lasp2",
    cp_softmax: str = "allgather",
    config: TransformerConfig | None = None,
    num_layers: int | None = None,
    linear_decay: str = "constant",
    feature_map: str = "identity",
    output_gate: str = "sigmoid",
    normalization: str | None = None,
    window: int | None = None,
    vp_stage: int | None = None,
    pp_rank: int | None = None,
) -> TransformerBlockSubmodules:
    """The block spec of a hybrid decoder, for ``GPTModel(config, transformer_layer_spec=...)``.

    Args:
        pattern: one letter per layer, "L" = linear attention with decay, "A" = softmax attention,
            "R" = RAttention (sliding-window softmax + residual linear attention), "S" = sliding-window
            softmax attention; repeated and truncated to the number of layers ("LLLA" with 8 layers ->
            LLLALLLA).
        cp_linear: context-parallel scheme of "L" layers and of R's linear branch: "lasp2" (one
            all-gather of d×d states per direction) or "lasp1" (a ring pass of states).
        cp_softmax: scheme of "A" layers: "allgather" (K/V all-gather), "ring" or "ulysses"
            (all-to-all; CP size must divide the heads and the query groups).
        config: the model's TransformerConfig. Recommended: sets the layer count
            (``config.num_layers``), keeps only this pipeline stage's layers (``vp_stage``,
            ``pp_rank``) and checks that the config is one these layers run with.
        num_layers: layer count when no config is given (default: ``len(pattern)``).
        linear_decay: "constant" (per-head slopes fading with depth), "data" (per-token gate) or "none".
        feature_map: on q and k of "L" layers: "identity", "silu", "relu" or "elu1".
        output_gate: of "L" layers: "sigmoid" or "silu".
        normalization: "RMSNorm" or "LayerNorm" (default: ``config.normalization``, else "RMSNorm");
            must equal ``config.normalization``.
        window: sliding window w (tokens) of "R" and "S" layers: query i sees keys i − w < j <= i;
            required when the pattern has R or S. Across CP ranks these layers exchange one halo of
            w tokens (spindle's window_attention / rattention_branches), whatever ``cp_softmax`` says.

    Megatron hands each layer its process groups (``pg_collection``); the CP ops run over
    ``pg_collection.cp`` on the sequence shards Megatron's ``get_batch_on_this_cp_rank`` produces.
    To reproduce spindle's native block (SwiGLU MLP, no biases) set ``gated_linear_unit=True``,
    ``activation_func=torch.nn.functional.silu``, ``add_bias_linear=False`` in the config.
    """
    check_scheme("cp_linear", cp_linear, LINEAR_SCHEMES)
    check_scheme("cp_softmax", cp_softmax, SOFTMAX_SCHEMES)
    if normalization is None:
        normalization = config.normalization if config is not None else "RMSNorm"
    check_scheme("normalization", normalization, NORMALIZATIONS)
    check_scheme("linear_decay", linear_decay, DECAY_KINDS)
    check_scheme("feature_map", feature_map, FEATURE_MAPS)
    check_scheme("output_gate", output_gate, OUTPUT_GATES)
    layer_count = _layer_count(pattern, config, num_layers)
    kinds = resolve_pattern(pattern, layer_count)
    _check_window(window, kinds)
    if config is not None:
        check_config(config, kinds, normalization)
    options = {"cp_linear": cp_linear, "cp_softmax": cp_softmax, "linear_decay": linear_decay,
               "feature_map": feature_map, "output_gate": output_gate, "normalization": normalization,
               "window": window}
    layer_specs = [_LAYER_BUILDERS[kind](options) for kind in kinds]
    if config is not None:
        offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
        count = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
        layer_specs = layer_specs[offset:offset + count]
    final_norm = get_gpt_layer_local_spec(normalization=normalization).submodules.input_layernorm
    return TransformerBlockSubmodules(layer_specs=layer_specs, layer_norm=final_norm)


def resolve_pattern(pattern: str, num_layers: int) -> str:
    """The pattern repeated and truncated to ``num_layers`` letters, after checking its letters (the
    native model's rule, spindle.runtime.model.resolve_pattern)."""
    return model.resolve_pattern(pattern, num_layers,
                                 settings=("hybrid_block_spec: pattern", "hybrid_block_spec: num_layers"))


def check_config(config: TransformerConfig, kinds: str, normalization: str) -> None:
    """Config settings the spindle layers cannot honour, reported together at spec time."""
    problems = []
    if config.normalization != normalization:
        problems.append(f"config.normalization={config.normalization!r} but normalization={normalization!r} "
                        "(pass the same value to both)")
    if set(kinds) & set("ARS") and config.attention_dropout:
        problems.append(f"attention_dropout={config.attention_dropout} (set 0.0: spindle's attention has no dropout)")
    if config.apply_query_key_layer_scaling:
        problems.append("apply_query_key_layer_scaling=True (set False)")
    if getattr(config, "window_size", None) is not None:
        problems.append(f"window_size={config.window_size} (leave it unset; sliding windows come from 'S' / 'R' "
                        "layers and hybrid_block_spec(window=...))")
    if problems:
        raise ValueError("hybrid_block_spec: this TransformerConfig does not fit spindle's layers: "
                         + "; ".join(problems))


def _layer_count(pattern: str, config: TransformerConfig | None, num_layers: int | None) -> int:
    if config is not None:
        if num_layers is not None and num_layers != config.num_layers:
            raise ValueError(f"hybrid_block_spec: num_layers={num_layers} differs from config.num_layers="
                             f"{config.num_layers}; pass one of them")
        return config.num_layers
    if num_layers is None:
        return len(pattern) if isinstance(pattern, str) else 0
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"hybrid_block_spec: num_layers must be a positive integer, got {num_layers!r}")
    return num_layers


def _check_window(window: int | None, kinds: str) -> None:
    needs = sorted(set(kinds) & set(WINDOW_LETTERS))
    if needs and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"hybrid_block_spec: the pattern has {'/'.join(needs)} layers, which need window= "
                         f"(a positive number of tokens); got window={window!r}")


def _softmax_layer(options: dict[str, Any]) -> ModuleSpec:
    """Megatron's local GPT layer with SpindleCoreAttention as its core attention."""
    layer = get_gpt_layer_local_spec(normalization=options["normalization"])
    layer.submodules.self_attention.submodules.core_attention = ModuleSpec(
        module=SpindleCoreAttention, params={"scheme": options["cp_softmax"]})
    return layer


def _window_layer(options: dict[str, Any]) -> ModuleSpec:
    """Megatron's local GPT layer with sliding-window SpindleCoreAttention ("S")."""
    layer = get_gpt_layer_local_spec(normalization=options["normalization"])
    layer.submodules.self_attention.submodules.core_attention = ModuleSpec(
        module=SpindleCoreAttention, params={"scheme": options["cp_softmax"], "window": options["window"]})
    return layer


def _rattention_layer(options: dict[str, Any]) -> ModuleSpec:
    """Megatron's local GPT layer with RAttentionSelfAttention as its self-attention ("R")."""
    return _replaced_mixer_layer(options, ModuleSpec(
        module=RAttentionSelfAttention, params={"window": options["window"], "scheme": options["cp_linear"]},
        submodules=RAttentionSubmodules()))


def _linear_layer(options: dict[str, Any]) -> ModuleSpec:
    """Megatron's local GPT layer with LinearSelfAttention as its self-attention ("L")."""
    return _replaced_mixer_layer(options, ModuleSpec(
        module=LinearSelfAttention,
        params={"scheme": options["cp_linear"], "decay": options["linear_decay"],
                "feature_map": options["feature_map"], "output_gate": options["output_gate"]},
        submodules=LinearAttentionSubmodules()))


def _replaced_mixer_layer(options: dict[str, Any], mixer: ModuleSpec) -> ModuleSpec:
    """Megatron's local GPT layer with `mixer` in place of its whole self-attention."""
    submodules = get_gpt_layer_local_spec(normalization=options["normalization"]).submodules
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=submodules.input_layernorm,
            self_attention=mixer,
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=submodules.pre_mlp_layernorm,
            mlp=submodules.mlp,
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map={"pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"},
        ),
    )


_LAYER_BUILDERS: dict[str, Callable[[dict[str, Any]], ModuleSpec]] = {
    "A": _softmax_layer,
    "L": _linear_layer,
    "R": _rattention_layer,
    "S": _window_layer,
}
