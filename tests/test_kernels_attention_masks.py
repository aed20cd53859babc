"""Sliding window (`window=`) and packed documents (`cu_seqlens=`) of spindle.kernels.attention against a
float64 dense reference whose mask is written out element by element (independent of kernels/attn/masks.py).

Covers windows smaller than, equal to and larger than T; Tq != Tk; GQA; documents shorter than a block,
B > 1, documents combined with a window; outputs, lse and every gradient (including through lse); the
backward helper given o and lse; the math path's key bands (never a T x T block at long T); the
SPINDLE_ATTN_BACKEND switch; and the errors for bad window / cu_seqlens values.
"""

from __future__ import annotations

import math

import pytest
import torch

from numerics import assert_tensors_close, nan_poisoned_allocations, outputs_and_gradients

from spindle.kernels import attention, attention_backward, force_backend
from spindle.kernels.attn import build_mask_spec, resolve_backend
from spindle.kernels.attn import math as attention_math

FP32_TOLERANCE = 2e-5


@pytest.fixture(autouse=True)
def nan_poisoned():
    """Buffers allocated with torch.empty & co. start NaN-filled: an element a kernel leaves unwritten fails."""
    with nan_poisoned_allocations():
        yield


def document_of(cu_seqlens: list[int], flat_position: int) -> int:
    return max(n for n, start in enumerate(cu_seqlens[:-1]) if start <= flat_position)


def reference_mask(batch, query_length, key_length, causal, window, cu_seqlens):
    """Bool [B, Tq, Tk] from the definition: p = i + Tk - Tq; j <= p; p - w < j; same document."""
    mask = torch.ones(batch, query_length, key_length, dtype=torch.bool)
    for b in range(batch):
        for i in range(query_length):
            p = i + key_length - query_length
            for j in range(key_length):
                keep = True
                if causal:
                    keep = j <= p
                if window is not None:
                    keep = keep and j > p - window
                if cu_seqlens is not None:
                    keep = keep and document_of(cu_seqlens, b * key_length + j) == document_of(
                        cu_seqlens, b * key_length + p)
                mask[b, i, j] = keep
    return mask


def masked_reference(q, k, v, scale, mask):
    """float64 dense softmax per head under a [B, Tq, Tk] mask; rows that see nothing: o = 0, lse = -inf."""
    heads, kv_heads = q.shape[2], k.shape[2]
    outputs, lses = [], []
    for head in range(heads):
        kv_head = head // (heads // kv_heads)
        scores = torch.einsum("bid,bjd->bij", q[:, :, head], k[:, :, kv_head]) * scale
        scores = scores.masked_fill(~mask, -math.inf)
        lse = torch.logsumexp(scores, -1)
        weights = torch.nan_to_num(torch.softmax(scores, -1), nan=0.0)
        outputs.append(torch.einsum("bij,bjd->bid", weights, v[:, :, kv_head]))
        lses.append(lse)
    return torch.stack(outputs, 2), torch.stack(lses, 1)


def make_inputs(batch, query_length, key_length, heads, kv_heads, dim, seed=0):
    generator = torch.Generator().manual_seed(seed)
    shapes = [(batch, query_length, heads, dim), (batch, key_length, kv_heads, dim), (batch, key_length, kv_heads, dim),
              (batch, query_length, heads, dim), (batch, heads, query_length)]
    return [torch.randn(shape, generator=generator, dtype=torch.float64) for shape in shapes]


def run_with_gradients(function, q, k, v, grad_output, grad_lse, dtype):
    """function(q, k, v) -> (output, lse): both and grad_q, grad_k, grad_v (an lse of -inf takes no gradient)."""
    return outputs_and_gradients(lambda q, k, v: function(q, k, v), {"q": q, "k": k, "v": v},
                                 {"output": grad_output, "lse": grad_lse}, dtype)


def assert_matches(actual, expected, tolerance, label):
    """Empty rows alike; then every tensor within `tolerance` (an all-zero reference must be matched exactly)."""
    assert torch.equal(torch.isneginf(actual["lse"]), torch.isneginf(expected["lse"])), f"{label}: empty rows differ"
    assert_tensors_close(actual, expected, tolerance, label)


