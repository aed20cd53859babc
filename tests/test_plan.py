"""The planner (runtime/plan.py): parameter and FLOP counts against the real model, model-state bytes
per engine and ZeRO stage, per-block activation bytes against the tensors autograd really saves,
communication volumes (LASP-2 independent of T, ring/all-gather proportional to T), the all-gather
K/V transient, the presets, the recommendation, check_fits (and the training preflight) and the `spindle plan` CLI."""
from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import pytest
import torch

from spindle import kernels
from spindle.runtime import plan
from spindle.runtime.config import Config, DataConfig, ModelConfig, ParallelConfig, TrainConfig, load_config
from spindle.runtime.model import HybridModel

if not torch.cuda.is_available():
    # the Triton kernels' saved tensors are checked in the interpreter; must precede the first `import triton`
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
needs_triton = pytest.mark.skipif(not kernels.linear_attn.triton_available(torch.device("cpu")),
                                  reason="needs triton (run with TRITON_INTERPRET=1)")
PRESETS = [REPO / "configs" / "hybrid-1m-1gpu.yaml", REPO / "configs" / "linear-llama3-8b-2m-64gpu.yaml"]


def make_config(*, layers: str = "LLLA", n_layers: int = 4, dim: int = 64, heads: int = 4, kv_heads: int = 2,
                vocab_size: int = 100, ffn_dim: int = 128, seq_len: int = 4096, dp: int = 1, cp: int = 1,
                tp: int = 1, checkpointing: str = "none", precision: str = "bf16", global_batch: int = 1,
                **parallel: object) -> Config:
    return Config(
        model=ModelConfig(layers=layers, n_layers=n_layers, dim=dim, heads=heads, kv_heads=kv_heads,
                          vocab_size=vocab_size, ffn_dim=ffn_dim),
        data=DataConfig(seq_len=seq_len),
        parallel=ParallelConfig(dp=dp, cp=cp, tp=tp, activation_checkpointing=checkpointing, **parallel),
        train=TrainConfig(global_batch=global_batch, precision=precision))


def volume(config: Config, name: str) -> float:
    """Bytes per step per rank of the traffic called ``name``."""
    volumes = plan.communication(plan.shape_of(config), plan.layout_of(config))
    return sum(v.bytes for v in volumes if v.name == name)


# ---------------------------------------------------------------------------------------------
# Parameters and FLOPs: analytic counts equal the model's own
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layers", ["LA", "LLLA", "L", "A"])
@pytest.mark.parametrize("decay", ["none", "constant", "data"])
@pytest.mark.parametrize("tie", [False, True])
def test_parameter_count_equals_model(layers: str, decay: str, tie: bool) -> None:
    model_config = ModelConfig(layers=layers, n_layers=5, dim=48, heads=6, kv_heads=2, vocab_size=50,
                               decay=decay, tie_embeddings=tie, ffn_dim=0)
    config = Config(model=model_config)
    model = HybridModel(model_config)
    assert plan.count_parameters(config) == model.num_parameters()
    for seq_len in (1, 300, 65536):
        assert plan.model_flops_per_token(plan.shape_of(config), seq_len) == model.flops_per_token(seq_len)


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.name)
def test_preset_parameter_count_equals_model(path: Path) -> None:
    config = load_config(path)
    with torch.device("meta"):  # shapes only: the 9B preset would need 37 GB of real memory
        model = HybridModel(config.model)
    assert plan.count_parameters(config) == model.num_parameters()


def test_parameter_count_by_hand() -> None:
    # L layer: 5 projections 64·64 + MLP 3·64·128 + norms 2·64 + output norm 16; A layer: q,o 64·64,
    # k,v 64·32, MLP, norms; embedding and output 100·64; final norm 64
    linear = 5 * 64 * 64 + 3 * 64 * 128 + 2 * 64 + 16
    softmax = 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64
    expected = 3 * linear + softmax + 2 * 100 * 64 + 64
    assert plan.count_parameters(make_config()) == expected


# ---------------------------------------------------------------------------------------------
# Model state per engine and ZeRO stage
# ---------------------------------------------------------------------------------------------
def state(config: Config) -> plan.ModelStateMemory:
    return plan.model_state_memory(plan.shape_of(config), plan.layout_of(config))


