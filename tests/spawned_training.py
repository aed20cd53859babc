"""Training runs inside the CP tests' shared spawn (tests/cp_reference.py's `register_cases`).

A spawned check can only pass or fail, so a training case records its per-step losses (rank 0 of the
run, as JSON under RESULTS_DIR) and its test compares them with a one-process run in the test process,
where nothing else is distributed. A training case needs the whole world: register it with
`SpawnedCase(TRAINING_WORLD, ...)`.

Also the packed-documents corpus both packing test modules train on (`prepare_corpus`, their
`register_cases(..., prepare=prepare_corpus)` hook: it runs in the test process before the spawn).
"""
from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch.distributed as dist

from spindle.parallel.layout import ParallelContext
from spindle.runtime.config import Config
from spindle.runtime.data import build_dataset
from spindle.runtime.main import build_engine, build_model
from spindle.runtime.optim import build_optimizer, learning_rate
from spindle.runtime.prepare import PrepareOptions, prepare
from spindle.runtime.trainer import BatchProvider, train_step
from text_corpus import make_documents, train_tokenizer, write_jsonl

TRAINING_WORLD = 4  # dp2 x cp2 or cp2 x tp2: the shared spawn's world when a training case is selected
# Named after the test process (the cases' options carry this path into the ranks); made by `make_results_dir`.
RESULTS_DIR = Path(tempfile.gettempdir()) / f"spindle-spawned-training-{os.getpid()}"
CORPUS = RESULTS_DIR / "corpus" / "prepared"


def make_results_dir() -> None:
    """A `register_cases` prepare hook (test process only): the folder, removed when the session ends."""
    if not RESULTS_DIR.exists():
        RESULTS_DIR.mkdir(parents=True)
        atexit.register(shutil.rmtree, RESULTS_DIR, True)


def prepare_corpus() -> None:
    """A `register_cases` prepare hook: 80 short documents, a trained tokenizer and `spindle prepare`."""
    make_results_dir()
    if CORPUS.exists():
        return
    folder = CORPUS.parent
    folder.mkdir()
    documents = make_documents(80, seed=11, max_words=20)
    tokenizer = train_tokenizer(folder / "tokenizer.json", documents)
    prepare(PrepareOptions(inputs=[str(write_jsonl(folder / "text.jsonl", documents))], tokenizer=str(tokenizer),
                           out=str(CORPUS), progress=False))


def train_losses(config: Config, context: ParallelContext) -> dict:
    """Per-step losses and gradient norms of config.train.steps steps through the real build path."""
    dataset = build_dataset(config.data, config.model.vocab_size, config.train.seed)
    model = build_model(config, context)
    engine = build_engine(config, model, build_optimizer(model, config.train), context)
    batches = BatchProvider(dataset, config.train.global_batch, config.train.micro_batch,
                            context.dp_rank, context.dp_size)
    losses, norms = [], []
    for step in range(config.train.steps):
        result = train_step(model, engine, batches.micro_batches(step), context, lr=learning_rate(step, config.train),
                            grad_clip=config.train.grad_clip, precision=None)
        losses.append(float(result.loss))
        norms.append(float(result.grad_norm))
    return {"losses": losses, "grad_norms": norms}


def check_world(group: dist.ProcessGroup) -> str | None:
    """None when `group` is the whole world (the trainer builds its mesh over WORLD), else why not."""
    if dist.get_world_size(group) != dist.get_world_size():
        return (f"a training case needs the whole world, got a group of {dist.get_world_size(group)} of "
                f"{dist.get_world_size()} ranks: register it with size {dist.get_world_size()}")
    return None


def record(group: dist.ProcessGroup, results_dir: str, case: str, result: dict) -> None:
    """Rank 0 of `group` writes what `recorded` reads back in the test process."""
    if dist.get_rank(group) == 0:
        path = Path(results_dir) / f"{case}.json"
        path.write_text(json.dumps(result))


def recorded(results_dir: str | Path, case: str) -> dict:
    path = Path(results_dir) / f"{case}.json"
    assert path.is_file(), f"{case}: the spawned run recorded no result ({path})"
    return json.loads(path.read_text())


_ONE_PROCESS: dict[str, dict] = {}


def one_process(key: str, compute: Callable[[], dict]) -> dict:
    """`compute()` once per test process and key (a one-process reference several cases compare with)."""
    if key not in _ONE_PROCESS:
        _ONE_PROCESS[key] = compute()
    return _ONE_PROCESS[key]


def assert_same_steps(case: str, actual: dict, expected: dict, keys: dict[str, float]) -> None:
    """Every step's value of each key within its relative tolerance; the reference trained."""
    assert expected["losses"][-1] != expected["losses"][0], expected  # the reference itself trained
    for key, tolerance in keys.items():
        assert len(actual[key]) == len(expected[key]), (case, key, actual[key], expected[key])
        for value, wanted in zip(actual[key], expected[key]):
            assert abs(value - wanted) <= tolerance * abs(wanted), (case, key, actual[key], expected[key])
