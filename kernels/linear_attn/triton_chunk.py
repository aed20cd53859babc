"""Triton kernels for chunk-parallel linear attention with decay (docs/algorithms.md, linear attention).

The sequence of every (batch, head) is cut into chunks of BT tokens. Only the d_k × d_v state chain is
serial; everything quadratic in the chunk runs with one program per chunk:

forward
  _chunk_states_kernel   grid (Dk blocks, Dv blocks, sequences·H), serial over chunks: writes the state
                         entering every chunk, h[n], and the final state.
  _chunk_output_kernel   grid (Dv blocks, chunks, B·H): o = scale·[(e^G ⊙ Q) h[n] + ((Q Kᵀ) ⊙ D) V]
backward
  _chunk_state_grads_kernel  grid (Dk blocks, Dv blocks, sequences·H), serial over chunks in reverse: writes
                         dh[n] = ∂L/∂(state leaving chunk n) and the initial state's gradient.
  _chunk_dqk_kernel      grid (Dk blocks, chunks, B·H): dq, dk and the log-decay gradient.
  _chunk_dv_kernel       grid (Dv blocks, chunks, B·H): dv.

Inside a chunk G_i is the inclusive cumulative log-decay (chunk-local, so magnitudes stay small), D_ij =
e^{G_i − G_j} for j ≤ i and the keys enter the outgoing state with e^{G_C − G_i}, G_C − G_i taken as the
exclusive suffix sum Σ_{u>i} g_u. A constant per-head decay is its own path: G_i = (i+1)·g from the
position, differences (i − j)·g, no [B, T, H] tensor anywhere. The tail chunk is padded with g = 0 and
zero q, k, v, so padding neither adds to nor decays the state.

Packed documents (cu_seqlens, inputs flattened to one row): a sequence is a document; chunks never cross
a document; the chunk-parallel kernels get a device-side chunk table (grid axes (chunk slot, H) instead of
(chunk, B·H)), built without a host sync from an upper bound on the number of chunks (spare slots exit).

Log-decay gradient, per token t of chunk n (derivation in kernels/linear_attn/README.md):
  dg_t = Σ_{i≥t} [q_i·dq_i − k_i·dk_i]_intra,inter-query + Σ_{i<t} k_i·dk_i^state + e^{G_C}⟨dh[n], h[n]⟩
with the diagonal of the intra term left out (it cancels exactly) and the keys' share of the
outgoing state as a prefix sum, so no two large terms cancel in fp32 under strong decay.

fp32 inputs use IEEE fp32 dots (no TF32: the state chain accumulates error); fp16/bf16 inputs use
tensor-core dots with fp32 accumulation; states are fp32. Head dims up to 256, padded to power-of-two
blocks with masks. Under TRITON_INTERPRET=1 the kernels run on CPU tensors with one fixed config.
"""

from __future__ import annotations

import dataclasses
import os

import torch
import triton
import triton.language as tl

from ..shapes import shapes_only

DEFAULT_CHUNK_SIZE = 64  # tokens per chunk; tests lower it so short sequences span several chunks
NO_DECAY, CONSTANT_DECAY, TOKEN_DECAY = 0, 1, 2
_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _fit_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Block sizes clipped to the padded head dims (no 128-wide block for a 64-wide head), duplicates dropped;
    under the interpreter only the first (no benchmarking on CPU)."""
    padded = {"BK": max(16, triton.next_power_of_2(kwargs["DK"])), "BV": max(16, triton.next_power_of_2(kwargs["DV"]))}
    fitted, seen = [], set()
    for config in configs:
        blocks = {name: min(size, padded[name]) for name, size in config.kwargs.items()}
        signature = (tuple(sorted(blocks.items())), config.num_warps, config.num_stages)
        if signature not in seen:
            seen.add(signature)
            fitted.append(triton.Config(blocks, num_warps=config.num_warps, num_stages=config.num_stages))
    return fitted[:1] if _INTERPRETING else fitted


def _autotune(configs: list[triton.Config], key: list[str]):
    """triton.autotune over `configs`, fitted to the head dims by _fit_configs."""
    return triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": _fit_configs})


def _configs(blocks: list[dict], warps=(4, 8), stages=(2, 3)) -> list[triton.Config]:
    """Every combination of block sizes × warps × stages; the first entry is the interpreter's."""
    return [triton.Config(dict(block), num_warps=w, num_stages=s) for block in blocks for w in warps for s in stages]


# block sizes tried by the serial state passes (forward states, backward state gradients) and by the kernels that
# write [BT, BV] tiles (output, dv); the first of each is the interpreter's
_STATE_PASS_BLOCKS = [dict(BK=64, BV=64), dict(BK=32, BV=64), dict(BK=64, BV=32), dict(BK=128, BV=64)]
_VALUE_PASS_BLOCKS = [dict(BK=64, BV=64), dict(BK=64, BV=128), dict(BK=128, BV=64), dict(BK=32, BV=64)]
_TUNING_KEY = ["DK", "DV", "BT", "DECAY", "VARLEN"]


