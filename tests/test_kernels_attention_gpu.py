"""bf16 softmax attention on every fused CUDA backend available (flash_attn3, flash_attn, sdpa,
sdpa_efficient) against a float64 dense reference: causal GQA, sliding window (smaller than, equal to and
larger than T, Tq != Tk), packed documents (with and without a window), outputs, lse and every gradient;
the backward helper given o and lse; and that auto picks a kernel with native GQA on bf16 inputs.

GPU-only (`pytest -m gpu`); every test skips without CUDA, and a backend that is not installed skips.
"""

from __future__ import annotations

import math

import pytest
import torch

from spindle.kernels import attention, attention_backward
from spindle.kernels.attn import resolve_backend, unsupported_reason

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
FUSED = ["flash_attn3", "flash_attn", "sdpa", "sdpa_efficient"]


def dense_mask(batch, query_length, key_length, causal, window, cu_seqlens, device):
    """[B, Tq, Tk] from the definition (p = i + Tk - Tq; j <= p; j > p - w; same document), vectorized."""
    p = torch.arange(query_length, device=device)[:, None] + key_length - query_length
    j = torch.arange(key_length, device=device)[None, :]
    mask = torch.ones(query_length, key_length, dtype=torch.bool, device=device)
    if causal:
        mask &= j <= p
    if window is not None:
        mask &= j > p - window
    mask = mask.expand(batch, -1, -1)
    if cu_seqlens is not None:
        offsets = torch.tensor(cu_seqlens, device=device)
        flat = torch.arange(batch * key_length, device=device)
        document = (torch.searchsorted(offsets, flat, right=True) - 1).view(batch, key_length)
        mask = mask & (document[:, :, None] == document[:, None, :])
    return mask


def reference(q, k, v, scale, mask):
    groups = q.shape[2] // k.shape[2]
    qh = q.double().transpose(1, 2)
    kh, vh = (t.double().transpose(1, 2).repeat_interleave(groups, 1) for t in (k, v))
    scores = (qh @ kh.transpose(-1, -2) * scale).masked_fill(~mask[:, None], -math.inf)
    lse = torch.logsumexp(scores, -1)
    weights = torch.nan_to_num(torch.softmax(scores, -1), nan=0.0)
    return (weights @ vh).transpose(1, 2), lse


def gradients(function, leaves, grad_output, grad_lse, dtype):
    leaves = [t.to(dtype).detach().requires_grad_() for t in leaves]
    output, lse = function(*leaves)
    finite = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    ((output.double() * grad_output).sum() + (finite.double() * grad_lse).sum()).backward()
    return {"output": output, "lse": lse, "dq": leaves[0].grad, "dk": leaves[1].grad, "dv": leaves[2].grad}


def relative(actual, expected):
    actual = torch.where(torch.isinf(actual), 0, actual).double()
    expected = torch.where(torch.isinf(expected), 0, expected).double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-300)).item()


