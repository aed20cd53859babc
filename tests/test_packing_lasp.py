"""Packed documents through LASP-2 and LASP-1 (cu_seqlens of the global batch), on several gloo ranks:

- every (scheme, P = 2, 3, 4, layout, decay kind) against each document run alone through the
  single-device kernel in float64: outputs and the gradients of q, k, v and the log-decay (none,
  constant [H], per token). The [2, 24] batch has documents shorter than any chunk, starts exactly on
  rank and zigzag chunk seams, documents crossing several seams and a chunk holding several documents;
- the trainer on packed batches of a prepared folder, hybrid "LA" (constant decay) and "LLA"
  (per-token decay) models, on cp2 and dp2 x cp2 against one process: the same per-step losses.

Two spawns: 2 ranks (P = 2 and cp2 training), 4 ranks (P = 3, 4 and dp2 x cp2 training).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distributed_utils import run_distributed, subgroup
from spindle import kernels
from spindle.parallel import cp as context_parallel
from spindle.parallel.layout import ParallelContext, ParallelDegrees
from spindle.runtime.config import Config, load_config, resolve
from test_packing_distributed import prepared, train_losses  # noqa: F401 (prepared: the corpus fixture)

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


# name -> (model, (dp, cp), cp_linear, cp_layout), by the world size that trains it
TRAINING = {2: {"cp2-LA-lasp2-zigzag": ("LA", (1, 2), "lasp2", "zigzag"),
                "cp2-LLA-lasp1-contiguous": ("LLA", (1, 2), "lasp1", "contiguous")},
            4: {"dp2-cp2-LLA-lasp2-zigzag": ("LLA", (2, 2), "lasp2", "zigzag"),
                "dp2-cp2-LA-lasp1-zigzag": ("LA", (2, 2), "lasp1", "zigzag")}}


def _worker(rank: int, world_size: int, group: object, folder: str) -> dict:
    expected = {kind: reference(kind) for kind in DECAYS}
    errors = {}
    for size in ((2,) if world_size == 2 else (3, 4)):
        members = subgroup(size)
        if members is None:
            continue
        for scheme in OPS:
            for layout in ("zigzag", "contiguous"):
                for kind in DECAYS:
                    errors[f"{scheme}-P{size}-{layout}-{kind}"] = check_case(scheme, members, layout, kind,
                                                                             expected[kind])
    if world_size == 2:  # offsets without the second row's start: one clear message on every rank
        tensors, _ = inputs("none")
        local = [context_parallel.shard(x, group, layout="zigzag") for x in tensors]
        missing_row = torch.tensor([0, 3, 4, 6, 11, 12, 20, 32, 33, 41, 48], dtype=torch.int32)
        with pytest.raises(ValueError, match="every row start"):
            context_parallel.lasp2(*local, group, cu_seqlens=missing_row)
    training = {}
    for name, (model, (dp, cp), linear, layout) in TRAINING[world_size].items():
        config = packed_config(folder, world_size, model, dp, cp, linear, layout)
        context = ParallelContext.build(ParallelDegrees(dp, cp, 1), torch.device("cpu"), cp_layout=layout)
        training[name] = (model, train_losses(config, context)["losses"])
    return {"errors": errors, "training": training}


def test_documents_matter() -> None:
    """The oracle can fail: the same tensors without document boundaries give other outputs."""
    tensors, _ = inputs("token")
    plain = kernels.linear_attention(*tensors[:3], log_decay=tensors[3], backend="naive")[0]
    assert float((plain - documents_alone(*tensors)).abs().max()) > 0.1


@pytest.mark.parametrize("world_size", [2, 4], ids=["2-ranks", "4-ranks"])
def test_lasp_with_packed_documents(prepared: str, world_size: int) -> None:  # noqa: F811
    results = run_distributed(_worker, world_size, prepared, timeout=300)
    errors = {case: error for result in results for case, error in result["errors"].items()}
    sizes = (2,) if world_size == 2 else (3, 4)
    assert len(errors) == len(sizes) * len(OPS) * 2 * len(DECAYS), sorted(errors)  # every case ran on some rank
    assert max(errors.values()) < 1e-12, errors
    references = {}
    for result in results:
        for name, (model, losses) in result["training"].items():
            if model not in references:
                references[model] = train_losses(packed_config(prepared, 1, model),
                                                 ParallelContext.single_process())["losses"]
            expected = references[model]
            assert max(abs(a - e) / abs(e) for a, e in zip(losses, expected)) < 1e-5, (name, losses, expected)
