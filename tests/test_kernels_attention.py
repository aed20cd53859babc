"""spindle.kernels.attention and attention_backward against an independent float64 dense softmax.

Covers GQA, bottom-right causal masking with Tq != Tk (including rows that see no key), the log-sum-exp
and its gradient, the backward helper that takes a given o and lse (what ring / all-gather attention
use), the forceable backend switch, and clear errors for bad input. Fused CUDA kernels are GPU-marked.
"""

import math
import re

import pytest
import torch
from numerics import (
    HALF_PRECISION_TOLERANCE,
    TOLERANCE,
    assert_tensors_close,
    nan_poisoned_allocations,
    outputs_and_gradients,
    tensor_errors,
)

from spindle.kernels import attention, attention_backward, force_backend
from spindle.kernels.attn import math as attention_math
from spindle.kernels.attn import resolve_backend

FP32_TOLERANCE = TOLERANCE[torch.float32]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def nan_poisoned():
    """Buffers allocated with torch.empty & co. (the fused backends' gradients) start NaN-filled: an element a
    kernel fails to write shows up as NaN."""
    with nan_poisoned_allocations():
        yield


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
    """function(q, k, v) -> (output, lse) on copies cast to dtype: output, lse and grad_q, grad_k, grad_v.
    The lse of a row that sees no key is -inf and takes no gradient."""
    return outputs_and_gradients(lambda q, k, v: function(q, k, v), {"q": q, "k": k, "v": v},
                                 {"output": grad_output, "lse": grad_lse}, dtype)


def case_id(case):
    batch, query_length, key_length, heads, kv_heads, dim, causal = case
    mask = "causal" if causal else "full"
    return f"B{batch}-Tq{query_length}-Tk{key_length}-H{heads}-KV{kv_heads}-D{dim}-{mask}"


CASES = [  # batch, Tq, Tk, heads, kv_heads, dim, causal
    (2, 17, 17, 4, 2, 32, True),
    (1, 9, 33, 4, 1, 48, True),  # Tq < Tk: a query chunk at the end of a longer key sequence
    (1, 30, 12, 2, 2, 64, True),  # Tq > Tk: the first 18 rows see no key
    (2, 21, 13, 4, 4, 32, False),
    (1, 1, 65, 2, 1, 32, True),
    (1, 5, 0, 2, 1, 16, False),  # no keys at all
]


@pytest.mark.parametrize("backend", ["naive", "math", "sdpa_cpu"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
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
    # a reference that is all zeros (no keys) must be matched exactly: its relative error divides by ~0
    assert_tensors_close(actual, expected, FP32_TOLERANCE, f"{backend} {case}")


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
    assert_tensors_close(actual, expected, 1e-12, "16-query blocks")


@pytest.mark.parametrize("case", [(1, 24, 24, 4, 2, 32, True), (2, 7, 19, 2, 1, 16, True), (1, 12, 5, 2, 2, 16, True)],
                         ids=case_id)
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
    expected_gradients = {name: expected[name] for name in ("grad_q", "grad_k", "grad_v")}
    assert_tensors_close({"grad_q": dq, "grad_k": dk, "grad_v": dv}, expected_gradients, FP32_TOLERANCE)
    # non-causal block split: gradients of the two key halves, each with the final o and lse
    output, lse = attention(q32, k32, v32, causal=False, return_lse=True)
    full = attention_backward(q32, k32, v32, output, lse, grad_output.float(), causal=False)
    first = attention_backward(q32, k32[:, :split], v32[:, :split], output, lse, grad_output.float(), causal=False)
    second = attention_backward(q32, k32[:, split:], v32[:, split:], output, lse, grad_output.float(), causal=False)
    halves = {"grad_q": first[0] + second[0], "grad_k": torch.cat([first[1], second[1]], 1),
              "grad_v": torch.cat([first[2], second[2]], 1)}
    assert_tensors_close(halves, dict(zip(("grad_q", "grad_k", "grad_v"), full)), FP32_TOLERANCE, "two key blocks")


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
                                  (1, 512, 200, 4, 1, 64, True), (1, 300, 700, 4, 2, 128, False)], ids=case_id)
@pytest.mark.parametrize("with_lse_gradient", [False, True], ids=["output-gradient", "output-and-lse-gradients"])
def test_fused_kernels_bf16_on_gpu(backend, case, with_lse_gradient):
    """bf16 error <= 5e-3 and <= 2x the plain PyTorch bf16 computation, output, lse and every gradient."""
    from spindle.kernels.attn import unsupported_reason

    reason = unsupported_reason(backend, torch.empty(1, 1, 1, case[5], device="cuda", dtype=torch.bfloat16))
    if reason is not None:
        pytest.skip(f"{backend} {reason}")
    batch, query_length, key_length, heads, kv_heads, dim, causal = case
    q, k, v, grad_output, grad_lse = (t.cuda() for t in make_inputs(batch, query_length, key_length, heads, kv_heads, dim))
    scale = dim**-0.5
    lse_weights = grad_lse if with_lse_gradient else torch.zeros_like(grad_lse)

    def reference(*x):
        return dense_softmax_reference(*x, causal, scale)

    expected = gradients(reference, q, k, v, grad_output, lse_weights, torch.float64)
    actual = gradients(lambda *x: attention(*x, causal=causal, return_lse=True, backend=backend), q, k, v,
                       grad_output, lse_weights, torch.bfloat16)
    baseline = gradients(reference, q, k, v, grad_output, lse_weights, torch.bfloat16)
    limits = {name: min(HALF_PRECISION_TOLERANCE, 2 * max(error, 1e-4))
              for name, error in tensor_errors(baseline, expected).items()}
    assert_tensors_close(actual, expected, limits, f"{backend} bf16 (limits: 2x plain bf16, at most 5e-3)")


def test_attention_forward_helper_matches_attention():
    from spindle.kernels import attention_forward

    q, k, v, _, _ = make_inputs(1, 12, 20, 4, 2, 16)
    q, k, v = (t.float().requires_grad_() for t in (q, k, v))
    output, lse = attention_forward(q, k, v, causal=True)
    expected_output, expected_lse = attention(q, k, v, causal=True, return_lse=True)
    assert not output.requires_grad
    assert torch.equal(output, expected_output.detach()) and torch.equal(lse, expected_lse.detach())