def test_model_state_bytes_per_engine_and_stage() -> None:
    n = plan.count_parameters(make_config())
    single = state(make_config(precision="fp32"))
    assert (single.parameters, single.gradients, single.optimizer) == (4 * n, 4 * n, 8 * n)
    assert single.weight_copies == 0 and single.gathered == 0
    # FSDP2 shards all three over the dp × cp replicas: 2 × 2 = 4 shards
    fsdp = state(make_config(dp=2, cp=2, global_batch=2, precision="fp32"))
    assert (fsdp.parameters, fsdp.gradients, fsdp.optimizer) == (n, n, 2 * n)
    cases = {1: (4 * n, 4 * n, 2 * n), 2: (4 * n, n, 2 * n), 3: (n, n, 2 * n)}
    for stage, expected in cases.items():
        zero = state(make_config(dp=4, global_batch=4, precision="fp32", dp_engine="deepspeed", zero_stage=stage))
        assert (zero.parameters, zero.gradients, zero.optimizer) == expected, stage
        assert zero.optimizer_cpu == 0
    offload = state(make_config(dp=4, global_batch=4, precision="fp32", dp_engine="deepspeed", zero_stage=2,
                                offload_optimizer=True))
    assert offload.optimizer == 0 and offload.optimizer_cpu == 2 * n


def test_tensor_parallel_splits_block_matrices_only() -> None:
    config = make_config(tp=2)
    counts = plan.parameter_counts(plan.shape_of(config))
    replicated = 2 * 100 * 64 + 64 + 3 * (2 * 64 + 16) + 2 * 64  # embedding, output, all norm gains
    assert plan.local_parameters(plan.shape_of(config), 2) == (counts.total - replicated) / 2 + replicated


def test_autocast_weight_copies_only_without_bf16_parameters() -> None:
    n = plan.count_parameters(make_config())
    copies = state(make_config(precision="bf16")).weight_copies
    assert copies == 2 * (n - 100 * 64)  # every weight but the embedding table is a matmul operand
    # FSDP2 over two replicas runs the forward on bf16 weights: no autocast copies, gathered units instead
    sharded = state(make_config(dp=2, global_batch=2, precision="bf16"))
    assert sharded.weight_copies == 0 and sharded.gathered > 0


# ---------------------------------------------------------------------------------------------
# Activations: the per-block byte counts equal what autograd saves
# ---------------------------------------------------------------------------------------------
def real_saved_bytes(config: Config, kind: str, *, bf16_weights: bool, recompute: bool = False,
                     linear_backend: str = "auto") -> int:
    """Bytes of the distinct storages one block saves for backward in a real CPU forward (real tensors, the
    kernels themselves), counted without the planner's help: the parameters' storages, bf16 tensors of a
    weight's shape (autocast's weight copies) and the shared RoPE tables are left out."""
    torch.manual_seed(0)
    model = HybridModel(config.model)
    block = model.layers[config.model.layers.index(kind)]
    dtype = torch.bfloat16 if bf16_weights else torch.float32
    for owner in block.modules():  # FSDP2's bf16 policy: parameters in bf16, buffers as they are
        for name, parameter in list(owner.named_parameters(recurse=False)):
            setattr(owner, name, torch.nn.Parameter(parameter.detach().to(dtype)))
    block.recompute = recompute
    length = config.data.seq_len
    x = torch.randn(1, length, config.model.dim, dtype=dtype, requires_grad=True)
    rotary = model.rotary(torch.arange(length), dtype)
    excluded = {t.untyped_storage().data_ptr() for t in (*rotary, *block.parameters())}
    weight_shapes = {tuple(p.shape) for p in block.parameters()} | {tuple(p.shape)[::-1] for p in block.parameters()}
    kept: list[torch.Tensor] = []  # keeps every saved tensor alive, so no storage is reused mid-count

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        kept.append(tensor)
        return tensor

    autocast = config.train.precision == "bf16"
    with kernels.linear_attn.force_backend(linear_backend), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            block(x, rotary)
    storages = {}
    for tensor in kept:
        weight_copy = autocast and tensor.dtype == torch.bfloat16 and tuple(tensor.shape) in weight_shapes
        if tensor.untyped_storage().data_ptr() in excluded or weight_copy:
            continue
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    return sum(storages.values())


def block_config(kind_variant: dict, precision: str, replicas: int, seq_len: int) -> Config:
    # widths 64/96 keep activation shapes distinct from weight shapes; window 16 for R and S
    config = make_config(layers="LARS", n_layers=4, dim=64, heads=4, kv_heads=2, ffn_dim=96, seq_len=seq_len,
                         precision=precision, dp=replicas, global_batch=replicas)
    return dataclasses.replace(config, model=dataclasses.replace(config.model, window=16, **kind_variant))


