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
- a prepared folder (``spindle data prepare``): the token stream is cut into non-overlapping windows
  of T (+1) tokens; epoch e visits every window once, in an order drawn from (seed, e), so sample i is
  window ``permuted_index(i % W, W, key(seed, i // W))``. With ``data.packing = "documents"`` a
  batch also carries ``cu_seqlens`` (the document starts inside each row, row starts, and B·T) and no
  label predicts a document's first token from the previous document.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from spindle.runtime.config import SYNTHETIC_SOURCES, ConfigError, DataConfig, did_you_mean, quoted
from spindle.runtime.prepare import PrepareError, verify_folder

if TYPE_CHECKING:
    from spindle.runtime.config import Config

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


class PackedBatch(NamedTuple):
    """A batch of packed documents: what ``Dataset.batch`` returns when boundaries are kept."""

    tokens: torch.Tensor
    """[B, T] int64."""
    labels: torch.Tensor
    """[B, T] int64; -100 where the next token starts another document."""
    cu_seqlens: torch.Tensor
    """int32 [N + 1]: document starts in the B·T tokens flattened row-major, with 0, every row start
    and B·T (a document never spans two rows)."""


def batch_cu_seqlens(row_starts: list[np.ndarray], length: int) -> torch.Tensor:
    """cu_seqlens of B rows of ``length`` tokens from each row's document starts inside (0, length)."""
    rows = [np.concatenate([[row * length], row * length + np.asarray(starts, dtype=np.int64)])
            for row, starts in enumerate(row_starts)]
    offsets = np.concatenate([*rows, [len(row_starts) * length]])
    return torch.from_numpy(offsets.astype(np.int32))


def document_positions(cu_seqlens: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """[B, T] int64 positions that restart at 0 at every document start (RoPE of packed documents).

    Tensor ops only (no host sync): flat index minus the start of the document it falls in.
    """
    offsets = cu_seqlens.to(torch.int64)
    flat = torch.arange(batch * length, device=cu_seqlens.device)  # [B·T]
    document = torch.searchsorted(offsets, flat, right=True) - 1  # index of each token's document
    return (flat - offsets[document]).view(batch, length)


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
                          f"expected one of {quoted(SYNTHETIC_SOURCES)}, a folder written by `spindle data prepare` "
                          f"or the path of a .bin/.npy token file")
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
# Prepared folders (spindle data prepare)
# ---------------------------------------------------------------------------------------------
_MASK64 = (1 << 64) - 1


def _mix64(value: int, key: int) -> int:
    """A 64-bit mixing function (splitmix64's finalizer): the round function of the Feistel network."""
    value = (value + key + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def permuted_index(index: int, size: int, key: int) -> int:
    """A seeded bijection of range(size), evaluated at ``index`` in O(1) memory.

    A four-round Feistel network permutes the smallest even-bit domain 2^(2h) >= size; values that land
    outside [0, size) are fed through again (cycle walking), which stays a bijection of [0, size) and
    takes under four rounds on average since the domain is less than 4 x size. A stored permutation of
    every window would need gigabytes on a trillion-token corpus.
    """
    if not 0 <= index < size:
        raise IndexError(f"index {index} is outside range({size})")
    half = max(1, ((size - 1).bit_length() + 1) // 2)
    mask = (1 << half) - 1
    value = index
    while True:
        left, right = value >> half, value & mask
        for round_index in range(4):
            left, right = right, left ^ (_mix64(right, key + round_index) & mask)
        value = (left << half) | right
        if value < size:
            return value


class _TokenStream:
    """The shards of a prepared folder as one token stream with global document starts."""

    def __init__(self, folder: Path, manifest: dict) -> None:
        self.tokens = [np.memmap(folder / shard["tokens_file"], dtype=np.dtype(manifest["dtype"]), mode="r")
                       for shard in manifest["shards"]]
        self.offsets = [np.load(folder / shard["documents_file"], mmap_mode="r", allow_pickle=False)
                        for shard in manifest["shards"]]
        self.bases = np.concatenate([[0], np.cumsum([len(tokens) for tokens in self.tokens])])  # [shards + 1]
        self.size = int(self.bases[-1])

    def _shards(self, start: int, stop: int) -> range:
        first = int(np.searchsorted(self.bases, start, side="right")) - 1
        last = int(np.searchsorted(self.bases, stop, side="left"))
        return range(first, min(last, len(self.tokens)))

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) as int64, across shard ends."""
        pieces = [np.asarray(self.tokens[shard][max(start - base, 0) : stop - base])
                  for shard in self._shards(start, stop) for base in [int(self.bases[shard])]]
        return np.concatenate(pieces).astype(np.int64)

    def document_starts(self, start: int, stop: int) -> np.ndarray:
        """Global offsets s of document starts with start < s <= stop."""
        found = []
        for shard in self._shards(start, stop + 1):
            base, offsets = int(self.bases[shard]), self.offsets[shard]
            low = int(np.searchsorted(offsets, start - base, side="right"))
            high = int(np.searchsorted(offsets, stop - base, side="right"))
            found.append(base + np.asarray(offsets[low:high], dtype=np.int64))
        starts = np.unique(np.concatenate(found)) if found else np.zeros(0, dtype=np.int64)
        return starts[(starts > start) & (starts <= stop) & (starts < self.size)]


class PreparedDataset(Dataset):
    """Non-overlapping windows of a prepared folder, every window once per epoch in a seeded order.

    Window w holds tokens [w·T, w·T + T] (T + 1 tokens: inputs and next-token labels); there are
    W = (N - 1) // T of them. With ``packing == "documents"`` the labels of positions whose next token
    starts another document are -100, and ``batch`` returns a ``PackedBatch`` with cu_seqlens.
    """

    def __init__(self, folder: str, manifest: dict, seq_len: int, seed: int, packing: str) -> None:
        self.stream = _TokenStream(Path(folder), manifest)
        self.seq_len, self.seed, self.packing = seq_len, seed, packing
        self.windows = (self.stream.size - 1) // seq_len
        self._epoch_keys: dict[int, int] = {}

    def _epoch_key(self, epoch: int) -> int:
        if epoch not in self._epoch_keys:
            seeds = np.random.SeedSequence([self.seed, epoch]).generate_state(1, dtype=np.uint64)
            self._epoch_keys[epoch] = int(seeds[0])
        return self._epoch_keys[epoch]

    def window(self, global_index: int) -> int:
        """The window sample ``global_index`` reads."""
        epoch, index = divmod(global_index, self.windows)
        return permuted_index(index, self.windows, self._epoch_key(epoch))

    def _read(self, global_index: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        start = self.window(global_index) * self.seq_len
        window = torch.from_numpy(self.stream.read(start, start + self.seq_len + 1))
        tokens, labels = window[:-1].clone(), window[1:].clone()
        if self.packing != "documents":
            return tokens, labels, np.zeros(0, dtype=np.int64)
        starts = self.stream.document_starts(start, start + self.seq_len) - start  # in (0, T]
        labels[torch.from_numpy(starts - 1)] = IGNORE_INDEX  # the token before a start predicts across
        return tokens, labels, starts[starts < self.seq_len]

    def sample(self, global_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, labels, _ = self._read(global_index)
        return tokens, labels

    def document_starts(self, global_index: int) -> np.ndarray:
        """Document starts inside sample ``global_index``, in (0, T); empty with packing "concat"."""
        return self._read(global_index)[2]

    def batch(self, indices: list[int] | range) -> tuple[torch.Tensor, torch.Tensor] | PackedBatch:
        samples = [self._read(int(index)) for index in indices]
        tokens = torch.stack([sample[0] for sample in samples])
        labels = torch.stack([sample[1] for sample in samples])
        if self.packing != "documents":
            return tokens, labels
        return PackedBatch(tokens, labels, batch_cu_seqlens([sample[2] for sample in samples], self.seq_len))


def open_prepared(data: DataConfig, vocab_size: int) -> dict:
    """Verify a prepared folder (sizes every time, sha256 once per file version) against the config."""
    try:
        manifest = verify_folder(data.source)
    except PrepareError as error:
        raise ConfigError(f"data.source = {data.source!r}: {error}") from None
    if manifest["tokens"] < data.seq_len + 1:
        raise ConfigError(f"data.source = {data.source!r}: it holds {manifest['tokens']} tokens, fewer than "
                          f"data.seq_len + 1 = {data.seq_len + 1}; prepare more text or use a smaller data.seq_len")
    if manifest["max_token_id"] >= vocab_size:
        raise ConfigError(f"data.source = {data.source!r}: it holds token id {manifest['max_token_id']} (vocabulary "
                          f"of {manifest.get('vocab_size')} tokens), outside model.vocab_size = {vocab_size}; set "
                          f"model.vocab_size to at least {manifest['max_token_id'] + 1}")
    return manifest


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
    if Path(source).is_dir():
        open_prepared(data, vocab_size)
        return
    tokens = open_token_file(source, data.dtype)
    if len(tokens) < data.seq_len + 1:
        raise _file_error(source, f"it holds {len(tokens)} tokens, fewer than data.seq_len + 1 = {data.seq_len + 1}",
                          "use a longer file or a smaller data.seq_len")
    check_token_ids(tokens, source, vocab_size)


def check_document_support(config: "Config") -> None:
    """Refuse, before anything starts, packed documents that a context-parallel op of the config's layer
    kinds cannot keep apart (the ops grow ``cu_seqlens`` one by one; each one that has it passes)."""
    data, parallel = config.data, config.parallel
    if data.packing != "documents" or parallel.cp == 1 or not Path(data.source).is_dir():
        return
    from spindle.parallel import cp as context_parallel
    from spindle.parallel.parallelize import LINEAR_SCHEMES, SOFTMAX_SCHEMES
    from spindle.runtime.config import layer_pattern
    from spindle.runtime.layers import accepts_cu_seqlens

    # The op each layer kind runs under context parallelism (parallel/parallelize.py binds the same).
    operations = {"L": (LINEAR_SCHEMES[parallel.cp_linear], f"parallel.cp_linear = {parallel.cp_linear!r}"),
                  "A": (SOFTMAX_SCHEMES[parallel.cp_softmax], f"parallel.cp_softmax = {parallel.cp_softmax!r}"),
                  "S": ("window_attention", "sliding-window (S) layers"),
                  "R": ("rattention_branches", "RAttention (R) layers")}
    for kind in sorted(set(layer_pattern(config.model)) & set(operations)):
        name, setting = operations[kind]
        operation = getattr(context_parallel, name, None)
        if operation is not None and not accepts_cu_seqlens(operation):
            raise ConfigError(
                f"data.packing = 'documents' with parallel.cp = {parallel.cp}: {setting} "
                f"(spindle.parallel.cp.{name}) cannot keep packed documents apart in this build; set "
                f"data.packing = 'concat' to train on the plain token stream, or parallel.cp = 1.")


def build_dataset(data: DataConfig, vocab_size: int, seed: int) -> Dataset:
    """The dataset named by ``data.source``; samples depend only on (seed, global index)."""
    validate_data(data, vocab_size)
    if data.source == "synthetic:recall":
        return RecallTask(data.seq_len, vocab_size, seed, data.num_samples, data.recall_pairs)
    if data.source == "synthetic:copy":
        return CopyTask(data.seq_len, vocab_size, seed, data.num_samples)
    if Path(data.source).is_dir():
        # validate_data verified the folder; this second read of the manifest is a stat per file.
        manifest = open_prepared(data, vocab_size)
        return PreparedDataset(data.source, manifest, data.seq_len, seed, data.packing)
    return TokenFileDataset(data.source, data.dtype, data.seq_len, seed)
