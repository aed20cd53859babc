"""Packed documents through LASP-2 and LASP-1 (cu_seqlens of the global batch), on several gloo ranks:

- every (scheme, P = 2, 3, 4, layout, decay kind) against each document run alone through the
  single-device kernel in float64: outputs and the gradients of q, k, v and the log-decay (none,
  constant [H], per token). The [2, 24] batch has documents shorter than any chunk, starts exactly on
  rank and zigzag chunk seams, documents crossing several seams and a chunk holding several documents;
- offsets without a row's start: one clear message;
- the trainer on packed batches of a prepared folder, hybrid "LA" (constant decay) and "LLA"
  (per-token decay) models, dp2 x cp2 (LASP-2 zigzag with both, LASP-1 zigzag and contiguous), against
  one process: the same per-step losses (recorded by the ranks, compared here: tests/spawned_training.py).

Every case runs in the CP tests' shared spawn (tests/cp_reference.py), each its own test id.
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
LENGTH = 24  # divisible by 2P for P = 2, 3, 4
# Row starts of the documents of a [2, 24] batch. Zigzag chunks are 6 / 4 / 3 tokens long for P = 2 / 3 / 4,
# contiguous ones 12 / 8 / 6: 3 and 4 are shorter than any chunk, 6, 8, 12 fall on rank or chunk seams,
# 12 -> 20 and 9 -> 17 -> 24 cross seams, chunks such as [0, 6) hold several documents.
ROW_STARTS = [[0, 3, 4, 6, 11, 12, 20], [0, 8, 9, 17]]
BATCH, HEADS, DIM = 2, 2, 3
OPS = {"lasp2": context_parallel.lasp2, "lasp1": context_parallel.lasp1}
DECAYS = ("none", "constant", "token")
MODELS = {"LA": {"model.layers": "LA", "model.n_layers": 2, "model.decay": "constant"},
          "LLA": {"model.layers": "LLA", "model.n_layers": 3, "model.decay": "data"}}


def cu_seqlens() -> torch.Tensor:
    return torch.tensor([row * LENGTH + start for row, starts in enumerate(ROW_STARTS) for start in starts]
                        + [BATCH * LENGTH], dtype=torch.int32)


def inputs(kind: str) -> tuple[list[torch.Tensor], torch.Tensor]:
    """[q, k, v] (+ log_decay unless kind is "none") and the upstream gradient, the same on every rank."""
    generator = torch.Generator().manual_seed(DECAYS.index(kind))
    tensors = [torch.randn(BATCH, LENGTH, HEADS, DIM, generator=generator, dtype=torch.float64) for _ in range(3)]
    if kind == "constant":
        tensors.append(-torch.rand(HEADS, generator=generator, dtype=torch.float64))
    elif kind == "token":
        tensors.append(-2 * torch.rand(BATCH, LENGTH, HEADS, generator=generator, dtype=torch.float64))
    return tensors, torch.randn(BATCH, LENGTH, HEADS, DIM, generator=generator, dtype=torch.float64)


def documents_alone(q, k, v, log_decay=None) -> torch.Tensor:
    """The reference: every document of every row through the single-device kernel by itself."""
    rows = []
    for row, starts in enumerate(ROW_STARTS):
        bounds, pieces = [*starts, LENGTH], []
        for start, end in zip(bounds[:-1], bounds[1:]):
            decay = log_decay if log_decay is None or log_decay.dim() == 1 else log_decay[row : row + 1, start:end]
            part = slice(start, end)
            pieces.append(kernels.linear_attention(q[row : row + 1, part], k[row : row + 1, part],
                                                   v[row : row + 1, part], log_decay=decay, backend="naive")[0])
        rows.append(torch.cat(pieces, dim=1))
    return torch.cat(rows)


@functools.cache  # once per rank: the cases of a kind share it
def reference(kind: str) -> list[torch.Tensor]:
    """[output, dq, dk, dv (, dlog_decay)] of documents_alone."""
    tensors, upstream = inputs(kind)
    leaves = [x.clone().requires_grad_() for x in tensors]
    output = documents_alone(*leaves)
    return [output.detach(), *torch.autograd.grad(output, leaves, upstream)]


def check_case(scheme: str, group, layout: str, kind: str, expected: list[torch.Tensor]) -> float:
    """Largest absolute difference, over the output and every gradient, of the sharded op vs `expected`."""
    tensors, upstream = inputs(kind)
    local = [x if x.dim() == 1 else context_parallel.shard(x, group, layout=layout) for x in tensors]
    local = [x.clone().requires_grad_() for x in local]
    decay = local[3] if len(local) > 3 else None
    output = OPS[scheme](*local[:3], group, layout=layout, log_decay=decay, cu_seqlens=cu_seqlens())
    grads = list(torch.autograd.grad(output, local, context_parallel.shard(upstream, group, layout=layout)))
    if kind == "constant":  # each rank holds its part of the replicated [H] decay's gradient
        torch.distributed.all_reduce(grads[3], group=group)
    results = [output.detach(), *grads]
    error = 0.0
    for result, wanted in zip(results, expected, strict=True):
        full = result if result.dim() == 1 else context_parallel.unshard(result, group, layout=layout)
        error = max(error, float((full - wanted).abs().max()))
    return error


def packed_config(folder: str, world_size: int, model: str, dp: int = 1, cp: int = 1,
                  linear: str = "lasp2", layout: str = "zigzag") -> Config:
    overrides = {"data.source": folder, "data.seq_len": LENGTH, "data.packing": "documents",
                 "model.vocab_size": 128, **MODELS[model], "parallel.dp": dp, "parallel.cp": cp,
                 "parallel.cp_linear": linear, "parallel.cp_softmax": "allgather", "parallel.cp_layout": layout,
                 "train.steps": 3, "train.global_batch": 4, "train.micro_batch": 2, "train.precision": "fp32"}
    return resolve(load_config(TINY, [f"{key}={value}" for key, value in overrides.items()],
                               world_size=world_size), world_size)


def _kernel_case(group: torch.distributed.ProcessGroup, scheme: str, layout: str, kind: str) -> str | None:
    error = check_case(scheme, group, layout, kind, reference(kind))
    return None if error < 1e-12 else f"largest difference {error:.3g} from the documents run alone"


def _missing_row_start(group: torch.distributed.ProcessGroup) -> str | None:
    """Offsets without the second row's start: one clear message on every rank."""
    tensors, _ = inputs("none")
    local = [context_parallel.shard(x, group, layout="zigzag") for x in tensors]
    missing_row = torch.tensor([0, 3, 4, 6, 11, 12, 20, 32, 33, 41, 48], dtype=torch.int32)
    with pytest.raises(ValueError, match="every row start"):
        context_parallel.lasp2(*local, group, cu_seqlens=missing_row)
    return None


