"""Public entry points for linear attention: argument checks, backend choice, split forward/backward.

Layering (as in fla): `linear_attention_fwd` / `linear_attention_bwd` are plain functions that
context parallelism (LASP-1/LASP-2) calls directly; a small autograd.Function wraps them for the
Triton backend; `linear_attention` is the documented op with the extras (`delay`, `cu_seqlens`).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os

import torch
import torch.nn.functional as F

from ..backend_switch import BackendSwitch
from ..shapes import check_qkv, shapes_only
from .chunked import linear_attention_chunked
from .naive import linear_attention_naive

BACKENDS = ("auto", "triton", "torch", "naive")
BACKEND_ENVIRONMENT_VARIABLE = "SPINDLE_LINEAR_ATTN_BACKEND"
# log-decay values below this act as this (a factor e^-30 ≈ 1e-13 per token: the state is forgotten).
# It gives -inf ("reset") a meaning on every path; finite chunk-local cumulative sums keep the kernels' exp
# differences free of inf - inf.
LOG_DECAY_FLOOR = -30.0
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TRITON_HEAD_DIMS = (16, 256)
# backend -> kernel forwards run so far (a Python count, no sync): tests read it to see, e.g., that a
# checkpointed layer runs its kernel twice (forward and recompute), not more
kernel_forwards: collections.Counter[str] = collections.Counter()


def triton_available(device: torch.device) -> bool:
    """Triton runs on CUDA devices, and on CPU tensors under the interpreter (TRITON_INTERPRET=1)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1"


_switch = BackendSwitch(BACKENDS, BACKEND_ENVIRONMENT_VARIABLE, "linear-attention backend")


def force_backend(name: str) -> contextlib.AbstractContextManager[None]:
    """Within the block, backend="auto" resolves to `name` (so does SPINDLE_LINEAR_ATTN_BACKEND, with lower
    precedence). An explicit backend= argument still wins."""
    return _switch.force(name)


# --------------------------------------------------------------------------------------------- checks


