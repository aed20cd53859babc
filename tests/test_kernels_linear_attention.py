"""spindle.kernels.linear_attention against an independent float64 dense reference (docs/algorithms.md §1, §7).

The reference below is the parallel form O = scale·((Q Kᵀ) ⊙ D) V plus the initial-state term, written
without the recurrence; its gradients come from autograd in float64. Every backend is checked for the
output, the final state and the gradients of q, k, v, log_decay and initial_state (with a random
final-state gradient). Without a GPU the triton backend runs on CPU under TRITON_INTERPRET=1 (set
before triton is imported by this process), at tiny shapes.
"""

import math
import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    # CPU tensors run the Triton kernels in the interpreter; must precede the first `import triton`
    # (spindle imports triton lazily). On a GPU machine the kernels compile for the GPU instead.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from numerics import (
    HALF_PRECISION_TOLERANCE,
    TOLERANCE,
    assert_tensors_close,
    nan_poisoned_allocations,
    outputs_and_gradients,
    relative_error,
    tensor_errors,
)

from spindle.kernels import linear_attention
from spindle.kernels.linear_attn import triton_available

FP32_TOLERANCE = TOLERANCE[torch.float32]  # relative error vs float64, docs/algorithms.md §7
TRITON_ON_CPU = triton_available(torch.device("cpu"))
needs_triton = pytest.mark.skipif(not TRITON_ON_CPU, reason="needs triton (run with TRITON_INTERPRET=1)")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def nan_poisoned():
    """Every buffer allocated with torch.empty & co. starts NaN-filled (the Triton path allocates its outputs,
    states and gradients that way): an element a kernel fails to write shows up as NaN."""
    with nan_poisoned_allocations():
        yield


def dense_reference(q, k, v, log_decay, scale, initial_state):
    """Parallel form in float64: o_i = scale·Σ_{j≤i} e^{G_i−G_j}(q_i·k_j) v_j + scale·e^{G_i} q_i S_0."""
    batch, length, heads, _ = q.shape
    if log_decay is None:
        cumulative = q.new_zeros(batch, length, heads)
    else:
        g = log_decay if log_decay.dim() == 3 else log_decay.expand(batch, length, heads)
        cumulative = g.cumsum(1)
    cumulative = cumulative.transpose(1, 2)  # [B, H, T]
    rows = torch.arange(length)[:, None]
    visible = torch.arange(length)[None, :] <= rows
    difference = cumulative[..., :, None] - cumulative[..., None, :]
    weights = torch.exp(torch.where(visible, difference, torch.full_like(difference, float("-inf"))))
    scores = torch.einsum("bihd,bjhd->bhij", q, k) * weights
    output = scale * torch.einsum("bhij,bjhe->bihe", scores, v)
    output = output + scale * torch.einsum("bhi,bihd,bhde->bihe", torch.exp(cumulative), q, initial_state)
    total = cumulative[..., -1]  # G_T, [B, H]
    key_weights = torch.exp(total[..., None] - cumulative)  # [B, H, T]
    final = torch.exp(total)[..., None, None] * initial_state
    final = final + torch.einsum("bhj,bjhd,bjhe->bhde", key_weights, k, v)
    return output, final