# name -> (model, cp_linear, cp_layout), each on dp2 x cp2
TRAINING = {"LA-lasp2-zigzag": ("LA", "lasp2", "zigzag"),
            "LLA-lasp1-contiguous": ("LLA", "lasp1", "contiguous"),
            "LLA-lasp2-zigzag": ("LLA", "lasp2", "zigzag"),
            "LA-lasp1-zigzag": ("LA", "lasp1", "zigzag")}
DP, CP = 2, 2


def _training_case(group: torch.distributed.ProcessGroup, name: str, folder: str, results_dir: str) -> str | None:
    if problem := check_world(group):
        return problem
    model, linear, layout = TRAINING[name]
    config = packed_config(folder, TRAINING_WORLD, model, DP, CP, linear, layout)
    context = ParallelContext.build(ParallelDegrees(DP, CP, 1), torch.device("cpu"), cp_layout=layout)
    record(group, results_dir, f"{__name__}-{name}", train_losses(config, context))
    return None


def _cases() -> dict[str, SpawnedCase]:
    cases = {f"{scheme}-P{size}-{layout}-{kind}": SpawnedCase(size, _kernel_case,
                                                               {"scheme": scheme, "layout": layout, "kind": kind})
             for size in (2, 3, 4) for scheme in OPS for layout in ("zigzag", "contiguous") for kind in DECAYS}
    cases["missing-row-start"] = SpawnedCase(2, _missing_row_start)
    for name in TRAINING:
        cases[f"train-dp{DP}-cp{CP}-{name}"] = SpawnedCase(
            TRAINING_WORLD, _training_case, {"name": name, "folder": str(CORPUS), "results_dir": str(RESULTS_DIR)})
    return cases


CASES = register_cases(__name__, _cases(), prepare=prepare_corpus)


def test_documents_matter() -> None:
    """The oracle can fail: the same tensors without document boundaries give other outputs."""
    tensors, _ = inputs("token")
    plain = kernels.linear_attention(*tensors[:3], log_decay=tensors[3], backend="naive")[0]
    assert float((plain - documents_alone(*tensors)).abs().max()) > 0.1


@pytest.mark.parametrize("case", [case for case in CASES if not case.startswith("train-")])
def test_lasp_with_packed_documents(case: str, case_results: dict[str, str | None]) -> None:
    """Output and every gradient against each document alone (float64, 1e-12), or the clear error."""
    assert_case_passed(case_results, case)


@pytest.mark.parametrize("case", [case for case in CASES if case.startswith("train-")])
def test_lasp_training_on_packed_documents(case: str, case_results: dict[str, str | None]) -> None:
    """The same per-step losses as one process (1e-5)."""
    assert_case_passed(case_results, case)
    name = case.removeprefix(f"train-dp{DP}-cp{CP}-")
    model = TRAINING[name][0]
    expected = one_process(f"{__name__}-{model}", lambda: train_losses(packed_config(str(CORPUS), 1, model),
                                                                       ParallelContext.single_process()))
    assert_same_steps(case, recorded(RESULTS_DIR, f"{__name__}-{name}"), expected, {"losses": 1e-5})
