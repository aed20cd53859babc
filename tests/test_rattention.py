"""RAttention (R) and sliding-window attention (S) layers.

- the R mixer and the S mixer against a direct masked float64 formula (RoPE, window mask, φ feature
  map, delayed linear branch, per-branch RMSNorm), outputs and every gradient, under GQA;
- config rules of `model.window` and the layer letters; FLOPs of R/S layers;
- a tiny RLRA model trains the same per-step losses on one process, dp2 x cp2 (zigzag with LASP-2 and a
  window above the 16-token chunk; contiguous with LASP-1 and a window above the 32-token chunk) and
  cp2 x tp2 (fp32, 1e-5), through the real build path of tests/test_composition.py, in the CP tests'
  shared spawn (tests/cp_reference.py; the ranks record, this process compares: tests/spawned_training.py).
"""

from __future__ import annotations

import math

import pytest
import torch
from test_composition import TINY, overrides_of, train_layout

from cp_reference import SpawnedCase, assert_case_passed, case_results, register_cases  # noqa: F401 (fixture)
from spawned_training import (RESULTS_DIR, TRAINING_WORLD, assert_same_steps, check_world, make_results_dir,
                              one_process, record, recorded)
from spindle.parallel.layout import ParallelContext, ParallelDegrees
from spindle.runtime.config import ConfigError, load_config, resolve
from spindle.runtime.layers import RAttention, RotaryEmbedding, SlidingWindowAttention, plus_minus_softmax
from spindle.runtime.model import HybridModel, mean_window_keys


DIM, HEADS, KV_HEADS, THETA = 32, 4, 2, 10000.0


# --------------------------------------------------------------------------- the direct formulas