def check_case(backend, batch, query_length, key_length, heads, kv_heads, dim, causal, window, cu_seqlens,
               dtype=torch.float32, with_lse_gradient=True):
    q, k, v, grad_output, grad_lse = make_inputs(batch, query_length, key_length, heads, kv_heads, dim)
    if not with_lse_gradient:
        grad_lse = torch.zeros_like(grad_lse)
    scale = dim**-0.5
    mask = reference_mask(batch, query_length, key_length, causal, window, cu_seqlens)
    expected = run_with_gradients(lambda *x: masked_reference(*x, scale, mask), q, k, v, grad_output, grad_lse,
                                  torch.float64)
    offsets = None if cu_seqlens is None else torch.tensor(cu_seqlens)
    actual = run_with_gradients(
        lambda *x: attention(*x, causal=causal, window=window, cu_seqlens=offsets, return_lse=True, backend=backend),
        q, k, v, grad_output, grad_lse, dtype)
    assert actual["lse"].shape == (batch, heads, query_length)
    tolerance = 1e-10 if dtype == torch.float64 else FP32_TOLERANCE
    assert_matches(actual, expected, tolerance, f"{backend} w={window} docs={cu_seqlens}")


WINDOW_CASES = {  # batch, Tq, Tk, heads, kv_heads, dim, window
    "w1": (2, 17, 17, 4, 2, 16, 1),
    "w5": (1, 17, 17, 2, 1, 16, 5),
    "w_equal_T": (1, 17, 17, 2, 2, 16, 17),
    "w_beyond_T": (1, 17, 17, 4, 2, 16, 40),
    "Tq_lt_Tk": (1, 9, 20, 4, 2, 16, 6),
    "Tq_gt_Tk": (1, 20, 9, 2, 1, 16, 4),  # the first 11 rows see no key
}


@pytest.mark.parametrize("backend", ["math", "naive"])
@pytest.mark.parametrize("case", list(WINDOW_CASES.values()), ids=list(WINDOW_CASES))
def test_window_matches_reference(backend, case):
    batch, query_length, key_length, heads, kv_heads, dim, window = case
    check_case(backend, batch, query_length, key_length, heads, kv_heads, dim, True, window, None)


DOCUMENT_CASES = {  # batch, T, cu_seqlens (0, B·T and every row start), causal, window
    "one_row": (1, 23, [0, 5, 6, 16, 23], True, None),  # a 1-token document
    "two_rows": (2, 19, [0, 3, 4, 19, 25, 38], True, None),
    "two_rows_window": (2, 19, [0, 3, 4, 19, 25, 38], True, 4),
    "window_beyond_documents": (2, 11, [0, 7, 11, 13, 22], True, 30),
    "one_document_per_row": (2, 9, [0, 9, 18], True, 3),
    "bidirectional": (2, 10, [0, 4, 10, 11, 20], False, None),
}


@pytest.mark.parametrize("backend", ["math", "naive"])
@pytest.mark.parametrize("case", list(DOCUMENT_CASES.values()), ids=list(DOCUMENT_CASES))
def test_documents_match_reference(backend, case):
    batch, length, cu_seqlens, causal, window = case
    check_case(backend, batch, length, length, 4, 2, 16, causal, window, cu_seqlens)


def test_float64_math_path_is_exact_with_documents_and_window():
    check_case("math", 2, 13, 13, 2, 1, 8, True, 3, [0, 2, 13, 20, 26], dtype=torch.float64)


