"""Activation checkpointing (torch.utils.checkpoint per block) changes memory, never results.

Every policy trains the same steps of configs/tiny.yaml (fp32) as policy "none", in one process and
with cp=2 on 2 gloo ranks, and must give the same losses and gradients; the blocks the policy names
must actually run their forward again during backward.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distributed_utils import run_distributed
from spindle.parallel.layout import ParallelContext, ParallelDegrees
from spindle.parallel.parallelize import AC_POLICIES
from spindle.runtime.config import load_config, resolve
from spindle.runtime.data import build_dataset
from spindle.runtime.main import build_model
from spindle.runtime.optim import build_optimizer
from spindle.runtime.trainer import BatchProvider, train_step

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
POLICIES = ("none", "full", "linear", "softmax")
STEPS = 2


def _train(policy: str, cp: int, context: ParallelContext) -> dict:
    overrides = ["train.precision=fp32", "train.global_batch=2", "train.micro_batch=1", f"parallel.cp={cp}",
                 f"parallel.activation_checkpointing={policy}"]
    config = resolve(load_config(TINY, overrides, world_size=cp), cp)
    torch.manual_seed(0)
    model = build_model(config, context)
    optimizer = build_optimizer(model, config.train)
    batches = BatchProvider(build_dataset(config.data, config.model.vocab_size, config.train.seed),
                            config.train.global_batch, config.train.micro_batch, context.dp_rank, context.dp_size)
    forwards = {"L": 0, "A": 0}

    def count(module, inputs, output, kind):
        forwards[kind] += 1

    for block in model.layers:
        block.mixer.register_forward_hook(lambda m, i, o, kind=block.kind: count(m, i, o, kind))
    losses, gradients = [], {}
    for step in range(STEPS):
        result = train_step(model, optimizer, batches.micro_batches(step), context, lr=1e-3,
                            grad_clip=config.train.grad_clip, precision=None)
        losses.append(float(result.loss))
        if step == 0:
            gradients = {name: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
                         for name, p in model.named_parameters()}
    recomputing = {block.kind for block in model.layers if block.recompute}
    return {"losses": losses, "gradients": gradients, "forwards": forwards, "recomputing": recomputing}


def _check_against(results: dict, reference: dict, label: str) -> None:
    assert results["losses"] == pytest.approx(reference["losses"], rel=1e-6, abs=0), label
    for name, gradient in reference["gradients"].items():
        torch.testing.assert_close(torch.as_tensor(results["gradients"][name]), torch.as_tensor(gradient), rtol=1e-5, atol=1e-7, msg=f"{label}: {name}")


def _expected_forwards(policy: str, reference: dict) -> dict:
    """A recomputed block runs its mixer forward once more per micro-batch."""
    return {kind: count * (2 if kind in AC_POLICIES[policy] else 1) for kind, count in reference["forwards"].items()}


@pytest.mark.parametrize("policy", POLICIES[1:])
def test_same_losses_and_gradients_one_process(policy: str) -> None:
    reference = _train("none", 1, ParallelContext.single_process())
    results = _train(policy, 1, ParallelContext.single_process())
    _check_against(results, reference, policy)
    assert results["recomputing"] == set(AC_POLICIES[policy]) & {"L", "A"}
    assert results["forwards"] == _expected_forwards(policy, reference)


def _cp_worker(rank: int, world_size: int, group) -> dict:
    context = ParallelContext.build(ParallelDegrees.resolve(1, 2, 1, world_size), torch.device("cpu"))
    runs = {policy: _train(policy, 2, context) for policy in POLICIES}
    # tensors by value through the result queue (shared-memory handles die with the rank's process)
    return {policy: {"losses": run["losses"], "forwards": run["forwards"],
                     "gradients": {name: value.numpy().copy() for name, value in run["gradients"].items()}}
            for policy, run in runs.items()}


@pytest.mark.slow
def test_same_losses_and_gradients_with_cp2() -> None:
    results = run_distributed(_cp_worker, 2, timeout=300)[0]
    single = _train("none", 1, ParallelContext.single_process())
    assert results["none"]["losses"] == pytest.approx(single["losses"], rel=1e-5)
    for policy in POLICIES[1:]:
        _check_against(results[policy], results["none"], f"cp2 {policy}")
        expected, counted = _expected_forwards(policy, results["none"]), results[policy]["forwards"]
        assert counted["A"] == expected["A"], policy
        # Known waste: under torch.utils.checkpoint a LASP op runs its forward three times, not twice (a
        # lone lasp2 call checkpointed shows the same; ring attention runs twice). Results stay exact.
        assert expected["L"] <= counted["L"] <= expected["L"] + (expected["L"] // 2 if "L" in AC_POLICIES[policy]
                                                                  else 0), policy