def _rope(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + D/2) by position · THETA^(−2i/D); x [B, T, H, D] float64."""
    half = x.shape[-1] // 2
    frequencies = THETA ** (-torch.arange(half, dtype=torch.float64) * 2 / x.shape[-1])
    angle = positions.double()[:, None] * frequencies[None, :]  # [T, D/2]
    cos, sin = angle.cos()[None, :, None, :], angle.sin()[None, :, None, :]
    first, second = x[..., :half], x[..., half:]
    return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean(dim=-1, keepdim=True) + eps) * weight


def _heads(x: torch.Tensor, weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    return (x @ weight.T).view(x.shape[0], x.shape[1], -1, head_dim)


def _window_branch(q, k, v, window, positions):
    """softmax(q·k / sqrt(D)) over keys i − w < j <= i, kv heads repeated; the mask written out."""
    groups = q.shape[2] // k.shape[2]
    q, k = _rope(q, positions), _rope(k, positions)
    k, v = k.repeat_interleave(groups, dim=2), v.repeat_interleave(groups, dim=2)
    i, j = torch.arange(q.shape[1])[:, None], torch.arange(q.shape[1])[None, :]
    scores = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~((j <= i) & (j > i - window)), float("-inf"))
    return torch.einsum("bhij,bjhd->bihd", torch.softmax(scores, dim=-1), v)


def _residual_branch(q, k, v, window):
    """Σ_{j <= i − w} (φ(q_i)·φ(k_j)) v_j with φ(x) = [softmax(x), softmax(−x)], kv heads repeated."""
    groups = q.shape[2] // k.shape[2]

    def phi(x):
        return torch.cat([torch.softmax(x, dim=-1), torch.softmax(-x, dim=-1)], dim=-1)

    k, v = k.repeat_interleave(groups, dim=2), v.repeat_interleave(groups, dim=2)
    i, j = torch.arange(q.shape[1])[:, None], torch.arange(q.shape[1])[None, :]
    scores = torch.einsum("bihd,bjhd->bhij", phi(q), phi(k)) * (j <= i - window)
    return torch.einsum("bhij,bjhd->bihd", scores, v)


def direct_rattention(mixer: RAttention, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    head_dim, window, eps = mixer.head_dim, mixer.window, mixer.local_norm.eps
    q = _heads(x, mixer.q_proj.weight, head_dim)
    k = _heads(x, mixer.k_proj.weight, head_dim)
    v = _heads(x, mixer.v_proj.weight, head_dim)
    mixed = (_rms(_window_branch(q, k, v, window, positions), mixer.local_norm.weight, eps)
             + _rms(_residual_branch(q, k, v, window), mixer.residual_norm.weight, eps))
    return mixed.reshape(*x.shape[:2], -1) @ mixer.out_proj.weight.T


def direct_sliding_window(mixer: SlidingWindowAttention, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    head_dim = mixer.head_dim
    q, k, v = (_heads(x, projection.weight, head_dim) for projection in (mixer.q_proj, mixer.k_proj, mixer.v_proj))
    return _window_branch(q, k, v, mixer.window, positions).reshape(*x.shape[:2], -1) @ mixer.out_proj.weight.T


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Random weights everywhere (norm weights too, so a swapped norm would show)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype) * 0.4 + (
                1.0 if parameter.dim() == 1 else 0.0))


@pytest.mark.parametrize("window", [1, 3, 8, 13, 20], ids=lambda w: f"w{w}")
@pytest.mark.parametrize("kind", ["R", "S"])
def test_mixer_matches_direct_masked_formula(kind: str, window: int) -> None:
    """Float64 outputs and the gradients of the input and every weight (T = 13: w = 13 and 20 leave R's
    linear branch empty, w = 1 leaves its window branch one key)."""
    length = 13
    if kind == "R":
        mixer = RAttention(DIM, HEADS, KV_HEADS, window=window, norm_eps=1e-6).double()
    else:
        mixer = SlidingWindowAttention(DIM, HEADS, KV_HEADS, window=window).double()
    _randomize(mixer, seed=window)
    generator = torch.Generator().manual_seed(100 + window)
    x = torch.randn(2, length, DIM, generator=generator, dtype=torch.float64, requires_grad=True)
    positions = torch.arange(length) + 5  # an offset, as a rank's chunk or a document would have
    rotary = RotaryEmbedding(DIM // HEADS, THETA)(positions, torch.float64)
    output = mixer(x, rotary)
    direct = (direct_rattention if kind == "R" else direct_sliding_window)(mixer, x, positions)
    weights = torch.randn(output.shape, generator=generator, dtype=torch.float64)
    inputs = [x, *mixer.parameters()]
    grads = torch.autograd.grad((output * weights).sum(), inputs)
    expected = torch.autograd.grad((direct * weights).sum(), inputs)
    torch.testing.assert_close(output, direct, rtol=1e-10, atol=1e-10)
    names = ["x"] + [name for name, _ in mixer.named_parameters()]
    for name, grad, reference in zip(names, grads, expected, strict=True):
        torch.testing.assert_close(grad, reference, rtol=1e-9, atol=1e-10, msg=lambda m, n=name: f"d{n}: {m}")


@pytest.mark.parametrize("kind", ["R", "S"])
def test_mixer_keeps_packed_documents_apart(kind: str) -> None:
    """With cu_seqlens, a packed row equals each document run on its own (window and delay count inside it)."""
    window, lengths = 3, [5, 2, 9]
    if kind == "R":
        mixer = RAttention(DIM, HEADS, KV_HEADS, window=window, norm_eps=1e-6).double()
    else:
        mixer = SlidingWindowAttention(DIM, HEADS, KV_HEADS, window=window).double()
    _randomize(mixer, seed=3)
    x = torch.randn(1, sum(lengths), DIM, dtype=torch.float64)
    rope = RotaryEmbedding(DIM // HEADS, THETA)
    positions = torch.cat([torch.arange(length) for length in lengths])
    cu_seqlens = torch.tensor([0, 5, 7, 16])
    packed = mixer(x, rope(positions, torch.float64), cu_seqlens=cu_seqlens)
    separate = torch.cat([mixer(part, rope(torch.arange(part.shape[1]), torch.float64))
                          for part in x.split(lengths, dim=1)], dim=1)
    torch.testing.assert_close(packed, separate, rtol=1e-10, atol=1e-10)


def test_plus_minus_softmax_is_two_distributions() -> None:
    x = torch.randn(3, 5, 2, 8, dtype=torch.float64)
    features = plus_minus_softmax(x)
    assert features.shape == (3, 5, 2, 16)
    torch.testing.assert_close(features[..., :8].sum(-1), torch.ones(3, 5, 2, dtype=torch.float64))
    torch.testing.assert_close(features[..., 8:], torch.softmax(-x, dim=-1))


# --------------------------------------------------------------------------- config and model


def _tiny(*settings: str, world_size: int = 1):
    return load_config(TINY, list(settings), world_size=world_size)


def test_window_config_rules() -> None:
    config = _tiny("model.layers=RLRS", "model.n_layers=4", "model.window=20")
    model = HybridModel(config.model)
    assert model.layer_kinds == "RLRS"
    assert [type(block.mixer).__name__ for block in model.layers] == [
        "RAttention", "LinearAttention", "RAttention", "SlidingWindowAttention"]
    assert all(block.mixer.window == 20 for block in model.layers if block.kind in "RS")
    with pytest.raises(ConfigError, match=r"model.window = 0 is out of range: expected a value >= 1"):
        _tiny("model.layers=RA", "model.window=0")
    with pytest.raises(ConfigError, match=r"model.window = 64 is not below data.seq_len = 64"):
        _tiny("model.layers=SA", "model.window=64")
    _tiny("model.layers=LA", "model.window=64")  # no windowed layers: the window is unused
    with pytest.raises(ConfigError, match=r"'R' \(RAttention\)|R = RAttention"):
        _tiny("model.layers=LX")


def test_flops_per_token_counts_window_layers() -> None:
    assert mean_window_keys(3, 10) == pytest.approx(sum(min(i + 1, 3) for i in range(10)) / 10)
    base = HybridModel(_tiny("model.layers=LL", "model.window=16").model)
    windowed = HybridModel(_tiny("model.layers=RS", "model.window=16").model)
    head_dim, dim, seq_len = 16, 64, 1024
    difference = windowed.flops_per_token(seq_len) - base.flops_per_token(seq_len)
    parameters = 6 * (windowed.num_parameters() - base.num_parameters())
    expected = parameters + 2 * 12 * mean_window_keys(16, seq_len) * dim + 24 * head_dim * dim - 2 * 12 * head_dim * dim
    assert difference == pytest.approx(expected)


# --------------------------------------------------------------------------- model-level parity

TOLERANCE = 1e-5
BASE = ["model.layers=RLRA", "model.n_layers=4"]
# tiny.yaml: seq_len 64; cp=2 chunks are 16 (zigzag) or 32 (contiguous) tokens
# (windows below one rank's chunk are covered op by op in tests/test_cp_window.py)
# case -> (layout, window), each on the 4-rank world (lasp2 and zigzag are the defaults)
LAYOUTS = {"dp2-cp2-lasp2-zigzag-w20": ("dp2-cp2-lasp2-zigzag", 20),
           "dp2-cp2-lasp1-contiguous-w40": ("dp2-cp2-lasp1-contiguous", 40),
           "cp2-tp2-w20": ("cp2-tp2", 20)}


def _config(layout: str, window: int, world_size: int):
    settings = overrides_of(layout) + BASE + [f"model.window={window}"]
    return resolve(load_config(TINY, settings, world_size=world_size), world_size)


def _parity_case(group: torch.distributed.ProcessGroup, case: str, results_dir: str) -> str | None:
    if problem := check_world(group):
        return problem
    layout, window = LAYOUTS[case]
    config = _config(layout, window, TRAINING_WORLD)
    degrees = ParallelDegrees.resolve(config.parallel.dp, config.parallel.cp, config.parallel.tp, TRAINING_WORLD)
    context = ParallelContext.build(degrees, torch.device("cpu"), cp_layout=config.parallel.cp_layout)
    result = train_layout(config, context)
    record(group, results_dir, f"{__name__}-{case}", {key: result[key] for key in ("losses", "grad_norms")})
    return None


PARITY_CASES = register_cases(
    __name__, {case: SpawnedCase(TRAINING_WORLD, _parity_case, {"case": case, "results_dir": str(RESULTS_DIR)})
               for case in LAYOUTS}, prepare=make_results_dir)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(PARITY_CASES))
def test_rlra_model_same_losses_on_every_layout(case: str, case_results: dict[str, str | None]) -> None:
    assert_case_passed(case_results, case)
    window = LAYOUTS[case][1]
    reference = one_process(f"{__name__}-w{window}",
                            lambda: train_layout(_config("dp1", window, 1), ParallelContext.single_process()))
    assert all(math.isfinite(loss) for loss in reference["losses"])
    assert_same_steps(case, recorded(RESULTS_DIR, f"{__name__}-{case}"), reference,
                      {"losses": TOLERANCE, "grad_norms": 1e-4})


# --------------------------------------------------------------------------- the planner's rows


@pytest.mark.parametrize("pattern", ["RLRA", "SSSA", "RS", "LRSA"])
def test_planner_counts_window_layers_like_the_model(pattern: str) -> None:
    """spindle plan's parameters and model FLOPs equal the built model's; halo bytes bound the exchange."""
    from spindle.parallel.cp.halo import halo_tokens_received
    from spindle.runtime import plan

    config = _tiny(f"model.layers={pattern}", "model.n_layers=8", "model.window=12")
    model = HybridModel(config.model)
    shape = plan.shape_of(config)
    assert plan.count_parameters(config) == model.num_parameters()
    for seq_len in (64, 4096):
        assert plan.model_flops_per_token(shape, seq_len) == pytest.approx(model.flops_per_token(seq_len))
    cp_config = _tiny(f"model.layers={pattern}", "model.window=12", "parallel.cp=4", world_size=4)
    layout = plan.layout_of(cp_config)
    chunk = cp_config.data.seq_len // 8  # zigzag: 2 chunks per rank
    exact, _ = halo_tokens_received(4, "zigzag", chunk, 12)
    per_token = (2 * cp_config.model.kv_heads * (cp_config.model.dim // cp_config.model.heads) * layout.compute_bytes
                 * layout.micro_batch)
    assert exact * per_token <= plan.halo_bytes("S", shape, layout) <= 2 * 12 * per_token
    names = [volume.name for volume in plan.communication(plan.shape_of(cp_config), layout)]
    assert "window halo (R/S)" in names and ("LASP-2 state all-gather (R)" in names) == ("R" in pattern)
