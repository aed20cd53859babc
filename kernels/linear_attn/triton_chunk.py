"""Triton kernels for chunked linear attention with decay (Lightning Attention-2 style), forward and backward.

Per (batch, head), blocks of BT tokens are walked in order while an fp32 state lives on chip:
  forward  (grid: batch·heads × value-dim blocks), state S[:, v-block]:
      o   = scale · [((Q Kᵀ) ⊙ D) V + exp(G) ⊙ (Q S)]          S ← exp(G_C) S + (K ⊙ exp(G_C − G))ᵀ V
  dq       (grid: batch·heads × key-dim blocks), forward sweep rebuilding S[k-block, :]:
      dQ  = scale · [((dO Vᵀ) ⊙ D) K + exp(G) ⊙ (dO Sᵀ)]
  dk, dv   (grid: batch·heads × key- or value-dim blocks), reverse sweep carrying dS (starts at the final
           state's gradient, ends as the initial state's gradient):
      dK  = scale · ((dO Vᵀ) ⊙ D)ᵀ Q + exp(G_C − G) ⊙ (V dSᵀ)
      dV  = scale · ((Q Kᵀ) ⊙ D)ᵀ dO + exp(G_C − G) ⊙ (K dS)   dS ← exp(G_C) dS + scale (Q ⊙ exp(G))ᵀ dO
G is the inclusive cumulative log-decay inside a block (precomputed in PyTorch, padded with g = 0 so the
tail block needs no special case), D_ij = exp(G_i − G_j) for j <= i.

Log-decay gradient: with q̃ = q·exp(G), k̃ = k·exp(−G) the output depends on G only through q̃·k̃, so
∂L/∂G_t = q_t·dq_t − k_t·dk_t, reverse-cumulated over t. Two parts of that difference are large and
cancel exactly, which in fp32 would swamp the small gradient of a strong decay: the intra diagonal
scale·(q_t·k_t)(do_t·v_t), present in both terms, and the last tokens' share of the final state. So the
kernels leave the diagonal out of the per-token sums they store (adding it to dq, dk separately), and
the final state's share is computed outside the sweep as a prefix sum (_final_state_gradients).

Head dims are padded to powers of two inside the kernels with masks; sequence tails are masked.
fp32 inputs use IEEE fp32 dots (no TF32: the state chain accumulates error); bf16/fp16 inputs use
tensor-core dots with fp32 accumulation, with the state kept in fp32 and rounded only as a dot operand.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _load_block(base, row_stride, start, length, columns, column_limit, BT: tl.constexpr):
    """[BT, len(columns)] tile of a [T, heads·dim] row-major slab; rows >= length and padded columns read 0."""
    rows = (start + tl.arange(0, BT)).to(tl.int64)
    mask = (rows[:, None] < length) & (columns[None, :] < column_limit)
    return tl.load(base + rows[:, None] * row_stride + columns[None, :], mask=mask, other=0.0)


@triton.jit
def _store_block(base, row_stride, start, length, columns, column_limit, value, BT: tl.constexpr):
    rows = (start + tl.arange(0, BT)).to(tl.int64)
    mask = (rows[:, None] < length) & (columns[None, :] < column_limit)
    tl.store(base + rows[:, None] * row_stride + columns[None, :], value.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _decay_terms(cumulative_base, start, HAS_DECAY: tl.constexpr, BT: tl.constexpr, STRICT: tl.constexpr):
    """Block decays: intra weights D [BT, BT], query factor exp(G) [BT], key factor exp(G_C − G) [BT], exp(G_C).

    STRICT leaves the diagonal out of D (the caller adds it separately)."""
    offsets = tl.arange(0, BT)
    if STRICT:
        causal = offsets[:, None] > offsets[None, :]
    else:
        causal = offsets[:, None] >= offsets[None, :]
    if HAS_DECAY:
        cumulative = tl.load(cumulative_base + start + offsets)
        last = tl.load(cumulative_base + start + BT - 1)
        # differences are <= 0 where j <= i; mask before exp so nothing overflows
        intra = tl.exp(tl.where(causal, cumulative[:, None] - cumulative[None, :], float("-inf")))
        return intra, tl.exp(cumulative), tl.exp(last - cumulative), tl.exp(last)
    ones = tl.full([BT], 1.0, tl.float32)
    return tl.where(causal, 1.0, 0.0), ones, ones, 1.0


@triton.jit
def _forward_kernel(
    q, k, v, cumulative_decay, initial_state, output, final_state,
    length, heads, scale,
    HAS_DECAY: tl.constexpr, HAS_INITIAL: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BKF: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr, PRECISION: tl.constexpr,
):
    # int64: offsets exceed 2^31 at a million tokens
    batch_head, value_block = tl.program_id(0).to(tl.int64), tl.program_id(1)
    batch, head = batch_head // heads, batch_head % heads
    key_columns = tl.arange(0, BKF)
    value_columns = value_block * BV + tl.arange(0, BV)
    q_base = q + batch * length * heads * DK + head * DK
    k_base = k + batch * length * heads * DK + head * DK
    v_base = v + batch * length * heads * DV + head * DV
    o_base = output + batch * length * heads * DV + head * DV
    g_base = cumulative_decay + batch_head * tl.cdiv(length, BT) * BT
    state_offsets = batch_head * DK * DV + key_columns[:, None] * DV + value_columns[None, :]
    state_mask = (key_columns[:, None] < DK) & (value_columns[None, :] < DV)
    if HAS_INITIAL:
        state = tl.load(initial_state + state_offsets, mask=state_mask, other=0.0).to(tl.float32)
    else:
        state = tl.zeros([BKF, BV], dtype=tl.float32)
    for start in range(0, length, BT):
        q_block = _load_block(q_base, heads * DK, start, length, key_columns, DK, BT)
        k_block = _load_block(k_base, heads * DK, start, length, key_columns, DK, BT)
        v_block = _load_block(v_base, heads * DV, start, length, value_columns, DV, BT)
        intra, query_decay, key_decay, block_decay = _decay_terms(g_base, start, HAS_DECAY, BT, False)
        scores = tl.dot(q_block, tl.trans(k_block), input_precision=PRECISION) * intra
        result = tl.dot(scores.to(v_block.dtype), v_block, input_precision=PRECISION)
        inter = tl.dot(q_block, state.to(q_block.dtype), input_precision=PRECISION)
        result += query_decay[:, None] * inter
        _store_block(o_base, heads * DV, start, length, value_columns, DV, result * scale, BT)
        decayed_keys = (k_block.to(tl.float32) * key_decay[:, None]).to(k_block.dtype)
        state = state * block_decay + tl.dot(tl.trans(decayed_keys), v_block, input_precision=PRECISION)
    tl.store(final_state + state_offsets, state, mask=state_mask)


@triton.jit
def _dq_kernel(
    q, k, v, grad_output, cumulative_decay, initial_state, grad_q, grad_cumulative_q,
    length, heads, scale,
    HAS_DECAY: tl.constexpr, HAS_INITIAL: tl.constexpr, DECAY_GRAD: tl.constexpr, DK: tl.constexpr,
    DV: tl.constexpr, BK: tl.constexpr, BVF: tl.constexpr, BT: tl.constexpr, PRECISION: tl.constexpr,
):
    """dQ by a forward sweep rebuilding S[key block, :]. DECAY_GRAD also stores Σ_d q ⊙ (dQ without its
    diagonal term scale·(do_i·v_i)·k_i) for this key block."""
    # int64: offsets exceed 2^31 at a million tokens
    batch_head, key_block = tl.program_id(0).to(tl.int64), tl.program_id(1)
    batch, head = batch_head // heads, batch_head % heads
    key_columns = key_block * BK + tl.arange(0, BK)
    value_columns = tl.arange(0, BVF)
    q_base = q + batch * length * heads * DK + head * DK
    k_base = k + batch * length * heads * DK + head * DK
    v_base = v + batch * length * heads * DV + head * DV
    do_base = grad_output + batch * length * heads * DV + head * DV
    dq_base = grad_q + batch * length * heads * DK + head * DK
    g_base = cumulative_decay + batch_head * tl.cdiv(length, BT) * BT
    partial_base = grad_cumulative_q + (key_block * tl.num_programs(0) + batch_head) * length
    state_offsets = batch_head * DK * DV + key_columns[:, None] * DV + value_columns[None, :]
    state_mask = (key_columns[:, None] < DK) & (value_columns[None, :] < DV)
    if HAS_INITIAL:
        state = tl.load(initial_state + state_offsets, mask=state_mask, other=0.0).to(tl.float32)
    else:
        state = tl.zeros([BK, BVF], dtype=tl.float32)
    for start in range(0, length, BT):
        k_block = _load_block(k_base, heads * DK, start, length, key_columns, DK, BT)
        v_block = _load_block(v_base, heads * DV, start, length, value_columns, DV, BT)
        do_block = _load_block(do_base, heads * DV, start, length, value_columns, DV, BT)
        intra, query_decay, key_decay, block_decay = _decay_terms(g_base, start, HAS_DECAY, BT, True)
        d_scores = tl.dot(do_block, tl.trans(v_block), input_precision=PRECISION) * intra
        result = tl.dot(d_scores.to(k_block.dtype), k_block, input_precision=PRECISION)
        inter = tl.dot(do_block, tl.trans(state.to(do_block.dtype)), input_precision=PRECISION)
        result = (result + query_decay[:, None] * inter) * scale
        if DECAY_GRAD:
            q_block = _load_block(q_base, heads * DK, start, length, key_columns, DK, BT)
            rows = start + tl.arange(0, BT)
            tl.store(partial_base + rows, tl.sum(q_block.to(tl.float32) * result, axis=1), mask=rows < length)
        diagonal = tl.sum(do_block.to(tl.float32) * v_block.to(tl.float32), axis=1) * scale
        result += diagonal[:, None] * k_block.to(tl.float32)
        _store_block(dq_base, heads * DK, start, length, key_columns, DK, result, BT)
        decayed_keys = (k_block.to(tl.float32) * key_decay[:, None]).to(k_block.dtype)
        state = state * block_decay + tl.dot(tl.trans(decayed_keys), v_block, input_precision=PRECISION)


@triton.jit
def _dkv_kernel(
    q, k, v, grad_output, cumulative_decay, grad_final_state, grad_key_or_value, grad_initial_state,
    grad_cumulative_k, length, heads, scale,
    COMPUTE_DK: tl.constexpr, HAS_DECAY: tl.constexpr, HAS_GRAD_FINAL: tl.constexpr, DECAY_GRAD: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Reverse sweep carrying dS. COMPUTE_DK: key-dim blocks (BK) × the full value dim (BV), writes dK (and,
    with DECAY_GRAD, Σ_d k ⊙ (dK without its diagonal term scale·(do_j·v_j)·q_j)); otherwise the full key
    dim × value-dim blocks, writes dV and the initial state's gradient."""
    # int64: offsets exceed 2^31 at a million tokens
    batch_head, block = tl.program_id(0).to(tl.int64), tl.program_id(1)
    batch, head = batch_head // heads, batch_head % heads
    if COMPUTE_DK:
        key_columns = block * BK + tl.arange(0, BK)
        value_columns = tl.arange(0, BV)
    else:
        key_columns = tl.arange(0, BK)
        value_columns = block * BV + tl.arange(0, BV)
    q_base = q + batch * length * heads * DK + head * DK
    k_base = k + batch * length * heads * DK + head * DK
    v_base = v + batch * length * heads * DV + head * DV
    do_base = grad_output + batch * length * heads * DV + head * DV
    g_base = cumulative_decay + batch_head * tl.cdiv(length, BT) * BT
    partial_base = grad_cumulative_k + (block * tl.num_programs(0) + batch_head) * length
    state_offsets = batch_head * DK * DV + key_columns[:, None] * DV + value_columns[None, :]
    state_mask = (key_columns[:, None] < DK) & (value_columns[None, :] < DV)
    if HAS_GRAD_FINAL:
        d_state = tl.load(grad_final_state + state_offsets, mask=state_mask, other=0.0).to(tl.float32)
    else:
        d_state = tl.zeros([BK, BV], dtype=tl.float32)
    num_blocks = tl.cdiv(length, BT)
    for reverse_index in range(0, num_blocks):
        start = (num_blocks - 1 - reverse_index) * BT
        q_block = _load_block(q_base, heads * DK, start, length, key_columns, DK, BT)
        do_block = _load_block(do_base, heads * DV, start, length, value_columns, DV, BT)
        intra, query_decay, key_decay, block_decay = _decay_terms(g_base, start, HAS_DECAY, BT, COMPUTE_DK)
        if COMPUTE_DK:
            v_block = _load_block(v_base, heads * DV, start, length, value_columns, DV, BT)
            d_scores = tl.dot(do_block, tl.trans(v_block), input_precision=PRECISION) * intra
            result = tl.dot(tl.trans(d_scores.to(q_block.dtype)), q_block, input_precision=PRECISION) * scale
            inter = tl.dot(v_block, tl.trans(d_state.to(v_block.dtype)), input_precision=PRECISION)
            result += key_decay[:, None] * inter
            if DECAY_GRAD:
                k_block = _load_block(k_base, heads * DK, start, length, key_columns, DK, BT)
                rows = start + tl.arange(0, BT)
                tl.store(partial_base + rows, tl.sum(k_block.to(tl.float32) * result, axis=1), mask=rows < length)
            diagonal = tl.sum(do_block.to(tl.float32) * v_block.to(tl.float32), axis=1) * scale
            result += diagonal[:, None] * q_block.to(tl.float32)
            _store_block(grad_key_or_value + batch * length * heads * DK + head * DK, heads * DK, start, length,
                         key_columns, DK, result, BT)
        else:
            k_block = _load_block(k_base, heads * DK, start, length, key_columns, DK, BT)
            scores = tl.dot(q_block, tl.trans(k_block), input_precision=PRECISION) * intra
            result = tl.dot(tl.trans(scores.to(do_block.dtype)), do_block, input_precision=PRECISION) * scale
            inter = tl.dot(k_block, d_state.to(k_block.dtype), input_precision=PRECISION)
            result += key_decay[:, None] * inter
            _store_block(grad_key_or_value + batch * length * heads * DV + head * DV, heads * DV, start, length,
                         value_columns, DV, result, BT)
        decayed_queries = (q_block.to(tl.float32) * query_decay[:, None]).to(q_block.dtype)
        d_state = d_state * block_decay + scale * tl.dot(
            tl.trans(decayed_queries), do_block, input_precision=PRECISION
        )
    if not COMPUTE_DK:
        tl.store(grad_initial_state + state_offsets, d_state, mask=state_mask)


