"""spindle's layers inside Megatron-core models (spindle.integrations.megatron), on CPU over gloo.

One spawn of 2 ranks runs every distributed case and returns measurements; the tests below check them:

- layout: Megatron's get_batch_on_this_cp_rank equals spindle's zigzag shard;
- layers (float64): a Megatron TransformerLayer from hybrid_block_spec equals spindle's native
  DecoderBlock on the same weights (converted by native_block_state_dict), with cp=1, cp=2 and
  tensor parallelism tp=2 — output, input gradient and every parameter gradient;
- whole model: a GPTModel with the spindle spec trained for a few steps gives the same per-step losses
  with cp=2 (dp=1) as with cp=1 (dp=2) (fp32, 1e-5), for a softmax-only and hybrid patterns (L, A,
  R = RAttention, S = sliding window);
- conversion: a GPTModel holding a native HybridModel's weights (native_model_state_dict) gives the
  native model's loss under cp=2;
- checkpoint: a cp=2 run saved by spindle's Checkpointer resumes at cp=1 and continues exactly as the
  uninterrupted run.
"""

from __future__ import annotations

import copy
import importlib

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install 'spindle[megatron]')")

from cp_reference import relative_rmse  # noqa: E402
from distributed_utils import run_distributed  # noqa: E402

pytestmark = pytest.mark.slow

LAYER_TOLERANCE = 1e-10  # float64, relative RMSE
LOSS_TOLERANCE = 1e-5  # fp32, absolute per-step loss
WHOLE_MODEL_CASES = {  # id: (pattern, cp_linear, cp_softmax, linear_decay)
    "softmax-allgather": ("A", "lasp2", "allgather", "constant"),
    "hybrid-lasp2-allgather": ("LLLA", "lasp2", "allgather", "constant"),
    "hybrid-lasp1-ring-datadecay": ("LA", "lasp1", "ring", "data"),
    "hybrid-rattention-window": ("LRSA", "lasp2", "allgather", "constant"),
}
WINDOW = 5  # tokens; longer than a CP chunk (16 tokens / 4 chunks) so the halo spans two chunks
LAYER_CASES = {  # id: (letter, options of hybrid_block_spec)
    "L-constant": ("L", {"linear_decay": "constant"}),
    "L-data-silu": ("L", {"linear_decay": "data", "feature_map": "silu", "output_gate": "silu"}),
    "L-none-lasp1": ("L", {"linear_decay": "none", "cp_linear": "lasp1", "feature_map": "elu1"}),
    "A-allgather": ("A", {"cp_softmax": "allgather"}),
    "A-ring": ("A", {"cp_softmax": "ring"}),
    "A-ulysses": ("A", {"cp_softmax": "ulysses"}),
    "R-lasp2": ("R", {"window": WINDOW}),
    "R-lasp1": ("R", {"window": WINDOW, "cp_linear": "lasp1"}),
    "S": ("S", {"window": WINDOW}),
}
TENSOR_PARALLEL_CASES = ("L-constant", "L-data-silu", "A-allgather", "R-lasp2", "S")  # at tp=2, cp=1
CHECKPOINT_STEPS = (3, 2)  # steps before the save (cp=2), steps after the resume (cp=1)


# ----------------------------------------------------------------------------------------------
# The distributed worker (module level: spawned processes import it)
# ----------------------------------------------------------------------------------------------


def _layer_config(context_parallel_size: int, tensor_parallel_size: int = 1):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=3, hidden_size=16, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=24,
        context_parallel_size=context_parallel_size, tensor_model_parallel_size=tensor_parallel_size,
        normalization="RMSNorm", layernorm_epsilon=1e-6,
        gated_linear_unit=True, activation_func=torch.nn.functional.silu, add_bias_linear=False,
        hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=True)


