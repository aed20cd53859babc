"""Activation checkpointing (torch.utils.checkpoint per block) changes memory, never results.

Every policy trains the same steps of configs/tiny.yaml (fp32) as policy "none", in one process and
with cp=2 on 2 gloo ranks (tests/two_rank_checks.py), and must give the same losses and gradients;
the blocks the policy names must actually run their forward again during backward, and exactly once
again: a checkpointed linear layer runs its kernel forward twice per micro-batch (forward and recompute),
at cp=1 and under LASP at cp=2 (counted by spindle.kernels.linear_attn.api.kernel_forwards).
"""

from __future__ import annotations

import pytest
import torch

import two_rank_checks
from two_rank_checks import POLICIES, train_with_policy

from spindle.parallel.layout import ParallelContext
from spindle.parallel.parallelize import AC_POLICIES


def _check_against(results: dict, reference: dict, label: str) -> None:
    assert results["losses"] == pytest.approx(reference["losses"], rel=1e-6, abs=0), label
    for name, gradient in reference["gradients"].items():
        torch.testing.assert_close(torch.as_tensor(results["gradients"][name]), torch.as_tensor(gradient),
                                   rtol=1e-5, atol=1e-7, msg=f"{label}: {name}")


def _expected_forwards(policy: str, reference: dict) -> dict:
    """A recomputed block runs its mixer forward once more per micro-batch."""
    return {kind: count * (2 if kind in AC_POLICIES[policy] else 1) for kind, count in reference["forwards"].items()}


def _expected_kernel_forwards(policy: str, reference: dict) -> int:
    """configs/tiny.yaml's linear-attention kernels all run in its L layers: twice each when L is recomputed."""
    return reference["kernel_forwards"] * (2 if "L" in AC_POLICIES[policy] else 1)


@pytest.mark.parametrize("policy", POLICIES[1:])
def test_same_losses_and_gradients_one_process(policy: str) -> None:
    reference = train_with_policy("none", 1, ParallelContext.single_process())
    results = train_with_policy(policy, 1, ParallelContext.single_process())
    _check_against(results, reference, policy)
    assert results["recomputing"] == set(AC_POLICIES[policy]) & {"L", "A"}
    assert results["forwards"] == _expected_forwards(policy, reference)
    assert results["kernel_forwards"] == _expected_kernel_forwards(policy, reference)


def _two_rank_checkpointing() -> dict:
    return two_rank_checks.results()["checkpointing"]


@pytest.mark.parametrize("cp", [1, pytest.param(2, marks=pytest.mark.slow)], ids=["cp1", "cp2-lasp2"])
def test_checkpointed_linear_layer_runs_its_kernel_forward_twice(cp: int) -> None:
    """Per micro-batch and L layer: one kernel forward without checkpointing, two with it (the forward and the
    checkpoint's recompute). Three would mean a backward replays the forward on its own (LASP once did:
    its backward's nested autograd replay triggered a second recompute)."""
    if cp == 1:
        runs = {policy: train_with_policy(policy, 1, ParallelContext.single_process()) for policy in ("none", "linear")}
    else:
        runs = _two_rank_checkpointing()
    micro_batch_layers = runs["none"]["forwards"]["L"]  # L mixer forwards without checkpointing
    assert micro_batch_layers > 0
    assert runs["none"]["kernel_forwards"] == micro_batch_layers
    assert runs["linear"]["kernel_forwards"] == 2 * micro_batch_layers, runs["linear"]["kernel_forwards"]


@pytest.mark.slow
def test_checkpointed_lasp_block_keeps_what_a_single_device_block_keeps() -> None:
    """The memory the policy promises: between forward and backward a checkpointed L block with LASP-2 keeps
    what the same block with the single-device kernel keeps (its input's recompute needs), plus at most the
    chain's Γ ([chunks, B, H] floats): no kernel residuals or gathered states held on the side."""
    kept = two_rank_checks.results()["block_bytes"]
    print(f"live bytes kept until backward: {kept}")
    assert kept["lasp2"][True] <= kept["single"][True] + 1024, kept
    assert kept["lasp2"][True] * 5 < kept["lasp2"][False], kept  # checkpointing frees most of the block


@pytest.mark.slow
def test_same_losses_and_gradients_with_cp2() -> None:
    results = _two_rank_checkpointing()
    single = train_with_policy("none", 1, ParallelContext.single_process())
    assert results["none"]["losses"] == pytest.approx(single["losses"], rel=1e-5)
    for policy in POLICIES[1:]:
        _check_against(results[policy], results["none"], f"cp2 {policy}")
        assert results[policy]["forwards"] == _expected_forwards(policy, results["none"]), policy
        assert results[policy]["kernel_forwards"] == _expected_kernel_forwards(policy, results["none"]), policy
