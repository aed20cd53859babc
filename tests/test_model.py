"""The hybrid decoder: pattern parsing, each mixer against an independent float64 reference,
causality, RoPE positions, the chunked loss against a dense cross-entropy, GQA, tied weights,
parameter and FLOP counts, and the hooks that parallelism relies on (replaceable ops, head-local
shapes)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from numerics import assert_tensors_close

from spindle.runtime.config import ModelConfig
from spindle.runtime.layers import LinearAttention, SoftmaxAttention, apply_rotary, default_ffn_dim
from spindle.runtime.model import HybridModel, resolve_pattern

DECAYS = ("none", "constant", "data")


def tiny_config(**overrides: object) -> ModelConfig:
    values: dict[str, object] = dict(layers="LA", n_layers=2, dim=32, heads=4, kv_heads=2,
                                     vocab_size=48, ffn_dim=64, decay="constant")
    values.update(overrides)
    return ModelConfig(**values)


def build(config: ModelConfig, dtype: torch.dtype = torch.float64, seed: int = 0) -> HybridModel:
    torch.manual_seed(seed)
    return HybridModel(config).to(dtype)


def random_tokens(config: ModelConfig, batch: int = 2, length: int = 13, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (batch, length), generator=generator)


# ---------------------------------------------------------------------------------------------
# Independent float64 references of the two mixers (written from docs/algorithms.md, not from layers.py)
# ---------------------------------------------------------------------------------------------


def reference_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight


def reference_linear_mixer(mixer: LinearAttention, x: torch.Tensor, feature_map: str,
                           eps: float) -> torch.Tensor:
    """Parallel form O = scale·((QKᵀ) ⊙ D) V with D_ij = exp(G_i − G_j), j ≤ i."""
    batch, length, dim = x.shape
    head_dim = mixer.head_dim
    maps = {"identity": lambda t: t, "silu": lambda t: t * torch.sigmoid(t),
            "relu": lambda t: t.clamp_min(0), "elu1": lambda t: torch.where(t > 0, t + 1, t.exp())}
    q = maps[feature_map](x @ mixer.q_proj.weight.T).reshape(batch, length, -1, head_dim)
    k = maps[feature_map](x @ mixer.k_proj.weight.T).reshape(batch, length, -1, head_dim)
    v = (x @ mixer.v_proj.weight.T).reshape(batch, length, -1, head_dim)
    heads = q.shape[2]
    if mixer.decay == "none":
        log_decay = x.new_zeros(batch, length, heads)
    elif mixer.decay == "constant":
        log_decay = mixer.log_decay_slopes.to(x.dtype).expand(batch, length, heads)
    else:
        logits = x @ mixer.decay_proj.weight.T + mixer.decay_proj.bias
        log_decay = -torch.log1p(torch.exp(-logits))  # logsigmoid
    cumulative = log_decay.cumsum(1)  # [B, T, H]
    difference = cumulative[:, :, None, :] - cumulative[:, None, :, :]  # [B, Ti, Tj, H]
    causal = torch.ones(length, length, dtype=torch.bool).tril()[None, :, :, None]
    weights = torch.where(causal, difference, torch.full_like(difference, -math.inf)).exp()
    scores = torch.einsum("bihd,bjhd->bijh", q, k) * head_dim ** -0.5 * weights
    o = torch.einsum("bijh,bjhd->bihd", scores, v)
    o = reference_rms_norm(o, mixer.output_norm.weight, eps).reshape(batch, length, -1)
    gate = x @ mixer.gate_proj.weight.T
    gate = torch.sigmoid(gate) if mixer.output_gate == "sigmoid" else gate * torch.sigmoid(gate)
    return (o * gate) @ mixer.out_proj.weight.T


def reference_rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """RoPE as complex multiplication: pair (i, i + d/2) is one complex number rotated by pos·θ^(-2i/d)."""
    half = x.shape[-1] // 2
    frequencies = theta ** (-torch.arange(half, dtype=torch.float64) * 2 / x.shape[-1])
    angles = positions.to(torch.float64)[..., None] * frequencies  # [(B,) T, half]
    if angles.dim() == 2:
        angles = angles[None]
    rotation = torch.polar(torch.ones_like(angles), angles)[:, :, None, :]  # [B, T, 1, half]
    rotated = torch.complex(x[..., :half], x[..., half:]) * rotation
    return torch.cat((rotated.real, rotated.imag), dim=-1)


def reference_softmax_mixer(mixer: SoftmaxAttention, x: torch.Tensor, positions: torch.Tensor,
                            theta: float) -> torch.Tensor:
    batch, length, _ = x.shape
    head_dim = mixer.head_dim
    q = reference_rope((x @ mixer.q_proj.weight.T).reshape(batch, length, -1, head_dim), positions, theta)
    k = reference_rope((x @ mixer.k_proj.weight.T).reshape(batch, length, -1, head_dim), positions, theta)
    v = (x @ mixer.v_proj.weight.T).reshape(batch, length, -1, head_dim)
    group = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    scores = torch.einsum("bihd,bjhd->bhij", q, k) * head_dim ** -0.5
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    probabilities = scores.masked_fill(~causal, -math.inf).softmax(-1)
    o = torch.einsum("bhij,bjhd->bihd", probabilities, v).reshape(batch, length, -1)
    return o @ mixer.out_proj.weight.T


def assert_mixer_matches(mixer: nn.Module, x: torch.Tensor, output: torch.Tensor, expected: torch.Tensor) -> None:
    """The output and the gradients of the input and of every named mixer parameter (under one random
    output gradient), each within 1e-10 (relative) of the float64 reference."""
    output_gradient = torch.randn(output.shape, generator=torch.Generator().manual_seed(5), dtype=output.dtype)
    names = ["x"] + [name for name, _ in mixer.named_parameters()]
    parameters = [x] + list(mixer.parameters())

    def named_gradients(result: torch.Tensor) -> dict[str, torch.Tensor]:
        gradients = torch.autograd.grad((result * output_gradient).sum(), parameters, retain_graph=True)
        return {"output": result.detach(), **{"grad_" + name: gradient for name, gradient in zip(names, gradients)}}

    assert_tensors_close(named_gradients(output), named_gradients(expected), 1e-10, type(mixer).__name__)


# ---------------------------------------------------------------------------------------------
# Layer pattern
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern, n_layers, expected", [
    ("LLLA", 4, "LLLA"), ("LLLA", 8, "LLLALLLA"), ("LA", 3, "LAL"), ("LLLA", 2, "LL"),
    ("A", 3, "AAA"), ("LAAL", 1, "L"),
])
def test_resolve_pattern_repeats_and_truncates(pattern: str, n_layers: int, expected: str) -> None:
    assert resolve_pattern(pattern, n_layers) == expected


@pytest.mark.parametrize("pattern, letter", [("LXA", "'X'"), ("lla", "'l'"), ("L A", "' '"),
                                             ("LLM", "'M'")])
def test_resolve_pattern_rejects_bad_letters(pattern: str, letter: str) -> None:
    with pytest.raises(ValueError) as error:
        resolve_pattern(pattern, 4)
    message = str(error.value)
    assert "model.layers" in message and letter in message
    assert "'L'" in message and "'A'" in message


def test_resolve_pattern_rejects_empty_pattern_and_layer_count() -> None:
    with pytest.raises(ValueError, match="model.layers"):
        resolve_pattern("", 4)
    with pytest.raises(ValueError, match="model.n_layers"):
        resolve_pattern("LA", 0)


def test_model_exposes_resolved_pattern_and_block_kinds() -> None:
    model = HybridModel(tiny_config(layers="LLA", n_layers=5))
    assert model.layer_kinds == "LLALL"
    assert [type(block.mixer) for block in model.layers] == [
        LinearAttention, LinearAttention, SoftmaxAttention, LinearAttention, LinearAttention]


@pytest.mark.parametrize("key, value", [("decay", "fast"), ("feature_map", "tanh"), ("kv_heads", 3),
                                        ("dim", 30), ("layers", "LQ")])
def test_model_rejects_bad_config_naming_the_key(key: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"model.{key}"):
        HybridModel(tiny_config(**{key: value}))


# ---------------------------------------------------------------------------------------------
# Mixers against the references
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("decay, feature_map", [("none", "identity"), ("constant", "silu"),
                                                ("data", "elu1"), ("data", "relu")])
def test_linear_mixer_matches_parallel_form(decay: str, feature_map: str) -> None:
    config = tiny_config(layers="L", decay=decay, feature_map=feature_map)
    mixer = build(config).layers[0].mixer
    x = torch.randn(2, 11, config.dim, dtype=torch.float64, requires_grad=True)
    output = mixer(x)
    expected = reference_linear_mixer(mixer, x, feature_map, config.norm_eps)
    assert output.shape == (2, 11, config.dim)
    assert_mixer_matches(mixer, x, output, expected)


def test_constant_decay_slopes_follow_minimax_schedule() -> None:
    config = tiny_config(layers="L", n_layers=3, heads=4, decay="constant")
    model = HybridModel(config)
    for layer_index, block in enumerate(model.layers):
        depth = 1 - layer_index / 2 + 1e-5
        expected = torch.tensor([-(2.0 ** (-8 * (h + 1) / 4)) * depth for h in range(4)])
        torch.testing.assert_close(block.mixer.log_decay_slopes, expected, rtol=1e-6, atol=0)
    assert "log_decay_slopes" not in model.state_dict()


def test_data_decay_gate_starts_slow_and_stays_nonpositive() -> None:
    config = tiny_config(layers="L", heads=4, decay="data")
    mixer = HybridModel(config).layers[0].mixer
    start = F.logsigmoid(mixer.decay_proj.bias.detach().double())
    torch.testing.assert_close(start, -(2.0 ** (-8 * (torch.arange(4.0) + 1) / 4)).double())
    log_decay = mixer.log_decay(torch.randn(2, 5, config.dim) * 100)
    assert log_decay.shape == (2, 5, 4) and bool((log_decay <= 0).all())


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_softmax_mixer_matches_dense_gqa_reference(kv_heads: int) -> None:
    config = tiny_config(layers="A", kv_heads=kv_heads)
    model = build(config)
    mixer = model.layers[0].mixer
    assert mixer.k_proj.weight.shape == (kv_heads * config.dim // config.heads, config.dim)
    x = torch.randn(2, 9, config.dim, dtype=torch.float64, requires_grad=True)
    positions = torch.arange(9) + 3
    output = mixer(x, model.rotary(positions, x.dtype))
    expected = reference_softmax_mixer(mixer, x, positions, config.rope_theta)
    assert output.shape == (2, 9, config.dim)
    assert_mixer_matches(mixer, x, output, expected)


@pytest.mark.parametrize("layers", ["L", "A", "LLA"])
def test_model_output_shape(layers: str) -> None:
    config = tiny_config(layers=layers, n_layers=3)
    model = build(config, torch.float32)
    hidden = model(random_tokens(config, batch=3, length=7))
    assert hidden.shape == (3, 7, config.dim) and hidden.dtype == torch.float32
    assert bool(hidden.isfinite().all())


# ---------------------------------------------------------------------------------------------
# Causality and positions
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layers, decay", [("L", "none"), ("L", "constant"), ("L", "data"),
                                           ("A", "constant"), ("LA", "none"), ("LA", "constant"),
                                           ("LA", "data")])
def test_changing_a_token_never_changes_earlier_outputs(layers: str, decay: str) -> None:
    config = tiny_config(layers=layers, n_layers=3, decay=decay)
    model = build(config)
    tokens = random_tokens(config, length=14)
    changed_at = 6
    changed = tokens.clone()
    changed[:, changed_at] = (tokens[:, changed_at] + 1) % config.vocab_size
    with torch.no_grad():
        before, after = model(tokens), model(changed)
    torch.testing.assert_close(after[:, :changed_at], before[:, :changed_at], rtol=0, atol=1e-13)
    for position in range(changed_at, tokens.shape[1]):  # the change must reach every later token
        assert (after[:, position] - before[:, position]).abs().max() > 1e-8


def model_tokens_and_default_output(layers: str) -> tuple[HybridModel, torch.Tensor, torch.Tensor]:
    """A float64 tiny model, ten random tokens, and its output at the default positions."""
    config = tiny_config(layers=layers)
    model = build(config)
    tokens = random_tokens(config, length=10)
    with torch.no_grad():
        return model, tokens, model(tokens)


def test_explicit_arange_positions_equal_the_default() -> None:
    model, tokens, default = model_tokens_and_default_output("LA")
    with torch.no_grad():
        torch.testing.assert_close(model(tokens, torch.arange(10)), default, rtol=0, atol=0)
        torch.testing.assert_close(model(tokens, torch.arange(10).expand(2, 10)), default, rtol=0, atol=0)


def test_rope_depends_only_on_relative_positions() -> None:
    model, tokens, default = model_tokens_and_default_output("A")
    with torch.no_grad():
        shifted = model(tokens, torch.arange(10) + 1000)
        per_row = model(tokens, torch.stack([torch.arange(10) + 5, torch.arange(10) + 77]))
        stretched = model(tokens, torch.arange(10) * 3)
    torch.testing.assert_close(shifted, default, rtol=0, atol=1e-10)
    torch.testing.assert_close(per_row, default, rtol=0, atol=1e-10)
    assert (stretched - default).abs().max() > 1e-6  # positions do reach the attention scores


def test_rotary_scores_are_invariant_to_a_common_shift() -> None:
    """⟨rope(q, m), rope(k, n)⟩ depends on m − n only, also at million-token positions."""
    model = build(tiny_config(layers="A"))
    q = torch.randn(1, 6, 4, 8, dtype=torch.float64)
    k = torch.randn(1, 6, 4, 8, dtype=torch.float64)
    def scores(positions: torch.Tensor) -> torch.Tensor:
        rotary = model.rotary(positions, torch.float64)
        return torch.einsum("bihd,bjhd->bhij", apply_rotary(q, rotary), apply_rotary(k, rotary))

    base = scores(torch.arange(6))
    torch.testing.assert_close(scores(torch.arange(6) + 1_000_003), base, rtol=0, atol=1e-8)


def test_positions_shape_is_checked() -> None:
    config = tiny_config()
    model = build(config)
    with pytest.raises(ValueError, match="positions"):
        model(random_tokens(config, length=5), torch.arange(6))


# ---------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tie_embeddings", [False, True], ids=["untied", "tied"])
def test_loss_matches_dense_cross_entropy_with_gradients(tie_embeddings: bool) -> None:
    config = tiny_config(layers="LA", n_layers=2, tie_embeddings=tie_embeddings, decay="data")
    model = build(config)
    tokens = random_tokens(config, length=12)
    labels = random_tokens(config, length=12, seed=7)
    labels[0, :3] = -100
    labels[1, -1] = -100
    loss_sum, token_count = model.loss(tokens, labels)
    assert loss_sum.dtype == torch.float32 and loss_sum.dim() == 0
    assert token_count.dtype == torch.int64 and int(token_count) == 24 - 4
    gradients = torch.autograd.grad(loss_sum, list(model.parameters()))

    logits = model(tokens) @ model.output_weight.T  # [B, T, vocab], dense float64 reference
    expected = F.cross_entropy(logits.reshape(-1, config.vocab_size), labels.reshape(-1),
                               ignore_index=-100, reduction="sum")
    expected_gradients = torch.autograd.grad(expected, list(model.parameters()))
    assert abs(loss_sum.item() - expected.item()) <= 1e-6 * abs(expected.item())
    names = ["grad_" + name for name, _ in model.named_parameters()]
    assert_tensors_close(dict(zip(names, gradients)), dict(zip(names, expected_gradients)), 1e-5)


def test_loss_rejects_mismatched_labels() -> None:
    config = tiny_config()
    model = build(config)
    with pytest.raises(ValueError, match="labels"):
        model.loss(random_tokens(config, length=6), random_tokens(config, length=5))


# ---------------------------------------------------------------------------------------------
# Weights, counts, init
# ---------------------------------------------------------------------------------------------


def test_tied_embeddings_share_storage() -> None:
    tied = HybridModel(tiny_config(tie_embeddings=True))
    assert tied.output_weight is tied.embedding.weight
    assert tied.output.weight.data_ptr() == tied.embedding.weight.data_ptr()
    untied = HybridModel(tiny_config(tie_embeddings=False))
    assert untied.output_weight.data_ptr() != untied.embedding.weight.data_ptr()
    vocab_by_dim = 48 * 32
    assert untied.num_parameters() - tied.num_parameters() == vocab_by_dim


def hand_count(dim: int, heads: int, kv_heads: int, vocab: int, ffn: int, kinds: str,
               decay: str, tied: bool) -> int:
    head_dim = dim // heads
    linear_mixer = 5 * dim * dim + head_dim + (dim * heads + heads if decay == "data" else 0)
    softmax_mixer = dim * dim + 2 * dim * kv_heads * head_dim + dim * dim
    block_common = 2 * dim + 3 * dim * ffn
    blocks = sum(block_common + (linear_mixer if kind == "L" else softmax_mixer) for kind in kinds)
    return vocab * dim * (1 if tied else 2) + blocks + dim


@pytest.mark.parametrize("decay, tied", [("constant", False), ("data", True), ("none", False)])
def test_parameter_count_matches_hand_count(decay: str, tied: bool) -> None:
    config = tiny_config(layers="LLA", n_layers=4, decay=decay, tie_embeddings=tied)
    model = HybridModel(config)
    assert model.num_parameters() == hand_count(32, 4, 2, 48, 64, "LLAL", decay, tied)


def test_default_ffn_dim_rounds_eight_thirds_up_to_64() -> None:
    assert default_ffn_dim(128) == 384  # 341.3 -> 384
    assert default_ffn_dim(96) == 256  # 256 exactly
    assert HybridModel(tiny_config(ffn_dim=0)).layers[0].mlp.up_proj.out_features == 128


def test_flops_per_token_formula() -> None:
    config = tiny_config(layers="LLA", n_layers=4, decay="constant")
    model = HybridModel(config)
    matmul_parameters = model.num_parameters() - 48 * 32  # the untied input table is a lookup
    head_dim = 8
    expected = 6 * matmul_parameters + 3 * 12 * head_dim * 32 + 1 * 6 * 1024 * 32
    assert model.flops_per_token(1024) == expected
    assert model.flops_per_token(2048) - model.flops_per_token(1024) == 6 * 1024 * 32


def test_init_scales_residual_outputs_by_depth() -> None:
    config = tiny_config(layers="LA", n_layers=8, dim=64, ffn_dim=128, init_std=0.05)
    model = build(config, torch.float32)
    output_std = 0.05 / math.sqrt(16)
    for block in model.layers:
        assert abs(block.mixer.q_proj.weight.std().item() / 0.05 - 1) < 0.1
        assert abs(block.mixer.out_proj.weight.std().item() / output_std - 1) < 0.1
        assert abs(block.mlp.down_proj.weight.std().item() / output_std - 1) < 0.1
        assert bool((block.mixer_norm.weight == 1).all()) and bool((block.mlp_norm.weight == 1).all())
    assert abs(model.embedding.weight.std().item() / 0.05 - 1) < 0.1


# ---------------------------------------------------------------------------------------------
# Hooks used by parallelism (applied from outside the model)
# ---------------------------------------------------------------------------------------------


def test_token_mixer_ops_are_replaceable_instance_attributes() -> None:
    config = tiny_config(layers="LA")
    model = build(config)
    tokens = random_tokens(config, length=8)
    with torch.no_grad():
        default = model(tokens)
    calls: list[str] = []
    for block in model.layers:
        mixer = block.mixer
        if block.kind == "L":
            original = mixer.sequence_op

            def sequence_op(q, k, v, *, log_decay=None, scale=None, original=original):
                calls.append("L")
                return original(q, k, v, log_decay=log_decay, scale=scale)
            mixer.sequence_op = sequence_op
        else:
            original = mixer.attention_op

            def attention_op(q, k, v, *, causal=True, scale=None, original=original):
                calls.append("A")
                assert causal
                return original(q, k, v, causal=causal, scale=scale)
            mixer.attention_op = attention_op
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), default, rtol=0, atol=0)
    assert calls == ["L", "A"]


def head_shard(mixer: nn.Module, heads: slice, kv_heads: slice | None = None) -> nn.Module:
    """The head slice a tensor-parallel rank would hold: q/k/v/gate/decay rows (column-parallel),
    out_proj columns (row-parallel), and the per-head decay slopes."""
    shard = copy.deepcopy(mixer)
    head_dim = mixer.head_dim
    rows = slice(heads.start * head_dim, heads.stop * head_dim)
    kv_rows = rows if kv_heads is None else slice(kv_heads.start * head_dim, kv_heads.stop * head_dim)
    with torch.no_grad():
        shard.q_proj.weight = nn.Parameter(mixer.q_proj.weight[rows].clone())
        shard.k_proj.weight = nn.Parameter(mixer.k_proj.weight[kv_rows].clone())
        shard.v_proj.weight = nn.Parameter(mixer.v_proj.weight[kv_rows].clone())
        shard.out_proj.weight = nn.Parameter(mixer.out_proj.weight[:, rows].clone())
        if isinstance(mixer, LinearAttention):
            shard.gate_proj.weight = nn.Parameter(mixer.gate_proj.weight[rows].clone())
            if mixer.decay_proj is not None:
                shard.decay_proj.weight = nn.Parameter(mixer.decay_proj.weight[heads].clone())
                shard.decay_proj.bias = nn.Parameter(mixer.decay_proj.bias[heads].clone())
            if mixer.log_decay_slopes is not None:
                shard.log_decay_slopes = mixer.log_decay_slopes[heads].clone()
    return shard


@pytest.mark.parametrize("decay", DECAYS)
def test_linear_mixer_head_shards_sum_to_the_full_output(decay: str) -> None:
    config = tiny_config(layers="L", decay=decay)
    mixer = build(config).layers[0].mixer
    x = torch.randn(2, 7, config.dim, dtype=torch.float64)
    with torch.no_grad():
        full = mixer(x)
        sharded = head_shard(mixer, slice(0, 1))(x) + head_shard(mixer, slice(1, 4))(x)
    torch.testing.assert_close(sharded, full, rtol=1e-12, atol=1e-13)


def test_softmax_mixer_head_shards_sum_to_the_full_output() -> None:
    config = tiny_config(layers="A", heads=4, kv_heads=2)
    model = build(config)
    mixer = model.layers[0].mixer
    x = torch.randn(2, 7, config.dim, dtype=torch.float64)
    rotary = model.rotary(torch.arange(7), x.dtype)
    with torch.no_grad():
        full = mixer(x, rotary)
        first = head_shard(mixer, slice(0, 2), slice(0, 1))(x, rotary)
        second = head_shard(mixer, slice(2, 4), slice(1, 2))(x, rotary)
    torch.testing.assert_close(first + second, full, rtol=1e-12, atol=1e-13)