# ----------------------------------------------------------------------------------------------- helpers


@triton.jit
def _chunk_decay(g, bos, head, heads, length, start, DECAY: tl.constexpr, BT: tl.constexpr):
    """(G [BT], key_log [BT], last): inclusive chunk-local cumulative log-decay, log of the keys' factor
    into the outgoing state (Σ_{u>i} g_u, exact suffix), and G_C. Padded rows carry g = 0."""
    offsets = tl.arange(0, BT)
    if DECAY == 1:
        rate = tl.load(g + head).to(tl.float32)
        valid = tl.minimum(length - start, BT)
        steps = tl.minimum(offsets + 1, valid).to(tl.float32)
        cumulative = steps * rate
        key_log = (valid - steps) * rate
        last = valid.to(tl.float32) * rate
    elif DECAY == 2:
        rows = start + offsets
        token = tl.load(g + ((bos + rows) * heads + head), mask=rows < length, other=0.0).to(tl.float32)
        cumulative = tl.cumsum(token, 0)
        key_log = tl.sum(tl.where(offsets[None, :] > offsets[:, None], token[None, :], 0.0), axis=1)
        last = tl.min(cumulative, 0)  # g <= 0: the cumulative sum only falls, so its minimum is G_C
    else:
        cumulative = tl.zeros([BT], dtype=tl.float32)
        key_log = tl.zeros([BT], dtype=tl.float32)
        last = tl.sum(key_log, 0)  # a 0 of the same kind (a scalar tensor) as the other branches return
    return cumulative, key_log, last


@triton.jit
def _intra_weights(g, head, length, start, cumulative, DECAY: tl.constexpr, BT: tl.constexpr, STRICT: tl.constexpr):
    """[BT, BT] weights D_ij = e^{G_i − G_j} on j <= i (j < i with STRICT), 0 elsewhere."""
    offsets = tl.arange(0, BT)
    if STRICT:
        causal = offsets[:, None] > offsets[None, :]
    else:
        causal = offsets[:, None] >= offsets[None, :]
    if DECAY == 1:
        rate = tl.load(g + head).to(tl.float32)
        valid = tl.minimum(length - start, BT)
        steps = tl.minimum(offsets + 1, valid).to(tl.float32)
        difference = (steps[:, None] - steps[None, :]) * rate  # exact: no difference of two large sums
    else:
        difference = cumulative[:, None] - cumulative[None, :]
    if DECAY == 0:
        return tl.where(causal, 1.0, 0.0)
    # masked before exp: above the diagonal the differences are positive and could overflow
    return tl.exp(tl.where(causal, difference, float("-inf")))