# decay and feature map only change linear layers
BLOCK_CASES = {"L": ("L", {}), "A": ("A", {}), "R": ("R", {}), "S": ("S", {}),
               "L-data-silu": ("L", {"decay": "data", "feature_map": "silu"}),
               "L-silu-gate": ("L", {"decay": "none", "output_gate": "silu"})}
PRECISIONS = {"fp32": ("fp32", 1), "autocast-fp32-weights": ("bf16", 1), "fsdp-bf16-weights": ("bf16", 2)}


# every precision for L and A; the variants and window layers once each (the same code paths)
CPU_CASES = [(case, precision) for case in ("L", "A") for precision in PRECISIONS] + [
    ("L-data-silu", "autocast-fp32-weights"), ("L-silu-gate", "fp32"), ("R", "autocast-fp32-weights"),
    ("S", "fsdp-bf16-weights")]


@pytest.mark.parametrize("case,precision", CPU_CASES, ids=[f"{case}-{precision}" for case, precision in CPU_CASES])
def test_block_bytes_equal_a_real_cpu_forward(case: str, precision: str) -> None:
    """The planner's bytes for the CPU kernels (fake tensors, backends forced) equal what a real CPU forward
    of the block saves, without and with activation checkpointing; 192 tokens: three chunks of 64."""
    kind, variant = BLOCK_CASES[case]
    config = block_config(variant, *PRECISIONS[precision], seq_len=192)
    layout = plan.layout_of(config, device_type="cpu")
    layer = plan.layer_activations(kind, plan.shape_of(config), layout)
    assert layer.saved == real_saved_bytes(config, kind, bf16_weights=layout.bf16_parameters)
    assert layer.checkpoint == real_saved_bytes(config, kind, bf16_weights=layout.bf16_parameters, recompute=True)
    if kind == "A" and layout.autocast:  # flash-attn's stand-in on fake tensors keeps what sdpa_cpu keeps here
        gpu_layout = plan.layout_of(config, device_type="cuda")
        assert plan.kernel_backends(plan.shape_of(config), gpu_layout)[1] == "flash_attn"
        assert plan.layer_activations(kind, plan.shape_of(config), gpu_layout).saved == layer.saved


@needs_triton
@pytest.mark.parametrize("case", ["L", "L-data-silu", "R"])
def test_block_bytes_equal_the_triton_kernels_forward(case: str) -> None:
    """The planner's bytes for the GPU kernels equal what the real Triton linear-attention kernels save, run
    under TRITON_INTERPRET=1 at 128 tokens (two chunks); softmax attention saves q, k, v, o and lse on every
    backend, so the CPU one stands in for flash-attn here."""
    kind, variant = BLOCK_CASES[case]
    config = block_config(variant, "fp32", 1, seq_len=128)
    layout = plan.layout_of(config, device_type="cuda")
    assert plan.kernel_backends(plan.shape_of(config), layout)[0] == "triton"
    planned = plan.layer_activations(kind, plan.shape_of(config), layout).saved
    assert planned == real_saved_bytes(config, kind, bf16_weights=False, linear_backend="triton")


def test_linear_block_bytes_by_hand() -> None:
    # fp32, tp 1, dim 64, 4 heads of 16, ffn 128, per token: block input and mid residual 2·4·64;
    # two norms (1/rms 4 B, normalized 4·64, shared output 4·64); q, k, v 3·4·64; output norm
    # fp32 input 4·64 + 1/rms 4·4 + normalized and output 2·4·64; gate and o·gate 2·4·64; MLP 4·4·128;
    # the Triton kernel's fp32 chunk states: 4 heads · 1024 / 64 chunks · 16 · 16 · 4 B; its [H] decay 4·4 B
    per_token = 2 * 256 + 2 * (4 + 2 * 256) + 3 * 256 + (256 + 16 + 2 * 256) + 2 * 256 + 4 * 4 * 128
    states, decay = 4 * 16 * 16 * 16 * 4, 4 * 4
    config = make_config(layers="L", n_layers=1, precision="fp32", seq_len=1024)
    layer = plan.layer_activations("L", plan.shape_of(config), plan.layout_of(config))
    assert layer.saved == 1024 * per_token + states + decay
    assert layer.checkpoint == 1024 * 4 * 64


