"""The fused-kernel shims (kernels/attn/gpu.py) driven on CPU through stand-in ops of the same schema.

flash-attn is not installed here and the aten flash kernels are CUDA-only, so each test registers
CPU ops whose argument lists are those of the real ones, and whose bodies compute attention densely in
float64 under the kernel's own documented conventions (window (left, right), bottom-right causal, varlen
offsets, its LSE layout):
- flash-attn 2.7/2.8: `flash_attn::_flash_attn_(varlen_)backward` is a torch custom op built from the
  Python signature below (copied from flash-attn 2.8.3; 2.7.x differs only in lacking `zero_tensors`);
- flash-attn 2.6: the private backward is a plain function with a `window_size` tuple;
- FlashAttention-3: `flash_attn_3::_flash_attn_backward` (upstream hopper interface);
- aten: `_flash_attention_forward/backward` defined from the INSTALLED torch's schema strings, with the
  varlen LSE in either layout ([H, total] and [N, H, max_seqlen]).
Then spindle.kernels.attention runs end to end through each shim and must match the element-wise float64
reference of test_kernels_attention_masks.py. Where flash-attn is importable, a last test checks that our
call binds to its installed op schema.
"""

from __future__ import annotations

import math
import types
from typing import Optional

import pytest
import torch
from test_kernels_attention_masks import make_inputs, masked_reference, reference_mask, run_with_gradients

from spindle.kernels import attention, attention_backward
from spindle.kernels.attn import gpu
from spindle.kernels.attn.op_binding import bind_arguments, schema_parameters

TOLERANCE = 2e-5


# ----------------------------------------------------------------------------------------------------
# dense float64 kernels in flash-attn's conventions


def flash_convention(q, k, v, scale, causal, left, right):
    """One sequence, q [Tq, H, D], k/v [Tk, H_kv, D]: keys [p - left, p + right] of p = i + Tk - Tq."""
    query_length, key_length = q.shape[0], k.shape[0]
    groups = q.shape[1] // k.shape[1]
    keys, values = (t.double().repeat_interleave(groups, 1) for t in (k, v))
    scores = torch.einsum("ihd,jhd->hij", q.double(), keys) * scale
    position = torch.arange(query_length)[:, None] + key_length - query_length
    column = torch.arange(key_length)[None, :]
    right = 0 if causal else right
    keep = torch.ones(query_length, key_length, dtype=torch.bool)
    if left is not None and left >= 0:
        keep &= column >= position - left
    if right is not None and right >= 0:
        keep &= column <= position + right
    return scores.masked_fill(~keep, -math.inf), keys, values


def dense_forward(q, k, v, scale, causal, left, right):
    scores, _, values = flash_convention(q, k, v, scale, causal, left, right)
    lse = torch.logsumexp(scores, -1)  # [H, Tq]
    weights = torch.nan_to_num(torch.exp(scores - lse[..., None]), nan=0.0)
    return torch.einsum("hij,jhd->ihd", weights, values), lse


def dense_backward(dout, q, k, v, out, lse, scale, causal, left, right):
    """Gradients from the GIVEN out and lse (what a flash backward does)."""
    scores, keys, values = flash_convention(q, k, v, scale, causal, left, right)
    weights = torch.nan_to_num(torch.exp(scores - lse.double()[..., None]), nan=0.0)
    dout, out = dout.double(), out.double()
    dv = torch.einsum("hij,ihd->jhd", weights, dout)
    dp = torch.einsum("ihd,jhd->hij", dout, values)
    delta = (dout * out).sum(-1).transpose(0, 1)  # [H, Tq]
    ds = weights * (dp - delta[..., None])
    dq = torch.einsum("hij,jhd->ihd", ds, keys) * scale
    dk = torch.einsum("hij,ihd->jhd", ds, q.double()) * scale
    kv_heads = k.shape[1]
    fold = lambda x: x.view(x.shape[0], kv_heads, -1, x.shape[-1]).sum(2)  # noqa: E731  sum each GQA group
    return dq, fold(dk), fold(dv)


KV_HEADS_SEEN: list[int] = []  # key heads each stand-in kernel received (native GQA: never repeated)


def batched_forward(q, k, v, scale, causal, left, right):
    KV_HEADS_SEEN.append(k.shape[-2])
    pieces = [dense_forward(q[b], k[b], v[b], scale, causal, left, right) for b in range(q.shape[0])]
    return torch.stack([p[0] for p in pieces]).to(q.dtype), torch.stack([p[1] for p in pieces]).float()


