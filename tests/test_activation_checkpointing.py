"""Activation checkpointing (torch.utils.checkpoint per block) changes memory, never results.

Every policy trains the same steps of configs/tiny.yaml (fp32) as policy "none", in one process and
with cp=2 on 2 gloo ranks (tests/two_rank_checks.py), and must give the same losses and gradients;
the blocks the policy names must actually run their forward again during backward.
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


@pytest.mark.parametrize("policy", POLICIES[1:])
def test_same_losses_and_gradients_one_process(policy: str) -> None:
    reference = train_with_policy("none", 1, ParallelContext.single_process())
    results = train_with_policy(policy, 1, ParallelContext.single_process())
    _check_against(results, reference, policy)
    assert results["recomputing"] == set(AC_POLICIES[policy]) & {"L", "A"}
    assert results["forwards"] == _expected_forwards(policy, reference)


@pytest.mark.slow
def test_same_losses_and_gradients_with_cp2() -> None:
    results = two_rank_checks.results()["checkpointing"]
    single = train_with_policy("none", 1, ParallelContext.single_process())
    assert results["none"]["losses"] == pytest.approx(single["losses"], rel=1e-5)
    for policy in POLICIES[1:]:
        _check_against(results[policy], results["none"], f"cp2 {policy}")
        expected, counted = _expected_forwards(policy, results["none"]), results[policy]["forwards"]
        assert counted["A"] == expected["A"], policy
        # Known waste: under torch.utils.checkpoint a LASP op runs its forward three times, not twice (a
        # lone lasp2 call checkpointed shows the same; ring attention runs twice). Results stay exact.
        assert expected["L"] <= counted["L"] <= expected["L"] + (expected["L"] // 2 if "L" in AC_POLICIES[policy]
                                                                  else 0), policy
