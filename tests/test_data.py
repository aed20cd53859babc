"""Datasets: deterministic in (seed, global index) across processes, token files, long-range tasks."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from spindle.runtime.config import ConfigError, DataConfig
from spindle.runtime.data import (
    BOS,
    IGNORE_INDEX,
    MARKER,
    CopyTask,
    RecallTask,
    build_dataset,
)


def digest(dataset, indices) -> str:
    return hashlib.sha256(b"".join(part.numpy().tobytes() for part in dataset.batch(indices))).hexdigest()


@pytest.fixture
def token_files(tmp_path: Path) -> dict[str, Path]:
    # Ids are consecutive integers, so a window's first token tells where it starts in the file.
    files = {"uint16": tmp_path / "tokens16.bin", "uint32": tmp_path / "tokens32.bin", "npy": tmp_path / "tokens.npy"}
    np.arange(5000, dtype=np.uint16).tofile(files["uint16"])
    np.arange(70_000, 75_000, dtype=np.uint32).tofile(files["uint32"])  # ids beyond uint16
    np.save(files["npy"], np.arange(3000, dtype=np.int64))
    return files


def file_config(path: Path, dtype: str = "uint16", seq_len: int = 32) -> DataConfig:
    return DataConfig(source=str(path), seq_len=seq_len, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# determinism
# ---------------------------------------------------------------------------------------------
SOURCES = ["synthetic:recall", "synthetic:copy"]


@pytest.mark.parametrize("source", SOURCES)
def test_same_index_same_sample(source: str) -> None:
    config = DataConfig(source=source, seq_len=64)
    first, second = build_dataset(config, 32, seed=5), build_dataset(config, 32, seed=5)
    for index in (0, 1, 17, 10**9):
        for left, right in zip(first.sample(index), second.sample(index)):
            assert torch.equal(left, right)
    tokens, labels = first.sample(3)
    assert tokens.shape == labels.shape == (64,) and tokens.dtype == labels.dtype == torch.int64
    assert not torch.equal(first.sample(3)[0], first.sample(4)[0])
    assert not torch.equal(first.sample(3)[0], build_dataset(config, 32, seed=6).sample(3)[0])


def test_batch_stacks_samples_in_order() -> None:
    dataset = build_dataset(DataConfig(seq_len=32), 32, seed=0)
    tokens, labels = dataset.batch([7, 2, 9])
    assert tokens.shape == labels.shape == (3, 32)
    for row, index in enumerate([7, 2, 9]):
        assert torch.equal(tokens[row], dataset.sample(index)[0]) and torch.equal(labels[row], dataset.sample(index)[1])


def test_num_samples_repeats_the_stream() -> None:
    dataset = build_dataset(DataConfig(seq_len=32, num_samples=5), 32, seed=0)
    assert torch.equal(dataset.sample(2)[0], dataset.sample(7)[0])
    assert not torch.equal(dataset.sample(2)[0], dataset.sample(3)[0])


_CHILD = """
import hashlib, json, sys
from spindle.runtime.config import DataConfig
from spindle.runtime.data import build_dataset
results = {}
for name, source, dtype in json.loads(sys.argv[1]):
    dataset = build_dataset(DataConfig(source=source, seq_len=32, dtype=dtype), 80_000, seed=11)
    batch = dataset.batch([0, 5, 123456])  # (tokens, labels), or tokens, labels, cu_seqlens when packed
    results[name] = hashlib.sha256(b"".join(part.numpy().tobytes() for part in batch)).hexdigest()
