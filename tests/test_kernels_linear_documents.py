"""linear_attention's `delay` and `cu_seqlens` (packed documents) against a float64 reference.

The reference runs every document on its own with the dense parallel form, written here without the
recurrence: o_i = scale · Σ_{j ≤ i−d} e^{G_{i−d} − G_j} (q_i·k_j) v_j (+ scale·e^{G_i} q_i S_0 when d = 0), and
the final state S_{L−1} = e^{G_{L−1}} S_0 + Σ_j e^{G_{L−1} − G_j} k_jᵀ v_j. Outputs, final states and every
gradient are compared (naive and torch in float64; triton in float32 under TRITON_INTERPRET=1).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the first `import triton`

from numerics import assert_tensors_close, nan_poisoned_allocations, outputs_and_gradients

from spindle.kernels import linear_attention
from spindle.kernels.linear_attn import triton_available

TRITON_ON_CPU = triton_available(torch.device("cpu"))


@pytest.fixture(autouse=True)
def nan_poisoned():
    """Every buffer allocated with torch.empty & co. (the Triton path's outputs, states and gradients) starts
    NaN-filled: an element a kernel fails to write shows up as NaN."""
    with nan_poisoned_allocations():
        yield


def dense_document(q, k, v, g, scale, delay, initial_state):
    """One document, [L, H, D] tensors, g [L, H] (float64): (o [L, H, Dv], final [H, Dk, Dv])."""
    length = q.shape[0]
    cumulative = g.cumsum(0).transpose(0, 1)  # [H, L]
    rows, columns = torch.arange(length)[:, None], torch.arange(length)[None, :]
    source = (rows - delay).clamp_min(0)  # the state index i - d each query reads
    visible = columns <= rows - delay
    difference = cumulative[:, source.expand(length, length)] - cumulative[:, columns.expand(length, length)]
    weights = torch.exp(torch.where(visible, difference, torch.full_like(difference, float("-inf"))))
    output = scale * torch.einsum("hij,ihd,jhd,jhe->ihe", weights, q, k, v)
    if initial_state is not None:
        output = output + scale * torch.einsum("hi,ihd,hde->ihe", torch.exp(cumulative), q, initial_state)
    if length == 0:
        final = torch.zeros(q.shape[1], q.shape[2], v.shape[2], dtype=q.dtype)
    else:
        final = torch.einsum("hj,jhd,jhe->hde", torch.exp(cumulative[:, -1:] - cumulative), k, v)
    if initial_state is not None:
        total = cumulative[:, -1] if length else torch.zeros(q.shape[1], dtype=q.dtype)
        final = final + torch.exp(total)[:, None, None] * initial_state
    return output, final


def reference(q, k, v, log_decay, scale, delay, offsets, initial_state):
    batch, length, heads, _ = q.shape
    flat = [x.reshape(batch * length, *x.shape[2:]) for x in (q, k, v)]
    if log_decay is None:
        g = q.new_zeros(batch * length, heads)
    elif log_decay.dim() == 1:
        g = log_decay.expand(batch * length, heads)
    else:
        g = log_decay.reshape(batch * length, heads)
    outputs, finals = [], []
    for index, (start, end) in enumerate(zip(offsets, offsets[1:])):
        state = None if initial_state is None else initial_state[index]
        output, final = dense_document(*(x[start:end] for x in flat), g[start:end], scale, delay, state)
        outputs.append(output)
        finals.append(final)
    return torch.cat(outputs).reshape(batch, length, heads, -1), torch.stack(finals)


def make_case(batch, length, heads, key_dim, value_dim, decay, documents, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    tensors = dict(q=rand(batch, length, heads, key_dim), k=rand(batch, length, heads, key_dim),
                   v=rand(batch, length, heads, value_dim))
    if decay == "constant":
        tensors["log_decay"] = -torch.rand(heads, generator=generator, dtype=torch.float64) * 0.5 - 0.05
    elif decay == "token":
        tensors["log_decay"] = torch.nn.functional.logsigmoid(rand(batch, length, heads) + 1.5)
    tensors["initial_state"] = rand(documents, heads, key_dim, value_dim)
    gradients = dict(output=rand(batch, length, heads, value_dim), final=rand(documents, heads, key_dim, value_dim))
    return tensors, gradients


def run(function, tensors, gradients, dtype):
    """Output, final state and every input gradient by name; gates and states stay fp32 next to fp32 q, k, v."""

    def named(**leaves):
        output, final = function(**leaves)
        return {"output": output, "final": final}

    kept = {} if dtype == torch.float64 else {name: torch.float32 for name in tensors if name not in ("q", "k", "v")}
    return outputs_and_gradients(named, tensors, gradients, dtype, kept)


def compare(backend, tensors, gradients, delay, offsets, label):
    dtype = torch.float32 if backend == "triton" else torch.float64
    tolerance = 1e-5 if backend == "triton" else 1e-11
    scale = 0.4
    cu_seqlens = None if offsets is None else torch.tensor(offsets, dtype=torch.int32)
    batch, length = tensors["q"].shape[:2]
    reference_offsets = offsets or [row * length for row in range(batch + 1)]

    def expected_function(q, k, v, log_decay=None, initial_state=None):
        return reference(q, k, v, log_decay, scale, delay, reference_offsets, initial_state)

    def actual_function(q, k, v, log_decay=None, initial_state=None):
        return linear_attention(q, k, v, log_decay=log_decay, scale=scale, initial_state=initial_state,
                                output_final_state=True, backend=backend, delay=delay, cu_seqlens=cu_seqlens,
                                chunk_size=16)

    expected = run(expected_function, tensors, gradients, torch.float64)
    actual = run(actual_function, tensors, gradients, dtype)
    assert actual["output"].dtype == dtype
    assert_tensors_close(actual, expected, tolerance, label)


DELAY_CASES = [(backend, decay, delay) for backend in ("naive", "torch")
               for decay, delay in [("none", 1), ("constant", 5), ("token", 20), ("token", 40)]]  # 20 > a chunk; 40 > T
if TRITON_ON_CPU:  # the interpreter is slow: fewer cases, one batch row
    DELAY_CASES += [("triton", "token", 20)]


@pytest.mark.parametrize("backend, decay, delay", DELAY_CASES, ids=lambda value: str(value))
def test_delay_matches_reference(backend, decay, delay):
    batch = 1 if backend == "triton" else 2
    tensors, gradients = make_case(batch, 37, 1, 16, 16, decay, documents=batch)
    del tensors["initial_state"]  # not defined with delay > 0 (refused; see the error test)
    compare(backend, tensors, gradients, delay, None, f"{backend} delay={delay} {decay}")


def test_delay_zero_is_the_plain_op():
    tensors, _ = make_case(1, 20, 2, 8, 8, "token", documents=1)
    plain, plain_final = linear_attention(tensors["q"], tensors["k"], tensors["v"], log_decay=tensors["log_decay"],
                                          output_final_state=True)
    delayed, delayed_final = linear_attention(tensors["q"], tensors["k"], tensors["v"], log_decay=tensors["log_decay"],
                                              output_final_state=True, delay=0)
    assert torch.equal(plain, delayed) and torch.equal(plain_final, delayed_final)


# Two rows of 24 tokens: documents of 3, 2 (shorter than a chunk), 19 (crossing the 16-token chunk seam),
# 17 and 7 tokens; every row start (0, 24) is an offset.
OFFSETS = [0, 3, 5, 24, 41, 48]


DOCUMENT_CASES = [(backend, decay) for backend in ("naive", "torch") for decay in ("none", "constant", "token")]
if TRITON_ON_CPU:
    DOCUMENT_CASES += [("triton", "constant")]  # per-token decay: the chunk-seam test below


@pytest.mark.parametrize("backend, decay", DOCUMENT_CASES, ids=lambda value: str(value))
def test_documents_match_reference(backend, decay):
    heads, key_dim = (1, 16) if backend == "triton" else (2, 8)
    tensors, gradients = make_case(2, 24, heads, key_dim, 16, decay, documents=len(OFFSETS) - 1)
    compare(backend, tensors, gradients, 0, OFFSETS, f"{backend} documents {decay}")


@pytest.mark.parametrize("backend", ["naive", "torch"] + (["triton"] if TRITON_ON_CPU else []))
def test_documents_with_delay_match_reference(backend):
    """The delay never reaches across a document start: o_i = 0 while i − d is before i's document."""
    tensors, gradients = make_case(2, 24, 1, 16, 16, "token", documents=len(OFFSETS) - 1)
    del tensors["initial_state"]
    compare(backend, tensors, gradients, 4, OFFSETS, f"{backend} documents delay=4")


def test_one_document_per_row_equals_no_documents():
    tensors, _ = make_case(2, 24, 2, 8, 8, "token", documents=2)
    arguments = dict(log_decay=tensors["log_decay"], initial_state=tensors["initial_state"], output_final_state=True)
    plain = linear_attention(tensors["q"], tensors["k"], tensors["v"], **arguments)
    packed = linear_attention(tensors["q"], tensors["k"], tensors["v"], **arguments,
                              cu_seqlens=torch.tensor([0, 24, 48], dtype=torch.int64))
    assert_tensors_close(dict(zip(("output", "final"), packed)), dict(zip(("output", "final"), plain)), 1e-12)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(cu_seqlens=torch.tensor([0, 5, 40])), "end at B·T"),
        (dict(cu_seqlens=torch.tensor([0, 30, 48])), "every row start"),
        (dict(cu_seqlens=torch.tensor([0, 30, 24, 48])), "non-decreasing"),
        (dict(cu_seqlens=torch.tensor([0.0, 24.0, 48.0])), "int32/int64"),
        (dict(cu_seqlens=torch.tensor([0, 24, 48]), initial_state=torch.zeros(2, 1, 8, 8)), "documents"),
        (dict(delay=3, initial_state=torch.zeros(2, 1, 8, 8)), "initial_state with delay"),
        (dict(delay=1.5), "delay must be an int"),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_bad_documents_and_delay_raise_clear_errors(change, message):
    q = torch.randn(2, 24, 1, 16)
    with pytest.raises((ValueError, TypeError), match=message):
        linear_attention(q, q, q, **change)