def varlen_forward(q, k, v, cu_q, cu_k, max_q, scale, causal, left, right):
    """q [total, H, D] -> out [total, H, D], lse [H, total]."""
    KV_HEADS_SEEN.append(k.shape[-2])
    assert cu_q.dtype == torch.int32 and cu_k.dtype == torch.int32
    out, lse = torch.zeros_like(q), torch.zeros(q.shape[1], q.shape[0])
    for a, b, c, d in zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), cu_k[:-1].tolist(), cu_k[1:].tolist()):
        assert b - a <= max_q
        if b > a:
            piece_out, piece_lse = dense_forward(q[a:b], k[c:d], v[c:d], scale, causal, left, right)
            out[a:b], lse[:, a:b] = piece_out.to(q.dtype), piece_lse.float()
    return out, lse


def varlen_backward(dout, q, k, v, out, lse, dq, dk, dv, cu_q, cu_k, scale, causal, left, right):
    for a, b, c, d in zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), cu_k[:-1].tolist(), cu_k[1:].tolist()):
        if b > a:
            grads = dense_backward(dout[a:b], q[a:b], k[c:d], v[c:d], out[a:b], lse[:, a:b], scale, causal, left, right)
            dq[a:b], dk[c:d], dv[c:d] = (g.to(dq.dtype) for g in grads)


def batched_backward(dout, q, k, v, out, lse, dq, dk, dv, scale, causal, left, right):
    for b in range(q.shape[0]):
        grads = dense_backward(dout[b], q[b], k[b], v[b], out[b], lse[b], scale, causal, left, right)
        dq[b], dk[b], dv[b] = (g.to(dq.dtype) for g in grads)


# ----------------------------------------------------------------------------------------------------
# flash-attn 2.8 stand-ins: custom ops with 2.8.3's Python signature


@torch.library.custom_op("spindle_fake_fa28::_flash_attn_backward", mutates_args=("dq", "dk", "dv"), device_types="cpu")
def fa28_backward(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    softmax_lse: torch.Tensor, dq: Optional[torch.Tensor], dk: Optional[torch.Tensor], dv: Optional[torch.Tensor],
    dropout_p: float, softmax_scale: float, causal: bool, window_size_left: int, window_size_right: int,
    softcap: float, alibi_slopes: Optional[torch.Tensor], deterministic: bool,
    rng_state: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    assert dropout_p == 0.0 and softcap == 0.0 and alibi_slopes is None
    batched_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, softmax_scale, causal, window_size_left,
                     window_size_right)
    return torch.zeros(q.shape[0], q.shape[2], q.shape[1])


@torch.library.custom_op("spindle_fake_fa28::_flash_attn_varlen_backward", mutates_args=("dq", "dk", "dv"),
                         device_types="cpu")
def fa28_varlen_backward(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    softmax_lse: torch.Tensor, dq: Optional[torch.Tensor], dk: Optional[torch.Tensor], dv: Optional[torch.Tensor],
    cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
    dropout_p: float, softmax_scale: float, causal: bool, window_size_left: int, window_size_right: int,
    softcap: float, alibi_slopes: Optional[torch.Tensor], deterministic: bool,
    rng_state: Optional[torch.Tensor] = None, zero_tensors: bool = False,
) -> torch.Tensor:
    assert softmax_lse.shape == (q.shape[1], q.shape[0])  # flash-attn >= 2.6: [H, total]
    varlen_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal,
                    window_size_left, window_size_right)
    return torch.zeros(q.shape[1], q.shape[0])


FLASH_ATTN_28_BACKWARD_SCHEMA = (
    "spindle_fake_fa28::_flash_attn_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, "
    "Tensor softmax_lse, Tensor(a6!)? dq, Tensor(a7!)? dk, Tensor(a8!)? dv, float dropout_p, float softmax_scale, "
    "bool causal, SymInt window_size_left, SymInt window_size_right, float softcap, Tensor? alibi_slopes, "
    "bool deterministic, Tensor? rng_state=None) -> Tensor"
)


def fa26_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal, window_size,
                  softcap, alibi_slopes, deterministic, rng_state=None):
    batched_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, softmax_scale, causal, *window_size)
    return dq, dk, dv, None


def fa26_varlen_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                         max_seqlen_k, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                         deterministic, rng_state=None):
    varlen_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal,
                    *window_size)
    return dq, dk, dv, None


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """flash-attn 2.6-2.8's public function: (out, softmax_lse [B, H, T], S_dmask) with return_attn_probs."""
    assert return_attn_probs and dropout_p == 0.0
    out, lse = batched_forward(q, k, v, softmax_scale, causal, *window_size)
    return out, lse, None


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    assert return_attn_probs and dropout_p == 0.0
    out, lse = varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, softmax_scale, causal, *window_size)
    return out, lse, None