def _native_block(letter: str, options: dict, config) -> torch.nn.Module:
    """spindle's native DecoderBlock for the layer of number 2 of 3, random (non-unit) weights, float64."""
    from spindle.runtime.layers import (
        DecoderBlock,
        LinearAttention,
        RAttention,
        SlidingWindowAttention,
        SoftmaxAttention,
    )

    dim, heads = config.hidden_size, config.num_attention_heads
    if letter == "L":
        mixer = LinearAttention(dim, heads, decay=options.get("linear_decay", "constant"),
                                feature_map=options.get("feature_map", "identity"),
                                output_gate=options.get("output_gate", "sigmoid"), layer_index=1,
                                n_layers=config.num_layers, norm_eps=config.layernorm_epsilon)
    elif letter == "R":
        mixer = RAttention(dim, heads, config.num_query_groups, window=options["window"],
                           norm_eps=config.layernorm_epsilon)
    elif letter == "S":
        mixer = SlidingWindowAttention(dim, heads, config.num_query_groups, window=options["window"])
    else:
        mixer = SoftmaxAttention(dim, heads, config.num_query_groups)
    block = DecoderBlock(letter, mixer, dim, config.ffn_hidden_size, config.layernorm_epsilon)
    block.reset_parameters(init_std=0.3, output_std=0.2)
    with torch.no_grad():
        for name, parameter in block.named_parameters():
            if name.endswith("norm.weight"):
                parameter.uniform_(0.5, 1.5)  # so a wrongly mapped norm weight shows
    return block.double()


def _rotary_table(length: int, head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """Megatron's RoPE angle table [T, 1, 1, head_dim] (non-interleaved), in float64."""
    inverse = theta ** -(torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(length, dtype=torch.float64), inverse)
    return torch.cat((angles, angles), dim=-1)[:, None, None, :]


def _tensor_parallel_part(name: str, full: torch.Tensor, local_shape: torch.Size, tp_group) -> torch.Tensor:
    """This tensor-parallel rank's part of a full (tp=1) parameter, as Megatron's TP linears hold it."""
    if full.shape == local_shape:
        return full  # replicated (norms)
    rank, size = tp_group.rank(), tp_group.size()
    if name.endswith("linear_fc1.weight"):  # gated MLP: each rank holds [its gate rows; its up rows]
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(size, dim=0)[rank], up.chunk(size, dim=0)[rank]], dim=0)
    dim = 0 if full.shape[0] != local_shape[0] else 1  # column-parallel rows, row-parallel columns
    return full.chunk(size, dim=dim)[rank]


