"""Ring, all-gather and Ulysses attention on 1-4 gloo ranks against dense float64 softmax attention on the
unsharded tensors: outputs and dq, dk, dv, both layouts, causal and not, GQA; plus their communication."""

from __future__ import annotations

import itertools

import pytest
import torch
from cp_reference import assert_close, data_calls, dense_attention, random_inputs
from distributed_utils import run_distributed, subgroup

from spindle.kernels import attention
from spindle.parallel.cp import allgather_attention, record_comm, ring_attention, shard, ulysses_attention
from spindle.parallel.cp.ulysses import deepspeed_available

pytestmark = pytest.mark.slow

BATCH, HEAD_DIM = 2, 8
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


@pytest.fixture(scope="module", autouse=True)
def _deepspeed_comm_op_built():
    """On CPU, DeepSpeed's comm backend JIT-compiles a small C++ op the first time it starts (minutes on two
    busy cores). Build it here, in the test process and without a deadline, so the ranks only load it: a rank
    killed by the timeout mid-build would leave a stale build lock that hangs every later DeepSpeed start."""
    if deepspeed_available():
        from deepspeed.comm.torch import build_shm_op  # what deepspeed.comm's TorchBackend calls on start

        build_shm_op()


def _full_inputs(seed, length, heads, kv_heads, dtype):
    shapes = {
        "q": (BATCH, length, heads, HEAD_DIM),
        "k": (BATCH, length, kv_heads, HEAD_DIM),
        "v": (BATCH, length, kv_heads, HEAD_DIM),
        "do": (BATCH, length, heads, HEAD_DIM),
    }
    return {name: tensor.to(dtype) for name, tensor in random_inputs(seed, shapes).items()}


def _check(op, group, size, layout, causal, heads, kv_heads, seed, dtype=torch.float64, chunk=3, **options):
    full = _full_inputs(seed, 2 * size * chunk, heads, kv_heads, dtype)
    scale = 0.3
    reference = {name: full[name].to(torch.float64, copy=True).requires_grad_() for name in ("q", "k", "v")}
    expected = dense_attention(reference["q"], reference["k"], reference["v"], causal, scale)
    expected.backward(full["do"].double())
    local = {name: shard(full[name], group, layout=layout).clone().requires_grad_() for name in ("q", "k", "v")}
    output = op(local["q"], local["k"], local["v"], group, layout=layout, causal=causal, scale=scale, **options)
    output.backward(shard(full["do"], group, layout=layout))
    label = f"{op.__name__} P={size} {layout} causal={causal} H={heads}/{kv_heads} {dtype} {options}"
    assert output.dtype == dtype, label
    assert_close(f"{label} output", output, shard(expected, group, layout=layout), TOLERANCE[dtype])
    for name in ("q", "k", "v"):
        expected_grad = shard(reference[name].grad, group, layout=layout)
        assert_close(f"{label} d{name}", local[name].grad, expected_grad, TOLERANCE[dtype])


def _equivalence_worker(rank, world_size, world_group):
    all_to_alls = ("torch", "deepspeed") if deepspeed_available() else ("torch",)
    for size in (1, 2, 3, 4):
        group = subgroup(size)
        if group is None:
            continue
        seeds = itertools.count(100 * size)
        for layout, causal in itertools.product(("zigzag", "contiguous"), (True, False)):
            for heads, kv_heads in ((4, 2), (2, 2)):  # GQA and plain multi-head
                _check(ring_attention, group, size, layout, causal, heads, kv_heads, next(seeds))
                _check(allgather_attention, group, size, layout, causal, heads, kv_heads, next(seeds))
            _check(allgather_attention, group, size, layout, causal, 4, 2, next(seeds), head_groups=2)
            for choice in all_to_alls:  # Ulysses needs heads divisible by P
                _check(ulysses_attention, group, size, layout, causal, 2 * size, size, next(seeds), all_to_all=choice)
        # longer local chunks and fp32
        _check(ring_attention, group, size, "zigzag", True, 4, 1, next(seeds), chunk=20)
        _check(ring_attention, group, size, "zigzag", True, 4, 2, next(seeds), dtype=torch.float32)
        _check(allgather_attention, group, size, "zigzag", True, 4, 2, next(seeds), dtype=torch.float32)


