"""Packed documents on several gloo ranks, in the CP tests' shared spawn (tests/cp_reference.py), each case
its own test id:

- Ulysses, all-gather and ring attention with cu_seqlens at P = 2, 3, 4, both layouts, B = 2, documents
  that cross rank seams, end exactly on a rank or chunk seam, or are shorter than a chunk: outputs and
  every input gradient against each document run alone through the single-device kernel (float64);
- the whole trainer on packed batches of a prepared folder (dp2 x cp2 with all-gather attention, cp2 x
  tp2 with ring attention, zigzag) against one process: the same per-step losses and gradient norms
  (recorded by the ranks, compared here: tests/spawned_training.py).
"""
from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

from cp_reference import SpawnedCase, assert_case_passed, case_results, register_cases  # noqa: F401 (fixture)
from spawned_training import (CORPUS, RESULTS_DIR, TRAINING_WORLD, assert_same_steps, check_world, one_process,
                              prepare_corpus, record, recorded, train_losses)
from spindle import kernels
from spindle.parallel import cp as context_parallel
from spindle.parallel.layout import ParallelContext, ParallelDegrees
from spindle.runtime.config import Config, load_config, resolve

pytestmark = pytest.mark.slow

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
STEPS = 3
LENGTH = 24  # divisible by 2P for P = 2, 3, 4
# Row starts of the documents of a [2, 24] batch: 3 and 4 are shorter than any chunk, 6 / 8 / 12 are
# rank and chunk seams for some P, 11 -> 20 crosses seams, 17 is inside a chunk.
ROW_STARTS = [[0, 3, 4, 6, 11, 12, 20], [0, 8, 9, 17]]


def packed_config(folder: str, world_size: int, dp: int = 1, cp: int = 1, tp: int = 1,
                  softmax: str = "allgather") -> Config:
    overrides = {"data.source": folder, "data.seq_len": LENGTH, "data.packing": "documents",
                 "model.vocab_size": 128, "model.layers": "A", "model.n_layers": 2, "parallel.dp": dp,
                 "parallel.cp": cp, "parallel.tp": tp, "parallel.cp_softmax": softmax, "parallel.cp_layout": "zigzag",
                 "train.steps": STEPS, "train.global_batch": 4, "train.micro_batch": 1, "train.precision": "fp32"}
    return resolve(load_config(TINY, [f"{key}={value}" for key, value in overrides.items()],
                               world_size=world_size), world_size)


def documents_alone(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The reference: every document of every row through the single-device kernel by itself."""
    rows = []
    for row, starts in enumerate(ROW_STARTS):
        bounds = [*starts, LENGTH]
        rows.append(torch.cat([kernels.attention(q[row : row + 1, start:end], k[row : row + 1, start:end],
                                                 v[row : row + 1, start:end], causal=True)
                               for start, end in zip(bounds[:-1], bounds[1:])], dim=1))
    return torch.cat(rows)


SCHEMES = {
    "ulysses": functools.partial(context_parallel.ulysses_attention, all_to_all="torch"),
    "allgather": context_parallel.allgather_attention,
    "allgather-head-groups": functools.partial(context_parallel.allgather_attention, head_groups=2),
    "ring": context_parallel.ring_attention,
}


def _check_scheme(scheme: str, group: torch.distributed.ProcessGroup, layout: str) -> float:
    generator = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, LENGTH, 12, 4, generator=generator, dtype=torch.float64) for _ in range(3))
    upstream = torch.randn(2, LENGTH, 12, 4, generator=generator, dtype=torch.float64)
    cu_seqlens = torch.tensor([row * LENGTH + start for row, starts in enumerate(ROW_STARTS) for start in starts]
                              + [2 * LENGTH], dtype=torch.int32)
    full = [x.clone().requires_grad_() for x in (q, k, v)]
    expected = documents_alone(*full)
    expected_grads = torch.autograd.grad(expected, full, upstream)
    local = [context_parallel.shard(x, group, layout=layout).requires_grad_() for x in (q, k, v)]
    output = SCHEMES[scheme](*local, group, layout=layout, cu_seqlens=cu_seqlens)
    grads = torch.autograd.grad(output, local, context_parallel.shard(upstream, group, layout=layout))
    error = (context_parallel.unshard(output.detach(), group, layout=layout) - expected).abs().max()
    for grad, reference in zip(grads, expected_grads):
        error = max(error, (context_parallel.unshard(grad, group, layout=layout) - reference).abs().max())
    return float(error)


def _kernel_case(group: torch.distributed.ProcessGroup, scheme: str, layout: str) -> str | None:
    error = _check_scheme(scheme, group, layout)
    return None if error < 1e-10 else f"largest difference {error:.3g} from the documents run alone"


# name -> (dp, cp, tp), cp_softmax
TRAINING = {"dp2-cp2-allgather": ((2, 2, 1), "allgather"), "cp2-tp2-ring": ((1, 2, 2), "ring")}


def _training_case(group: torch.distributed.ProcessGroup, name: str, folder: str, results_dir: str) -> str | None:
    if problem := check_world(group):
        return problem
    degrees, softmax = TRAINING[name]
    config = packed_config(folder, TRAINING_WORLD, *degrees, softmax=softmax)
    context = ParallelContext.build(ParallelDegrees(*degrees), torch.device("cpu"), cp_layout="zigzag")
    record(group, results_dir, f"{__name__}-{name}", train_losses(config, context))
    return None


def _cases() -> dict[str, SpawnedCase]:
    cases = {f"{scheme}-P{size}-{layout}": SpawnedCase(size, _kernel_case, {"scheme": scheme, "layout": layout})
             for size in (2, 3, 4) for layout in ("zigzag", "contiguous") for scheme in SCHEMES}
    for name in TRAINING:
        cases[f"train-{name}"] = SpawnedCase(TRAINING_WORLD, _training_case,
                                             {"name": name, "folder": str(CORPUS), "results_dir": str(RESULTS_DIR)})
    return cases


CASES = register_cases(__name__, _cases(), prepare=prepare_corpus)


@pytest.mark.parametrize("case", [case for case in CASES if not case.startswith("train-")])
def test_packed_documents_kernels(case: str, case_results: dict[str, str | None]) -> None:
    """Outputs and every input gradient against each document alone (float64, 1e-10)."""
    assert_case_passed(case_results, case)


@pytest.mark.parametrize("case", [case for case in CASES if case.startswith("train-")])
def test_packed_documents_training(case: str, case_results: dict[str, str | None]) -> None:
    """The same per-step losses and gradient norms as one process (1e-5)."""
    assert_case_passed(case_results, case)
    actual = recorded(RESULTS_DIR, f"{__name__}-{case.removeprefix('train-')}")
    expected = one_process(f"{__name__}-reference",
                           lambda: train_losses(packed_config(str(CORPUS), 1), ParallelContext.single_process()))
    assert_same_steps(case, actual, expected, {"losses": 1e-5, "grad_norms": 1e-5})