CASES = {  # batch, Tq, Tk, heads, kv_heads, dim, causal, window, cu_seqlens
    "causal_gqa": (2, 1024, 1024, 8, 2, 128, True, None, None),
    "Tq_lt_Tk": (1, 256, 1024, 8, 8, 64, True, None, None),
    "Tq_gt_Tk": (1, 512, 200, 4, 1, 64, True, None, None),
    "not_causal": (1, 300, 700, 4, 2, 128, False, None, None),
    "window_small": (2, 1024, 1024, 8, 2, 128, True, 128, None),
    "window_equal_T": (1, 512, 512, 4, 2, 64, True, 512, None),
    "window_beyond_T": (1, 512, 512, 4, 2, 64, True, 4096, None),
    "window_Tq_lt_Tk": (1, 256, 1000, 4, 1, 64, True, 300, None),
    "documents": (2, 1024, 1024, 8, 2, 128, True, None, [0, 7, 300, 1024, 1100, 2048]),
    "documents_window": (2, 1024, 1024, 8, 2, 64, True, 96, [0, 500, 1024, 1030, 2048]),
}


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
@pytest.mark.parametrize("backend", FUSED)
def test_fused_bf16_against_float64(backend, case):
    """bf16 error <= 5e-3 and <= 2x a plain PyTorch bf16 computation, outputs, lse and every gradient."""
    batch, query_length, key_length, heads, kv_heads, dim, causal, window, cu_seqlens = case
    probe = torch.empty(1, 1, heads, dim, device="cuda", dtype=torch.bfloat16)
    reason = unsupported_reason(backend, probe, window, cu_seqlens is not None)
    if reason is not None:
        pytest.skip(f"{backend} {reason}")
    generator = torch.Generator(device="cuda").manual_seed(0)
    shapes = [(batch, query_length, heads, dim), (batch, key_length, kv_heads, dim), (batch, key_length, kv_heads, dim)]
    leaves = [torch.randn(s, device="cuda", dtype=torch.float64, generator=generator) for s in shapes]
    grad_output = torch.randn(batch, query_length, heads, dim, device="cuda", dtype=torch.float64, generator=generator)
    grad_lse = torch.randn(batch, heads, query_length, device="cuda", dtype=torch.float64, generator=generator)
    scale = dim**-0.5
    mask = dense_mask(batch, query_length, key_length, causal, window, cu_seqlens, "cuda")
    offsets = None if cu_seqlens is None else torch.tensor(cu_seqlens, device="cuda", dtype=torch.int32)
    for lse_weights in (torch.zeros_like(grad_lse), grad_lse):  # fused backward, then the lse-gradient route
        expected = gradients(lambda *x: reference(*x, scale, mask), leaves, grad_output, lse_weights, torch.float64)
        baseline = gradients(lambda *x: reference(*x, scale, mask), leaves, grad_output, lse_weights, torch.bfloat16)
        actual = gradients(
            lambda *x: attention(*x, causal=causal, window=window, cu_seqlens=offsets, return_lse=True, backend=backend),
            leaves, grad_output, lse_weights, torch.bfloat16)
        assert actual["lse"].dtype == torch.float32 and actual["lse"].shape == (batch, heads, query_length)
        for name in expected:
            error, baseline_error = relative(actual[name], expected[name]), relative(baseline[name], expected[name])
            assert error <= 5e-3 and error <= 2 * max(baseline_error, 1e-4), (
                f"{backend} {name}: {error:.2e} vs plain bf16 {baseline_error:.2e}")


@pytest.mark.parametrize("backend", FUSED)
def test_backward_helper_given_output_and_lse(backend):
    """What ring attention does: attention_backward with the forward's o and lse equals autograd's gradient."""
    probe = torch.empty(1, 1, 8, 64, device="cuda", dtype=torch.bfloat16)
    if unsupported_reason(backend, probe, 64) is not None and unsupported_reason(backend, probe) is not None:
        pytest.skip(f"{backend} unavailable")
    window = None if unsupported_reason(backend, probe, 64) else 64
    torch.manual_seed(0)
    q = torch.randn(2, 512, 8, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(2, 512, 2, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    output, lse = attention(q, k, v, window=window, return_lse=True, backend=backend)
    grad = torch.randn_like(output)
    output.backward(grad)
    dq, dk, dv = attention_backward(q.detach(), k.detach(), v.detach(), output.detach(), lse.detach(), grad,
                                    window=window, backend=backend)
    for computed, leaf in zip((dq, dk, dv), (q, k, v)):
        assert relative(computed, leaf.grad) <= 1e-2


def test_auto_prefers_a_native_gqa_kernel_for_bf16():
    q = torch.empty(1, 16, 8, 128, device="cuda", dtype=torch.bfloat16)
    chosen = resolve_backend("auto", q, window=128, documents=True)
    assert chosen in ("flash_attn3", "flash_attn", "sdpa"), chosen