def _layer_errors(letter: str, options: dict, cp_size: int, tp_size: int = 1) -> dict[str, float]:
    """Relative RMSE of output, input gradient and each parameter gradient: Megatron layer vs native."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.spec_utils import build_module

    from spindle.integrations.megatron import hybrid_block_spec, native_block_state_dict
    from spindle.parallel.cp import shard, unshard
    from spindle.runtime.layers import RotaryEmbedding

    config = _layer_config(cp_size, tp_size)
    groups = ProcessGroupCollection.use_mpu_process_groups()
    cp_group, tp_group = groups.cp, groups.tp
    torch.manual_seed(11)
    native = _native_block(letter, options, config)
    spec = hybrid_block_spec(letter, num_layers=1, **options).layer_specs[0]
    layer = build_module(spec, config=config, layer_number=2, pg_collection=groups).double()
    shapes = {name: parameter.shape for name, parameter in layer.named_parameters()}
    missing = set(shapes) - set(native_block_state_dict(native))
    assert not missing, f"parameters the conversion does not cover: {sorted(missing)}"
    layer.load_state_dict({name: _tensor_parallel_part(name, value, shapes[name], tp_group)
                           for name, value in native_block_state_dict(native).items()}, strict=False)

    batch, length, head_dim = 2, 16, config.kv_channels
    x = torch.randn(batch, length, config.hidden_size, dtype=torch.float64, requires_grad=True)
    grad_output = torch.randn(batch, length, config.hidden_size, dtype=torch.float64)
    rotary = RotaryEmbedding(head_dim, 10000.0)(torch.arange(length), torch.float64)
    reference = native(x, rotary)
    reference.backward(grad_output)

    # Megatron: [s, b, h] activations, this rank's tokens in Megatron's CP order
    local_x = shard(x.detach().transpose(0, 1), cp_group, dim=0).requires_grad_()
    table = shard(_rotary_table(length, head_dim), cp_group, dim=0)
    output, _ = layer(local_x, attention_mask=None, rotary_pos_emb=table)
    output.backward(shard(grad_output.transpose(0, 1), cp_group, dim=0))

    errors = {
        "output": relative_rmse(unshard(output.detach(), cp_group, dim=0).transpose(0, 1), reference),
        "grad input": relative_rmse(unshard(local_x.grad, cp_group, dim=0).transpose(0, 1), x.grad),
    }
    gradients = copy.deepcopy(native)
    with torch.no_grad():
        for (name, parameter), (_, source) in zip(gradients.named_parameters(), native.named_parameters()):
            parameter.copy_(source.grad)
    expected = native_block_state_dict(gradients)
    for name, parameter in layer.named_parameters():
        gradient = parameter.grad.clone()
        dist.all_reduce(gradient, group=cp_group)  # each CP rank holds its tokens' share
        errors[f"grad {name}"] = relative_rmse(gradient, _tensor_parallel_part(name, expected[name],
                                                                               gradient.shape, tp_group))
    assert parallel_state.get_context_parallel_world_size() == cp_size
    assert parallel_state.get_tensor_model_parallel_world_size() == tp_size
    return errors


def _whole_model_losses(pattern, cp_linear, cp_softmax, linear_decay, steps, run_dir=None, resume="never"):
    from spindle.integrations.megatron import example

    settings = example.Settings(pattern=pattern, layers=len(pattern) if len(pattern) > 1 else 2,
                                cp_linear=cp_linear, cp_softmax=cp_softmax, linear_decay=linear_decay,
                                steps=steps, seq_len=16, window=WINDOW)
    return example.train(settings, run_dir=run_dir, resume=resume)


def _native_model_loss_gap(cp_group) -> tuple[float, float]:
    """(native mean loss, Megatron mean loss) of the same LRSA model: a native HybridModel and a
    GPTModel from hybrid_block_spec holding its weights (native_model_state_dict), fp32, under CP."""
    import torch.distributed as dist
    import torch.nn.functional as F
    from megatron.core.models.gpt import GPTModel
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron.core.utils import get_batch_on_this_cp_rank

    from spindle.integrations.megatron import hybrid_block_spec, native_model_state_dict, use_host_rotary
    from spindle.runtime.config import ModelConfig
    from spindle.runtime.model import HybridModel

    native_config = ModelConfig(layers="LRSA", n_layers=4, dim=32, heads=4, kv_heads=2, vocab_size=64, ffn_dim=64,
                                window=WINDOW, init_std=0.2)
    torch.manual_seed(5)
    native = HybridModel(native_config)
    config = TransformerConfig(
        num_layers=4, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64,
        context_parallel_size=cp_group.size(), normalization="RMSNorm", layernorm_epsilon=native_config.norm_eps,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, hidden_dropout=0.0,
        attention_dropout=0.0, use_cpu_initialization=True)
    model = GPTModel(config, hybrid_block_spec("LRSA", config=config, window=WINDOW), vocab_size=64,
                     max_sequence_length=16, position_embedding_type="rope",
                     rotary_base=int(native_config.rope_theta),
                     pg_collection=ProcessGroupCollection.use_mpu_process_groups())
    use_host_rotary(model)
    model.load_state_dict(native_model_state_dict(native), strict=True)
    tokens, labels = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    loss_sum, count = native.loss(tokens, labels)
    local = get_batch_on_this_cp_rank({"tokens": tokens, "labels": labels,
                                       "position_ids": torch.arange(16).expand(2, -1)}, cp_group)
    megatron_sum = model(local["tokens"], local["position_ids"], None, labels=local["labels"]).sum()
    dist.all_reduce(megatron_sum, group=cp_group)
    return float(loss_sum / count), float(megatron_sum / count)


def _layout_matches(cp_group) -> bool:
    from megatron.core.utils import get_batch_on_this_cp_rank

    from spindle.parallel.cp import shard

    tokens = torch.arange(2 * 24).view(2, 24)
    megatron = get_batch_on_this_cp_rank({"tokens": tokens.clone()}, cp_group)["tokens"]
    return torch.equal(megatron, shard(tokens, cp_group, layout="zigzag", dim=1))


def _worker(rank: int, world_size: int, group, run_dir: str) -> dict:
    from megatron.core import parallel_state

    results: dict = {"layers": {}, "losses": {}}
    for cp_size in (1, 2):
        parallel_state.initialize_model_parallel(context_parallel_size=cp_size)
        try:
            if cp_size == 2:
                results["layout"] = _layout_matches(parallel_state.get_context_parallel_group())
                results["native model"] = _native_model_loss_gap(parallel_state.get_context_parallel_group())
            for case, (letter, options) in LAYER_CASES.items():
                results["layers"][(case, cp_size)] = _layer_errors(letter, options, cp_size)
            for case, arguments in WHOLE_MODEL_CASES.items():
                results["losses"][(case, cp_size)] = _whole_model_losses(*arguments, steps=sum(CHECKPOINT_STEPS))
        finally:
            parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    for case in TENSOR_PARALLEL_CASES:
        letter, options = LAYER_CASES[case]
        results["layers"][(case, "tp2")] = _layer_errors(letter, options, cp_size=1, tp_size=2)
    parallel_state.destroy_model_parallel()
    before, after = CHECKPOINT_STEPS
    arguments = WHOLE_MODEL_CASES["hybrid-lasp2-allgather"]
    parallel_state.initialize_model_parallel(context_parallel_size=2)
    results["saved"] = _whole_model_losses(*arguments, steps=before, run_dir=run_dir)
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(context_parallel_size=1)
    results["resumed"] = _whole_model_losses(*arguments, steps=after, run_dir=run_dir, resume="auto")
    parallel_state.destroy_model_parallel()
    return results


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory) -> dict:
    """Rank 0's measurements from one 2-rank spawn (both ranks check the same things)."""
    config_dir = tmp_path_factory.mktemp("spindle_config")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SPINDLE_CONFIG_DIR", str(config_dir))  # the checkpoint signing key stays in tmp
        results = run_distributed(_worker, 2, str(tmp_path_factory.mktemp("megatron_run")), timeout=600)
    return results[0]