print(json.dumps(results))
"""


def test_same_samples_in_another_process(token_files: dict[str, Path], tmp_path: Path) -> None:
    from spindle.runtime.prepare import PrepareOptions, prepare
    from text_corpus import make_documents, train_tokenizer, write_jsonl

    documents = make_documents(100, seed=1)
    prepare(PrepareOptions(inputs=[str(write_jsonl(tmp_path / "text.jsonl", documents))], out=str(tmp_path / "prepared"),
                           tokenizer=str(train_tokenizer(tmp_path / "tokenizer.json", documents)), progress=False))
    sources = [("recall", "synthetic:recall", "uint16"), ("copy", "synthetic:copy", "uint16"),
               ("bin16", str(token_files["uint16"]), "uint16"), ("bin32", str(token_files["uint32"]), "uint32"),
               ("npy", str(token_files["npy"]), "uint16"), ("prepared", str(tmp_path / "prepared"), "uint16")]
    child = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(sources)], capture_output=True, text=True,
                           check=True, timeout=120)
    theirs = json.loads(child.stdout.strip().splitlines()[-1])
    for name, source, dtype in sources:
        ours = build_dataset(DataConfig(source=source, seq_len=32, dtype=dtype), 80_000, seed=11)
        assert digest(ours, [0, 5, 123456]) == theirs[name], name


# ---------------------------------------------------------------------------------------------
# token files
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, dtype, first_id, count", [("uint16", "uint16", 0, 5000),
                                                          ("uint32", "uint32", 70_000, 5000),
                                                          ("npy", "uint16", 0, 3000)])
def test_token_file_windows(token_files: dict[str, Path], kind: str, dtype: str, first_id: int, count: int) -> None:
    dataset = build_dataset(file_config(token_files[kind], dtype), 80_000, seed=0)
    starts = set()
    for index in range(200):
        tokens, labels = dataset.sample(index)
        start = int(tokens[0]) - first_id
        expected = torch.arange(first_id + start, first_id + start + 33)
        assert torch.equal(tokens, expected[:-1]) and torch.equal(labels, expected[1:])  # labels = next tokens
        assert 0 <= start <= count - 33
        starts.add(start)
    assert len(starts) > 150, "windows should be spread over the file"


def test_file_window_covers_the_last_token(tmp_path: Path) -> None:
    path = tmp_path / "exact.bin"
    np.arange(33, dtype=np.uint16).tofile(path)  # exactly seq_len + 1 tokens: one possible window
    dataset = build_dataset(file_config(path), 64, seed=0)
    tokens, labels = dataset.sample(9)
    assert torch.equal(tokens, torch.arange(32)) and torch.equal(labels, torch.arange(1, 33))


@pytest.mark.parametrize("make_file, fragments", [
    (lambda path: None, ["does not exist"]),
    (lambda path: path.write_bytes(b"\x00" * 101), ["101 bytes", "multiple of 2", "data.dtype"]),
    (lambda path: path.write_bytes(b""), ["empty"]),
    (lambda path: np.arange(20, dtype=np.uint16).tofile(path), ["20 tokens", "data.seq_len + 1 = 33"]),
    (lambda path: np.full(100, 70, dtype=np.uint16).tofile(path), ["token id 70", "model.vocab_size = 64"]),
])
def test_bad_bin_files(tmp_path: Path, make_file, fragments: list[str]) -> None:
    path = tmp_path / "bad.bin"
    make_file(path)
    with pytest.raises(ConfigError) as raised:
        build_dataset(file_config(path), 64, seed=0)
    for fragment in ["data.source", "bad.bin", *fragments]:
        assert fragment in str(raised.value), str(raised.value)


@pytest.mark.parametrize("array, fragments", [
    (np.zeros(100, dtype=np.float32), ["float32", "integer"]),
    (np.zeros((10, 10), dtype=np.int64), ["shape (10, 10)", "1-D"]),
    (np.array([1, 2, -3] * 30, dtype=np.int64), ["token id -3", "[0, 64)"]),
])
def test_bad_npy_files(tmp_path: Path, array: np.ndarray, fragments: list[str]) -> None:
    path = tmp_path / "bad.npy"
    np.save(path, array)
    with pytest.raises(ConfigError) as raised:
        build_dataset(file_config(path), 64, seed=0)
    for fragment in ["data.source", "bad.npy", *fragments]:
        assert fragment in str(raised.value), str(raised.value)


def test_unknown_synthetic_task() -> None:
    with pytest.raises(ConfigError, match="synthetic:recall"):
        build_dataset(DataConfig(source="synthetic:sort"), 64, seed=0)


# ---------------------------------------------------------------------------------------------
# the synthetic tasks need long-range information
# ---------------------------------------------------------------------------------------------
def recall_answer_from_pairs(tokens: torch.Tensor, position: int, pairs: int) -> int:
    """The oracle: find the query key in the pair section at the start and read the value after it."""
    pair_section = tokens[1 : 1 + 2 * pairs].tolist()
    return pair_section[pair_section[0::2].index(int(tokens[position])) * 2 + 1]


def test_recall_layout_and_oracle() -> None:
    task = RecallTask(seq_len=128, vocab_size=64, seed=0)
    pairs = task.num_pairs
    assert pairs == 8
    for index in range(50):
        tokens, labels = task.sample(index)
        labelled = torch.nonzero(labels != IGNORE_INDEX).flatten().tolist()
        assert len(labelled) == pairs and tokens[0] == BOS and tokens[128 - 2 * pairs - 1] == MARKER
        assert labels[-1] == IGNORE_INDEX  # nothing after the last token to predict
        keys = tokens[1 : 1 + 2 * pairs : 2]
        assert len(set(keys.tolist())) == pairs and ((keys >= task.key_start) & (keys < task.value_start)).all()
        for position in labelled:
            answer = recall_answer_from_pairs(tokens, position, pairs)
            assert labels[position] == answer == tokens[position + 1]
            # The answer's only earlier occurrence that carries information is in the pair section,
            # far back: the pair sits at least 3/4 of a sequence before the query.
            assert position - 2 * pairs >= 128 * 3 // 4 - 2


def best_short_window_accuracy(dataset, samples: int, window: int, vocab_size: int) -> float:
    """Accuracy of the best predictor that sees a single token at a fixed distance d < window before
    the labelled position (fit on half of the samples, scored on the other half), over all d."""
    tokens, labels = dataset.batch(range(samples))
    rows, positions = torch.nonzero(labels != IGNORE_INDEX, as_tuple=True)
    answers = labels[rows, positions].numpy()
    fit = (rows < samples // 2).numpy()
    best = 0.0
    for distance in range(window):
        seen = tokens[rows, positions - distance].numpy()
        counts = np.zeros((vocab_size, vocab_size))
        np.add.at(counts, (seen[fit], answers[fit]), 1)
        guesses = counts.argmax(axis=1)  # the most frequent answer after each seen token
        best = max(best, float(np.mean(guesses[seen[~fit]] == answers[~fit])))
    return best


def test_recall_answer_is_not_predictable_from_a_short_window() -> None:
    task = RecallTask(seq_len=64, vocab_size=32, seed=1)  # 10 values: chance is 0.1
    # Every token of the last 32 positions, the query key included, tells nothing about the answer.
    assert best_short_window_accuracy(task, samples=1200, window=32, vocab_size=32) < 0.14
    # ... while reading the pair section 3/4 of a sequence back answers every query.
    tokens, labels = task.sample(0)
    for position in torch.nonzero(labels != IGNORE_INDEX).flatten().tolist():
        assert recall_answer_from_pairs(tokens, position, task.num_pairs) == labels[position]


def test_copy_layout_and_long_range() -> None:
    task = CopyTask(seq_len=41, vocab_size=16, seed=0)  # odd length: one extra BOS in front
    tokens, labels = task.sample(3)
    segment = task.segment
    assert segment == 19 and tokens[:2].tolist() == [BOS, BOS] and tokens[2 + segment] == MARKER
    assert torch.equal(tokens[2 : 2 + segment], tokens[-segment:])
    labelled = torch.nonzero(labels != IGNORE_INDEX).flatten()
    assert torch.equal(labels[labelled], tokens[labelled + 1])
    assert torch.equal(labels[labelled], tokens[2 : 2 + segment])  # the answers are the first copy
    assert best_short_window_accuracy(CopyTask(seq_len=34, vocab_size=12, seed=0), samples=600, window=16,
                                      vocab_size=12) < 0.16