@pytest.mark.skipif(not TRITON_ON_CPU, reason="needs triton (run with TRITON_INTERPRET=1)")
def test_triton_documents_empty_and_chunk_aligned():
    """Triton with an empty document, one exactly one chunk long and boundaries on chunk seams; the chunk
    table has more slots than chunks (the spare programs must write nothing: buffers are NaN-poisoned)."""
    offsets = [0, 16, 16, 32, 33, 40]
    tensors, gradients = make_case(1, 40, 1, 16, 16, "token", documents=len(offsets) - 1)
    compare("triton", tensors, gradients, 0, offsets, "triton documents on chunk seams")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("delay", [0, 7], ids=["no-delay", "delay-7"])
def test_triton_documents_on_gpu(dtype, delay):
    """Compiled kernels (autotuned) with packed documents and a delay, against the float64 reference."""
    offsets = [0, 5, 300, 1024, 1024 + 64, 2048]
    tensors, gradients = make_case(2, 1024, 2, 64, 128, "token", documents=len(offsets) - 1, seed=9)
    scale = 64**-0.5
    cu_seqlens = torch.tensor(offsets, dtype=torch.int32, device="cuda")
    case = {name: value.cuda() for name, value in tensors.items() if name != "initial_state" or delay == 0}
    expected = run(lambda **leaves: reference(*(leaves[n] for n in ("q", "k", "v", "log_decay")), scale, delay,
                                              offsets, leaves.get("initial_state")),
                   {n: x.cpu() for n, x in case.items()}, gradients, torch.float64)
    actual = run(lambda **leaves: linear_attention(
        leaves["q"], leaves["k"], leaves["v"], log_decay=leaves["log_decay"], scale=scale,
        initial_state=leaves.get("initial_state"), output_final_state=True, backend="triton", delay=delay,
        cu_seqlens=cu_seqlens), case, {n: x.cuda() for n, x in gradients.items()}, dtype)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert_tensors_close({name: value.cpu() for name, value in actual.items()}, expected, tolerance, f"{dtype}")