def test_documents_equal_separate_calls():
    """Packed documents give exactly what each document gives on its own (the cu_seqlens contract)."""
    q, k, v, _, _ = make_inputs(2, 12, 12, 2, 1, 8)
    cu_seqlens = [0, 5, 12, 16, 24]
    packed = attention(q, k, v, cu_seqlens=torch.tensor(cu_seqlens), window=3)
    flat = [t.reshape(24, *t.shape[2:]) for t in (q, k, v)]
    for start, stop in zip(cu_seqlens, cu_seqlens[1:]):
        alone = attention(*(t[None, start:stop] for t in flat), window=3)
        torch.testing.assert_close(packed.reshape(24, 2, 8)[start:stop], alone[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("window, cu_seqlens", [(6, None), (None, [0, 20, 33, 64, 70, 128]), (5, [0, 9, 64, 128])],
                         ids=["window", "documents", "both"])
def test_math_bands_never_exceed_rows_plus_window(monkeypatch, window, cu_seqlens):
    """Small query blocks: every key band stays within what its rows can see, and results do not change."""
    length = 64
    q, k, v, grad_output, grad_lse = make_inputs(2, length, length, 2, 1, 8)
    offsets = None if cu_seqlens is None else torch.tensor(cu_seqlens)
    run = lambda *x: attention(*x, window=window, cu_seqlens=offsets, return_lse=True, backend="math")  # noqa: E731
    expected = run_with_gradients(run, q, k, v, grad_output, grad_lse, torch.float64)
    monkeypatch.setattr(attention_math, "_MAX_SCORES_PER_BLOCK", 1)  # 16-row blocks
    spec = build_mask_spec(offsets, True, window, 2, length, length, torch.device("cpu"))
    plan = list(attention_math.block_plan(spec, length, length, 4))
    assert len(plan) == length // 16
    for rows, band in plan:
        assert band.stop == rows.stop  # causal: nothing after the last row
        if window is not None:
            assert band.stop - band.start <= rows.stop - rows.start + window - 1
        if cu_seqlens is not None:  # starts at the document of the first row (both batch rows)
            first_docs = [max(s for s in cu_seqlens if s <= b * length + rows.start) - b * length for b in (0, 1)]
            assert band.start >= min(first_docs)
    actual = run_with_gradients(run, q, k, v, grad_output, grad_lse, torch.float64)
    assert_tensors_close(actual, expected, 1e-12, "16-row blocks")


def test_long_sequence_window_is_banded():
    """T = 8192, w = 16 on the math path: the plan's widest block is far below T (no T x T scores)."""
    length, window = 8192, 16
    spec = build_mask_spec(None, True, window, 1, length, length, torch.device("cpu"))
    plan = list(attention_math.block_plan(spec, length, length, 1))
    largest = max((rows.stop - rows.start) * (band.stop - band.start) for rows, band in plan)
    assert largest <= 256 * (256 + window) < length * length // 100
    q = torch.randn(1, length, 1, 8, requires_grad=True)
    output = attention(q, q, q, window=window, backend="math")
    output.sum().backward()
    assert torch.isfinite(q.grad).all()


def test_backward_helper_with_window_and_documents():
    """attention_backward given the final o and lse reproduces the autograd gradient with window + documents."""
    q, k, v, grad_output, _ = make_inputs(2, 14, 14, 4, 2, 8)
    cu_seqlens = torch.tensor([0, 6, 14, 15, 28])
    leaves = [t.float().requires_grad_() for t in (q, k, v)]
    output, lse = attention(*leaves, window=4, cu_seqlens=cu_seqlens, return_lse=True)
    (output * grad_output.float()).sum().backward()
    dq, dk, dv = attention_backward(*(t.detach() for t in leaves), output.detach(), lse.detach(), grad_output.float(),
                                    window=4, cu_seqlens=cu_seqlens)
    names = ("grad_q", "grad_k", "grad_v")
    assert_tensors_close(dict(zip(names, (dq, dk, dv))), {name: leaf.grad for name, leaf in zip(names, leaves)}, 1e-5)


def test_environment_variable_forces_backend(monkeypatch):
    q = torch.randn(1, 4, 2, 8)
    monkeypatch.setenv("SPINDLE_ATTN_BACKEND", "naive")
    assert resolve_backend("auto", q) == "naive"
    with force_backend("math"):  # the context manager wins over the environment
        assert resolve_backend("auto", q) == "math"
    assert resolve_backend("math", q) == "math"  # an explicit backend wins over both
    monkeypatch.setenv("SPINDLE_ATTN_BACKEND", "sdpa")
    with pytest.raises(ValueError, match="backend='sdpa'"):
        attention(q, q, q)  # a forced backend that cannot run the call is an error, not a silent fallback
    monkeypatch.setenv("SPINDLE_ATTN_BACKEND", "flash4")
    with pytest.raises(ValueError, match="SPINDLE_ATTN_BACKEND='flash4'"):
        attention(q, q, q)
    monkeypatch.setenv("SPINDLE_ATTN_BACKEND", "auto")
    assert resolve_backend("auto", q) == "sdpa_cpu"


def test_auto_skips_backends_without_window_or_documents(monkeypatch):
    from spindle.kernels.attn import gpu, unsupported_reason

    q = torch.randn(1, 4, 2, 8)
    monkeypatch.setattr(gpu, "sdpa_efficient_supports", lambda tensor: True)  # as if on a GPU
    assert unsupported_reason("sdpa_efficient", q) is None
    assert "sliding window" in unsupported_reason("sdpa_efficient", q, window=3)
    assert "sliding window" in unsupported_reason("sdpa_efficient", q, documents=True)
    assert resolve_backend("auto", q) == "sdpa_efficient"
    assert resolve_backend("auto", q, window=3) == "math"
    assert resolve_backend("auto", q, documents=True) == "math"


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"window": 0}, ValueError, "window must be >= 1"),
        ({"window": 2.5}, TypeError, "window must be a positive int"),
        ({"window": 3, "causal": False}, ValueError, "window needs causal=True"),
        ({"cu_seqlens": torch.tensor([0, 3, 16])}, ValueError, "every row start"),
        ({"cu_seqlens": torch.tensor([0, 8, 12])}, ValueError, "end at B·T = 16"),
        ({"cu_seqlens": torch.tensor([0, 8, 5, 16])}, ValueError, "non-decreasing"),
        ({"cu_seqlens": torch.tensor([0.0, 8.0, 16.0])}, TypeError, "int32 or int64"),
        ({"cu_seqlens": torch.tensor([[0, 8, 16]])}, ValueError, "1-D int tensor"),
    ],
    ids=["window0", "window_float", "window_not_causal", "missing_row_start", "wrong_total", "decreasing",
         "float_offsets", "2d_offsets"],
)
def test_bad_window_and_cu_seqlens_raise(kwargs, error, message):
    q = torch.randn(2, 8, 2, 8)
    with pytest.raises(error, match=message):
        attention(q, q, q, **kwargs)