def make_inputs(batch, length, heads, key_dim, value_dim, decay, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    q, k, v = rand(batch, length, heads, key_dim), rand(batch, length, heads, key_dim), rand(batch, length, heads, value_dim)
    if decay == "none":
        log_decay = None
    elif decay == "constant":
        log_decay = -torch.rand(heads, generator=generator, dtype=torch.float64) * 0.5 - 0.01
    elif decay == "token":
        log_decay = torch.nn.functional.logsigmoid(rand(batch, length, heads) + 2.0)
    elif decay == "strong":
        log_decay = torch.full((batch, length, heads), -5.0, dtype=torch.float64)
    initial_state = rand(batch, heads, key_dim, value_dim)
    grad_output = rand(batch, length, heads, value_dim)
    grad_final = rand(batch, heads, key_dim, value_dim)
    return dict(q=q, k=k, v=v, log_decay=log_decay, initial_state=initial_state), grad_output, grad_final


def reference_function(scale):
    """The dense float64 form as a function of named leaves, returning the named outputs."""

    def reference(q, k, v, log_decay, initial_state):
        output, final = dense_reference(q, k, v, log_decay, scale, initial_state)
        return {"output": output, "final_state": final}

    return reference


def kernel_function(backend, **options):
    """linear_attention with `backend` as a function of named leaves, returning the named outputs."""

    def kernel(q, k, v, log_decay, initial_state):
        output, final = linear_attention(q, k, v, log_decay=log_decay, initial_state=initial_state,
                                         output_final_state=True, backend=backend, **options)
        return {"output": output, "final_state": final}

    return kernel


def run_with_gradients(function, inputs, grad_output, grad_final, dtype):
    """function on copies of inputs cast to dtype: output, final state and every input gradient, by name.
    States and gates stay fp32 next to half-precision q, k, v (as a model computes them)."""
    kept = {} if dtype == torch.float64 else {"initial_state": torch.float32, "log_decay": torch.float32}
    return outputs_and_gradients(function, inputs, {"output": grad_output, "final_state": grad_final}, dtype, kept)


def check_against_reference(backend, shape, decay, dtype=torch.float32, tolerance=FP32_TOLERANCE, **kwargs):
    """Output, final state and the gradients of q, k, v, log_decay and initial_state, each within
    `tolerance` (relative error) of the float64 dense form."""
    inputs, grad_output, grad_final = make_inputs(*shape, decay)
    expected = run_with_gradients(reference_function(shape[3] ** -0.5), inputs, grad_output, grad_final, torch.float64)
    actual = run_with_gradients(kernel_function(backend, **kwargs), inputs, grad_output, grad_final, dtype)
    assert actual["output"].dtype == dtype
    assert actual["final_state"].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_tensors_close(actual, expected, tolerance, f"{backend} {decay} {shape}")


@pytest.mark.parametrize("length", [1, 17, 65, 130])
@pytest.mark.parametrize("decay", ["none", "constant", "token", "strong"])
def test_torch_backend_matches_reference(length, decay):
    check_against_reference("torch", (2, length, 2, 32, 48), decay)


@pytest.mark.parametrize("length", [1, 17, 65])
@pytest.mark.parametrize("decay", ["none", "constant", "token", "strong"])
def test_naive_backend_matches_reference(length, decay):
    check_against_reference("naive", (1, length, 2, 32, 48), decay)


@pytest.mark.parametrize("backend", ["naive", "torch"])
@pytest.mark.parametrize("head_dim", [48, 64])
def test_pytorch_backends_head_dims(backend, head_dim):
    check_against_reference(backend, (1, 33 if backend == "naive" else 70, 2, head_dim, head_dim), "token")


def test_torch_backend_float64_is_exact():
    check_against_reference("torch", (1, 130, 2, 16, 16), "token", dtype=torch.float64, tolerance=1e-12)


@needs_triton
@pytest.mark.parametrize(
    "length, decay, key_dim, value_dim",
    [(1, "token", 16, 16), (33, "constant", 48, 24), (40, "strong", 16, 32),
     (20, "token", 96, 192),  # several key and value blocks per head, padded
     (21, "constant", 80, 80), (19, "token", 256, 16), (18, "none", 16, 256)],
    ids=lambda value: str(value),
)
def test_triton_matches_reference(length, decay, key_dim, value_dim, monkeypatch):
    from spindle.kernels.linear_attn import triton_chunk

    # 16-token chunks, so that these short sequences span several chunks and a masked tail
    monkeypatch.setattr(triton_chunk, "DEFAULT_CHUNK_SIZE", 16)
    check_against_reference("triton", (1, length, 1, key_dim, value_dim), decay)


@needs_triton
def test_triton_recomputed_states_match_reference():
    """recompute_states=True: the backward recomputes the chunk states instead of keeping them."""
    check_against_reference("triton", (2, 35, 1, 32, 16), "token", chunk_size=16, recompute_states=True)


@needs_triton
def test_triton_default_chunk_awkward_length():
    check_against_reference("triton", (1, 130, 1, 16, 16), "token")


@needs_triton
def test_triton_leaves_no_nan_and_needs_no_state():
    """Outputs and gradients start NaN-filled inside the kernel path; none may survive (tail length 23)."""
    q, k, v = (torch.randn(1, 23, 1, 16, requires_grad=True) for _ in range(3))
    output, final = linear_attention(q, k, v, output_final_state=False, backend="triton")
    assert final is None
    output.sum().backward()
    for tensor in (output, q.grad, k.grad, v.grad):
        assert torch.isfinite(tensor).all()


@pytest.mark.parametrize("backend", ["torch"] + (["triton"] if TRITON_ON_CPU else []))
def test_state_passing_equals_one_call(backend):
    """Running two halves with the first half's final state as the second's initial state (what CP does)."""
    inputs, _, _ = make_inputs(1, 40, 2, 16, 16, "token")
    q, k, v, g = (inputs[name].float() for name in ("q", "k", "v", "log_decay"))
    full, full_state = linear_attention(q, k, v, log_decay=g, output_final_state=True, backend=backend)
    first, state = linear_attention(q[:, :19], k[:, :19], v[:, :19], log_decay=g[:, :19], output_final_state=True, backend=backend)
    second, last_state = linear_attention(
        q[:, 19:], k[:, 19:], v[:, 19:], log_decay=g[:, 19:], initial_state=state, output_final_state=True, backend=backend
    )
    assert_tensors_close({"output": torch.cat([first, second], 1), "final_state": last_state},
                         {"output": full, "final_state": full_state}, FP32_TOLERANCE, backend)


def test_empty_sequence_passes_state_through():
    q = torch.zeros(1, 0, 2, 8)
    state = torch.randn(1, 2, 8, 8)
    output, final = linear_attention(q, q, q, initial_state=state, output_final_state=True)
    assert output.shape == (1, 0, 2, 8) and torch.equal(final, state)


def test_constant_decay_gradient_reaches_head_tensor():
    q, k, v = (torch.randn(1, 9, 3, 8) for _ in range(3))
    decay = torch.tensor([-0.1, -0.5, -1.0], requires_grad=True)
    output, _ = linear_attention(q, k, v, log_decay=decay, backend="torch")
    output.square().sum().backward()
    per_token = decay.detach().expand(1, 9, 3).clone().requires_grad_()
    reference, _ = linear_attention(q, k, v, log_decay=per_token, backend="naive")
    reference.square().sum().backward()
    assert decay.grad.shape == (3,)
    assert relative_error(decay.grad, per_token.grad.sum((0, 1))) < FP32_TOLERANCE


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(k=torch.randn(1, 5, 2, 16)), "k must have the shape of q"),
        (dict(v=torch.randn(1, 6, 2, 8)), "v must be"),
        (dict(q=torch.randn(5, 2, 8)), "q must be 4-D"),
        (dict(log_decay=torch.full((1, 4, 2), 0.5)), "log_decay must be <= 0"),
        (dict(log_decay=torch.tensor([-0.1, float("nan")])), "log_decay must be <= 0 and not NaN"),
        (dict(delay=-1), "delay must be"),
        (dict(delay=2, initial_state=torch.zeros(1, 2, 8, 8)), "initial_state with delay"),
        (dict(log_decay=torch.zeros(3)), "log_decay must be"),
        (dict(initial_state=torch.zeros(1, 2, 8, 4)), "initial_state must be"),
        (dict(backend="cuda-magic"), "unknown backend"),
        (dict(q=torch.zeros(1, 4, 2, 8, dtype=torch.int32)), "q has dtype"),
        (dict(v=torch.randn(1, 4, 2, 8, dtype=torch.float64)), "share one dtype"),
        (dict(scale="big"), "scale must be"),
    ],
)
def test_bad_inputs_raise_clear_errors(change, message):
    arguments = dict(q=torch.randn(1, 4, 2, 8), k=torch.randn(1, 4, 2, 8), v=torch.randn(1, 4, 2, 8))
    arguments.update(change)
    q, k, v = arguments.pop("q"), arguments.pop("k"), arguments.pop("v")
    with pytest.raises((ValueError, TypeError), match=message):
        linear_attention(q, k, v, **arguments)


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q = torch.randn(1, 4, 1, 16)
    with pytest.raises(ValueError, match="backend='triton'"):
        linear_attention(q, q, q, backend="triton")


