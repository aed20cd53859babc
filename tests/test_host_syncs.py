"""No host sync on the training hot path: CP ops and a cp=2 training step, counted on 2 gloo ranks.

tests/sync_guard.py counts the host-reading Tensor calls (.item(), .cpu(), .tolist(), bool(), ...) made
from the repository's source files. Each op and the step run once first (the first call of a shape
checks that the ranks agree; later calls with the same shapes reuse that check), then once counted.
The logging read (Trainer._record) is outside train_step and is the one sync of a logged step.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distributed_utils import run_distributed

pytestmark = pytest.mark.slow

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
CP_OPS = ("lasp2", "lasp1", "ring", "allgather", "ulysses")


def _run_op(name: str, group, generator: torch.Generator) -> None:
    from spindle.parallel import cp

    q, k, v = (torch.randn(1, 16, 2, 8, generator=generator, requires_grad=True) for _ in range(3))
    if name in ("lasp2", "lasp1"):
        decay = torch.nn.functional.logsigmoid(torch.randn(1, 16, 2, generator=generator) + 3).requires_grad_()
        output = getattr(cp, name)(q, k, v, group, log_decay=decay)
    else:
        output = {"ring": cp.ring_attention, "allgather": cp.allgather_attention,
                  "ulysses": cp.ulysses_attention}[name](q, k, v, group)
    output.sum().backward()


def _train_step_setup(world_size: int):
    from spindle.parallel.layout import ParallelContext, ParallelDegrees
    from spindle.runtime.config import load_config, resolve
    from spindle.runtime.data import build_dataset
    from spindle.runtime.main import build_engine, build_model
    from spindle.runtime.optim import build_optimizer
    from spindle.runtime.trainer import BatchProvider

    overrides = ["parallel.cp=2", "train.precision=fp32", "train.global_batch=2", "train.micro_batch=1"]
    config = resolve(load_config(TINY, overrides, world_size=world_size), world_size)
    degrees = ParallelDegrees.resolve(1, 2, 1, world_size)
    context = ParallelContext.build(degrees, torch.device("cpu"), cp_layout=config.parallel.cp_layout)
    model = build_model(config, context)
    engine = build_engine(config, model, build_optimizer(model, config.train), context)
    batches = BatchProvider(build_dataset(config.data, config.model.vocab_size, config.train.seed),
                            config.train.global_batch, config.train.micro_batch, context.dp_rank, context.dp_size)
    return config, context, model, engine, batches


def _validate_calls(group, generator: torch.Generator) -> list[int]:
    """Signature gathers of ring attention on new shapes, on the same shapes again, and under the debug switch."""
    import os

    from spindle.parallel.cp import record_comm

    calls = []
    for debug in ("0", "0", "1"):
        os.environ["SPINDLE_DEBUG_CHECKS"] = debug
        with record_comm() as stats:
            q, k, v = (torch.randn(1, 12, 2, 4, generator=generator) for _ in range(3))
            from spindle.parallel import cp

            cp.ring_attention(q, k, v, group)
        calls.append(stats.calls.get("validate", 0))
    os.environ.pop("SPINDLE_DEBUG_CHECKS")
    return calls


def _syncs_worker(rank: int, world_size: int, group) -> dict:
    from sync_guard import count_host_syncs

    from spindle.runtime.trainer import train_step

    generator = torch.Generator().manual_seed(rank)
    results = {}
    for name in CP_OPS:
        _run_op(name, group, generator)  # first call of these shapes: ranks checked once
        with count_host_syncs() as counts:
            _run_op(name, group, generator)
        results[name] = dict(counts)
    results["validate_calls"] = _validate_calls(group, generator)
    config, context, model, engine, batches = _train_step_setup(world_size)

    def step(index: int):
        return train_step(model, engine, batches.micro_batches(index), context, lr=1e-3,
                          grad_clip=config.train.grad_clip, precision=None)

    step(0)
    with count_host_syncs() as counts:
        step(1)
    results["train_step"] = dict(counts)
    return results


@pytest.fixture(scope="module")
def sync_counts() -> dict:
    counts = run_distributed(_syncs_worker, 2, timeout=300)[0]
    for case, where in counts.items():
        if case == "validate_calls":
            continue
        print(f"host syncs in {case}: {sum(where.values())} {where}")
    return counts


@pytest.mark.parametrize("case", [*CP_OPS, "train_step"])
def test_no_host_sync_from_our_code(sync_counts: dict, case: str) -> None:
    assert sync_counts[case] == {}


def test_rank_agreement_checked_once_per_shape(sync_counts: dict) -> None:
    assert sync_counts["validate_calls"] == [1, 0, 1]


def test_index_tensors_are_cached_per_device() -> None:
    from spindle.parallel.cp import layout

    first = layout.chunk_index(3, "zigzag")
    assert first is layout.chunk_index(3, "zigzag", "cpu") and first.tolist() == [0, 2, 4, 5, 3, 1]
    index = layout.gathered_to_global_index(12, 2, "zigzag")
    assert index is layout.gathered_to_global_index(12, 2, "zigzag")
    # rank 0 holds positions 0-2 and 9-11, rank 1 positions 3-8: the inverse permutation restores order
    gathered = torch.cat([layout.layout_positions(12, rank, 2, "zigzag") for rank in range(2)])
    assert gathered[index].tolist() == list(range(12))