def test_checkpointing_keeps_only_block_inputs() -> None:
    shape = plan.shape_of(make_config())
    none = plan.activation_memory(shape, plan.layout_of(make_config(checkpointing="none")))
    full = plan.activation_memory(shape, plan.layout_of(make_config(checkpointing="full")))
    linear = plan.activation_memory(shape, plan.layout_of(make_config(checkpointing="linear")))
    tokens, rope = 4096, 4096 * 16 * 4
    assert full.saved == 4 * tokens * 4 * 64 + rope  # four fp32 block inputs and the RoPE tables
    layer_l = plan.layer_activations("L", shape, plan.layout_of(make_config()))
    layer_a = plan.layer_activations("A", shape, plan.layout_of(make_config()))
    assert none.saved == 3 * layer_l.saved + layer_a.saved + rope
    assert linear.saved == 3 * layer_l.checkpoint + layer_a.saved + rope
    assert full.saved < linear.saved < none.saved
    # a checkpointed block is recomputed in backward: the transient grows by its activations
    assert full.transient == pytest.approx(max(layer.saved - layer.checkpoint + layer.workspace
                                               for layer in (layer_l, layer_a)))


def test_activations_are_linear_in_sequence_length() -> None:
    """Flash-style kernels: nothing O(T²) is kept, softmax layers included (the constant: [H] decays)."""
    for layers in ("A", "LLLA"):
        saved = [plan.activation_memory(plan.shape_of(make_config(layers=layers)),
                                        plan.layout_of(make_config(layers=layers, seq_len=length))).saved
                 for length in (4096, 8192, 12288)]
        assert saved[2] - saved[1] == saved[1] - saved[0] > 0


def test_allgather_kv_transient() -> None:
    # 2·B·T·H_kv·d·bytes: B 1, T 8192, H_kv 2, d 16, bf16
    config = make_config(cp=4, seq_len=8192)
    memory = plan.activation_memory(plan.shape_of(config), plan.layout_of(config))
    assert memory.allgather_kv == 2 * 1 * 8192 * 2 * 16 * 2
    # backward holds the gathered K/V and their fp32 gradients; it is the largest one-layer transient here
    layer = plan.layer_activations("A", plan.shape_of(config), plan.layout_of(config))
    assert layer.comm_transient == memory.allgather_kv * (2 + 4) / 2
    assert memory.transient >= layer.comm_transient
    ring = make_config(cp=4, seq_len=8192, cp_softmax="ring")
    assert plan.activation_memory(plan.shape_of(ring), plan.layout_of(ring)).allgather_kv == 0


# ---------------------------------------------------------------------------------------------
# Communication
# ---------------------------------------------------------------------------------------------
def test_lasp2_bytes_are_independent_of_sequence_length() -> None:
    # per linear layer and pass: (P−1)·B·H·dk·dv·4 per state, two states per rank under zigzag
    per_pass = (4 - 1) * 1 * 4 * 16 * 16 * 4
    for seq_len in (4096, 65536, 1 << 20):
        contiguous = make_config(cp=4, seq_len=seq_len, cp_layout="contiguous")
        assert volume(contiguous, "LASP-2 state all-gather") == 3 * 2 * per_pass  # 3 layers, fwd + bwd
        zigzag = make_config(cp=4, seq_len=seq_len)
        assert volume(zigzag, "LASP-2 state all-gather") == 3 * 2 * 2 * per_pass
        recomputed = make_config(cp=4, seq_len=seq_len, checkpointing="full")
        assert volume(recomputed, "LASP-2 state all-gather") == 3 * 3 * 2 * per_pass  # + recomputed forward
    lasp1 = make_config(cp=4, cp_linear="lasp1", cp_layout="contiguous")
    volumes = plan.communication(plan.shape_of(lasp1), plan.layout_of(lasp1))
    chain = next(v for v in volumes if v.name == "LASP-1 state chain")
    assert chain.bytes == 3 * 2 * per_pass and chain.messages == 3 * 2 * 3 and not chain.overlapped


