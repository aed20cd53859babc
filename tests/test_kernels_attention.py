"""spindle.kernels.attention and attention_backward against an independent float64 dense softmax.

Covers GQA, bottom-right causal masking with Tq != Tk (including rows that see no key), the log-sum-exp
and its gradient, the backward helper that takes a given o and lse (what ring / all-gather attention
use), the forceable backend switch, and clear errors for bad input. Fused CUDA kernels are GPU-marked.
"""

import math
import re

import pytest
import torch

from spindle.kernels import attention, attention_backward, force_backend
from spindle.kernels.attn import math as attention_math
from spindle.kernels.attn import resolve_backend

FP32_TOLERANCE = 1e-5
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def relative_rmse(actual, expected):
    expected = expected.double()
    return ((actual.double() - expected).norm() / expected.norm().clamp_min(1e-300)).item()


def dense_softmax_reference(q, k, v, causal, scale):
    """float64, one head at a time: plain softmax(QKᵀ·scale + mask) V and logsumexp."""
    batch, query_length, heads, _ = q.shape
    key_length, kv_heads = k.shape[1], k.shape[2]
    outputs, lses = [], []
    for head in range(heads):
        kv_head = head // (heads // kv_heads)
        scores = torch.einsum("bid,bjd->bij", q[:, :, head], k[:, :, kv_head]) * scale
        if causal:
            i = torch.arange(query_length)[:, None]
            j = torch.arange(key_length)[None, :]
            scores = scores.masked_fill(j > i + key_length - query_length, -math.inf)
        lse = torch.logsumexp(scores, -1)
        weights = torch.nan_to_num(torch.softmax(scores, -1), nan=0.0)  # all-masked rows -> 0
        outputs.append(torch.einsum("bij,bjd->bid", weights, v[:, :, kv_head]))
        lses.append(lse)
    return torch.stack(outputs, 2), torch.stack(lses, 1)


def make_inputs(batch, query_length, key_length, heads, kv_heads, dim, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, query_length, heads, dim, generator=generator, dtype=torch.float64)
    k = torch.randn(batch, key_length, kv_heads, dim, generator=generator, dtype=torch.float64)
    v = torch.randn(batch, key_length, kv_heads, dim, generator=generator, dtype=torch.float64)
    grad_output = torch.randn(batch, query_length, heads, dim, generator=generator, dtype=torch.float64)
    grad_lse = torch.randn(batch, heads, query_length, generator=generator, dtype=torch.float64)
    return q, k, v, grad_output, grad_lse


def gradients(function, q, k, v, grad_output, grad_lse, dtype):
    leaves = [t.to(dtype).detach().requires_grad_() for t in (q, k, v)]
    output, lse = function(*leaves)
    finite_lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)  # empty rows: lse = -inf
    loss = (output.double() * grad_output).sum() + (finite_lse.double() * grad_lse).sum()
    loss.backward()
    return {"output": output, "lse": lse, "dq": leaves[0].grad, "dk": leaves[1].grad, "dv": leaves[2].grad}


CASES = [  # batch, Tq, Tk, heads, kv_heads, dim, causal
    (2, 17, 17, 4, 2, 32, True),
    (1, 9, 33, 4, 1, 48, True),  # Tq < Tk: a query chunk at the end of a longer key sequence
    (1, 30, 12, 2, 2, 64, True),  # Tq > Tk: the first 18 rows see no key
    (2, 21, 13, 4, 4, 32, False),
    (1, 1, 65, 2, 1, 32, True),
    (1, 5, 0, 2, 1, 16, False),  # no keys at all
]


@pytest.mark.parametrize("backend", ["naive", "math", "sdpa_cpu"])
@pytest.mark.parametrize("case", CASES)
def test_attention_matches_reference(backend, case):
    from spindle.kernels.attn import unsupported_reason

    batch, query_length, key_length, heads, kv_heads, dim, causal = case
    reason = unsupported_reason(backend, torch.empty(batch, query_length, heads, dim), key_length=key_length,
                                causal=causal)
    q, k, v, grad_output, grad_lse = make_inputs(batch, query_length, key_length, heads, kv_heads, dim)
    if reason is not None:  # a forced backend that cannot run the call says so; it never falls back silently
        with pytest.raises(ValueError, match=re.escape(f"backend={backend!r} {reason}")):
            attention(q.float(), k.float(), v.float(), causal=causal, return_lse=True, backend=backend)
        return
    scale = dim**-0.5
    expected = gradients(lambda *x: dense_softmax_reference(*x, causal, scale), q, k, v, grad_output, grad_lse, torch.float64)
    actual = gradients(
        lambda *x: attention(*x, causal=causal, return_lse=True, backend=backend), q, k, v, grad_output, grad_lse, torch.float32
    )
    assert actual["output"].dtype == torch.float32 and actual["lse"].dtype == torch.float32
    assert actual["lse"].shape == (batch, heads, query_length)
    assert torch.equal(torch.isneginf(actual["lse"]), torch.isneginf(expected["lse"]))
    for name, value in expected.items():
        assert not torch.isnan(actual[name]).any(), f"NaN in {name}"
        if value.numel() == 0 or value.abs().max() == 0:
            assert actual[name].abs().max() == 0 if actual[name].numel() else True
            continue
        reference = torch.where(torch.isinf(value), torch.zeros_like(value), value)
        candidate = torch.where(torch.isinf(actual[name]), torch.zeros_like(actual[name]), actual[name])
        error = relative_rmse(candidate, reference)
        assert error <= FP32_TOLERANCE, f"{backend} {case}: {name} relative RMSE {error:.2e}"