def _check_tensors(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    check_qkv("linear_attention", q, k, v)
    if k.shape != q.shape:
        raise ValueError(f"linear_attention: k must have the shape of q {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"linear_attention: v must be [batch, seq, heads, value_dim] = {tuple(q.shape[:3])} + [Dv], "
            f"got {tuple(v.shape)}"
        )


def check_log_decay_values(log_decay: torch.Tensor, caller: str = "linear_attention") -> None:
    """log_decay must be <= 0 and not NaN (-inf is allowed: a full reset of the state).

    CPU tensors raise a ValueError at once. CUDA tensors are checked on the device (torch._assert_async): a
    bad value stops the program with this message at the next synchronization, with no host sync per call.
    """
    message = (
        f"{caller}: log_decay must be <= 0 and not NaN (it is the log of a decay factor in [0, 1]; -inf "
        "means a full reset). Compute it as e.g. -softplus(x) or logsigmoid(x)."
    )
    if shapes_only(log_decay):  # no values to check (the planner's meta run)
        return
    valid = log_decay.detach() <= 0  # False for NaN and positive values
    if log_decay.device.type == "cpu":
        if not bool(valid.all()):
            bad = log_decay.detach()[~valid].flatten()[0].item()
            raise ValueError(f"{message} Got {bad!r}.")
    else:
        torch._assert_async(valid.all(), message)


def floor_log_decay(log_decay: torch.Tensor | None) -> torch.Tensor | None:
    """Values below LOG_DECAY_FLOOR (incl. -inf) act as the floor; their gradient is zero."""
    return None if log_decay is None else log_decay.clamp(min=LOG_DECAY_FLOOR)


def _check_log_decay(log_decay: torch.Tensor | None, q: torch.Tensor, allow_token: bool = True) -> None:
    if log_decay is None:
        return
    batch, length, heads, _ = q.shape
    if not isinstance(log_decay, torch.Tensor):
        raise TypeError(f"linear_attention: log_decay must be a torch.Tensor or None, got {type(log_decay).__name__}")
    if not log_decay.is_floating_point():
        raise TypeError(f"linear_attention: log_decay must be a floating tensor, got {log_decay.dtype}")
    if log_decay.device != q.device:
        raise ValueError(f"linear_attention: log_decay is on {log_decay.device}, q on {q.device}")
    if tuple(log_decay.shape) not in ((heads,), (batch, length, heads)):
        raise ValueError(
            f"linear_attention: log_decay must be [heads] = [{heads}] (constant per head) or "
            f"[batch, seq, heads] = {[batch, length, heads]} (per token), got {tuple(log_decay.shape)}"
        )
    check_log_decay_values(log_decay)


def _check_state(name: str, state: torch.Tensor | None, expected: tuple[int, ...], q: torch.Tensor, what: str) -> None:
    if state is None:
        return
    if not isinstance(state, torch.Tensor):
        raise TypeError(f"linear_attention: {name} must be a torch.Tensor or None, got {type(state).__name__}")
    if tuple(state.shape) != expected:
        raise ValueError(f"linear_attention: {name} must be {what} = {list(expected)}, got {tuple(state.shape)}")
    if not state.is_floating_point():
        raise TypeError(f"linear_attention: {name} must be floating (fp32), got {state.dtype}")
    if state.device != q.device:
        raise ValueError(f"linear_attention: {name} is on {state.device}, q on {q.device}")


def _check_scale(scale: float | None, q: torch.Tensor) -> float:
    if scale is None:
        return q.shape[-1] ** -0.5
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise TypeError(f"linear_attention: scale must be a float or None, got {type(scale).__name__}")
    return float(scale)


def resolve_backend(backend: str, q: torch.Tensor, v: torch.Tensor) -> str:
    """"auto": a forced backend (force_backend, then SPINDLE_LINEAR_ATTN_BACKEND) if any, else triton for
    CUDA tensors it supports, else torch. An explicit choice is checked and kept."""
    if backend not in BACKENDS:
        raise ValueError(f"linear_attention: unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        forced = _switch.forced("linear_attention")
        if forced is None:
            low, high = TRITON_HEAD_DIMS
            usable = (
                q.device.type == "cuda" and q.dtype in _TRITON_DTYPES
                and low <= q.shape[-1] <= high and low <= v.shape[-1] <= high and triton_available(q.device)
            )
            return "triton" if usable else "torch"
        backend = forced
    if backend == "triton":
        _check_triton(q, v)
    return backend


def _check_triton(q: torch.Tensor, v: torch.Tensor) -> None:
    # shapes-only tensors (kernels/shapes.py) stand in for CUDA ones: nothing is launched for them
    if not triton_available(torch.device("cuda") if shapes_only(q) else q.device):
        raise ValueError(
            f"linear_attention: backend='triton' needs CUDA tensors or TRITON_INTERPRET=1 for CPU tensors "
            f"(and an installed triton); got a tensor on {q.device}. Use backend='torch'."
        )
    if q.dtype not in _TRITON_DTYPES:
        raise TypeError(f"linear_attention: backend='triton' supports float16/bfloat16/float32, got {q.dtype}")
    low, high = TRITON_HEAD_DIMS
    for name, dim in (("q/k head_dim", q.shape[-1]), ("v head_dim", v.shape[-1])):
        if not low <= dim <= high:
            raise ValueError(f"linear_attention: backend='triton' supports {name} in [{low}, {high}], got {dim}")


# --------------------------------------------------------------------------------------------- split fwd/bwd


@dataclasses.dataclass
class LinearAttentionResiduals:
    """What linear_attention_bwd needs from linear_attention_fwd (opaque to callers).

    Triton: the inputs (and the chunk states unless recompute_states). torch / naive: the autograd graph of
    the forward over detached leaves.
    """

    backend: str
    scale: float
    chunk_size: int | None
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    log_decay: torch.Tensor | None  # as given ([H] or [B, T, H]), before the floor
    initial_state: torch.Tensor | None
    states: torch.Tensor | None = None  # Triton chunk states, [chunks, H, Dk, Dv] fp32
    cu_seqlens: torch.Tensor | None = None  # Triton with packed documents (flattened [1, B·T] inputs)
    shapes: tuple | None = None  # the caller's q, v, log_decay shapes when the inputs were flattened
    graph: tuple | None = None  # torch / naive: (leaves, output, final_state)


def linear_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    log_decay: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    backend: str = "auto",
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int | None = None,
    recompute_states: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, LinearAttentionResiduals]:
    """Forward of linear attention without autograd: (o, final_state | None, residuals for the backward).

    Arguments and results as `linear_attention` (no delay). chunk_size: tokens per chunk (triton: a power of
    two >= 16, default 64; torch: default 64). recompute_states (triton): keep only the inputs and recompute
    the chunk states in the backward (saves B·H·⌈T/C⌉·Dk·Dv fp32 for one more pass).
    """
    _check_tensors(q, k, v)
    _check_log_decay(log_decay, q)
    batch, length, heads, key_dim = q.shape
    scale = _check_scale(scale, q)
    chosen = resolve_backend(backend, q, v)
    if cu_seqlens is None:
        _check_state("initial_state", initial_state, (batch, heads, key_dim, v.shape[-1]), q,
                     "[batch, heads, key_dim, value_dim]")
        return _forward(q, k, v, log_decay, scale, initial_state, output_final_state, chosen, chunk_size,
                        recompute_states)
    offsets = _check_cu_seqlens(cu_seqlens, batch, length, on_host=chosen != "triton")
    _check_state("initial_state", initial_state, (cu_seqlens.numel() - 1, heads, key_dim, v.shape[-1]), q,
                 "[documents, heads, key_dim, value_dim] with cu_seqlens")
    if chosen != "triton":
        residuals = LinearAttentionResiduals(chosen, scale, chunk_size, q, k, v, log_decay, initial_state)
        with torch.enable_grad():
            leaves = [None if x is None else x.detach().requires_grad_() for x in (q, k, v, log_decay, initial_state)]
            flat = [x.reshape(1, batch * length, *x.shape[2:]) for x in leaves[:3]]
            decay = leaves[3] if log_decay is None or log_decay.dim() == 1 else leaves[3].reshape(1, -1, heads)
            output, final_state = _document_loop(chosen, *flat, decay, scale, leaves[4], True, offsets, chunk_size)
            output = output.reshape(v.shape)
        residuals.graph = (leaves, output, final_state)
        return output.detach(), (final_state.detach() if output_final_state else None), residuals
    flat = [x.reshape(1, batch * length, *x.shape[2:]) for x in (q, k, v)]
    decay = log_decay if log_decay is None or log_decay.dim() == 1 else log_decay.reshape(1, -1, heads)
    output, final_state, residuals = _forward(
        *flat, decay, scale, initial_state, output_final_state, chosen, chunk_size, recompute_states,
        cu_seqlens.to(device=q.device, dtype=torch.int64),
    )
    residuals.shapes = (q.shape, v.shape, None if decay is None or log_decay.dim() == 1 else log_decay.shape)
    return output.reshape(v.shape), final_state, residuals


def _forward(q, k, v, log_decay, scale, initial_state, output_final_state, chosen, chunk_size, recompute_states,
             cu_seqlens=None):
    """cu_seqlens: triton only, with q, k, v (and a per-token decay) flattened to one row."""
    state_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    residuals = LinearAttentionResiduals(chosen, scale, chunk_size, q, k, v, log_decay, initial_state)
    floored = floor_log_decay(log_decay)
    if chosen == "triton":
        from . import triton_chunk

        chunk = triton_chunk.check_chunk_size(chunk_size or triton_chunk.DEFAULT_CHUNK_SIZE)
        residuals.chunk_size = chunk
        residuals.q, residuals.k, residuals.v = q.contiguous(), k.contiguous(), v.contiguous()
        residuals.log_decay = None if log_decay is None else log_decay.contiguous()
        residuals.initial_state = None if initial_state is None else initial_state.float().contiguous()
        residuals.cu_seqlens = cu_seqlens
        if q.shape[1] == 0:
            return _empty_forward(q, v, residuals.initial_state, output_final_state, state_dtype, residuals)
        kernel_forwards["triton"] += 1
        output, final_state, residuals.states = triton_chunk.triton_forward(
            residuals.q, residuals.k, residuals.v, None if floored is None else floored.contiguous(), scale,
            residuals.initial_state, chunk, keep_states=not recompute_states, cu_seqlens=cu_seqlens,
        )
        return output, (final_state if output_final_state else None), residuals
    if q.shape[1] == 0:
        return _empty_forward(q, v, initial_state, output_final_state, state_dtype, residuals)
    with torch.enable_grad():
        leaves = [None if x is None else x.detach().requires_grad_() for x in (q, k, v, log_decay, initial_state)]
        output, final_state = _autograd_backend(chosen, *leaves, scale, True, chunk_size)
    residuals.graph = (leaves, output, final_state)
    return output.detach(), (final_state.detach() if output_final_state else None), residuals


def _empty_forward(q, v, initial_state, output_final_state, state_dtype, residuals):
    residuals.backend = "empty"
    output = v.new_zeros(v.shape)
    if not output_final_state:
        return output, None, residuals
    if initial_state is None:
        return output, q.new_zeros(q.shape[0], q.shape[2], q.shape[3], v.shape[-1], dtype=state_dtype), residuals
    return output, initial_state.to(state_dtype), residuals


def _autograd_backend(chosen, q, k, v, log_decay, initial_state, scale, output_final_state, chunk_size):
    """torch / naive backends on tensors that may require grad (autograd does their backward)."""
    kernel_forwards[chosen] += 1
    full = floor_log_decay(log_decay)
    if full is not None and full.dim() == 1:
        full = full.view(1, 1, -1).expand(q.shape[0], q.shape[1], -1)  # an expand: [H] still gets its gradient
    if chosen == "naive":
        return linear_attention_naive(q, k, v, full, scale, initial_state, output_final_state)
    return linear_attention_chunked(q, k, v, full, scale, initial_state, output_final_state, chunk_size or 64)


def linear_attention_bwd(
    grad_output: torch.Tensor | None,
    grad_final_state: torch.Tensor | None,
    residuals: LinearAttentionResiduals,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Backward of linear_attention_fwd: (dq, dk, dv, dlog_decay, dinitial_state).

    grad_output: ∂L/∂o [B, T, H, Dv] or None (zero); grad_final_state: ∂L/∂S_T [B, H, Dk, Dv] or None.
    dq, dk, dv have the dtypes of q, k, v; dlog_decay the shape and dtype of the log_decay given to the
    forward ([H] or [B, T, H]; None without decay); dinitial_state that of initial_state (None without one).
    """
    r = residuals
    if r.backend == "empty":
        grad_initial = None
        if r.initial_state is not None:
            grad_initial = torch.zeros_like(r.initial_state) if grad_final_state is None else grad_final_state.to(
                r.initial_state.dtype)
        grad_decay = None if r.log_decay is None else torch.zeros_like(r.log_decay)
        return torch.zeros_like(r.q), torch.zeros_like(r.k), torch.zeros_like(r.v), grad_decay, grad_initial
    if r.backend == "triton":
        return _triton_backward(grad_output, grad_final_state, r)
    leaves, output, final_state = r.graph
    grad_output = torch.zeros_like(output) if grad_output is None else grad_output.to(output.dtype)
    roots, root_grads = [output], [grad_output]
    if grad_final_state is not None:
        roots.append(final_state)
        root_grads.append(grad_final_state.to(final_state.dtype))
    wanted = [leaf for leaf in leaves if leaf is not None]
    grads = iter(torch.autograd.grad(roots, wanted, root_grads, allow_unused=True))
    results = []
    for leaf in leaves:
        grad = None if leaf is None else next(grads)
        results.append(torch.zeros_like(leaf) if leaf is not None and grad is None else grad)
    return tuple(results)


def _triton_backward(grad_output, grad_final_state, r: LinearAttentionResiduals):
    from . import triton_chunk

    grad_output = torch.zeros_like(r.v) if grad_output is None else grad_output.to(r.v.dtype).reshape(r.v.shape)
    grad_output = grad_output.contiguous()
    if grad_final_state is not None:
        grad_final_state = grad_final_state.float().contiguous()
    floored = floor_log_decay(r.log_decay)
    grad_q, grad_k, grad_v, grad_decay, grad_initial = triton_chunk.triton_backward(
        r.q, r.k, r.v, None if floored is None else floored.contiguous(), r.scale, r.initial_state, r.states,
        grad_output, grad_final_state, r.chunk_size, decay_grad=r.log_decay is not None,
        initial_grad=r.initial_state is not None, cu_seqlens=r.cu_seqlens,
    )
    if grad_decay is not None:  # the floor passes no gradient below it (as clamp's autograd does)
        grad_decay = torch.where(r.log_decay >= LOG_DECAY_FLOOR, grad_decay, 0.0).to(r.log_decay.dtype)
    if r.shapes is not None:  # flattened by linear_attention_fwd(cu_seqlens=...): back to the caller's shapes
        q_shape, v_shape, decay_shape = r.shapes
        grad_q, grad_k, grad_v = grad_q.reshape(q_shape), grad_k.reshape(q_shape), grad_v.reshape(v_shape)
        if decay_shape is not None:
            grad_decay = grad_decay.reshape(decay_shape)
    return grad_q, grad_k, grad_v, grad_decay, grad_initial


class LinearAttentionFunction(torch.autograd.Function):
    """Autograd wrapper of linear_attention_fwd / linear_attention_bwd (the triton backend).

    The residual tensors go through ctx.save_for_backward, so saved-tensor hooks (offloading, the
    planner's activation count) see exactly what the kernel keeps; the rest stays on ctx.
    """

    @staticmethod
    def forward(ctx, q, k, v, log_decay, initial_state, scale, chunk_size, recompute_states, cu_seqlens=None):
        output, final_state, residuals = _forward(
            q, k, v, log_decay, scale, initial_state, True, "triton", chunk_size, recompute_states, cu_seqlens
        )
        ctx.save_for_backward(*(getattr(residuals, name) for name in _SAVED_RESIDUALS))
        ctx.settings = dataclasses.replace(residuals, **dict.fromkeys(_SAVED_RESIDUALS))  # no tensors
        ctx.initial_dtype = None if initial_state is None else initial_state.dtype
        ctx.set_materialize_grads(False)  # None for an unused output instead of a zero tensor
        return output, final_state

    @staticmethod
    def backward(ctx, grad_output, grad_final_state):
        residuals = dataclasses.replace(ctx.settings, **dict(zip(_SAVED_RESIDUALS, ctx.saved_tensors)))
        grad_q, grad_k, grad_v, grad_decay, grad_initial = linear_attention_bwd(
            grad_output, grad_final_state, residuals
        )
        if grad_initial is not None:
            grad_initial = grad_initial.to(ctx.initial_dtype)
        return grad_q, grad_k, grad_v, grad_decay, grad_initial, None, None, None, None


# the tensor fields of LinearAttentionResiduals on the triton path (graph is the torch / naive paths' only)
_SAVED_RESIDUALS = ("q", "k", "v", "log_decay", "initial_state", "states", "cu_seqlens")


# --------------------------------------------------------------------------------------------- public op


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    log_decay: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    backend: str = "auto",
    delay: int = 0,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int | None = None,
    recompute_states: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal linear attention with an optional scalar decay per head or per token.

    Recurrence, per batch and head (docs/algorithms.md, linear attention), tokens t = 0..T-1::

        S_t = exp(g_t) · S_{t-1} + k_tᵀ v_t   (S_{-1} = initial_state)      o_t = scale · q_t S_{t-delay}

    Args:
        q, k: [B, T, H, Dk]; v: [B, T, H, Dv]. float16, bfloat16, float32 (float64 for "torch"/"naive").
        log_decay: None (no decay), [H] (constant per head) or [B, T, H] (per token); values g <= 0.
            -inf is a full reset; values below -30 act as -30 (a factor 1e-13) with zero gradient.
            NaN or positive values: ValueError for CPU tensors, a device-side assert for CUDA tensors.
            Gradients flow to it when it requires grad.
        scale: multiplies q; defaults to Dk ** -0.5.
        initial_state: S_{-1}, [B, H, Dk, Dv] (fp32; [N, H, Dk, Dv] with cu_seqlens); zeros when None.
        output_final_state: also return S_{T-1}, fp32 [B, H, Dk, Dv] ([N, H, Dk, Dv] with cu_seqlens;
            float64 for float64 inputs); its gradient flows back into every input.
        backend: "auto" (a forced backend, see force_backend / SPINDLE_LINEAR_ATTN_BACKEND; else triton on
            CUDA, torch elsewhere), "triton", "torch" (chunked) or "naive".
        delay: d >= 0. Token i reads the state S_{i-d}, i.e. only keys j <= i - d; o_i = 0 for i < d. The
            final state is still S_{T-1}. Needs initial_state=None when d > 0.
        cu_seqlens: packed documents: int32/int64 offsets [N+1] into the B·T tokens flattened row-major,
            containing 0, B·T and every row start; the state restarts at each document. Equals running every
            document separately. triton: chunks never cross a document, no host sync (CUDA offsets are
            checked on the device); torch / naive: one document at a time (offsets read on the host).
        chunk_size, recompute_states: see linear_attention_fwd.

    Returns:
        (o, final_state): o has the dtype of q and shape [B, T, H, Dv]; final_state is None unless
        output_final_state.
    """
    _check_tensors(q, k, v)
    _check_log_decay(log_decay, q)
    scale = _check_scale(scale, q)
    delay = _check_delay(delay, initial_state)
    batch, length, heads, key_dim = q.shape
    if cu_seqlens is not None:
        return _documents(q, k, v, log_decay, scale, initial_state, output_final_state, backend, delay,
                          cu_seqlens, chunk_size, recompute_states)
    _check_state("initial_state", initial_state, (batch, heads, key_dim, v.shape[-1]), q,
                 "[batch, heads, key_dim, value_dim]")
    chosen = resolve_backend(backend, q, v)
    if delay:
        return _delayed(q, k, v, log_decay, scale, output_final_state, chosen, delay, chunk_size, recompute_states)
    return _dispatch(q, k, v, log_decay, scale, initial_state, output_final_state, chosen, chunk_size,
                     recompute_states)


def _dispatch(q, k, v, log_decay, scale, initial_state, output_final_state, chosen, chunk_size, recompute_states):
    if q.shape[1] == 0:
        output, final_state, _ = _forward(q, k, v, log_decay, scale, initial_state, output_final_state, "torch",
                                          chunk_size, False)
        return output, final_state
    if chosen == "triton":
        output, final_state = LinearAttentionFunction.apply(
            q, k, v, log_decay, initial_state, scale, chunk_size, recompute_states
        )
        return output, (final_state if output_final_state else None)
    return _autograd_backend(chosen, q, k, v, log_decay, initial_state, scale, output_final_state, chunk_size)


def _check_delay(delay: int, initial_state: torch.Tensor | None) -> int:
    if not isinstance(delay, int) or isinstance(delay, bool) or delay < 0:
        raise ValueError(f"linear_attention: delay must be an int >= 0, got {delay!r}")
    if delay and initial_state is not None:
        raise ValueError(
            "linear_attention: initial_state with delay > 0 is not defined (the tokens before the sequence "
            "that the first delayed outputs would read are not there); pass initial_state=None"
        )
    return delay


def _shift_right(x: torch.Tensor | None, delay: int) -> torch.Tensor | None:
    """Along dim 1: zeros in front, the last `delay` entries dropped ([H] decay is left alone)."""
    if x is None or x.dim() == 1:
        return x
    length = x.shape[1]
    padding = [0, 0] * (x.dim() - 2) + [min(delay, length), 0]
    return F.pad(x[:, : max(length - delay, 0)], padding)


def _delayed(q, k, v, log_decay, scale, output_final_state, chosen, delay, chunk_size, recompute_states):
    """o_i = scale·q_i S_{i-delay}: the plain op on k, v, g shifted right by delay (shifted-in g = 0, so the
    zero state before the first key is not decayed); S_{T-1} continues the shifted run's final state
    S_{T-1-delay} over the last `delay` tokens."""
    output, shifted_final = _dispatch(
        q, _shift_right(k, delay), _shift_right(v, delay), _shift_right(log_decay, delay), scale, None,
        output_final_state, chosen, chunk_size, recompute_states,
    )
    if not output_final_state:
        return output, None
    tail = slice(max(q.shape[1] - delay, 0), None)
    tail_decay = log_decay if log_decay is None or log_decay.dim() == 1 else log_decay[:, tail]
    _, final_state = _dispatch(
        q[:, tail], k[:, tail], v[:, tail], tail_decay, scale, shifted_final, True,
        chosen, chunk_size, recompute_states,
    )
    return output, final_state


def _check_cu_seqlens(cu_seqlens: torch.Tensor, batch: int, length: int, on_host: bool) -> list[int] | None:
    """Checks the offsets: on the host (returning them as a list) for CPU offsets or when on_host, else on the
    device with torch._assert_async (no host sync; a bad value stops the program at the next sync)."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.dtype not in (
        torch.int32, torch.int64
    ) or cu_seqlens.numel() < 2:
        raise TypeError("linear_attention: cu_seqlens must be a 1-D int32/int64 tensor of document offsets [N+1]")
    total = batch * length
    rules = (f"start at 0 and end at B·T = {total}, be non-decreasing and contain every row start "
             f"(multiples of T = {length}: a document cannot span two rows)")
    if cu_seqlens.device.type == "cuda" and not on_host:
        row_starts = torch.arange(0, total, max(length, 1), device=cu_seqlens.device)
        valid = (cu_seqlens[0] == 0) & (cu_seqlens[-1] == total) & (cu_seqlens[1:] >= cu_seqlens[:-1]).all()
        torch._assert_async(valid & torch.isin(row_starts, cu_seqlens).all(), f"linear_attention: cu_seqlens must {rules}")
        return None
    offsets = [int(x) for x in cu_seqlens.tolist()]
    problem = None
    if offsets[0] != 0 or offsets[-1] != total:
        problem = f"it must start at 0 and end at B·T = {total}"
    elif any(b < a for a, b in zip(offsets, offsets[1:])):
        problem = "it must be non-decreasing"
    elif not set(range(0, total, max(length, 1))) <= set(offsets):
        problem = f"it must contain every row start (multiples of T = {length}): a document cannot span two rows"
    if problem:
        raise ValueError(f"linear_attention: bad cu_seqlens {offsets[:8]}{'...' if len(offsets) > 8 else ''}: {problem}")
    return offsets


def _shift_within_documents(x: torch.Tensor | None, delay: int, cu_seqlens: torch.Tensor) -> torch.Tensor | None:
    """[1, tokens, ...] shifted right by delay inside every document (zeros where i − delay is before i's
    document start; an [H] decay is left alone). Device-side gather, no host sync."""
    if x is None or x.dim() == 1:
        return x
    tokens = torch.arange(x.shape[1], device=x.device)
    offsets = cu_seqlens.to(device=x.device, dtype=torch.int64)
    starts = offsets[torch.searchsorted(offsets, tokens, right=True) - 1]
    source = tokens - delay
    valid = (source >= starts).view(1, -1, *([1] * (x.dim() - 2)))
    return torch.where(valid, x[:, source.clamp(min=0)], torch.zeros((), dtype=x.dtype, device=x.device))


def _documents(q, k, v, log_decay, scale, initial_state, output_final_state, backend, delay, cu_seqlens, chunk_size,
               recompute_states):
    """Packed documents on the flattened [1, B·T] sequence, each with its own state. With delay: the outputs
    of the run on k, v, g shifted inside the documents; the final states of the unshifted run."""
    batch, length, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    chosen = resolve_backend(backend, q, v)
    offsets = _check_cu_seqlens(cu_seqlens, batch, length, on_host=chosen != "triton")
    count = cu_seqlens.numel() - 1
    _check_state("initial_state", initial_state, (count, heads, key_dim, value_dim), q,
                 "[documents, heads, key_dim, value_dim] with cu_seqlens")
    flat = [x.reshape(1, batch * length, *x.shape[2:]) for x in (q, k, v)]
    flat_decay = log_decay if log_decay is None or log_decay.dim() == 1 else log_decay.reshape(1, batch * length, heads)

    def run(keys, values, decay, state, final):
        if chosen == "triton":
            documents = cu_seqlens.to(device=q.device, dtype=torch.int64)
            return LinearAttentionFunction.apply(flat[0], keys, values, decay, state, scale, chunk_size,
                                                 recompute_states, documents)
        return _document_loop(chosen, flat[0], keys, values, decay, scale, state, final, offsets, chunk_size)

    if not delay:
        output, final_state = run(flat[1], flat[2], flat_decay, initial_state, output_final_state)
    else:
        shifted = (_shift_within_documents(x, delay, cu_seqlens) for x in (flat[1], flat[2], flat_decay))
        output, _ = run(*shifted, None, False)
        final_state = run(flat[1], flat[2], flat_decay, None, True)[1] if output_final_state else None
    output = output.reshape(batch, length, heads, value_dim)
    return output, (final_state if output_final_state else None)


def _document_loop(chosen, q, k, v, log_decay, scale, initial_state, output_final_state, offsets, chunk_size):
    """torch / naive: every document on its own ([1, tokens, ...] inputs, host offsets)."""
    outputs, finals = [], []
    for index, (start, end) in enumerate(zip(offsets, offsets[1:])):
        piece = slice(start, end)
        decay = log_decay if log_decay is None or log_decay.dim() == 1 else log_decay[:, piece]
        state = None if initial_state is None else initial_state[index : index + 1]
        output, final_state = _dispatch(q[:, piece], k[:, piece], v[:, piece], decay, scale, state,
                                        output_final_state, chosen, chunk_size, False)
        outputs.append(output)
        finals.append(final_state)
    return torch.cat(outputs, dim=1), (torch.cat(finals, dim=0) if output_final_state else None)