def test_triton_rejects_unsupported_head_dim():
    if not TRITON_ON_CPU:
        pytest.skip("needs triton (run with TRITON_INTERPRET=1)")
    q = torch.randn(1, 4, 1, 8)
    with pytest.raises(ValueError, match="head_dim"):
        linear_attention(q, q, q, backend="triton")


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("decay", ["none", "constant", "token"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_triton_bf16_on_gpu(decay, head_dim):
    """bf16 at a realistic shape: error <= 5e-3 and <= 2x the plain PyTorch bf16 computation's error."""
    inputs, grad_output, grad_final = make_inputs(2, 2048, 4, head_dim, head_dim, decay)
    cuda = {name: (value.cuda() if value is not None else None) for name, value in inputs.items()}
    assert_half_precision_quality(cuda, grad_output.cuda(), grad_final.cuda(), head_dim**-0.5, torch.bfloat16)


def assert_half_precision_quality(inputs, grad_output, grad_final, scale, dtype):
    """The Triton kernel in `dtype`: output, final state and every input gradient within 5e-3 of float64 and
    within 2x the error of the plain PyTorch evaluation of the parallel form in `dtype`, tensor by tensor."""
    reference = reference_function(scale)

    def plain(**leaves):
        return reference(**{name: (value.to(dtype) if value is not None else None) for name, value in leaves.items()})

    expected = run_with_gradients(reference, inputs, grad_output, grad_final, torch.float64)
    actual = run_with_gradients(kernel_function("triton"), inputs, grad_output, grad_final, dtype)
    baseline = run_with_gradients(plain, inputs, grad_output, grad_final, dtype)
    limits = {name: min(HALF_PRECISION_TOLERANCE, 2 * error) for name, error in tensor_errors(baseline, expected).items()}
    assert_tensors_close(actual, expected, limits, f"triton {dtype} (limits: 2x plain {dtype}, at most 5e-3)")


@needs_triton
def test_triton_float16_on_interpreter(monkeypatch):
    """The half-precision kernel path (tensor-core dots, fp32 state) on CPU. The interpreter computes
    fp16 dots correctly but not bf16 ones (Triton 3.9 returns garbage for a bf16 tl.dot when interpreted),
    so bf16 itself is covered by the GPU-marked test."""
    from spindle.kernels.linear_attn import triton_chunk

    monkeypatch.setattr(triton_chunk, "DEFAULT_CHUNK_SIZE", 16)
    inputs, grad_output, grad_final = make_inputs(1, 40, 2, 32, 32, "token")
    assert_half_precision_quality(inputs, grad_output, grad_final, 32**-0.5, torch.float16)


# ------------------------------------------------------------------------------ chunk-parallel launch grids


@needs_triton
def test_triton_launch_grids_grow_with_length(monkeypatch):
    """At B = H = 1, T = 4096 some forward and some backward launch has >= T/64 programs (one per chunk).

    Every kernel launch of the Triton backend is intercepted and its grid recorded (with the interpreter's
    block sizes) instead of run: interpreting 4096 tokens would take a minute, and the kernels' results are
    checked by the other tests."""
    from spindle.kernels.linear_attn import triton_chunk

    launches: list[tuple[str, int]] = []

    class Recording:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            shape = grid({"BK": 64, "BV": 64}) if callable(grid) else grid
            launches.append((self.name, math.prod(shape)))
            return lambda *args, **kwargs: None

    names = ["_chunk_states_kernel", "_chunk_output_kernel", "_chunk_state_grads_kernel", "_chunk_dqk_kernel",
             "_chunk_dv_kernel"]
    for name in names:
        monkeypatch.setattr(triton_chunk, name, Recording(name))
    length = 4096
    q, k, v = (torch.randn(1, length, 1, 64, requires_grad=True) for _ in range(3))
    log_decay = torch.full((1, length, 1), -0.01, requires_grad=True)
    output, _ = linear_attention(q, k, v, log_decay=log_decay, backend="triton")
    forward_launches = dict(launches)
    launches.clear()
    output.backward(torch.ones_like(output))
    backward_launches = dict(launches)
    assert set(forward_launches) == {"_chunk_states_kernel", "_chunk_output_kernel"}
    assert set(backward_launches) == {"_chunk_state_grads_kernel", "_chunk_dqk_kernel", "_chunk_dv_kernel"}
    assert max(forward_launches.values()) >= length // 64, forward_launches
    assert max(backward_launches.values()) >= length // 64, backward_launches
    # only the d_k x d_v state chains are serial: one program per (batch·head, state block) at this size
    assert forward_launches["_chunk_states_kernel"] == backward_launches["_chunk_state_grads_kernel"] == 1


# ------------------------------------------------------------------------------ split forward / backward


SPLIT_CASES = [("naive", "token", True), ("torch", "constant", True), ("torch", "token", False)]
if TRITON_ON_CPU:
    SPLIT_CASES += [("triton", "token", False)]  # with a final-state gradient: every autograd test above


@pytest.mark.parametrize("backend, decay, with_final_gradient", SPLIT_CASES, ids=lambda value: str(value))
def test_split_forward_backward_match_reference(backend, decay, with_final_gradient):
    """linear_attention_fwd / linear_attention_bwd (what LASP calls) against the float64 dense reference."""
    from spindle.kernels.linear_attn import linear_attention_bwd, linear_attention_fwd

    shape = (2, 37, 1, 16, 24)
    inputs, grad_output, grad_final = make_inputs(*shape, decay)
    if not with_final_gradient:
        grad_final = torch.zeros_like(grad_final)
    scale = 0.3
    expected = run_with_gradients(reference_function(scale), inputs, grad_output, grad_final, torch.float64)
    dtype = torch.float32 if backend == "triton" else torch.float64
    cast = {name: value.to(dtype) for name, value in inputs.items()}
    output, final, residuals = linear_attention_fwd(
        cast["q"], cast["k"], cast["v"], log_decay=cast["log_decay"], scale=scale,
        initial_state=cast["initial_state"], output_final_state=True, backend=backend, chunk_size=16,
    )
    grads = linear_attention_bwd(grad_output.to(dtype), grad_final.to(dtype) if with_final_gradient else None, residuals)
    names = ["grad_q", "grad_k", "grad_v", "grad_log_decay", "grad_initial_state"]
    actual = {"output": output, "final_state": final, **dict(zip(names, grads))}
    assert_tensors_close(actual, expected, FP32_TOLERANCE if dtype == torch.float32 else 1e-12, backend)


# ------------------------------------------------------------------------------ backend switch


def test_force_backend_and_environment_variable(monkeypatch):
    from spindle.kernels.linear_attn import BACKEND_ENVIRONMENT_VARIABLE, force_backend, resolve_backend

    q = torch.randn(1, 4, 1, 16)
    monkeypatch.delenv(BACKEND_ENVIRONMENT_VARIABLE, raising=False)
    assert resolve_backend("auto", q, q) == "torch"
    with force_backend("naive"):
        assert resolve_backend("auto", q, q) == "naive"
        assert resolve_backend("torch", q, q) == "torch"  # an explicit choice wins
    assert resolve_backend("auto", q, q) == "torch"
    monkeypatch.setenv(BACKEND_ENVIRONMENT_VARIABLE, "naive")
    assert resolve_backend("auto", q, q) == "naive"
    with force_backend("torch"):
        assert resolve_backend("auto", q, q) == "torch"  # the context manager wins over the variable
    monkeypatch.setenv(BACKEND_ENVIRONMENT_VARIABLE, "fastest")
    with pytest.raises(ValueError, match=BACKEND_ENVIRONMENT_VARIABLE):
        resolve_backend("auto", q, q)
    with pytest.raises(ValueError, match="unknown linear-attention backend"):
        with force_backend("fastest"):
            pass


@pytest.mark.parametrize("forced", ["torch"] + (["triton"] if TRITON_ON_CPU else []))
def test_auto_backend_driven_both_ways(forced, monkeypatch):
    """backend="auto" under force_backend runs the forced path (checked by its result and its launches)."""
    from spindle.kernels.linear_attn import force_backend, triton_chunk

    calls = []
    original = triton_chunk.triton_forward
    monkeypatch.setattr(triton_chunk, "triton_forward", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    with force_backend(forced):
        check_against_reference("auto", (1, 70, 1, 16, 16), "token")
    assert bool(calls) == (forced == "triton")


# ------------------------------------------------------------------------------ decay values


def _available_backends():
    return ["naive", "torch"] + (["triton"] if TRITON_ON_CPU else [])


@pytest.mark.parametrize("backend", _available_backends())
@pytest.mark.parametrize("kind", ["token", "constant"])
def test_minus_inf_log_decay_is_a_reset(backend, kind):
    """g = -inf means a decay factor 0: the state restarts. Outputs after it equal a fresh run from there,
    gradients are finite, and the -inf entries get a zero gradient."""
    dtype = torch.float32 if backend == "triton" else torch.float64
    tolerance = FP32_TOLERANCE if backend == "triton" else 1e-12
    inputs, grad_output, _ = make_inputs(1, 40, 2, 16, 16, "token", seed=3)
    if backend == "triton" and kind == "token":
        inputs = {name: value[:, :, :1] if value is not None else None for name, value in inputs.items()}
        grad_output = grad_output[:, :, :1]
    q, k, v = (inputs[name].to(dtype) for name in ("q", "k", "v"))
    if kind == "token":
        log_decay = inputs["log_decay"].to(dtype).clone()
        log_decay[:, 21] = float("-inf")
    else:
        log_decay = torch.tensor([-0.2, float("-inf")], dtype=dtype)
    log_decay.requires_grad_()
    output, final = linear_attention(q, k, v, log_decay=log_decay, output_final_state=True, backend=backend,
                                     chunk_size=16)
    (output.double() * grad_output).sum().backward()
    assert torch.isfinite(output).all() and torch.isfinite(final).all() and torch.isfinite(log_decay.grad).all()
    if kind == "token":
        assert (log_decay.grad[:, 21] == 0).all()
        fresh, fresh_final = linear_attention(q[:, 21:], k[:, 21:], v[:, 21:], log_decay=log_decay.detach()[:, 21:],
                                              output_final_state=True, backend="naive")
        assert_tensors_close({"output after the reset": output[:, 21:], "final_state": final},
                             {"output after the reset": fresh, "final_state": fresh_final}, tolerance, backend)
    else:
        assert log_decay.grad[1] == 0
        # head 1 forgets everything: each output sees only its own key
        own = (q[:, :, 1] * k[:, :, 1]).sum(-1, keepdim=True) * v[:, :, 1] * 16**-0.5
        assert relative_error(output[:, :, 1], own) <= tolerance


@pytest.mark.parametrize("backend", _available_backends())
@pytest.mark.parametrize("bad", [float("nan"), 0.25], ids=["nan", "positive"])
def test_nan_and_positive_log_decay_are_refused_on_every_backend(backend, bad):
    q = torch.randn(1, 8, 2, 16)
    log_decay = torch.full((1, 8, 2), -0.1)
    log_decay[0, 5, 1] = bad
    with pytest.raises(ValueError, match="log_decay must be <= 0 and not NaN"):
        linear_attention(q, q, q, log_decay=log_decay, backend=backend)
    with pytest.raises(ValueError, match="log_decay must be <= 0 and not NaN"):
        linear_attention(q, q, q, log_decay=torch.tensor([-0.1, bad]), backend=backend)


@needs_cuda
@pytest.mark.gpu
def test_positive_log_decay_on_cuda_stops_on_the_device():
    """CUDA tensors are checked on the device (no host sync per call): a positive value raises at the next
    synchronization. Run in a subprocess, since a device-side assert ends the CUDA context."""
    script = (
        "import torch\n"
        "from spindle.kernels import linear_attention\n"
        "q = torch.randn(1, 64, 1, 64, device='cuda')\n"
        "linear_attention(q, q, q, log_decay=torch.full((1,), 0.5, device='cuda'))\n"
        "torch.cuda.synchronize()\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "log_decay must be <= 0" in result.stderr, result.stderr[-2000:]