def test_empty_rows_have_zero_output_and_gradient():
    q, k, v, grad_output, _ = make_inputs(1, 10, 4, 2, 1, 16)
    q, k, v = (t.float().requires_grad_() for t in (q, k, v))
    output, lse = attention(q, k, v, causal=True, return_lse=True, backend="math")
    (output * grad_output.float()).sum().backward()
    empty = 10 - 4
    assert torch.all(output[:, :empty] == 0) and torch.all(torch.isneginf(lse[..., :empty]))
    assert torch.all(q.grad[:, :empty] == 0)
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all() and torch.isfinite(v.grad).all()


def test_math_path_blocks_queries(monkeypatch):
    """Forcing tiny query blocks (memory bound) must not change results."""
    q, k, v, grad_output, grad_lse = make_inputs(1, 50, 40, 4, 2, 32)
    expected = gradients(lambda *x: attention(*x, return_lse=True, backend="math"), q, k, v, grad_output, grad_lse, torch.float64)
    monkeypatch.setattr(attention_math, "_MAX_SCORES_PER_BLOCK", 1)  # -> 16-query blocks
    actual = gradients(lambda *x: attention(*x, return_lse=True, backend="math"), q, k, v, grad_output, grad_lse, torch.float64)
    for name in expected:
        finite = torch.isfinite(expected[name])
        assert torch.allclose(actual[name][finite], expected[name][finite], rtol=1e-12, atol=1e-12), name


@pytest.mark.parametrize("case", [(1, 24, 24, 4, 2, 32, True), (2, 7, 19, 2, 1, 16, True), (1, 12, 5, 2, 2, 16, True)])
def test_backward_helper_with_final_output_and_lse(case):
    """The helper reproduces the full gradient from the final o and lse; and split into two key blocks
    (each given the FINAL o and lse, as ring attention does) it sums to the same gradient."""
    batch, query_length, key_length, heads, kv_heads, dim, causal = case
    q, k, v, grad_output, _ = make_inputs(batch, query_length, key_length, heads, kv_heads, dim)
    expected = gradients(lambda *x: dense_softmax_reference(*x, causal, dim**-0.5), q, k, v, grad_output,
                         torch.zeros(batch, heads, query_length, dtype=torch.float64), torch.float64)
    q32, k32, v32 = q.float(), k.float(), v.float()
    output, lse = attention(q32, k32, v32, causal=causal, return_lse=True)
    split = key_length // 2
    dq, dk, dv = attention_backward(q32, k32, v32, output, lse, grad_output.float(), causal=causal)
    assert dq.dtype == torch.float32
    for name, value in (("dq", dq), ("dk", dk), ("dv", dv)):
        assert relative_rmse(value, expected[name]) <= FP32_TOLERANCE, name
    # non-causal block split: gradients of the two key halves, each with the final o and lse
    output, lse = attention(q32, k32, v32, causal=False, return_lse=True)
    full = attention_backward(q32, k32, v32, output, lse, grad_output.float(), causal=False)
    first = attention_backward(q32, k32[:, :split], v32[:, :split], output, lse, grad_output.float(), causal=False)
    second = attention_backward(q32, k32[:, split:], v32[:, split:], output, lse, grad_output.float(), causal=False)
    assert relative_rmse(first[0] + second[0], full[0]) <= FP32_TOLERANCE
    assert relative_rmse(torch.cat([first[1], second[1]], 1), full[1]) <= FP32_TOLERANCE
    assert relative_rmse(torch.cat([first[2], second[2]], 1), full[2]) <= FP32_TOLERANCE