# ----------------------------------------------------------------------------------------------------
# FlashAttention-3 stand-ins (upstream hopper/flash_attn_interface.py signature)


@torch.library.custom_op("spindle_fake_fa3::_flash_attn_backward", mutates_args=("dq", "dk", "dv"), device_types="cpu")
def fa3_backward(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    softmax_lse: torch.Tensor, cu_seqlens_q: Optional[torch.Tensor] = None,
    cu_seqlens_k: Optional[torch.Tensor] = None, sequed_q: Optional[torch.Tensor] = None,
    sequed_k: Optional[torch.Tensor] = None, max_seqlen_q: Optional[int] = None, max_seqlen_k: Optional[int] = None,
    dq: Optional[torch.Tensor] = None, dk: Optional[torch.Tensor] = None, dv: Optional[torch.Tensor] = None,
    softmax_scale: Optional[float] = None, is_causal: bool = False, window_size_left: int = -1,
    window_size_right: int = -1, softcap: float = 0.0, deterministic: bool = False, sm_margin: int = 0,
) -> torch.Tensor:
    if cu_seqlens_q is None:
        batched_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, softmax_scale, is_causal, window_size_left,
                         window_size_right)
    else:
        varlen_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, softmax_scale,
                        is_causal, window_size_left, window_size_right)
    return torch.zeros(1)


def fa3_func(q, k, v, softmax_scale=None, causal=False, qv=None, q_descale=None, k_descale=None, v_descale=None,
             window_size=(-1, -1), attention_chunk=0, softcap=0.0, num_splits=1, pack_gqa=None, deterministic=False,
             sm_margin=0, return_attn_probs=False):
    return batched_forward(q, k, v, softmax_scale, causal, *window_size)


def fa3_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_q=None, seqused_k=None,
                    softmax_scale=None, causal=False, qv=None, q_descale=None, k_descale=None, v_descale=None,
                    window_size=(-1, -1), attention_chunk=0, softcap=0.0, num_splits=1, pack_gqa=None,
                    deterministic=False, sm_margin=0, return_attn_probs=False):
    return varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, softmax_scale, causal, *window_size)


# ----------------------------------------------------------------------------------------------------
# aten stand-ins, defined from the installed torch's own schema strings

_aten_library = torch.library.Library("spindle_fake_aten", "DEF")
_aten_lse_packed = {"value": True}  # which varlen LSE layout the stand-in forward returns


def _define_like_aten(name: str, implementation) -> None:
    schema = str(getattr(torch.ops.aten, name).default._schema)
    _aten_library.define(name + schema[schema.index("("):])
    _aten_library.impl(name, implementation, "CPU")


def _window(left, right):
    return (-1 if left is None else left), (-1 if right is None else right)


def aten_forward(query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal, return_debug_mask,
                 *, scale=None, window_size_left=None, window_size_right=None, **unused):
    left, right = _window(window_size_left, window_size_right)
    rng = torch.zeros(2, dtype=torch.uint64)
    if cum_seq_q is None:
        out, lse = batched_forward(query, key, value, scale, is_causal, left, right)
        return out, lse, rng, torch.empty(0), torch.empty(0)
    out, lse = varlen_forward(query, key, value, cum_seq_q, cum_seq_k, max_q, scale, is_causal, left, right)
    if not _aten_lse_packed["value"]:  # [N, H, max_q], padded per document
        padded = torch.zeros(cum_seq_q.numel() - 1, lse.shape[0], max_q)
        for n, (a, b) in enumerate(zip(cum_seq_q[:-1].tolist(), cum_seq_q[1:].tolist())):
            padded[n, :, : b - a] = lse[:, a:b]
        lse = padded
    return out, lse, rng, torch.empty(0), torch.empty(0)


def aten_backward(grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p,
                  is_causal, rng_state, unused, *, scale=None, window_size_left=None, window_size_right=None):
    left, right = _window(window_size_left, window_size_right)
    dq, dk, dv = torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)
    if cum_seq_q is None or cum_seq_q.numel() == 0:
        batched_backward(grad_out, query, key, value, out, logsumexp, dq, dk, dv, scale, is_causal, left, right)
        return dq, dk, dv
    if logsumexp.dim() == 3:
        assert not _aten_lse_packed["value"]
        packed = torch.zeros(logsumexp.shape[1], query.shape[0])
        for n, (a, b) in enumerate(zip(cum_seq_q[:-1].tolist(), cum_seq_q[1:].tolist())):
            packed[:, a:b] = logsumexp[n, :, : b - a]
        logsumexp = packed
    varlen_backward(grad_out, query, key, value, out, logsumexp, dq, dk, dv, cum_seq_q, cum_seq_k, scale, is_causal,
                    left, right)
    return dq, dk, dv