# ----------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------


def test_megatron_cp_layout_is_spindle_zigzag(distributed_results):
    assert distributed_results["layout"], "get_batch_on_this_cp_rank differs from shard(..., layout='zigzag')"


@pytest.mark.parametrize("case, parallel", [(case, cp) for cp in (1, 2) for case in LAYER_CASES]
                         + [(case, "tp2") for case in TENSOR_PARALLEL_CASES])
def test_layer_equals_native_block_float64(distributed_results, case, parallel):
    errors = distributed_results["layers"][(case, parallel)]
    assert len(errors) > 6, "too few quantities compared"
    bad = {name: error for name, error in errors.items() if not error <= LAYER_TOLERANCE}
    assert not bad, f"{case} ({parallel}): relative RMSE above {LAYER_TOLERANCE:.0e}: {bad}"


def test_gpt_model_with_converted_native_weights_equals_native_model(distributed_results):
    native, megatron = distributed_results["native model"]
    assert abs(native - megatron) <= LOSS_TOLERANCE, f"native HybridModel loss {native} vs GPTModel (cp=2) {megatron}"
    assert abs(native - torch.log(torch.tensor(64.0)).item()) > 1e-2, "loss at chance level: weak comparison"


@pytest.mark.parametrize("case", list(WHOLE_MODEL_CASES))
def test_gpt_model_losses_cp2_equal_cp1(distributed_results, case):
    reference = distributed_results["losses"][(case, 1)]
    sharded = distributed_results["losses"][(case, 2)]
    assert len(reference) == len(sharded) == sum(CHECKPOINT_STEPS)
    assert len(set(reference)) == len(reference), f"losses do not change between steps: {reference}"
    differences = [abs(a - b) for a, b in zip(reference, sharded)]
    assert max(differences) <= LOSS_TOLERANCE, f"{case}: cp=1 {reference} vs cp=2 {sharded}"