def test_force_backend_switch():
    q = torch.randn(1, 4, 2, 8)
    assert resolve_backend("auto", q) == "sdpa_cpu"  # PyTorch's fused CPU kernel
    assert resolve_backend("auto", q, key_length=6) == "math"  # causal Tq != Tk: its mask is top-left
    assert resolve_backend("auto", q, key_length=6, causal=False) == "sdpa_cpu"
    assert resolve_backend("auto", q, window=2) == "math"
    with force_backend("naive"):
        assert resolve_backend("auto", q) == "naive"
        assert resolve_backend("math", q) == "math"  # an explicit backend wins
    assert resolve_backend("auto", q) == "sdpa_cpu"
    with pytest.raises(ValueError, match="unknown backend"):
        with force_backend("flash3"):
            pass


def test_return_lse_false_returns_tensor():
    q = torch.randn(1, 4, 2, 8)
    output = attention(q, q, q)
    assert isinstance(output, torch.Tensor) and output.shape == q.shape


@pytest.mark.parametrize(
    "shapes, message",
    [
        (((1, 4, 3, 8), (1, 4, 2, 8), (1, 4, 2, 8)), "multiple of key/value heads"),
        (((1, 4, 2, 8), (1, 4, 2, 16), (1, 4, 2, 16)), "agree on batch and head_dim"),
        (((1, 4, 2, 8), (1, 5, 2, 8), (1, 4, 2, 8)), "k and v must agree"),
        (((4, 2, 8), (1, 4, 2, 8), (1, 4, 2, 8)), "q must be 4-D"),
    ],
)
def test_bad_shapes_raise(shapes, message):
    q, k, v = (torch.randn(*shape) for shape in shapes)
    with pytest.raises(ValueError, match=message):
        attention(q, k, v)


def test_bad_dtype_and_backend_raise():
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(TypeError, match="q has dtype"):
        attention(q.int(), q, q)
    with pytest.raises(ValueError, match="unknown backend"):
        attention(q, q, q, backend="cudnn9")
    with pytest.raises(ValueError, match="backend='flash_attn'"):
        attention(q, q, q, backend="flash_attn")
    with pytest.raises(ValueError, match="backend='sdpa'"):
        attention(q, q, q, backend="sdpa")


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["flash_attn3", "flash_attn", "sdpa", "sdpa_efficient"])
@pytest.mark.parametrize("case", [(2, 1024, 1024, 8, 2, 128, True), (1, 256, 1024, 8, 8, 64, True),
                                  (1, 512, 200, 4, 1, 64, True), (1, 300, 700, 4, 2, 128, False)])
def test_fused_kernels_bf16_on_gpu(backend, case):
    """bf16 error <= 5e-3 and <= 2x the plain PyTorch bf16 computation, output, lse and every gradient."""
    from spindle.kernels.attn import unsupported_reason

    reason = unsupported_reason(backend, torch.empty(1, 1, 1, case[5], device="cuda", dtype=torch.bfloat16))
    if reason is not None:
        pytest.skip(f"{backend} {reason}")
    batch, query_length, key_length, heads, kv_heads, dim, causal = case
    q, k, v, grad_output, grad_lse = (t.cuda() for t in make_inputs(batch, query_length, key_length, heads, kv_heads, dim))
    scale = dim**-0.5
    for with_lse_gradient in (False, True):
        lse_weights = grad_lse if with_lse_gradient else torch.zeros_like(grad_lse)
        expected = gradients(lambda *x: dense_softmax_reference(*x, causal, scale), q, k, v, grad_output, lse_weights, torch.float64)
        actual = gradients(lambda *x: attention(*x, causal=causal, return_lse=True, backend=backend), q, k, v,
                           grad_output, lse_weights, torch.bfloat16)
        baseline = gradients(lambda *x: dense_softmax_reference(*x, causal, scale), q, k, v, grad_output, lse_weights,
                             torch.bfloat16)
        for name, value in expected.items():
            reference = torch.where(torch.isinf(value), torch.zeros_like(value), value)
            error = relative_rmse(torch.where(torch.isinf(actual[name]), 0, actual[name]), reference)
            baseline_error = relative_rmse(torch.where(torch.isinf(baseline[name]), 0, baseline[name]), reference)
            assert error <= 5e-3 and error <= 2 * max(baseline_error, 1e-4), f"{name}: {error:.2e} vs {baseline_error:.2e}"


def test_attention_forward_helper_matches_attention():
    from spindle.kernels import attention_forward

    q, k, v, _, _ = make_inputs(1, 12, 20, 4, 2, 16)
    q, k, v = (t.float().requires_grad_() for t in (q, k, v))
    output, lse = attention_forward(q, k, v, causal=True)
    expected_output, expected_lse = attention(q, k, v, causal=True, return_lse=True)
    assert not output.requires_grad
    assert torch.equal(output, expected_output.detach()) and torch.equal(lse, expected_lse.detach())