_define_like_aten("_flash_attention_forward", aten_forward)
_define_like_aten("_flash_attention_backward", aten_backward)


# ----------------------------------------------------------------------------------------------------
# wiring a shim to its stand-ins


def install(monkeypatch, kernel: str) -> str:
    """Point gpu.py at the stand-ins of `kernel`; return the spindle backend name to request."""
    monkeypatch.setattr(gpu, "_half_kernel_supports", lambda q: True)
    real_registered_op = gpu.registered_op
    if kernel in ("flash_attn_2.8", "flash_attn_2.6"):
        module = types.SimpleNamespace(flash_attn_func=flash_attn_func, flash_attn_varlen_func=flash_attn_varlen_func,
                                       _flash_attn_backward=fa26_backward,
                                       _flash_attn_varlen_backward=fa26_varlen_backward)
        monkeypatch.setattr(gpu, "flash_attn_module", lambda: module)
        if kernel == "flash_attn_2.8":
            ops = torch.ops.spindle_fake_fa28
            monkeypatch.setattr(gpu, "registered_op", lambda namespace, name: getattr(ops, name)
                                if namespace == "flash_attn" else real_registered_op(namespace, name))
        else:
            monkeypatch.setattr(gpu, "registered_op", lambda namespace, name: None if namespace == "flash_attn"
                                else real_registered_op(namespace, name))
        return "flash_attn"
    if kernel == "flash_attn3":
        module = types.SimpleNamespace(flash_attn_func=fa3_func, flash_attn_varlen_func=fa3_varlen_func)
        monkeypatch.setattr(gpu, "flash_attn3_module", lambda: module)
        monkeypatch.setattr(gpu, "flash_attn3_supports", lambda q: True)
        monkeypatch.setattr(gpu, "registered_op", lambda namespace, name: torch.ops.spindle_fake_fa3._flash_attn_backward)
        return "flash_attn3"
    layout_packed = kernel == "sdpa_packed_lse"
    monkeypatch.setitem(_aten_lse_packed, "value", layout_packed)
    monkeypatch.setattr(gpu, "aten_op", lambda name: getattr(torch.ops.spindle_fake_aten, name))
    monkeypatch.setattr(gpu, "sdpa_supports", lambda q: True)
    monkeypatch.setattr(gpu, "_sdpa_varlen_lse_is_packed", lambda device=None: layout_packed)
    return "sdpa"


KERNELS = ["flash_attn_2.8", "flash_attn_2.6", "flash_attn3", "sdpa_packed_lse", "sdpa_padded_lse"]
CASES = {  # batch, Tq, Tk, heads, kv_heads, causal, window, cu_seqlens
    "causal_gqa": (2, 13, 13, 4, 2, True, None, None),
    "Tq_gt_Tk": (1, 15, 6, 2, 1, True, None, None),  # leading rows stripped before the kernel
    "Tq_lt_Tk_window": (1, 7, 16, 4, 2, True, 5, None),
    "not_causal": (1, 9, 12, 2, 2, False, None, None),
    "window_beyond_T": (1, 10, 10, 2, 1, True, 25, None),
    "documents": (2, 11, 11, 4, 2, True, None, [0, 1, 6, 11, 15, 22]),
    "documents_window": (2, 11, 11, 4, 1, True, 3, [0, 4, 11, 22]),
}


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
@pytest.mark.parametrize("kernel", KERNELS)
def test_shim_matches_reference(monkeypatch, kernel, case):
    backend = install(monkeypatch, kernel)
    batch, query_length, key_length, heads, kv_heads, causal, window, cu_seqlens = case
    q, k, v, grad_output, grad_lse = make_inputs(batch, query_length, key_length, heads, kv_heads, 8)
    scale = 8**-0.5
    mask = reference_mask(batch, query_length, key_length, causal, window, cu_seqlens)
    no_lse_gradient = torch.zeros_like(grad_lse)  # the fused backward runs only without a gradient of lse
    expected = run_with_gradients(lambda *x: masked_reference(*x, scale, mask), q, k, v, grad_output,
                                  no_lse_gradient, torch.float64)
    offsets = None if cu_seqlens is None else torch.tensor(cu_seqlens, dtype=torch.int64)
    KV_HEADS_SEEN.clear()
    actual = run_with_gradients(
        lambda *x: attention(*x, causal=causal, window=window, cu_seqlens=offsets, return_lse=True, backend=backend),
        q, k, v, grad_output, no_lse_gradient, torch.float32)
    assert KV_HEADS_SEEN and set(KV_HEADS_SEEN) == {kv_heads}, "K/V must reach the kernel unrepeated (native GQA)"
    for name, value in expected.items():
        reference = torch.where(torch.isinf(value), torch.zeros_like(value), value)
        candidate = torch.where(torch.isinf(actual[name]), torch.zeros_like(actual[name]), actual[name]).double()
        error = ((candidate - reference).norm() / reference.norm()).item()
        assert error <= TOLERANCE, f"{kernel} {case}: {name} relative RMSE {error:.2e}"