def test_checkpoint_saved_at_cp2_resumes_at_cp1(distributed_results):
    before, _ = CHECKPOINT_STEPS
    uninterrupted = distributed_results["losses"][("hybrid-lasp2-allgather", 2)]
    assert distributed_results["saved"] == pytest.approx(uninterrupted[:before], abs=LOSS_TOLERANCE)
    assert distributed_results["resumed"] == pytest.approx(uninterrupted[before:], abs=LOSS_TOLERANCE)


# ----------------------------------------------------------------------------------------------
# In-process checks (no processes spawned)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["0.15.3", "0.17.0", "1.0.0", "0.9"])
def test_version_check_refuses_unsupported_releases(version):
    from spindle.integrations.megatron.version import SUPPORTED_RANGE, MegatronVersionError, check_version

    with pytest.raises(MegatronVersionError, match=f"found {version}.*pip install 'megatron-core{SUPPORTED_RANGE}'"):
        check_version(version)


def test_version_check_accepts_installed_and_rejects_at_import(monkeypatch):
    import importlib.metadata as metadata

    import spindle.integrations.megatron as integration
    from spindle.integrations.megatron.version import MegatronVersionError, check_version

    assert check_version("0.16.1") == "0.16.1"
    assert check_version() == metadata.version("megatron-core")
    with pytest.raises(MegatronVersionError, match="cannot read the megatron-core version"):
        check_version("nightly")
    real_version = metadata.version
    monkeypatch.setattr(metadata, "version",
                        lambda name: "0.12.0" if name == "megatron-core" else real_version(name))
    with pytest.raises(MegatronVersionError, match="supports megatron-core >=0.16,<0.17, found 0.12.0"):
        importlib.reload(integration)
    monkeypatch.setattr(metadata, "version", real_version)
    importlib.reload(integration)  # leave the package importable for later tests


def test_hybrid_block_spec_layers_and_errors():
    from megatron.core.transformer.transformer_config import TransformerConfig

    from spindle.integrations.megatron import LinearSelfAttention, SpindleCoreAttention, hybrid_block_spec

    spec = hybrid_block_spec("LLLA", num_layers=6, cp_softmax="ring")
    attention = [layer.submodules.self_attention for layer in spec.layer_specs]
    assert [a.module is LinearSelfAttention for a in attention] == [True, True, True, False, True, True]
    assert attention[3].submodules.core_attention.module is SpindleCoreAttention
    assert attention[3].submodules.core_attention.params == {"scheme": "ring"}
    with pytest.raises(ValueError, match="has 'X' at position 2; allowed letters"):
        hybrid_block_spec("LLX")
    with pytest.raises(ValueError, match="cp_linear='ring' is not supported; choose one of 'lasp2', 'lasp1'"):
        hybrid_block_spec("LA", cp_linear="ring")
    config = TransformerConfig(num_layers=2, hidden_size=16, num_attention_heads=4, attention_dropout=0.1,
                               normalization="RMSNorm", use_cpu_initialization=True)
    with pytest.raises(ValueError, match="attention_dropout=0.1"):
        hybrid_block_spec("LA", config=config)
    with pytest.raises(ValueError, match="num_layers=3 differs from config.num_layers=2"):
        hybrid_block_spec("LA", config=config, num_layers=3)
    with pytest.raises(ValueError, match="has R/S layers, which need window="):
        hybrid_block_spec("LRS")