@triton.jit
def _serial_program(cu_seqlens, chunk_offsets, length, heads, num_chunks, start_state, HAS_START: tl.constexpr,
                    VARLEN: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """For the serial state kernels, grid (Dk blocks, Dv blocks, sequences·heads). A sequence is a batch row,
    or a document. Returns (head, bos, sequence length, index of the sequence's first chunk among all chunks,
    key columns, value columns, offset of this (sequence, head)'s [DK, DV] state, offsets and mask of the
    program's [BK, BV] tile in it, that tile of `start_state` in fp32 (zeros without HAS_START))."""
    sequence_head = tl.program_id(2).to(tl.int64)
    sequence, head = sequence_head // heads, sequence_head % heads
    if VARLEN:
        bos = tl.load(cu_seqlens + sequence).to(tl.int64)
        sequence_length = (tl.load(cu_seqlens + sequence + 1).to(tl.int64) - bos).to(tl.int32)
        first_chunk = tl.load(chunk_offsets + sequence).to(tl.int64)
    else:
        bos = sequence * length
        sequence_length = length
        first_chunk = sequence * num_chunks
    key_columns = tl.program_id(0) * BK + tl.arange(0, BK)
    value_columns = tl.program_id(1) * BV + tl.arange(0, BV)
    own_state = (sequence * heads + head) * DK * DV
    tile_offsets, tile_mask = _state_tile(key_columns, value_columns, DK, DV)
    if HAS_START:
        state = tl.load(start_state + own_state + tile_offsets, mask=tile_mask, other=0.0).to(tl.float32)
    else:
        state = tl.zeros([BK, BV], dtype=tl.float32)
    return (head, bos, sequence_length, first_chunk, key_columns, value_columns, own_state, tile_offsets, tile_mask,
            state)


@triton.jit
def _chunk_program(cu_seqlens, chunk_table, length, heads, num_chunks, VARLEN: tl.constexpr, BT: tl.constexpr):
    """For the chunk-parallel kernels: (head, bos, sequence length, the chunk's first token within the sequence,
    global chunk).
    Dense grid axes 1, 2 = (chunk, batch·heads); varlen axes 1, 2 = (chunk-table slot, heads), where the
    table row (document, chunk) is (-1, 0) for slots past the last chunk: those programs get a sequence
    length of 0, so every load and store they make is masked off (no early return needed)."""
    if VARLEN:
        slot = tl.program_id(1).to(tl.int64)
        head = tl.program_id(2).to(tl.int64)
        sequence = tl.load(chunk_table + 2 * slot).to(tl.int64)
        chunk = tl.load(chunk_table + 2 * slot + 1)
        valid = sequence >= 0
        sequence = tl.maximum(sequence, 0)
        bos = tl.load(cu_seqlens + sequence).to(tl.int64)
        sequence_length = (tl.load(cu_seqlens + sequence + 1).to(tl.int64) - bos).to(tl.int32)
        sequence_length = tl.where(valid, sequence_length, 0)
        chunk = tl.where(valid, chunk, 0)
        global_chunk = slot
    else:
        batch_head = tl.program_id(2).to(tl.int64)
        batch, head = batch_head // heads, batch_head % heads
        chunk = tl.program_id(1)
        bos = batch * length
        sequence_length = length
        global_chunk = batch * num_chunks + chunk
    return head, bos, sequence_length, chunk * BT, global_chunk


@triton.jit
def _load_tile(base, row_stride, start, length, columns, column_limit, BT: tl.constexpr):
    """[BT, len(columns)] tile of a [T, heads·dim] slab; rows >= length and padded columns read 0."""
    rows = (start + tl.arange(0, BT)).to(tl.int64)
    mask = (rows[:, None] < length) & (columns[None, :] < column_limit)
    return tl.load(base + rows[:, None] * row_stride + columns[None, :], mask=mask, other=0.0)


@triton.jit
def _store_tile(base, row_stride, start, length, columns, column_limit, value, BT: tl.constexpr):
    rows = (start + tl.arange(0, BT)).to(tl.int64)
    mask = (rows[:, None] < length) & (columns[None, :] < column_limit)
    tl.store(base + rows[:, None] * row_stride + columns[None, :], value.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _state_tile(key_columns, value_columns, DK: tl.constexpr, DV: tl.constexpr):
    """Offsets and mask of a [BK, BV] tile of one row-major [DK, DV] state."""
    offsets = key_columns[:, None] * DV + value_columns[None, :]
    return offsets, (key_columns[:, None] < DK) & (value_columns[None, :] < DV)


@triton.jit
def _head_slab(pointer, bos, heads, head, DIM: tl.constexpr):
    """Start of one head's columns of a [tokens, heads·DIM] tensor, from token bos (int64 offsets: > 2^31 at a
    million tokens)."""
    return pointer + bos * heads * DIM + head * DIM


@triton.jit
def _state_slab(pointer, index, heads, head, DK: tl.constexpr, DV: tl.constexpr):
    """Start of the row-major [DK, DV] state of one head of chunk (or sequence) `index` in [N, heads, DK, DV]."""
    return pointer + (index * heads + head) * DK * DV


@triton.jit
def _load_chunk_state(base, key_columns, value_columns, sequence_length, DK: tl.constexpr, DV: tl.constexpr,
                      VARLEN: tl.constexpr):
    """[BK, BV] tile of one chunk's state (states or their gradients); spare chunk-table slots read zeros."""
    offsets, mask = _state_tile(key_columns, value_columns, DK, DV)
    if VARLEN:
        mask = mask & (key_columns[:, None] < tl.where(sequence_length > 0, DK, 0))
    return tl.load(base + offsets, mask=mask, other=0.0)


@triton.jit
def _products_over_keys(a_base, b_base, state_base, heads, start, sequence_length, value_columns,
                        VARLEN: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr,
                        BK: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr, STATE_FIRST: tl.constexpr):
    """(a bᵀ [BT, BT], a·state [BT, BV]) summed over the key blocks, for a chunk's [BT, DK] tiles a and b: q, k
    and the chunk state in the output kernel; k, q and the state gradient in the dv kernel. The order of the two
    products changes the compiled kernel (its shared memory); STATE_FIRST keeps each kernel's own, measured
    order."""
    scores = tl.zeros([BT, BT], dtype=tl.float32)
    inter = tl.zeros([BT, BV], dtype=tl.float32)
    for key_block in range(tl.cdiv(DK, BK)):
        key_columns = key_block * BK + tl.arange(0, BK)
        a_tile = _load_tile(a_base, heads * DK, start, sequence_length, key_columns, DK, BT)
        b_tile = _load_tile(b_base, heads * DK, start, sequence_length, key_columns, DK, BT)
        state = _load_chunk_state(state_base, key_columns, value_columns, sequence_length, DK, DV, VARLEN)
        if STATE_FIRST:
            inter += tl.dot(a_tile, state.to(a_tile.dtype), input_precision=PRECISION)
            scores += tl.dot(a_tile, tl.trans(b_tile), input_precision=PRECISION)
        else:
            scores += tl.dot(a_tile, tl.trans(b_tile), input_precision=PRECISION)
            inter += tl.dot(a_tile, state.to(a_tile.dtype), input_precision=PRECISION)
    return scores, inter


# ----------------------------------------------------------------------------------------------- forward


@_autotune(_configs(_STATE_PASS_BLOCKS), key=_TUNING_KEY)
@triton.jit
def _chunk_states_kernel(
    k, v, g, initial_state, states, final_state, cu_seqlens, chunk_offsets, length, heads, num_chunks,
    DECAY: tl.constexpr, HAS_INITIAL: tl.constexpr, STORE_FINAL: tl.constexpr, VARLEN: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    PRECISION: tl.constexpr,
):
    (head, bos, sequence_length, first_chunk, key_columns, value_columns, own_state, state_offsets, state_mask,
     state) = _serial_program(cu_seqlens, chunk_offsets, length, heads, num_chunks, initial_state, HAS_INITIAL,
                              VARLEN, DK, DV, BK, BV)
    k_base = _head_slab(k, bos, heads, head, DK)
    v_base = _head_slab(v, bos, heads, head, DV)
    for chunk in range(tl.cdiv(sequence_length, BT)):
        start = chunk * BT
        tl.store(_state_slab(states, first_chunk + chunk, heads, head, DK, DV) + state_offsets, state,
                 mask=state_mask)
        k_tile = _load_tile(k_base, heads * DK, start, sequence_length, key_columns, DK, BT)
        v_tile = _load_tile(v_base, heads * DV, start, sequence_length, value_columns, DV, BT)
        _, key_log, last = _chunk_decay(g, bos, head, heads, sequence_length, start, DECAY, BT)
        if DECAY != 0:
            k_tile = (k_tile.to(tl.float32) * tl.exp(key_log)[:, None]).to(v_tile.dtype)
            state = state * tl.exp(last)
        state += tl.dot(tl.trans(k_tile), v_tile, input_precision=PRECISION)
    if STORE_FINAL:
        tl.store(final_state + own_state + state_offsets, state, mask=state_mask)


@_autotune(_configs(_VALUE_PASS_BLOCKS), key=_TUNING_KEY)
@triton.jit
def _chunk_output_kernel(
    q, k, v, g, states, output, cu_seqlens, chunk_table, length, heads, num_chunks, scale,
    DECAY: tl.constexpr, VARLEN: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr,
):
    value_block = tl.program_id(0)
    head, bos, sequence_length, start, global_chunk = _chunk_program(
        cu_seqlens, chunk_table, length, heads, num_chunks, VARLEN, BT
    )
    value_columns = value_block * BV + tl.arange(0, BV)
    scores, inter = _products_over_keys(  # q kᵀ, q h[n]
        _head_slab(q, bos, heads, head, DK), _head_slab(k, bos, heads, head, DK),
        _state_slab(states, global_chunk, heads, head, DK, DV), heads, start, sequence_length, value_columns,
        VARLEN, DK, DV, BT, BK, BV, PRECISION, True)
    cumulative, _, _ = _chunk_decay(g, bos, head, heads, sequence_length, start, DECAY, BT)
    if DECAY != 0:
        inter = inter * tl.exp(cumulative)[:, None]
    scores = scores * _intra_weights(g, head, sequence_length, start, cumulative, DECAY, BT, False)
    v_tile = _load_tile(_head_slab(v, bos, heads, head, DV), heads * DV, start, sequence_length, value_columns, DV, BT)
    result = (inter + tl.dot(scores.to(v_tile.dtype), v_tile, input_precision=PRECISION)) * scale
    _store_tile(_head_slab(output, bos, heads, head, DV), heads * DV, start, sequence_length, value_columns, DV,
                result, BT)


# ----------------------------------------------------------------------------------------------- backward


@_autotune(_configs(_STATE_PASS_BLOCKS), key=_TUNING_KEY)
@triton.jit
def _chunk_state_grads_kernel(
    q, grad_output, g, grad_final_state, grad_states, grad_initial_state, cu_seqlens, chunk_offsets,
    length, heads, num_chunks, scale,
    DECAY: tl.constexpr, HAS_GRAD_FINAL: tl.constexpr, STORE_INITIAL: tl.constexpr, VARLEN: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    PRECISION: tl.constexpr,
):
    (head, bos, sequence_length, first_chunk, key_columns, value_columns, own_state, state_offsets, state_mask,
     d_state) = _serial_program(cu_seqlens, chunk_offsets, length, heads, num_chunks, grad_final_state,
                                HAS_GRAD_FINAL, VARLEN, DK, DV, BK, BV)
    q_base = _head_slab(q, bos, heads, head, DK)
    do_base = _head_slab(grad_output, bos, heads, head, DV)
    count = tl.cdiv(sequence_length, BT)
    for reverse in range(count):
        chunk = count - 1 - reverse
        start = chunk * BT
        # dh[n]: the gradient of the state leaving chunk n (from every later output and the final state)
        tl.store(_state_slab(grad_states, first_chunk + chunk, heads, head, DK, DV) + state_offsets, d_state,
                 mask=state_mask)
        q_tile = _load_tile(q_base, heads * DK, start, sequence_length, key_columns, DK, BT)
        do_tile = _load_tile(do_base, heads * DV, start, sequence_length, value_columns, DV, BT)
        cumulative, _, last = _chunk_decay(g, bos, head, heads, sequence_length, start, DECAY, BT)
        q_tile = q_tile.to(tl.float32) * scale
        if DECAY != 0:
            q_tile = q_tile * tl.exp(cumulative)[:, None]
            d_state = d_state * tl.exp(last)
        d_state += tl.dot(tl.trans(q_tile.to(do_tile.dtype)), do_tile, input_precision=PRECISION)
    if STORE_INITIAL:
        tl.store(grad_initial_state + own_state + state_offsets, d_state, mask=state_mask)


@_autotune(_configs([dict(BV=64), dict(BV=128), dict(BV=32)]), key=["DK", "DV", "BT", "DECAY", "BK", "VARLEN"])
@triton.jit
def _chunk_dqk_kernel(
    q, k, v, grad_output, g, states, grad_states, grad_q, grad_k, grad_decay_partial, cu_seqlens, chunk_table,
    length, heads, num_chunks, total_tokens, total_chunks, scale,
    DECAY: tl.constexpr, DECAY_GRAD: tl.constexpr, VARLEN: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr,
):
    """dq, dk for one key block of one chunk; with DECAY_GRAD also this key block's share of dg: per token
    ([key blocks, tokens, H]) for a per-token decay, summed over the chunk ([key blocks, chunks, H]) for a
    constant one."""
    key_block = tl.program_id(0)
    head, bos, sequence_length, start, global_chunk = _chunk_program(
        cu_seqlens, chunk_table, length, heads, num_chunks, VARLEN, BT
    )
    key_columns = key_block * BK + tl.arange(0, BK)
    q_base = _head_slab(q, bos, heads, head, DK)
    k_base = _head_slab(k, bos, heads, head, DK)
    v_base = _head_slab(v, bos, heads, head, DV)
    do_base = _head_slab(grad_output, bos, heads, head, DV)
    state_base = _state_slab(states, global_chunk, heads, head, DK, DV)
    grad_state_base = _state_slab(grad_states, global_chunk, heads, head, DK, DV)
    query_inter = tl.zeros([BT, BK], dtype=tl.float32)  # do h[n]ᵀ
    key_inter = tl.zeros([BT, BK], dtype=tl.float32)  # v dh[n]ᵀ
    d_scores = tl.zeros([BT, BT], dtype=tl.float32)  # do vᵀ
    state_product = tl.zeros([BK, BV], dtype=tl.float32)  # h[n] ⊙ dh[n], summed to ⟨h[n], dh[n]⟩ below
    for value_block in range(tl.cdiv(DV, BV)):
        value_columns = value_block * BV + tl.arange(0, BV)
        v_tile = _load_tile(v_base, heads * DV, start, sequence_length, value_columns, DV, BT)
        do_tile = _load_tile(do_base, heads * DV, start, sequence_length, value_columns, DV, BT)
        state = _load_chunk_state(state_base, key_columns, value_columns, sequence_length, DK, DV, VARLEN)
        grad_state = _load_chunk_state(grad_state_base, key_columns, value_columns, sequence_length, DK, DV, VARLEN)
        query_inter += tl.dot(do_tile, tl.trans(state.to(do_tile.dtype)), input_precision=PRECISION)
        key_inter += tl.dot(v_tile, tl.trans(grad_state.to(v_tile.dtype)), input_precision=PRECISION)
        d_scores += tl.dot(do_tile, tl.trans(v_tile), input_precision=PRECISION)
        if DECAY_GRAD:
            state_product += state * grad_state
    q_tile = _load_tile(q_base, heads * DK, start, sequence_length, key_columns, DK, BT)
    k_tile = _load_tile(k_base, heads * DK, start, sequence_length, key_columns, DK, BT)
    cumulative, key_log, last = _chunk_decay(g, bos, head, heads, sequence_length, start, DECAY, BT)
    offsets = tl.arange(0, BT)
    # do_i·v_i: the diagonal's share, added to dq and dk separately (it cancels exactly in dg)
    diagonal = tl.sum(tl.where(offsets[:, None] == offsets[None, :], d_scores, 0.0), axis=1) * scale
    d_scores = d_scores * _intra_weights(g, head, sequence_length, start, cumulative, DECAY, BT, True) * scale
    query_intra = tl.dot(d_scores.to(k_tile.dtype), k_tile, input_precision=PRECISION)
    key_intra = tl.dot(tl.trans(d_scores).to(q_tile.dtype), q_tile, input_precision=PRECISION)
    query_inter = query_inter * scale
    if DECAY != 0:
        query_inter = query_inter * tl.exp(cumulative)[:, None]
        key_inter = key_inter * tl.exp(key_log)[:, None]
    q32, k32 = q_tile.to(tl.float32), k_tile.to(tl.float32)
    grad_q_tile = query_inter + query_intra + diagonal[:, None] * k32
    grad_k_tile = key_inter + key_intra + diagonal[:, None] * q32
    _store_tile(_head_slab(grad_q, bos, heads, head, DK), heads * DK, start, sequence_length, key_columns, DK,
                grad_q_tile, BT)
    _store_tile(_head_slab(grad_k, bos, heads, head, DK), heads * DK, start, sequence_length, key_columns, DK,
                grad_k_tile, BT)
    if DECAY_GRAD:
        suffix_terms = tl.sum(q32 * (query_inter + query_intra), axis=1) - tl.sum(k32 * key_intra, axis=1)
        prefix_terms = tl.sum(k32 * key_inter, axis=1)
        later = offsets[None, :] >= offsets[:, None]  # row t, column i: i >= t
        grad_decay = tl.sum(tl.where(later, suffix_terms[None, :], 0.0), axis=1)
        grad_decay += tl.sum(tl.where(later, 0.0, prefix_terms[None, :]), axis=1)
        grad_decay += tl.exp(last) * tl.sum(tl.sum(state_product, axis=1), axis=0)
        rows = start + offsets
        if DECAY == 2:
            pointers = grad_decay_partial + ((key_block * total_tokens + bos + rows) * heads + head)
            tl.store(pointers, grad_decay, mask=rows < sequence_length)
        else:
            total = tl.sum(tl.where(rows < sequence_length, grad_decay, 0.0), axis=0)
            pointer = grad_decay_partial + (key_block * total_chunks + global_chunk) * heads + head
            if VARLEN:  # spare chunk-table slots leave their (zero-initialized) entry alone
                tl.store(pointer, total, mask=sequence_length > 0)
            else:
                tl.store(pointer, total)


@_autotune(_configs(_VALUE_PASS_BLOCKS), key=_TUNING_KEY)
@triton.jit
def _chunk_dv_kernel(
    q, k, grad_output, g, grad_states, grad_v, cu_seqlens, chunk_table, length, heads, num_chunks, scale,
    DECAY: tl.constexpr, VARLEN: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr,
):
    value_block = tl.program_id(0)
    head, bos, sequence_length, start, global_chunk = _chunk_program(
        cu_seqlens, chunk_table, length, heads, num_chunks, VARLEN, BT
    )
    value_columns = value_block * BV + tl.arange(0, BV)
    scores_t, inter = _products_over_keys(  # [j, i] = k_j·q_i; k dh[n]
        _head_slab(k, bos, heads, head, DK), _head_slab(q, bos, heads, head, DK),
        _state_slab(grad_states, global_chunk, heads, head, DK, DV), heads, start, sequence_length, value_columns,
        VARLEN, DK, DV, BT, BK, BV, PRECISION, False)
    cumulative, key_log, _ = _chunk_decay(g, bos, head, heads, sequence_length, start, DECAY, BT)
    if DECAY != 0:
        inter = inter * tl.exp(key_log)[:, None]
    weights = _intra_weights(g, head, sequence_length, start, cumulative, DECAY, BT, False)  # [i, j]
    scores_t = scores_t * tl.trans(weights) * scale
    do_tile = _load_tile(_head_slab(grad_output, bos, heads, head, DV), heads * DV, start, sequence_length,
                         value_columns, DV, BT)
    result = inter + tl.dot(scores_t.to(do_tile.dtype), do_tile, input_precision=PRECISION)
    _store_tile(_head_slab(grad_v, bos, heads, head, DV), heads * DV, start, sequence_length, value_columns, DV,
                result, BT)


# ----------------------------------------------------------------------------------------------- launchers


def _allocate(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every kernel output buffer comes from here: uninitialized (tests replace this to NaN-poison them)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _launch(kernel, grid, *args, **constants) -> None:
    """kernel[grid](*args, **constants). For shapes-only tensors (kernels/shapes.py: the planner counts what
    this path allocates and keeps) nothing runs; the outputs stay allocated, unwritten, with their shapes."""
    if not shapes_only(args[0]):
        kernel[grid](*args, **constants)


def _precision(dtype: torch.dtype) -> str:
    # fp32 operands: IEEE fp32 (TF32 would lose ~1e-3 relative over the state chain); half types: tensor cores
    return "ieee" if dtype == torch.float32 else "tf32"


def _decay_kind(log_decay: torch.Tensor | None) -> int:
    if log_decay is None:
        return NO_DECAY
    return CONSTANT_DECAY if log_decay.dim() == 1 else TOKEN_DECAY


def _key_block(key_dim: int) -> int:
    """Key block of the dq/dk kernel (fixed: it sizes the decay-gradient partials)."""
    return min(64, max(16, triton.next_power_of_2(key_dim)))


@dataclasses.dataclass
class ChunkLayout:
    """How tokens form sequences and chunks. Dense: B rows of T tokens, ⌈T/C⌉ chunks each. Packed documents
    (cu_seqlens): N documents of the flattened B·T tokens, chunks never crossing a document; a device-side
    chunk table maps each chunk program to (document, chunk), built without a host sync from an upper bound
    ⌊B·T/C⌋ + N on the number of chunks (programs past the last chunk exit at once)."""

    batch: int
    length: int
    sequences: int  # B, or N documents
    num_chunks: int  # chunks per row (dense)
    total_chunks: int  # chunk slots: rows of the state buffers
    cu_seqlens: torch.Tensor | None = None  # int64 [N+1]
    chunk_offsets: torch.Tensor | None = None  # int64 [N+1]: index of each document's first chunk
    chunk_table: torch.Tensor | None = None  # int32 [total_chunks, 2]

    @property
    def varlen(self) -> bool:
        return self.cu_seqlens is not None

    def chunk_grid(self, heads: int) -> tuple[int, int]:
        """Grid axes 1, 2 of the chunk-parallel kernels."""
        return (self.total_chunks, heads) if self.varlen else (self.num_chunks, self.batch * heads)

    def pointers(self, fallback: torch.Tensor, serial: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.varlen:
            return fallback, fallback
        return self.cu_seqlens, (self.chunk_offsets if serial else self.chunk_table)


def chunk_layout(batch: int, length: int, chunk_size: int, cu_seqlens: torch.Tensor | None = None,
                 device: torch.device | None = None) -> ChunkLayout:
    num_chunks = triton.cdiv(length, chunk_size)
    if cu_seqlens is None:
        return ChunkLayout(batch, length, batch, num_chunks, batch * num_chunks)
    offsets = cu_seqlens.to(device=device, dtype=torch.int64)
    documents = offsets.numel() - 1
    counts = (offsets[1:] - offsets[:-1] + chunk_size - 1) // chunk_size
    chunk_offsets = torch.nn.functional.pad(counts.cumsum(0), (1, 0))
    total = (batch * length) // chunk_size + documents
    slots = torch.arange(total, device=offsets.device)
    document = torch.searchsorted(chunk_offsets[1:], slots, right=True)
    valid = document < documents
    chunk = slots - chunk_offsets[document.clamp(max=documents - 1)]
    table = torch.stack([torch.where(valid, document, -1), torch.where(valid, chunk, 0)], dim=1).to(torch.int32)
    return ChunkLayout(batch, length, documents, num_chunks, total, offsets, chunk_offsets, table.contiguous())


def chunk_states(k, v, log_decay, initial_state, chunk_size, layout: ChunkLayout, store_final=True):
    """States entering every chunk [chunk slots, H, Dk, Dv] fp32 and the final state per sequence (or None)."""
    heads, key_dim = k.shape[2], k.shape[3]
    value_dim = v.shape[-1]
    states = _allocate((layout.total_chunks, heads, key_dim, value_dim), torch.float32, k.device)
    final_state = _allocate((layout.sequences, heads, key_dim, value_dim), torch.float32, k.device) if store_final else None
    cu_seqlens, chunk_offsets = layout.pointers(k, serial=True)

    def grid(meta):
        return (triton.cdiv(key_dim, meta["BK"]), triton.cdiv(value_dim, meta["BV"]), layout.sequences * heads)

    _launch(_chunk_states_kernel, grid,
        k, v, log_decay if log_decay is not None else k, initial_state if initial_state is not None else k,
        states, final_state if store_final else states, cu_seqlens, chunk_offsets, layout.length, heads,
        layout.num_chunks, DECAY=_decay_kind(log_decay), HAS_INITIAL=initial_state is not None,
        STORE_FINAL=store_final, VARLEN=layout.varlen, DK=key_dim, DV=value_dim, BT=chunk_size,
        PRECISION=_precision(k.dtype),
    )
    return states, final_state


def chunk_output(q, k, v, log_decay, states, scale, chunk_size, layout: ChunkLayout):
    heads, key_dim = q.shape[2], q.shape[3]
    value_dim = v.shape[-1]
    output = _allocate(v.shape, v.dtype, v.device)
    cu_seqlens, chunk_table = layout.pointers(q, serial=False)

    def grid(meta):
        return (triton.cdiv(value_dim, meta["BV"]), *layout.chunk_grid(heads))

    _launch(_chunk_output_kernel, grid,
        q, k, v, log_decay if log_decay is not None else q, states, output, cu_seqlens, chunk_table, layout.length,
        heads, layout.num_chunks, scale, DECAY=_decay_kind(log_decay), VARLEN=layout.varlen, DK=key_dim,
        DV=value_dim, BT=chunk_size, PRECISION=_precision(q.dtype),
    )
    return output


def chunk_state_gradients(q, grad_output, log_decay, grad_final_state, scale, chunk_size, store_initial,
                          layout: ChunkLayout):
    """dh[n] for every chunk [chunk slots, H, Dk, Dv] fp32 and the initial state's gradient (or None)."""
    heads, key_dim = q.shape[2], q.shape[3]
    value_dim = grad_output.shape[-1]
    grad_states = _allocate((layout.total_chunks, heads, key_dim, value_dim), torch.float32, q.device)
    grad_initial = None
    if store_initial:
        grad_initial = _allocate((layout.sequences, heads, key_dim, value_dim), torch.float32, q.device)
    cu_seqlens, chunk_offsets = layout.pointers(q, serial=True)

    def grid(meta):
        return (triton.cdiv(key_dim, meta["BK"]), triton.cdiv(value_dim, meta["BV"]), layout.sequences * heads)

    _launch(_chunk_state_grads_kernel, grid,
        q, grad_output, log_decay if log_decay is not None else q,
        grad_final_state if grad_final_state is not None else q, grad_states,
        grad_initial if store_initial else grad_states, cu_seqlens, chunk_offsets, layout.length, heads,
        layout.num_chunks, scale, DECAY=_decay_kind(log_decay), HAS_GRAD_FINAL=grad_final_state is not None,
        STORE_INITIAL=store_initial, VARLEN=layout.varlen, DK=key_dim, DV=value_dim, BT=chunk_size,
        PRECISION=_precision(q.dtype),
    )
    return grad_states, grad_initial


def chunk_input_gradients(q, k, v, grad_output, log_decay, states, grad_states, scale, chunk_size, decay_grad,
                          layout: ChunkLayout):
    """(dq, dk, dv, dlog_decay): dq, dk, dv in the input dtype; dlog_decay fp32 [B, T, H] or [H] (or None)."""
    batch, length, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    kind = _decay_kind(log_decay)
    key_block = _key_block(key_dim)
    key_blocks = triton.cdiv(key_dim, key_block)
    grad_q = _allocate(q.shape, q.dtype, q.device)
    grad_k = _allocate(k.shape, k.dtype, k.device)
    grad_v = _allocate(v.shape, v.dtype, v.device)
    decay_grad = decay_grad and kind != NO_DECAY
    if not decay_grad:
        partial = grad_q  # unused
    elif kind == TOKEN_DECAY:
        partial = _allocate((key_blocks, batch * length, heads), torch.float32, q.device)
    else:  # one value per chunk slot; with documents some slots are never written, so they start at zero
        shape = (key_blocks, layout.total_chunks, heads)
        partial = torch.zeros(shape, dtype=torch.float32, device=q.device) if layout.varlen else _allocate(
            shape, torch.float32, q.device)
    decay = log_decay if log_decay is not None else q
    cu_seqlens, chunk_table = layout.pointers(q, serial=False)
    _launch(_chunk_dqk_kernel, (key_blocks, *layout.chunk_grid(heads)),
        q, k, v, grad_output, decay, states, grad_states, grad_q, grad_k, partial, cu_seqlens, chunk_table,
        layout.length, heads, layout.num_chunks, batch * length, layout.total_chunks, scale,
        DECAY=kind, DECAY_GRAD=decay_grad, VARLEN=layout.varlen, DK=key_dim, DV=value_dim, BT=chunk_size,
        BK=key_block, PRECISION=_precision(q.dtype),
    )

    def grid(meta):
        return (triton.cdiv(value_dim, meta["BV"]), *layout.chunk_grid(heads))

    _launch(_chunk_dv_kernel, grid,
        q, k, grad_output, decay, grad_states, grad_v, cu_seqlens, chunk_table, layout.length, heads,
        layout.num_chunks, scale, DECAY=kind, VARLEN=layout.varlen, DK=key_dim, DV=value_dim, BT=chunk_size,
        PRECISION=_precision(q.dtype),
    )
    grad_log_decay = None
    if decay_grad:
        if kind == TOKEN_DECAY:
            grad_log_decay = (partial[0] if key_blocks == 1 else partial.sum(0)).view(batch, length, heads)
        else:
            grad_log_decay = partial.sum((0, 1))
    return grad_q, grad_k, grad_v, grad_log_decay


def check_chunk_size(chunk_size: int) -> int:
    if chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(f"linear_attention: the triton chunk_size must be a power of two >= 16, got {chunk_size}")
    return chunk_size


def triton_forward(q, k, v, log_decay, scale, initial_state, chunk_size, keep_states, cu_seqlens=None):
    """(o, final_state fp32, states or None). q, k, v contiguous; log_decay None, [H] or [B, T, H] contiguous;
    with cu_seqlens the states are per document ([N, H, Dk, Dv])."""
    layout = chunk_layout(q.shape[0], q.shape[1], chunk_size, cu_seqlens, q.device)
    states, final_state = chunk_states(k, v, log_decay, initial_state, chunk_size, layout)
    output = chunk_output(q, k, v, log_decay, states, scale, chunk_size, layout)
    return output, final_state, (states if keep_states else None)


def triton_backward(q, k, v, log_decay, scale, initial_state, states, grad_output, grad_final_state, chunk_size,
                    decay_grad, initial_grad, cu_seqlens=None):
    """(dq, dk, dv, dlog_decay fp32 or None, dinitial_state fp32 or None); states None = recompute them."""
    layout = chunk_layout(q.shape[0], q.shape[1], chunk_size, cu_seqlens, q.device)
    if states is None:
        states, _ = chunk_states(k, v, log_decay, initial_state, chunk_size, layout, store_final=False)
    grad_states, grad_initial = chunk_state_gradients(
        q, grad_output, log_decay, grad_final_state, scale, chunk_size, initial_grad, layout
    )
    grad_q, grad_k, grad_v, grad_log_decay = chunk_input_gradients(
        q, k, v, grad_output, log_decay, states, grad_states, scale, chunk_size, decay_grad, layout
    )
    return grad_q, grad_k, grad_v, grad_log_decay, grad_initial