def test_softmax_cp_matches_single_device():
    """ring, all-gather and Ulysses on CP groups of 1, 2, 3 and 4 ranks (Ulysses through both exchanges)."""
    run_distributed(_equivalence_worker, 4)


def _recorded(op, group, size, layout, heads, kv_heads, **options):
    full = _full_inputs(0, 2 * size * 2, heads, kv_heads, torch.float64)
    local = {name: shard(full[name], group, layout=layout).clone().requires_grad_() for name in ("q", "k", "v")}
    with record_comm() as forward:
        output = op(local["q"], local["k"], local["v"], group, layout=layout, **options)
    with record_comm() as backward:
        output.backward(torch.ones_like(output))
    return local["k"], forward, backward


def _communication_worker(rank, world_size, world_group):
    for size in (2, 3, 4):
        group = subgroup(size)
        if group is None:
            continue
        for layout in ("zigzag", "contiguous"):
            # ring: P-1 hops of K/V forward; backward P-1 hops of K/V plus P-1 hops of the fp32 dK/dV
            k, forward, backward = _recorded(ring_attention, group, size, layout, 4, 2)
            kv_bytes = 2 * k.numel() * k.element_size()
            label = f"ring P={size} {layout}"
            assert forward.calls.get("validate", 0) <= 1, f"{label}: {forward.calls}"  # cached per shape set
            assert data_calls(forward) == {"send_recv": size - 1}, f"{label}: {forward.calls}"
            assert forward.bytes["send_recv"] == (size - 1) * kv_bytes, f"{label}: {forward.bytes}"
            assert backward.calls == {"send_recv": 2 * (size - 1)}, f"{label}: {backward.calls}"
            assert backward.bytes["send_recv"] == (size - 1) * (kv_bytes + 2 * k.numel() * 8), label
            # all-gather: one gather per head group each way, one fp32 reduce-scatter per head group
            for head_groups in (1, 2):
                k, forward, backward = _recorded(allgather_attention, group, size, layout, 4, 2, head_groups=head_groups)
                label = f"allgather P={size} {layout} head_groups={head_groups}"
                assert forward.calls.get("validate", 0) <= 1, f"{label}: {forward.calls}"
                assert data_calls(forward) == {"all_gather": head_groups}, f"{label}: {forward.calls}"
                assert forward.bytes["all_gather"] == (size - 1) * kv_bytes, f"{label}: {forward.bytes}"
                assert backward.calls == {"all_gather": head_groups, "reduce_scatter": head_groups}, label
                assert backward.bytes["reduce_scatter"] == (size - 1) * 2 * k.numel() * 8, label
            # Ulysses: four all-to-alls each way (q, k, v, o), the same through DeepSpeed and our exchange
            counts = []
            for choice in ("torch", "deepspeed") if deepspeed_available() else ("torch",):
                _, forward, backward = _recorded(ulysses_attention, group, size, layout, 2 * size, size, all_to_all=choice)
                assert forward.calls["all_to_all"] == 4 and backward.calls["all_to_all"] == 4, choice
                counts.append((forward.bytes["all_to_all"], backward.bytes["all_to_all"]))
            assert len(set(counts)) == 1, f"Ulysses byte counts differ between exchanges: {counts}"


def test_softmax_cp_communication():
    run_distributed(_communication_worker, 4)


def test_reference_agrees_with_public_kernel():
    """The dense reference used above is the public single-device kernel's semantics (bottom-right causal, GQA)."""
    full = _full_inputs(7, 12, 4, 2, torch.float64)
    for causal in (True, False):
        expected = attention(full["q"], full["k"], full["v"], causal=causal, scale=0.3, backend="math")
        assert_close(f"dense vs kernel causal={causal}", dense_attention(full["q"], full["k"], full["v"], causal, 0.3),
                     expected, 1e-12)  # fmt: skip