def test_flash_attn_28_stand_in_has_the_documented_schema():
    assert str(torch.ops.spindle_fake_fa28._flash_attn_backward.default._schema) == FLASH_ATTN_28_BACKWARD_SCHEMA


def test_unknown_required_argument_is_a_clear_error(monkeypatch):
    """A future flash-attn adding a required argument fails with a message naming it, not a wrong call."""

    @torch.library.custom_op("spindle_fake_fa99::_flash_attn_backward", mutates_args=("dq",), device_types="cpu")
    def future(dout: torch.Tensor, q: torch.Tensor, dq: Optional[torch.Tensor], brand_new_knob: float) -> torch.Tensor:
        return torch.zeros(1)

    install(monkeypatch, "flash_attn_2.8")
    monkeypatch.setattr(gpu, "registered_op", lambda namespace, name: torch.ops.spindle_fake_fa99._flash_attn_backward)
    q = torch.randn(1, 4, 2, 8, requires_grad=True)
    output = attention(q, q, q, backend="flash_attn")
    with pytest.raises(RuntimeError, match="brand_new_knob"):
        output.sum().backward()


def test_window_on_aten_needs_the_window_arguments(monkeypatch):
    """If the installed torch's aten flash op had no window arguments, window= must not be dropped silently."""
    parameters = [p for p in schema_parameters(torch.ops.aten._flash_attention_forward) if "window" not in p.name]
    with pytest.raises(RuntimeError, match="window_size_left"):
        bind_arguments(parameters, {p.name: None for p in parameters}, where="test",
                       required=("window_size_left", "window_size_right"))


def test_binds_to_installed_flash_attn_schema():
    """With flash-attn importable, our named arguments cover every required argument of its registered ops."""
    pytest.importorskip("flash_attn")
    op = gpu.registered_op("flash_attn", "_flash_attn_backward")
    if op is None:
        pytest.skip("flash-attn < 2.7 registers no torch op (2.6's plain function is covered above)")
    values = {name: None for name in ("dout", "q", "k", "v", "out", "softmax_lse", "dq", "dk", "dv", "dropout_p",
                                      "softmax_scale", "causal", "window_size_left", "window_size_right", "softcap",
                                      "alibi_slopes", "deterministic", "rng_state", "zero_tensors")}
    for name in ("_flash_attn_backward", "_flash_attn_varlen_backward"):
        varlen = dict(values, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None)
        bind_arguments(schema_parameters(gpu.registered_op("flash_attn", name)), varlen, where=name)


@pytest.mark.parametrize("kernel", KERNELS)
def test_backward_helper_through_shims_is_fp32(monkeypatch, kernel):
    """attention_backward (what ring attention calls) through each shim: fp32 results equal to autograd's."""
    backend = install(monkeypatch, kernel)
    q, k, v, grad_output, _ = make_inputs(2, 11, 11, 4, 2, 8)
    offsets = torch.tensor([0, 4, 11, 22])
    leaves = [t.float().requires_grad_() for t in (q, k, v)]
    output, lse = attention(*leaves, window=5, cu_seqlens=offsets, return_lse=True, backend=backend)
    (output * grad_output.float()).sum().backward()
    grads = attention_backward(*(t.detach() for t in leaves), output.detach(), lse.detach(), grad_output.float(),
                               window=5, cu_seqlens=offsets, backend=backend)
    for computed, leaf in zip(grads, leaves):
        assert computed.dtype == torch.float32
        torch.testing.assert_close(computed, leaf.grad, rtol=1e-5, atol=1e-6)


def test_varlen_lse_layout_probe_runs_without_a_gpu():
    """The installed torch's aten flash varlen LSE layout is read from its meta kernel (torch >= 2.6: [H, total])."""
    gpu._sdpa_varlen_lse_is_packed.cache_clear()
    assert gpu._sdpa_varlen_lse_is_packed() is True
