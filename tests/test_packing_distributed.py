"""Packed documents on several gloo ranks, in one 4-rank spawn:

- Ulysses, all-gather and ring attention with cu_seqlens at P = 2, 3, 4, both layouts, B = 2, documents
  that cross rank seams, end exactly on a rank or chunk seam, or are shorter than a chunk: outputs and
  every input gradient against each document run alone through the single-device kernel (float64);
- the whole trainer on packed batches of a prepared folder (dp2 x cp2 with all-gather attention, cp2 x
  tp2 with ring attention, zigzag) against one process: the same per-step losses and gradient norms.
"""
from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

from distributed_utils import run_distributed, subgroup
from spindle import kernels
from spindle.parallel import cp as context_parallel
from spindle.parallel.layout import ParallelContext, ParallelDegrees
from spindle.runtime.config import Config, load_config, resolve
from spindle.runtime.data import build_dataset
from spindle.runtime.main import build_engine, build_model
from spindle.runtime.optim import build_optimizer, learning_rate
from spindle.runtime.prepare import PrepareOptions, prepare
from spindle.runtime.trainer import BatchProvider, train_step
from text_corpus import make_documents, train_tokenizer, write_jsonl

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


def train_losses(config: Config, context: ParallelContext) -> dict:
    dataset = build_dataset(config.data, config.model.vocab_size, config.train.seed)
    model = build_model(config, context)
    engine = build_engine(config, model, build_optimizer(model, config.train), context)
    batches = BatchProvider(dataset, config.train.global_batch, config.train.micro_batch,
                            context.dp_rank, context.dp_size)
    losses, norms = [], []
    for step in range(STEPS):
        result = train_step(model, engine, batches.micro_batches(step), context, lr=learning_rate(step, config.train),
                            grad_clip=config.train.grad_clip, precision=None)
        losses.append(float(result.loss))
        norms.append(float(result.grad_norm))
    return {"losses": losses, "grad_norms": norms}


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


def _worker(rank: int, world_size: int, group: object, folder: str) -> dict:
    errors = {}
    for size in (2, 3, 4):
        members = subgroup(size)
        for layout in ("zigzag", "contiguous"):
            for scheme in SCHEMES:
                if members is not None:
                    errors[f"{scheme}-P{size}-{layout}"] = _check_scheme(scheme, members, layout)
    training = {}
    for name, degrees, softmax in (("dp2-cp2-allgather", (2, 2, 1), "allgather"), ("cp2-tp2-ring", (1, 2, 2), "ring")):
        config = packed_config(folder, world_size, *degrees, softmax=softmax)
        context = ParallelContext.build(ParallelDegrees(*degrees), torch.device("cpu"), cp_layout="zigzag")
        training[name] = train_losses(config, context)
    return {"errors": errors, "training": training}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> str:
    folder = tmp_path_factory.mktemp("packed")
    documents = make_documents(80, seed=11, max_words=20)
    tokenizer = train_tokenizer(folder / "tokenizer.json", documents)
    prepare(PrepareOptions(inputs=[str(write_jsonl(folder / "text.jsonl", documents))], tokenizer=str(tokenizer),
                           out=str(folder / "prepared"), progress=False))
    return str(folder / "prepared")


def test_packed_documents_on_four_ranks(prepared: str) -> None:
    results = run_distributed(_worker, 4, prepared, timeout=300)
    errors = {case: error for result in results for case, error in result["errors"].items()}
    assert len(errors) == 6 * len(SCHEMES), errors  # every (scheme, P, layout) ran on some rank
    assert max(errors.values()) < 1e-10, errors
    reference = train_losses(packed_config(prepared, 1), ParallelContext.single_process())
    for result in results:
        for layout, training in result["training"].items():
            for key in ("losses", "grad_norms"):
                actual, expected = training[key], reference[key]
                assert max(abs(a - e) / abs(e) for a, e in zip(actual, expected)) < 1e-5, (layout, key, actual)