# ----------------------------------------------------------------------------------------------------
# launchers

DEFAULT_CHUNK_SIZE = 64  # tokens per block; tests lower it so short sequences span several blocks
_TILE_ELEMENTS = 8192  # fp32 elements of on-chip state per program (64 KiB of registers / shared memory)


def _pow2(dim: int) -> int:
    return max(16, triton.next_power_of_2(dim))


def _partial_block(full_other: int) -> int:
    """Block of one head dim such that block × (padded other dim) stays within the state tile budget."""
    return max(16, _TILE_ELEMENTS // full_other)


def _precision(dtype: torch.dtype) -> str:
    # fp32 operands: IEEE fp32 (TF32 would lose ~1e-3 relative over the state chain); half types: tensor cores
    return "ieee" if dtype == torch.float32 else "tf32"


def _warps(*dims: int) -> int:
    return 8 if max(dims) >= 128 else 4


def chunk_cumulative_decay(log_decay: torch.Tensor | None, chunk_size: int) -> torch.Tensor | None:
    """[B, T, H] log-decay -> [B, H, N·C] fp32 inclusive cumulative sums restarting every chunk.

    The tail is padded with g = 0, so padded positions carry the last real cumulative value.
    """
    if log_decay is None:
        return None
    batch, length, heads = log_decay.shape
    padded = triton.cdiv(length, chunk_size) * chunk_size
    g = torch.nn.functional.pad(log_decay.float(), (0, 0, 0, padded - length))
    g = g.view(batch, padded // chunk_size, chunk_size, heads).cumsum(2)  # [B, N, C, H]
    return g.permute(0, 3, 1, 2).reshape(batch, heads, padded).contiguous()


def _forward(q, k, v, cumulative, initial_state, scale, chunk_size):
    batch, length, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    output = torch.full_like(v, float("nan"))  # NaN-poisoned: any row the kernel misses shows up
    final_state = torch.full((batch, heads, key_dim, value_dim), float("nan"), dtype=torch.float32, device=q.device)
    key_full = _pow2(key_dim)
    value_block = min(_pow2(value_dim), _partial_block(key_full))
    grid = (batch * heads, triton.cdiv(value_dim, value_block))
    _forward_kernel[grid](
        q, k, v, cumulative if cumulative is not None else q, initial_state if initial_state is not None else q,
        output, final_state, length, heads, scale,
        HAS_DECAY=cumulative is not None, HAS_INITIAL=initial_state is not None, DK=key_dim, DV=value_dim,
        BKF=key_full, BV=value_block, BT=chunk_size, PRECISION=_precision(q.dtype),
        num_warps=_warps(key_full, value_block),
    )
    return output, final_state


def _backward(q, k, v, grad_output, cumulative, initial_state, grad_final_state, scale, chunk_size, decay_grad):
    """fp32 (dq, dk, dv, d_initial_state, dG): dG = ∂L/∂G_t [B, H, T] with decay_grad (else None), without a
    final-state share. Every buffer is NaN-poisoned before the kernels write it."""
    batch, length, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    key_full, value_full = _pow2(key_dim), _pow2(value_dim)
    key_block = min(key_full, _partial_block(value_full))
    value_block = min(value_full, _partial_block(key_full))
    key_blocks = triton.cdiv(key_dim, key_block)
    nan = float("nan")
    grad_q = torch.full(q.shape, nan, dtype=torch.float32, device=q.device)
    grad_k = torch.full(k.shape, nan, dtype=torch.float32, device=q.device)
    grad_v = torch.full(v.shape, nan, dtype=torch.float32, device=q.device)
    grad_initial = torch.full((batch, heads, key_dim, value_dim), nan, dtype=torch.float32, device=q.device)
    partial_shape = (key_blocks, batch * heads, length) if decay_grad else (1,)
    grad_cumulative_q = torch.full(partial_shape, nan, dtype=torch.float32, device=q.device)
    grad_cumulative_k = torch.full(partial_shape, nan, dtype=torch.float32, device=q.device)
    common = dict(HAS_DECAY=cumulative is not None, DECAY_GRAD=decay_grad, DK=key_dim, DV=value_dim,
                  BT=chunk_size, PRECISION=_precision(q.dtype))
    cumulative = cumulative if cumulative is not None else q
    _dq_kernel[(batch * heads, key_blocks)](
        q, k, v, grad_output, cumulative, initial_state if initial_state is not None else q, grad_q,
        grad_cumulative_q, length, heads, scale, HAS_INITIAL=initial_state is not None, BK=key_block,
        BVF=value_full, num_warps=_warps(key_block, value_full), **common,
    )
    final = grad_final_state if grad_final_state is not None else q
    for compute_dk, grid_blocks, target, blocks in (
        (True, key_blocks, grad_k, (key_block, value_full)),
        (False, triton.cdiv(value_dim, value_block), grad_v, (key_full, value_block)),
    ):
        _dkv_kernel[(batch * heads, grid_blocks)](
            q, k, v, grad_output, cumulative, final, target, grad_initial, grad_cumulative_k, length, heads, scale,
            COMPUTE_DK=compute_dk, HAS_GRAD_FINAL=grad_final_state is not None, BK=blocks[0], BV=blocks[1],
            num_warps=_warps(*blocks), **common,
        )
    grad_cumulative = None
    if decay_grad:
        grad_cumulative = (grad_cumulative_q.sum(0) - grad_cumulative_k.sum(0)).view(batch, heads, length)
    return grad_q, grad_k, grad_v, grad_initial, grad_cumulative


def _final_state_gradients(k, v, log_decay, initial_state, grad_final_state):
    """The final state's share of (dk, dv, d_initial_state, dg), computed outside the sweep.

    S_T = exp(G_T)·S_0 + Σ_j w_j k_jᵀ v_j with w_j = exp(Σ_{u>j} g_u), so with f_j = w_j·(k_j dS_T v_jᵀ):
    dk_j = w_j·v_j dS_Tᵀ, dv_j = w_j·k_j dS_T, dS_0 = exp(G_T)·dS_T and dg_t = exp(G_T)·⟨dS_T, S_0⟩ + Σ_{j<t} f_j
    (a prefix sum: no large terms that cancel).
    """
    g = log_decay.float()  # [B, T, H]
    after = torch.nn.functional.pad(g.flip(1).cumsum(1).flip(1)[:, 1:], (0, 0, 0, 1))  # Σ_{u>j} g_u
    weights = torch.exp(after)  # [B, T, H], <= 1
    key_side = torch.einsum("bthe,bhde->bthd", v.float(), grad_final_state)  # v_j dS_Tᵀ, [B, T, H, Dk]
    value_side = torch.einsum("bthd,bhde->bthe", k.float(), grad_final_state)  # k_j dS_T, [B, T, H, Dv]
    total_decay = torch.exp(g.sum(1))  # exp(G_T), [B, H]
    contributions = weights * (k.float() * key_side).sum(-1)  # f_j, [B, T, H]
    grad_log_decay = torch.nn.functional.pad(contributions.cumsum(1)[:, :-1], (0, 0, 1, 0))  # Σ_{j<t} f_j
    if initial_state is not None:
        grad_log_decay = grad_log_decay + (total_decay * (grad_final_state * initial_state).sum((-1, -2)))[:, None]
    grad_initial = total_decay[..., None, None] * grad_final_state
    return weights[..., None] * key_side, weights[..., None] * value_side, grad_initial, grad_log_decay


class LinearAttentionTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, log_decay, initial_state, scale, chunk_size):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        if initial_state is not None:
            initial_state = initial_state.float().contiguous()
        cumulative = chunk_cumulative_decay(log_decay, chunk_size)
        output, final_state = _forward(q, k, v, cumulative, initial_state, scale, chunk_size)
        ctx.save_for_backward(q, k, v, log_decay, cumulative, initial_state)
        ctx.scale, ctx.chunk_size = scale, chunk_size
        ctx.set_materialize_grads(False)  # None for an unused output instead of a zero tensor
        return output, final_state

    @staticmethod
    def backward(ctx, grad_output, grad_final_state):
        q, k, v, log_decay, cumulative, initial_state = ctx.saved_tensors
        grad_output = torch.zeros_like(v) if grad_output is None else grad_output.to(v.dtype).contiguous()
        if grad_final_state is not None:
            grad_final_state = grad_final_state.float().contiguous()
        decay_grad = ctx.needs_input_grad[3]
        # with a log-decay gradient the final state's share is added outside the sweep (_final_state_gradients)
        grad_q, grad_k, grad_v, grad_initial, grad_cumulative = _backward(
            q, k, v, grad_output, cumulative, initial_state, None if decay_grad else grad_final_state,
            ctx.scale, ctx.chunk_size, decay_grad,
        )
        grad_log_decay = None
        if decay_grad:
            grad_log_decay = grad_cumulative.transpose(1, 2).flip(1).cumsum(1).flip(1)  # Σ_{u>=t}, [B, T, H]
            if grad_final_state is not None:
                final_k, final_v, final_initial, final_log_decay = _final_state_gradients(
                    k, v, log_decay, initial_state, grad_final_state
                )
                grad_k, grad_v = grad_k + final_k, grad_v + final_v
                grad_initial = grad_initial + final_initial
                grad_log_decay = grad_log_decay + final_log_decay
            grad_log_decay = grad_log_decay.to(log_decay.dtype)
        grad_initial = grad_initial if ctx.needs_input_grad[4] else None
        return grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype), grad_log_decay, grad_initial, None, None


def linear_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor | None,
    scale: float,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """q, k: [B, T, H, Dk]; v: [B, T, H, Dv]; log_decay None or [B, T, H]. Checks are done by the caller."""
    chunk_size = chunk_size or DEFAULT_CHUNK_SIZE
    if chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(f"linear_attention_triton: chunk_size must be a power of two >= 16, got {chunk_size}")
    output, final_state = LinearAttentionTriton.apply(q, k, v, log_decay, initial_state, scale, chunk_size)
    return output, (final_state if output_final_state else None)