@pytest.mark.parametrize("backend", ["torch"] + (["triton"] if TRITON_ON_CPU else []))
def test_split_forward_backward_with_documents(backend):
    """linear_attention_fwd / _bwd with cu_seqlens (what context parallelism with documents calls)."""
    from spindle.kernels.linear_attn import linear_attention_bwd, linear_attention_fwd

    tensors, gradients = make_case(2, 24, 1, 16, 16, "token", documents=len(OFFSETS) - 1, seed=4)
    scale = 0.4
    expected = run(lambda **leaves: reference(*(leaves[n] for n in ("q", "k", "v", "log_decay")), scale, 0, OFFSETS,
                                              leaves["initial_state"]), tensors, gradients, torch.float64)
    dtype = torch.float32 if backend == "triton" else torch.float64
    cast = {name: value.to(dtype) for name, value in tensors.items()}
    output, final, residuals = linear_attention_fwd(
        cast["q"], cast["k"], cast["v"], log_decay=cast["log_decay"], scale=scale, initial_state=cast["initial_state"],
        output_final_state=True, backend=backend, cu_seqlens=torch.tensor(OFFSETS), chunk_size=16,
    )
    grads = linear_attention_bwd(gradients["output"].to(dtype), gradients["final"].to(dtype), residuals)
    names = ["grad_q", "grad_k", "grad_v", "grad_log_decay", "grad_initial_state"]
    actual = {"output": output, "final": final, **dict(zip(names, grads))}
    assert_tensors_close(actual, expected, 1e-5 if backend == "triton" else 1e-11, backend)