def test_cu_seqlens_needs_equal_lengths():
    q, k = torch.randn(1, 4, 2, 8), torch.randn(1, 6, 2, 8)
    with pytest.raises(ValueError, match="as many queries as keys"):
        attention(q, k, k, cu_seqlens=torch.tensor([0, 6]))


def test_bidirectional_documents_band_ends_at_the_last_document(monkeypatch):
    """causal=False with documents: a block's keys end where its last row's document ends (both batch rows)."""
    length, cu_seqlens = 64, [0, 10, 40, 64, 74, 104, 128]  # the same documents in both rows
    q, k, v, grad_output, grad_lse = make_inputs(2, length, length, 2, 1, 8)
    offsets = torch.tensor(cu_seqlens)
    run = lambda *x: attention(*x, causal=False, cu_seqlens=offsets, return_lse=True, backend="math")  # noqa: E731
    expected = run_with_gradients(run, q, k, v, grad_output, grad_lse, torch.float64)
    monkeypatch.setattr(attention_math, "_MAX_SCORES_PER_BLOCK", 1)  # 16-row blocks
    spec = build_mask_spec(offsets, False, None, 2, length, length, torch.device("cpu"))
    bands = [band for _, band in attention_math.block_plan(spec, length, length, 4)]
    assert [(band.start, band.stop) for band in bands] == [(0, 40), (10, 40), (10, 64), (40, 64)]
    actual = run_with_gradients(run, q, k, v, grad_output, grad_lse, torch.float64)
    assert_tensors_close(actual, expected, 1e-12, "16-row blocks")
