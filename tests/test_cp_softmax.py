"""Ring, all-gather and Ulysses attention on 1-4 gloo ranks against dense float64 softmax attention on the
unsharded tensors: output and dq, dk, dv compared tensor by tensor (relative error, fp64 within 1e-10, fp32
within 1e-5), both layouts, causal and not, GQA; plus their communication. Every case has its own test id;
all selected cases run in one spawn."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist
from cp_reference import SpawnedCase, assert_case_passed, assert_close, case_results, data_calls, dense_attention
from cp_reference import random_inputs, register_cases
from numerics import TOLERANCE, check_tensors

from spindle.kernels import attention
from spindle.parallel.cp import allgather_attention, record_comm, ring_attention, shard, ulysses_attention
from spindle.parallel.cp.ulysses import deepspeed_available

pytestmark = pytest.mark.slow

BATCH, HEAD_DIM = 2, 8


def _build_deepspeed_comm_op() -> None:
    """On CPU, DeepSpeed's comm backend JIT-compiles a small C++ op the first time it starts (minutes on two
    busy cores). Built here, in the test process before the spawn and without a deadline, the ranks only
    load it: a rank killed by the timeout mid-build would leave a stale build lock that hangs every later
    DeepSpeed start."""
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


def _check(group, op, layout, causal, heads, kv_heads, seed, dtype=torch.float64, chunk=3, **options):
    """op on the CP group against dense float64 softmax attention: output and the gradients of q, k, v."""
    size = dist.get_world_size(group)
    full = _full_inputs(seed, 2 * size * chunk, heads, kv_heads, dtype)
    scale = 0.3
    reference = {name: full[name].to(torch.float64, copy=True).requires_grad_() for name in ("q", "k", "v")}
    expected = dense_attention(reference["q"], reference["k"], reference["v"], causal, scale)
    expected.backward(full["do"].double())
    local = {name: shard(full[name], group, layout=layout).clone().requires_grad_() for name in ("q", "k", "v")}
    output = op(local["q"], local["k"], local["v"], group, layout=layout, causal=causal, scale=scale, **options)
    output.backward(shard(full["do"], group, layout=layout))
    if output.dtype != dtype:
        return f"output dtype {output.dtype} != {dtype}"
    actual = {"output": output.detach(), **{"grad_" + name: local[name].grad for name in ("q", "k", "v")}}
    wanted = {"output": expected.detach(), **{"grad_" + name: tensor.grad for name, tensor in reference.items()}}
    wanted = {name: shard(tensor, group, layout=layout) for name, tensor in wanted.items()}
    return check_tensors(actual, wanted, TOLERANCE[dtype])


def _equivalence_cases() -> dict[str, SpawnedCase]:
    """ring, all-gather and Ulysses (through both exchanges) on CP groups of 1-4 ranks, both layouts,
    causal or not, GQA and plain multi-head; longer local chunks and fp32."""
    all_to_alls = ("torch", "deepspeed") if deepspeed_available() else ("torch",)
    cases = {}
    for size in (1, 2, 3, 4):
        seeds = itertools.count(100 * size)

        def add(name, op, layout, causal, heads, kv_heads, **options):
            mask = "causal" if causal else "full"
            case_id = f"P{size}-{name}-{layout}-{mask}-H{heads}-KV{kv_heads}"
            cases[case_id] = SpawnedCase(size, _check, dict(op=op, layout=layout, causal=causal, heads=heads,
                                                            kv_heads=kv_heads, seed=next(seeds), **options))

        for layout, causal in itertools.product(("zigzag", "contiguous"), (True, False)):
            for heads, kv_heads in ((4, 2), (2, 2)):  # GQA and plain multi-head
                add("ring", ring_attention, layout, causal, heads, kv_heads)
                add("allgather", allgather_attention, layout, causal, heads, kv_heads)
            add("allgather-2-head-groups", allgather_attention, layout, causal, 4, 2, head_groups=2)
            for choice in all_to_alls:  # Ulysses needs heads divisible by P
                add(f"ulysses-{choice}", ulysses_attention, layout, causal, 2 * size, size, all_to_all=choice)
        add("ring-chunk20", ring_attention, "zigzag", True, 4, 1, chunk=20)
        add("ring-float32", ring_attention, "zigzag", True, 4, 2, dtype=torch.float32)
        add("allgather-float32", allgather_attention, "zigzag", True, 4, 2, dtype=torch.float32)
    return cases


EQUIVALENCE_CASES = register_cases(__name__, _equivalence_cases(), prepare=_build_deepspeed_comm_op)


@pytest.mark.parametrize("case", list(EQUIVALENCE_CASES))
def test_softmax_cp_matches_single_device(case: str, case_results: dict[str, str | None]) -> None:
    """ring, all-gather or Ulysses on a CP group against dense float64 attention (output, dq, dk, dv)."""
    assert_case_passed(case_results, case)


def _recorded(op, group, layout, heads, kv_heads, **options):
    size = dist.get_world_size(group)
    full = _full_inputs(0, 2 * size * 2, heads, kv_heads, torch.float64)
    local = {name: shard(full[name], group, layout=layout).clone().requires_grad_() for name in ("q", "k", "v")}
    with record_comm() as forward:
        output = op(local["q"], local["k"], local["v"], group, layout=layout, **options)
    with record_comm() as backward:
        output.backward(torch.ones_like(output))
    return local["k"], forward, backward


def _check_ring_communication(group, layout):
    """ring: P-1 hops of K/V forward; backward P-1 hops of K/V plus P-1 hops of the fp32 dK/dV."""
    size = dist.get_world_size(group)
    k, forward, backward = _recorded(ring_attention, group, layout, 4, 2)
    kv_bytes = 2 * k.numel() * k.element_size()
    failures = []
    if forward.calls.get("validate", 0) > 1 or data_calls(forward) != {"send_recv": size - 1}:
        failures.append(f"forward calls {forward.calls}")  # the shape check is cached per shape set
    elif forward.bytes["send_recv"] != (size - 1) * kv_bytes:
        failures.append(f"forward bytes {forward.bytes}")
    if backward.calls != {"send_recv": 2 * (size - 1)}:
        failures.append(f"backward calls {backward.calls}")
    elif backward.bytes["send_recv"] != (size - 1) * (kv_bytes + 2 * k.numel() * 8):
        failures.append(f"backward bytes {backward.bytes}")
    return "; ".join(failures) or None


def _check_allgather_communication(group, layout, head_groups):
    """all-gather: one gather per head group each way, one fp32 reduce-scatter per head group."""
    size = dist.get_world_size(group)
    k, forward, backward = _recorded(allgather_attention, group, layout, 4, 2, head_groups=head_groups)
    kv_bytes = 2 * k.numel() * k.element_size()
    failures = []
    if forward.calls.get("validate", 0) > 1 or data_calls(forward) != {"all_gather": head_groups}:
        failures.append(f"forward calls {forward.calls}")
    elif forward.bytes["all_gather"] != (size - 1) * kv_bytes:
        failures.append(f"forward bytes {forward.bytes}")
    if backward.calls != {"all_gather": head_groups, "reduce_scatter": head_groups}:
        failures.append(f"backward calls {backward.calls}")
    elif backward.bytes["reduce_scatter"] != (size - 1) * 2 * k.numel() * 8:
        failures.append(f"backward bytes {backward.bytes}")
    return "; ".join(failures) or None


def _check_ulysses_communication(group, layout):
    """Ulysses: four all-to-alls each way (q, k, v, o), the same through DeepSpeed and our exchange."""
    size = dist.get_world_size(group)
    counts, failures = [], []
    for choice in ("torch", "deepspeed") if deepspeed_available() else ("torch",):
        _, forward, backward = _recorded(ulysses_attention, group, layout, 2 * size, size, all_to_all=choice)
        if forward.calls.get("all_to_all") != 4 or backward.calls.get("all_to_all") != 4:
            failures.append(f"{choice}: calls {forward.calls} / {backward.calls}")
        counts.append((forward.bytes.get("all_to_all"), backward.bytes.get("all_to_all")))
    if len(set(counts)) != 1:
        failures.append(f"byte counts differ between exchanges: {counts}")
    return "; ".join(failures) or None


def _communication_cases() -> dict[str, SpawnedCase]:
    cases = {}
    for size, layout in itertools.product((2, 3, 4), ("zigzag", "contiguous")):
        cases[f"ring-P{size}-{layout}"] = SpawnedCase(size, _check_ring_communication, dict(layout=layout))
        for head_groups in (1, 2):
            cases[f"allgather-P{size}-{layout}-{head_groups}-head-groups"] = SpawnedCase(
                size, _check_allgather_communication, dict(layout=layout, head_groups=head_groups))
        cases[f"ulysses-P{size}-{layout}"] = SpawnedCase(size, _check_ulysses_communication, dict(layout=layout))
    return cases


COMMUNICATION_CASES = register_cases(__name__, _communication_cases())


@pytest.mark.parametrize("case", list(COMMUNICATION_CASES))
def test_softmax_cp_communication(case: str, case_results: dict[str, str | None]) -> None:
    assert_case_passed(case_results, case)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_reference_agrees_with_public_kernel(causal: bool) -> None:
    """The dense reference used above is the public single-device kernel's semantics (bottom-right causal, GQA)."""
    full = _full_inputs(7, 12, 4, 2, torch.float64)
    expected = attention(full["q"], full["k"], full["v"], causal=causal, scale=0.3, backend="math")
    assert_close("dense vs kernel", dense_attention(full["q"], full["k"], full["v"], causal, 0.3), expected, 1e-12)
