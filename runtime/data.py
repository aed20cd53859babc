"""Training data: synthetic long-range tasks and token files, addressed by a global sample index.

Every sample is a pure function of ``(seed, global_index)``: a run resumes exactly from its step
counter, and the same global batch can be re-split over any number of data-parallel ranks.

Samples are ``(tokens[T], labels[T])`` with labels aligned to positions: ``labels[t]`` is the token
the model should predict after reading ``tokens[: t + 1]``, and -100 (IGNORE_INDEX) where nothing is
predictable.

Tasks:
- ``synthetic:recall`` (associative recall): key-value pairs at the start, random filler, then
  queries at the end. A query key is labelled with its value, which appears only in the pair
  section, about 3/4 of a sequence back; nothing else in the sequence carries information about it.
- ``synthetic:copy``: a random segment, a separator, then the segment again; each copied token is
  labelled with the next one, which appears only in the first copy, half a sequence back.
- a token file: ``.bin`` (raw memmap of ``data.dtype``) or ``.npy`` (1-D integer array); sample i is
  the window of T + 1 tokens starting at an offset drawn from ``(seed, i)``.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from spindle.runtime.config import SYNTHETIC_SOURCES, ConfigError, DataConfig, did_you_mean, quoted

IGNORE_INDEX = -100

BOS = 0
"""First token of every synthetic sequence (also pads the copy task when seq_len is odd)."""
MARKER = 1
"""Recall: starts the query section. Copy: separates the segment from its copy."""
FIRST_CONTENT_ID = 2

RECALL_MIN_SEQ_LEN = 16
RECALL_MIN_VOCAB = 8
COPY_MIN_SEQ_LEN = 4
COPY_MIN_VOCAB = 3

# How many tokens of a file the validation reads to look for ids outside the vocabulary.
_CHECK_WINDOWS = 16
_CHECK_WINDOW_TOKENS = 65536


def sample_generator(seed: int, index: int) -> np.random.Generator:
    """The random stream of one sample: a function of (seed, index) only, identical in every process."""
    return np.random.default_rng(np.random.SeedSequence([seed, index]))


class Dataset:
    """Base of all datasets: subclasses implement ``sample``; ``batch`` stacks samples."""

    seq_len: int

    def sample(self, global_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens [T] int64, labels [T] int64) of one global sample index."""
        raise NotImplementedError

    def batch(self, indices: list[int] | range) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens [B, T], labels [B, T]) for a list of global sample indices."""
        samples = [self.sample(int(index)) for index in indices]
        return torch.stack([tokens for tokens, _ in samples]), torch.stack([labels for _, labels in samples])


# ---------------------------------------------------------------------------------------------
# Synthetic tasks
# ---------------------------------------------------------------------------------------------
class RecallTask(Dataset):
    """Multi-query associative recall.

    Vocabulary: BOS, MARKER, then three equal ranges of keys, values and filler tokens.
    Layout of one sequence of T tokens (P pairs and P queries; P = ``pairs``, or T // 16 capped by the
    key count when ``pairs`` is 0):
        BOS k1 v1 ... kP vP  f f f ... f  MARKER q1 a1 ... qP aP
    Keys are distinct, values i.i.d. uniform; the queries are the P keys in a random order and
    ``labels`` holds a_j at the position of q_j (-100 elsewhere).
    """

    def __init__(self, seq_len: int, vocab_size: int, seed: int, num_samples: int = 0, pairs: int = 0) -> None:
        self.seq_len, self.seed, self.num_samples = seq_len, seed, num_samples
        range_size = (vocab_size - FIRST_CONTENT_ID) // 3
        self.key_start = FIRST_CONTENT_ID
        self.value_start = self.key_start + range_size
        self.filler_start = self.value_start + range_size
        self.range_size = range_size
        self.vocab_size = vocab_size
        self.num_pairs = max(1, min(pairs or seq_len // 16, range_size))

    def sample(self, global_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = global_index % self.num_samples if self.num_samples else global_index
        generator = sample_generator(self.seed, index)
        length, pairs = self.seq_len, self.num_pairs
        keys = self.key_start + generator.choice(self.range_size, size=pairs, replace=False)
        values = self.value_start + generator.integers(0, self.range_size, size=pairs)
        order = generator.permutation(pairs)
        tokens = generator.integers(self.filler_start, self.vocab_size, size=length)
        labels = np.full(length, IGNORE_INDEX, dtype=np.int64)
        tokens[0] = BOS
        tokens[1 : 1 + 2 * pairs : 2], tokens[2 : 2 + 2 * pairs : 2] = keys, values
        query_start = length - 2 * pairs
        tokens[query_start - 1] = MARKER
        tokens[query_start::2], tokens[query_start + 1 :: 2] = keys[order], values[order]
        labels[query_start::2] = values[order]
        return torch.from_numpy(tokens.astype(np.int64)), torch.from_numpy(labels)


class CopyTask(Dataset):
    """Copy a random segment: ``BOS x1 .. xL MARKER x1 .. xL`` with L = (T - 2) // 2.

    At MARKER the label is x1; at the copied x_i it is x_{i+1}; -100 elsewhere. An odd T gets one
    extra BOS at the front.
    """

    def __init__(self, seq_len: int, vocab_size: int, seed: int, num_samples: int = 0) -> None:
        self.seq_len, self.vocab_size, self.seed, self.num_samples = seq_len, vocab_size, seed, num_samples
        self.segment = (seq_len - 2) // 2

    def sample(self, global_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = global_index % self.num_samples if self.num_samples else global_index
        generator = sample_generator(self.seed, index)
        segment = generator.integers(FIRST_CONTENT_ID, self.vocab_size, size=self.segment)
        padding = self.seq_len - 2 * self.segment - 2
        tokens = np.concatenate([np.full(padding + 1, BOS), segment, [MARKER], segment]).astype(np.int64)
        labels = np.full(self.seq_len, IGNORE_INDEX, dtype=np.int64)
        copy_start = self.seq_len - self.segment  # position of the copied x1
        labels[copy_start - 1 : -1] = segment  # MARKER predicts x1, copied x_i predicts x_{i+1}
        return torch.from_numpy(tokens), torch.from_numpy(labels)


# ---------------------------------------------------------------------------------------------
# Token files
# ---------------------------------------------------------------------------------------------
def _file_error(source: str, problem: str, fix: str) -> ConfigError:
    return ConfigError(f"data.source = {source!r}: {problem}; {fix}")


def open_token_file(source: str, dtype: str) -> np.ndarray:
    """Memory-map a .bin (raw ``dtype``) or .npy token file as a 1-D integer array, checking its format."""
    path = Path(source)
    if not path.is_file():
        raise _file_error(source, "the file does not exist",
                          f"expected one of {quoted(SYNTHETIC_SOURCES)} or the path of a .bin/.npy token file")
    if path.suffix == ".bin":
        itemsize = np.dtype(dtype).itemsize
        size = os.path.getsize(path)
        if size % itemsize:
            raise _file_error(source, f"its size of {size} bytes is not a multiple of {itemsize} "
                              f"(data.dtype = {dtype!r})", "check data.dtype ('uint16' or 'uint32') or the file")
        if size == 0:
            raise _file_error(source, "the file is empty", "expected at least data.seq_len + 1 tokens")
        return np.memmap(path, dtype=np.dtype(dtype), mode="r")
    if path.suffix == ".npy":
        try:
            tokens = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as error:
            raise _file_error(source, f"not a readable .npy array ({error})", "write it with numpy.save") from None
        if not np.issubdtype(tokens.dtype, np.integer):
            raise _file_error(source, f"the array has dtype {tokens.dtype}, not an integer type",
                              "store token ids as an integer array (e.g. uint16, uint32 or int64)")
        if tokens.ndim != 1:
            raise _file_error(source, f"the array has shape {tokens.shape}",
                              "expected a 1-D array of token ids (flatten it before saving)")
        return tokens
    raise _file_error(source, f"unknown file type {path.suffix!r}",
                      "expected a .bin (raw token ids of data.dtype) or .npy file")


def check_token_ids(tokens: np.ndarray, source: str, vocab_size: int) -> None:
    """Read evenly spaced windows of the file and reject ids outside [0, vocab_size)."""
    count = len(tokens)
    starts = np.linspace(0, max(count - _CHECK_WINDOW_TOKENS, 0), num=_CHECK_WINDOWS, dtype=np.int64)
    nonzero_by_parity = [0, 0]  # uint32 ids read as uint16: every odd position holds a high half of 0
    for start in np.unique(starts):
        window = np.asarray(tokens[start : start + _CHECK_WINDOW_TOKENS])
        nonzero_by_parity[start % 2] += int(np.count_nonzero(window[0::2]))
        nonzero_by_parity[1 - start % 2] += int(np.count_nonzero(window[1::2]))
        bad = np.flatnonzero((window < 0) | (window >= vocab_size))
        if bad.size:
            position = int(start + bad[0])
            raise _file_error(
                source, f"token id {int(tokens[position])} at position {position} is outside the vocabulary "
                f"[0, {vocab_size}) of model.vocab_size = {vocab_size}",
                "set model.vocab_size above the largest token id, or check data.dtype")
    if tokens.dtype == np.uint16 and count >= 16 and nonzero_by_parity[0] and not nonzero_by_parity[1]:
        raise _file_error(source, "every other token id is 0, the pattern of uint32 token ids read as uint16",
                          "set data.dtype = 'uint32' (or rewrite the file as uint16)")


class TokenFileDataset(Dataset):
    """Windows of T + 1 tokens of one file; sample i starts at an offset drawn from (seed, i)."""

    def __init__(self, source: str, dtype: str, seq_len: int, seed: int) -> None:
        self.tokens = open_token_file(source, dtype)
        self.seq_len, self.seed = seq_len, seed
        self.num_starts = len(self.tokens) - seq_len  # valid window starts: 0 .. len - T - 1

    def sample(self, global_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = int(sample_generator(self.seed, global_index).integers(0, self.num_starts))
        window = torch.from_numpy(np.asarray(self.tokens[start : start + self.seq_len + 1]).astype(np.int64))
        return window[:-1].clone(), window[1:].clone()


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------
def _check_recall_pairs(data: DataConfig, vocab_size: int) -> None:
    pairs, keys = data.recall_pairs, (vocab_size - FIRST_CONTENT_ID) // 3
    if pairs > keys:
        raise ConfigError(f"data.recall_pairs = {pairs} exceeds the {keys} distinct keys of model.vocab_size = "
                          f"{vocab_size}: use at most {keys} (or 0 for automatic), or a larger vocabulary.")
    if 4 * pairs + 2 > data.seq_len:
        raise ConfigError(f"data.recall_pairs = {pairs} does not fit in data.seq_len = {data.seq_len}: pairs and "
                          f"queries need 4 * pairs + 2 tokens; use at most {(data.seq_len - 2) // 4}.")


def validate_data(data: DataConfig, vocab_size: int) -> None:
    """Check ``data.source`` (and the file behind it) against the sequence length and vocabulary."""
    source = data.source
    if source.startswith("synthetic:"):
        if source not in SYNTHETIC_SOURCES:
            raise ConfigError(f"data.source = {source!r} is not a known synthetic task: expected one of "
                              f"{quoted(SYNTHETIC_SOURCES)} or a .bin/.npy path.{did_you_mean(source, SYNTHETIC_SOURCES)}")
        min_len, min_vocab = ((RECALL_MIN_SEQ_LEN, RECALL_MIN_VOCAB) if source == "synthetic:recall"
                              else (COPY_MIN_SEQ_LEN, COPY_MIN_VOCAB))
        if data.seq_len < min_len:
            raise ConfigError(f"data.seq_len = {data.seq_len} is too short for data.source = {source!r}: "
                              f"expected at least {min_len}.")
        if vocab_size < min_vocab:
            raise ConfigError(f"model.vocab_size = {vocab_size} is too small for data.source = {source!r}: "
                              f"expected at least {min_vocab}.")
        if source == "synthetic:recall":
            _check_recall_pairs(data, vocab_size)
        return
    tokens = open_token_file(source, data.dtype)
    if len(tokens) < data.seq_len + 1:
        raise _file_error(source, f"it holds {len(tokens)} tokens, fewer than data.seq_len + 1 = {data.seq_len + 1}",
                          "use a longer file or a smaller data.seq_len")
    check_token_ids(tokens, source, vocab_size)


def build_dataset(data: DataConfig, vocab_size: int, seed: int) -> Dataset:
    """The dataset named by ``data.source``; samples depend only on (seed, global index)."""
    validate_data(data, vocab_size)
    if data.source == "synthetic:recall":
        return RecallTask(data.seq_len, vocab_size, seed, data.num_samples, data.recall_pairs)
    if data.source == "synthetic:copy":
        return CopyTask(data.seq_len, vocab_size, seed, data.num_samples)
    return TokenFileDataset(data.source, data.dtype, data.seq_len, seed)