@pytest.mark.parametrize("scheme,name", [("ring", "ring attention K/V"), ("allgather", "all-gather attention K/V")])
def test_softmax_cp_bytes_are_proportional_to_sequence_length(scheme: str, name: str) -> None:
    short = volume(make_config(cp=4, seq_len=4096, cp_softmax=scheme), name)
    long = volume(make_config(cp=4, seq_len=16384, cp_softmax=scheme), name)
    assert long == 4 * short
    # forward (P−1)·2·B·n·H_kv·d·2; backward K/V again + fp32 dK/dV: 3× the forward
    forward = (4 - 1) * 2 * 1 * (4096 // 4) * 2 * 16 * 2
    assert short == forward + 3 * forward


def test_ulysses_and_data_and_tensor_parallel_volumes() -> None:
    config = make_config(cp=2, seq_len=4096, cp_softmax="ulysses")
    local = 1 * 2048 * (2 * 4 + 2 * 2) * 16 * 2  # q, k, v in and o out per all-to-all round
    assert volume(config, "Ulysses all-to-all") == 2 * (1 / 2) * local
    n = plan.count_parameters(make_config())
    fsdp = make_config(dp=4, global_batch=4)
    assert volume(fsdp, "gradient reduce-scatter") == 3 / 4 * 4 * n
    assert volume(fsdp, "parameter all-gather") == 2 * 3 / 4 * 2 * n  # bf16 weights, forward + backward
    zero1 = make_config(dp=4, global_batch=4, dp_engine="deepspeed", zero_stage=1)
    assert volume(zero1, "gradient all-reduce") == 2 * 3 / 4 * 4 * n
    assert plan.communication(plan.shape_of(make_config()), plan.layout_of(make_config())) == []
    tp = make_config(tp=2, seq_len=1000)
    # per block: 2 forward all-reduces, backward one per column-parallel projection (L: 4 + 2, A: 3 + 2)
    count = 3 * (2 + 6) + (2 + 5)
    assert volume(tp, "TP all-reduce") == count * 2 * (1 / 2) * 1000 * 64 * 2


def test_lasp2_beats_ring_at_long_sequences() -> None:
    """docs/algorithms.md §2's example: B 1, H 32, d 128, P 64: 126 MiB per layer forward for LASP-2,
    7.9 GiB for softmax CP at 2048K tokens with H_kv 8."""
    config = make_config(layers="LA", n_layers=2, dim=4096, heads=32, kv_heads=8, ffn_dim=14336, cp=64,
                         seq_len=2048 * 1024, cp_layout="contiguous", cp_softmax="ring")
    lasp2 = volume(config, "LASP-2 state all-gather") / 2  # one layer, forward only
    ring = volume(config, "ring attention K/V") / 4
    assert lasp2 / 2**20 == pytest.approx(126, abs=0.1)
    assert ring / 2**30 == pytest.approx(7.875, abs=0.01)


# ---------------------------------------------------------------------------------------------
# Presets, recommendation, check_fits
# ---------------------------------------------------------------------------------------------
# the R preset's fit rests on R's linear branch recomputing its chunk states (runtime/layers.py): keeping
# them adds 5 GiB to the layer backward's peak and no longer fits an H200
@pytest.mark.parametrize("path", [*PRESETS, REPO / "configs" / "rattention-1m-1gpu.yaml"], ids=lambda p: p.name)
def test_presets_validate_and_fit(path: Path) -> None:
    config = load_config(path)
    result = plan.make_plan(config, "h200")
    assert result.fits, plan.format_plan(result)
    assert result.memory.total <= plan.GPUS["h200"].usable_bytes
    plan.check_fits(config, "h200")


def test_preset_shapes() -> None:
    hybrid = load_config(PRESETS[0])
    assert hybrid.data.seq_len == 1 << 20 and (hybrid.parallel.dp, hybrid.parallel.cp, hybrid.parallel.tp) == (1, 1, 1)
    assert set(plan.shape_of(hybrid).pattern[7::8]) == {"A"} and plan.shape_of(hybrid).pattern.count("A") * 8 == 16
    llama = load_config(PRESETS[1])
    model = llama.model
    assert (model.dim, model.n_layers, model.heads, model.kv_heads, model.ffn_dim, model.vocab_size) == \
        (4096, 32, 32, 8, 14336, 128256)
    assert set(plan.shape_of(llama).pattern) == {"L"} and llama.data.seq_len == 2 << 20
    assert llama.parallel.dp * llama.parallel.cp * llama.parallel.tp == 64


def test_recommendation_picks_a_cp_that_fits() -> None:
    # 8B-shaped linear model at 2M tokens: one GPU cannot hold it, 64 can with enough cp
    config = load_config(PRESETS[1])
    alone = dataclasses.replace(config, parallel=dataclasses.replace(config.parallel, cp=1))
    assert not plan.make_plan(alone, "h200").fits
    candidates = plan.recommend(config, 64, "h200")
    best = candidates[0]
    assert best.fits and best.dp * best.cp * best.tp == 64 and best.cp > 1
    assert all(c.step_s >= best.step_s for c in candidates if c.fits)
    chosen = dataclasses.replace(config, parallel=dataclasses.replace(
        config.parallel, dp=best.dp, cp=best.cp, tp=best.tp, activation_checkpointing=best.checkpointing))
    assert plan.make_plan(chosen, "h200").fits
    # a longer target needs at least as much cp as the shorter one's best that fits
    longer = plan.recommend(config, 64, "a100", target_seq_len=4 << 20)
    assert longer[0].fits and longer[0].cp * longer[0].tp >= 32


def test_recommendation_reports_when_nothing_fits() -> None:
    config = load_config(PRESETS[1])
    candidates = plan.recommend(config, 1, "h100")
    assert candidates and not any(c.fits for c in candidates)
    assert candidates == sorted(candidates, key=lambda c: c.memory_bytes)


def test_check_fits_raises_with_numbers() -> None:
    config = load_config(PRESETS[1], ["parallel.cp=8", "parallel.dp=1", "parallel.activation_checkpointing=none"])
    with pytest.raises(plan.PlanDoesNotFit, match=r"needs [0-9.]+ GiB per GPU but the H100 has [0-9.]+ GiB usable"):
        plan.check_fits(config, "h100")
    with pytest.raises(ValueError, match="gpu='tpu' is not a known GPU"):
        plan.check_fits(config, "tpu")


def test_training_preflight_warns_when_the_plan_does_not_fit(capsys: pytest.CaptureFixture) -> None:
    from spindle.runtime.main import warn_if_plan_does_not_fit

    config = load_config(PRESETS[1], ["parallel.cp=8", "parallel.dp=1", "parallel.activation_checkpointing=none"])
    assert warn_if_plan_does_not_fit(config, 8, "h100")
    warning = capsys.readouterr().err
    assert warning.startswith("spindle: warning: the plan needs") and "Training anyway" in warning
    assert not warn_if_plan_does_not_fit(load_config(PRESETS[0]), 1, "h200")
    assert capsys.readouterr().err == ""


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour")
def test_check_fits_without_gpu_does_nothing() -> None:
    assert plan.check_fits(load_config(PRESETS[1], ["parallel.cp=1"])) is None


def test_step_time_components() -> None:
    config = load_config(PRESETS[1])
    result = plan.make_plan(config, "h200")
    time = result.time
    assert time.step_s == pytest.approx(time.compute_s + time.communication_s + time.optimizer_s)
    assert time.tokens_per_s == pytest.approx((2 << 20) / time.step_s)
    assert 0 < time.mfu < plan.DEFAULT_EFFICIENCY
    # LASP-1's serial chain is never cheaper than LASP-2's overlapped all-gather
    lasp1 = load_config(PRESETS[1], ["parallel.cp_linear=lasp1"])
    assert plan.make_plan(lasp1, "h200").time.communication_s > time.communication_s
    # a slower inter-node link only makes the step slower
    slow = plan.make_plan(config, "h200", inter_node_gbps=5).time.step_s
    assert slow > time.step_s and math.isfinite(slow)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def test_cli_table_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert plan.main([str(PRESETS[0])]) == 0
    table = capsys.readouterr().out
    assert "memory per GPU" in table and "fits" in table and "recommendation for 1 GPU" in table
    assert plan.main([str(PRESETS[1]), "--json", "--gpu", "H100", "--link-gbps", "25",
                      "--target-seq-len", str(4 << 20), "--set", "train.steps=3"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["gpu"]["name"] == "H100" and data["network"]["inter_node_bytes_per_s"] == 25e9
    assert data["layout"]["world_size"] == 64 and data["recommendation"]["seq_len"] == 4 << 20
    assert data["memory"]["total"] > 0 and isinstance(data["fits"], bool)
    assert data["model"]["parameters"] == plan.count_parameters(load_config(PRESETS[1]))
    assert any(v["name"] == "LASP-2 state all-gather" for v in data["communication"])


def test_cli_dp_minus_one_needs_gpus(capsys: pytest.CaptureFixture[str]) -> None:
    assert plan.main([str(PRESETS[1]), "--set", "parallel.dp=-1", "--set", "parallel.cp=8"]) == 2
    assert "--gpus" in capsys.readouterr().err
    assert plan.main([str(PRESETS[1]), "--set", "parallel.dp=-1", "--set", "parallel.cp=8", "--gpus", "64",
                      "--set", "train.global_batch=8", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["layout"]["dp"] == 8


@pytest.mark.parametrize("argv,message", [
    (["missing.yaml"], "does not exist"),
    (["{preset}", "--set", "parallel.cpp=2"], "Did you mean 'cp'"),
    (["{preset}", "--set", "parallel.cp=3"], "data.seq_len"),
    (["{preset}", "--gpu", "tpu"], "invalid choice"),
    (["{preset}", "--link-gbps", "-5"], "must be a positive number"),
    (["{preset}", "--target-seq-len", "many"], "is not an integer"),
    (["{preset}", "--efficiency", "2"], "at most 1"),
    ([], "the following arguments are required"),
])
def test_cli_bad_input_exits_2(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [str(PRESETS[0]) if arg == "{preset}" else arg for arg in argv]
    assert plan.main(argv) == 2
    captured = capsys.readouterr()
    assert message in captured.err and captured.out == ""


# ---------------------------------------------------------------------------------------------
# The e2e benchmark harness runs (numbers are not asserted: that is the benchmark's job)
# ---------------------------------------------------------------------------------------------
def test_e2e_benchmark_writes_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from spindle.benchmarks import e2e

    output = tmp_path / "e2e.md"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two shared cores: more threads only contend
    try:
        assert e2e.main(["--device", "cpu", "--models", "hybrid-1:3", "--seq-lens", "64", "--warmup", "0",
                         "--steps", "1", "--set", "model.n_layers=4", "--output", str(output)]) == 0
    finally:
        torch.set_num_threads(threads)
    report = output.read_text()
    assert "spindle bench e2e --device cpu" in report and "| hybrid-1:3 | LLLA |" in report
    assert "GPU numbers are pending" in report
    results = json.loads(output.with_suffix(".json").read_text())
    assert results[0]["status"] == "ok" and results[0]["peak_gib"] > 0 and results[0]["planned_gib"] > 0
    assert output.with_suffix(".png").stat().st_size > 0
    assert e2e.main(["--models", "transformer"]) == 2
    assert "unknown model variant" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# The one context-parallel cost model
# ---------------------------------------------------------------------------------------------
def _cp_shape(world_size: int, local_tokens: int = 32768) -> plan.CpShape:
    return plan.CpShape(world_size, local_tokens, batch=1, heads=32, kv_heads=8, head_dim=128, compute_bytes=2,
                        states_per_rank=2)


def test_lasp1_chain_is_serial_and_lasp2_overlaps() -> None:
    bandwidth, latency, rate = 50e9, 15e-6, 400e12
    state = 2 * 32 * 128 * 128 * 4
    lasp1 = plan.cp_layer_cost("lasp1", _cp_shape(64), bandwidth, latency, rate)
    hop = latency + state / bandwidth + plan.LASP1_HOP_OVERHEAD_S
    assert lasp1.forward_exposed_s == pytest.approx(63 * hop) and lasp1.backward_exposed_s == pytest.approx(63 * hop)
    lasp2 = plan.cp_layer_cost("lasp2", _cp_shape(64), bandwidth, latency, rate)
    gather = 63 * (latency + state / bandwidth)
    assert lasp2.forward_exposed_s == pytest.approx(max(0.0, gather - lasp2.forward_compute_s))
    assert lasp2.backward_exposed_s == pytest.approx(max(0.0, gather - lasp2.backward_compute_s))
    assert lasp2.total_s < lasp1.total_s
    # a slow kernel hides LASP-2's gathers completely, never LASP-1's chain
    slow = plan.cp_layer_cost("lasp2", _cp_shape(64), bandwidth, latency, 1e9)
    assert slow.forward_exposed_s == 0 == slow.backward_exposed_s
    assert plan.cp_layer_cost("lasp1", _cp_shape(64), bandwidth, latency, 1e9).forward_exposed_s == pytest.approx(63 * hop)
    # the backward is the kernel's own (LINEAR_BACKWARD_FACTOR forwards), with no rerun of the local forward
    forward_flops = 2.0 * 32 * 32768 * (plan.LINEAR_CHUNK * 128 + 2 * 128 * 128)
    assert lasp2.forward_compute_s == pytest.approx(forward_flops / rate)
    assert lasp2.backward_compute_s == pytest.approx(plan.LINEAR_BACKWARD_FACTOR * forward_flops / rate)


def test_ring_hides_hops_shorter_than_a_step_and_allgather_does_not() -> None:
    fast_link = plan.cp_layer_cost("ring", _cp_shape(8), 450e9, 5e-6, 400e12)
    assert fast_link.forward_exposed_s == 0
    slow_link = plan.cp_layer_cost("ring", _cp_shape(8), 1e9, 5e-6, 400e12)
    assert slow_link.forward_exposed_s > 0
    gathered = plan.cp_layer_cost("allgather", _cp_shape(8), 450e9, 5e-6, 400e12)
    assert gathered.forward_exposed_s > 0 and gathered.bytes_received == fast_link.bytes_received
    with pytest.raises(ValueError, match="expected one of"):
        plan.cp_layer_cost("ringg", _cp_shape(8), 1e9, 0, 1e12)


def test_step_time_prices_cp_with_the_layer_model() -> None:
    lasp2 = plan.make_plan(make_config(layers="L", n_layers=2, cp=4, seq_len=8192))
    lasp1 = plan.make_plan(make_config(layers="L", n_layers=2, cp=4, seq_len=8192, cp_linear="lasp1"))
    assert lasp1.time.communication_s > lasp2.time.communication_s


# ---------------------------------------------------------------------------------------------
# Counts read off the model itself
# ---------------------------------------------------------------------------------------------
def test_counted_flops_fit_a_real_cpu_step_at_another_length() -> None:
    """The meta-device count, fitted as a + b·T at two lengths, predicts a real CPU step at a third."""
    from torch.utils.flop_counter import FlopCounterMode

    from spindle.kernels.attn.api import force_backend

    config = make_config(layers="LLA", n_layers=3, dim=64, heads=4, kv_heads=2, ffn_dim=96, vocab_size=50)
    counted = plan.counted_flops(plan.shape_of(config))
    torch.manual_seed(0)
    model = HybridModel(config.model)
    length = 192
    tokens = torch.randint(0, 50, (1, length))
    # the math backend: fused CPU attention kernels are opaque to FlopCounterMode
    with force_backend("math"), FlopCounterMode(display=False) as counter:
        loss, _ = model.loss(tokens, tokens)
        loss.backward()
    measured = counter.get_total_flops() / length
    assert measured == pytest.approx(counted.step_constant + counted.step_per_key * length, rel=1e-6)
    assert counted.forward_per_key["L"] == 0 and counted.forward_per_key["A"] > 0  # only attention grows with T


def test_parameter_counts_cover_every_layer_kind() -> None:
    config = make_config(layers="LASR", n_layers=4)
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, window=16))
    model = HybridModel(config.model)
    counts = plan.parameter_counts(plan.shape_of(config))
    assert counts.total == sum(p.numel() for p in model.parameters())
    assert set(counts.per_kind) == {"L", "A", "S", "R"}


# the planner's peak for two small configs against the peak of live CPU tensors in two real steps
MEMORY_CASES = {
    "LA-d128-T512": ["model.layers=LA", "model.n_layers=2", "model.dim=128", "model.heads=4", "model.kv_heads=2",
                     "model.vocab_size=512", "data.seq_len=512"],
    "LLLA-d256-T512": ["model.layers=LLLA", "model.n_layers=4", "model.dim=256", "model.heads=4",
                        "model.kv_heads=2", "model.vocab_size=1024", "data.seq_len=512"],
}


def measured_and_planned_peak(overrides: list[str]) -> tuple[int, float]:
    from spindle.benchmarks.harness import PeakLiveBytes
    from spindle.parallel.layout import ParallelContext
    from spindle.runtime.config import resolve
    from spindle.runtime.data import build_dataset
    from spindle.runtime.main import build_model
    from spindle.runtime.optim import build_optimizer
    from spindle.runtime.trainer import BatchProvider, train_step

    settings = ["train.precision=fp32", "train.global_batch=1", "train.micro_batch=1", *overrides]
    config = resolve(load_config(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml", settings), 1)
    context = ParallelContext.single_process()
    with PeakLiveBytes() as probe:  # from before the model exists: weights, gradients, AdamW states included
        model = build_model(config, context)
        optimizer = build_optimizer(model, config.train)
        batches = BatchProvider(build_dataset(config.data, config.model.vocab_size, config.train.seed),
                                config.train.global_batch, config.train.micro_batch, 0, 1)
        for step in range(2):  # the second step has AdamW's states from the first
            train_step(model, optimizer, batches.micro_batches(step), context, lr=1e-3, grad_clip=1.0, precision=None)
    return probe.peak, plan.make_plan(config, device_type="cpu").memory.total


@pytest.mark.parametrize("case", list(MEMORY_CASES))
def test_planned_peak_within_15_percent_of_measured_cpu_peak(case: str) -> None:
    measured, planned = measured_and_planned_peak(MEMORY_CASES[case])
    print(f"{case}: planned {planned / 2**20:.2f} MiB, measured {measured / 2**20:.2f} MiB, "
          f"measured/planned {measured / planned:.3f}")
    assert abs(measured / planned - 1) <= 0.15
