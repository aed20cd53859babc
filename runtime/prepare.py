"""``spindle data prepare``: tokenize text into a prepared folder that ``data.source`` can train on.

    spindle data prepare INPUT... --tokenizer TOKENIZER --out DIR [--text-field text] [--workers N]
                         [--dtype auto|uint16|uint32] [--eos auto|none|TOKEN] [--shard-tokens N]
    spindle data verify DIR

Inputs (files, or folders searched recursively for these suffixes, in sorted order):
- ``.jsonl`` / ``.jsonl.gz``: one JSON object per line, the document in ``--text-field``;
- ``.parquet``: one document per row of the ``--text-field`` column (read with pyarrow, by row group);
- ``.txt``: the whole file is one document (a book, a source file); use JSON Lines for many small ones.
Empty documents (and null fields) are skipped and counted.

Tokens: each document is encoded with the tokenizer as its tokenizer.json says (a post-processor that
adds a BOS token adds it), then the end-of-document token is appended unless the encoding already
ends with it. ``--eos auto`` picks the first of ``EOS_CANDIDATES`` in the vocabulary (none if absent),
``--eos none`` appends nothing, any other value names the token. The tokenizer is read from a local
tokenizer.json or a folder holding one; nothing is ever downloaded.

The prepared folder:
    manifest.json              format, dtype, counts, tokenizer sha256, eos id, one entry per shard
    tokens_00000.bin ...       raw token ids (uint16 when the vocabulary fits, else uint32)
    documents_00000.npy ...    int64 offsets [D + 1] of the shard's documents into its tokens
A shard ends at a document boundary once it holds ``--shard-tokens`` tokens. Everything is written
into a temporary folder beside ``--out`` and renamed at the end, so a failed run leaves no output.
A run checks a folder's sizes at every start and each shard's sha256 once per (size, mtime): see
``verify_folder``.
"""
from __future__ import annotations

import argparse
import collections
import gzip
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

MANIFEST_NAME = "manifest.json"
FORMAT = "spindle-prepared-tokens"
VERSION = 1
VERIFIED_CACHE_NAME = ".spindle-verified.json"
"""Beside the manifest: sha256 results of shards already verified, keyed by (size, mtime_ns)."""

SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet", ".txt")
EOS_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[EOS]")
UINT16_LIMIT = 1 << 16
DEFAULT_SHARD_TOKENS = 1 << 28  # 512 MiB of uint16 per shard
CHUNK_DOCUMENTS = 512  # documents per tokenization task
CHUNK_CHARACTERS = 1 << 22  # ... or this much text, whichever comes first
USAGE_ERROR = 2


class PrepareError(ValueError):
    """Bad input to `spindle data prepare`, or a prepared folder that does not match its manifest."""


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------
def tokenizer_file(spec: str) -> Path:
    """The local tokenizer.json named by ``--tokenizer``: the file itself or a folder holding one."""
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
        if not path.is_file():
            raise PrepareError(f"--tokenizer {spec}: the folder has no tokenizer.json; pass the path of a "
                               f"Hugging Face tokenizers file, or of a folder that holds tokenizer.json")
        return path
    if path.is_file():
        return path
    hint = ("; it looks like a hub name, and spindle never downloads: save the tokenizer locally first "
            "(tokenizers.Tokenizer.from_pretrained(name).save('tokenizer.json'), on a machine with network)"
            if not spec.startswith((".", "/", "~")) and spec.count("/") <= 1 and not Path(spec).suffix else "")
    raise PrepareError(f"--tokenizer {spec}: no such local file or folder{hint}; expected the path of a "
                       f"tokenizer.json or of a folder holding one")


def load_tokenizer(path: Path) -> Any:
    """A ``tokenizers.Tokenizer`` from a local file, with one clear error for anything unreadable."""
    try:
        from tokenizers import Tokenizer
    except ModuleNotFoundError:
        raise PrepareError("the 'tokenizers' package is not installed: pip install tokenizers "
                           "(spindle data prepare uses Hugging Face tokenizers)") from None
    try:
        return Tokenizer.from_file(str(path))
    except Exception as error:  # tokenizers raises a bare Exception for malformed files
        raise PrepareError(f"--tokenizer {path}: not a readable Hugging Face tokenizer.json "
                           f"({' '.join(str(error).split())[:200]})") from None


def resolve_eos(tokenizer: Any, spec: str) -> tuple[int | None, str | None]:
    """(id, text) of the end-of-document token, or (None, None) for ``--eos none`` / none found."""
    if spec == "none":
        return None, None
    candidates = EOS_CANDIDATES if spec == "auto" else (spec,)
    for token in candidates:
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return int(token_id), token
    if spec != "auto":
        raise PrepareError(f"--eos {spec}: the tokenizer has no such token; name a token of its vocabulary, "
                           f"or use --eos auto (one of {', '.join(EOS_CANDIDATES)} when present) or --eos none")
    return None, None


def choose_dtype(requested: str, vocab_size: int) -> str:
    """uint16 when every id fits (vocabulary <= 65536), else uint32; a forced uint16 must fit."""
    if requested == "auto":
        return "uint16" if vocab_size <= UINT16_LIMIT else "uint32"
    if requested == "uint16" and vocab_size > UINT16_LIMIT:
        raise PrepareError(f"--dtype uint16: the tokenizer's vocabulary of {vocab_size} tokens does not fit in "
                           f"uint16 (ids up to {UINT16_LIMIT - 1}); use --dtype uint32 or --dtype auto")
    return requested


# ---------------------------------------------------------------------------------------------
# Reading documents
# ---------------------------------------------------------------------------------------------
def input_kind(path: Path) -> str | None:
    name = path.name.lower()
    return next((suffix for suffix in SUFFIXES if name.endswith(suffix)), None)


def expand_inputs(specs: list[str]) -> list[Path]:
    """Files in the order given; a folder contributes its supported files, recursively, sorted."""
    files: list[Path] = []
    for spec in specs:
        path = Path(spec).expanduser()
        if path.is_dir():
            found = sorted(child for child in path.rglob("*") if child.is_file() and input_kind(child))
            if not found:
                raise PrepareError(f"input folder {spec} holds no {', '.join(SUFFIXES)} files")
            files.extend(found)
        elif not path.is_file():
            raise PrepareError(f"input {spec} does not exist; expected {', '.join(SUFFIXES)} files or folders")
        elif input_kind(path) is None:
            raise PrepareError(f"input {spec}: unknown file type; expected one of {', '.join(SUFFIXES)} "
                               f"(JSON Lines, optionally gzipped; Parquet; plain text, one document per file)")
        else:
            files.append(path)
    for path in files:
        if path.stat().st_size == 0:
            raise PrepareError(f"input {path} is empty; remove it from the inputs or give it some text")
    return files


def _decode(raw: bytes, where: str) -> str:
    if b"\x00" in raw:
        raise PrepareError(f"{where} holds NUL bytes: binary data, not text")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise PrepareError(f"{where} is not UTF-8 text (invalid byte at offset {error.start}): binary data or "
                           f"another encoding; convert it to UTF-8") from None


def _text_value(value: object, field_name: str, where: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    kinds = {bool: "boolean", int: "number", float: "number", list: "array", dict: "object"}
    raise PrepareError(f"{where}: field {field_name!r} holds a JSON {kinds.get(type(value), type(value).__name__)}, "
                       f"not a string; pick the text field with --text-field")


def read_jsonl(path: Path, field_name: str) -> Iterator[str | None]:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            for number, raw in enumerate(handle, start=1):
                where = f"{path}, line {number}"
                line = _decode(raw, where).strip()
                if not line:
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise PrepareError(f"{where} is not valid JSON ({error.msg}); expected one JSON object "
                                       f"per line") from None
                if not isinstance(record, dict):
                    raise PrepareError(f"{where} holds a JSON {type(record).__name__}, not an object with a "
                                       f"{field_name!r} field")
                if field_name not in record:
                    fields = ", ".join(repr(name) for name in list(record)[:10])
                    raise PrepareError(f"{where} has no field {field_name!r} (its fields: {fields}); "
                                       f"pick the text field with --text-field")
                yield _text_value(record[field_name], field_name, where)
    except (OSError, EOFError, zlib.error) as error:  # gzip.BadGzipFile is an OSError
        raise PrepareError(f"{path}: cannot read it ({error}); a truncated or corrupt gzip file?") from None


def read_parquet(path: Path, field_name: str) -> Iterator[str | None]:
    try:
        import pyarrow
        import pyarrow.parquet as parquet
    except ModuleNotFoundError:
        raise PrepareError(f"{path}: reading Parquet needs pyarrow: pip install pyarrow") from None
    try:
        table = parquet.ParquetFile(path)
    except (pyarrow.ArrowException, OSError) as error:
        raise PrepareError(f"{path} is not a readable Parquet file ({error})") from None
    names = table.schema_arrow.names
    if field_name not in names:
        raise PrepareError(f"{path} has no column {field_name!r} (its columns: "
                           f"{', '.join(repr(name) for name in names[:10])}); pick the text column with --text-field")
    kind = table.schema_arrow.field(field_name).type
    if not (pyarrow.types.is_string(kind) or pyarrow.types.is_large_string(kind)):
        raise PrepareError(f"{path}: column {field_name!r} has type {kind}, not string; pick the text column "
                           f"with --text-field")
    try:
        for batch in table.iter_batches(batch_size=CHUNK_DOCUMENTS, columns=[field_name]):
            yield from batch.column(0).to_pylist()
    except (pyarrow.ArrowException, OSError) as error:
        raise PrepareError(f"{path}: cannot read it ({error}); a truncated or corrupt Parquet file?") from None


def read_text(path: Path) -> Iterator[str | None]:
    yield _decode(path.read_bytes(), str(path))


def read_documents(path: Path, field_name: str) -> Iterator[str | None]:
    """The documents of one input file, in file order (None for a null field)."""
    kind = input_kind(path)
    if kind == ".parquet":
        return read_parquet(path, field_name)
    if kind == ".txt":
        return read_text(path)
    return read_jsonl(path, field_name)


# ---------------------------------------------------------------------------------------------
# Tokenizing (in this process or in worker processes)
# ---------------------------------------------------------------------------------------------
class DocumentEncoder:
    """Turns a list of documents into (token ids uint32 [sum of lengths], lengths int64 [documents])."""

    def __init__(self, tokenizer: Any, eos_id: int | None) -> None:
        self.tokenizer, self.eos_id = tokenizer, eos_id

    def __call__(self, documents: list[str]) -> tuple[np.ndarray, np.ndarray]:
        encoded = [encoding.ids for encoding in self.tokenizer.encode_batch(documents)]
        if self.eos_id is not None:
            encoded = [ids if ids and ids[-1] == self.eos_id else ids + [self.eos_id] for ids in encoded]
        lengths = np.fromiter((len(ids) for ids in encoded), dtype=np.int64, count=len(encoded))
        tokens = np.fromiter((token for ids in encoded for token in ids), dtype=np.uint32, count=int(lengths.sum()))
        return tokens, lengths


_worker_encoder: DocumentEncoder | None = None


def _start_worker(tokenizer_path: str, eos_id: int | None) -> None:
    # One tokenizer thread per worker process: the processes are the parallelism.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    global _worker_encoder
    _worker_encoder = DocumentEncoder(load_tokenizer(Path(tokenizer_path)), eos_id)


def _encode_in_worker(documents: list[str]) -> tuple[np.ndarray, np.ndarray]:
    assert _worker_encoder is not None, "worker started without _start_worker"
    return _worker_encoder(documents)


def chunks_of(inputs: list[Path], field_name: str, counts: "Counts") -> Iterator[list[str]]:
    """Lists of non-empty documents, in input order, a few MB each."""
    chunk: list[str] = []
    characters = 0
    for path in inputs:
        counts.current = path.name
        for text in read_documents(path, field_name):
            if not text:
                counts.skipped += 1
                continue
            chunk.append(text)
            characters += len(text)
            if len(chunk) >= CHUNK_DOCUMENTS or characters >= CHUNK_CHARACTERS:
                yield chunk
                chunk, characters = [], 0
    if chunk:
        yield chunk


def encoded_chunks(chunks: Iterator[list[str]], tokenizer_path: Path, encoder: DocumentEncoder,
                   workers: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Encoded chunks in input order. With workers > 1, at most 2 x workers chunks are in flight, so
    memory stays bounded however large the corpus is (Pool.imap would read the whole input ahead)."""
    if workers <= 1:
        for chunk in chunks:
            yield encoder(chunk)
        return
    # fork where the platform has it: spawn would re-import the `spindle` entry point (torch, ray) in every
    # worker. Forking is safe here because this process has not encoded anything yet, so the tokenizer's
    # Rust thread pool has not started.
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods and sys.platform == "linux" else "spawn")
    with context.Pool(workers, initializer=_start_worker, initargs=(str(tokenizer_path), encoder.eos_id)) as pool:
        pending: collections.deque = collections.deque()
        for chunk in chunks:
            pending.append(pool.apply_async(_encode_in_worker, (chunk,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


# ---------------------------------------------------------------------------------------------
# Writing shards
# ---------------------------------------------------------------------------------------------
@dataclass
class Counts:
    documents: int = 0
    tokens: int = 0
    skipped: int = 0
    current: str = ""


@dataclass
class ShardWriter:
    """Appends documents to tokens_NNNNN.bin (hashing as it writes) and rolls over at a document
    boundary once a shard holds ``shard_tokens`` tokens."""

    folder: Path
    dtype: str
    shard_tokens: int
    shards: list[dict] = field(default_factory=list)
    _handle: Any = None
    _hash: Any = None
    _offsets: list[int] = field(default_factory=list)
    _max_id: int = -1

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents (their concatenated ids and lengths), closing shards as they fill."""
        if tokens.size and int(tokens.max()) > np.iinfo(self.dtype).max:
            raise PrepareError(f"token id {int(tokens.max())} does not fit in {self.dtype}; use --dtype uint32")
        while lengths.size:
            if self._handle is None:
                self._open()
            ends = self._offsets[-1] + np.cumsum(lengths)  # shard offsets after each document
            full = np.flatnonzero(ends >= self.shard_tokens)
            take = int(full[0]) + 1 if full.size else lengths.size  # documents that go into this shard
            count = int(ends[take - 1] - self._offsets[-1])
            piece = tokens[:count].astype(self.dtype).tobytes()
            self._handle.write(piece)
            self._hash.update(piece)
            self._offsets.extend(ends[:take].tolist())
            if count:
                self._max_id = max(self._max_id, int(tokens[:count].max()))
            tokens, lengths = tokens[count:], lengths[take:]
            if full.size:
                self.close_shard()

    def _open(self) -> None:
        index = len(self.shards)
        self._name = f"tokens_{index:05d}.bin"
        self._handle = open(self.folder / self._name, "wb")
        self._hash, self._offsets, self._max_id = hashlib.sha256(), [0], -1

    def close_shard(self) -> None:
        if self._handle is None:
            return
        self._handle.close()
        documents_name = self._name.replace("tokens_", "documents_").replace(".bin", ".npy")
        np.save(self.folder / documents_name, np.asarray(self._offsets, dtype=np.int64))
        self.shards.append({
            "tokens_file": self._name, "documents_file": documents_name,
            "tokens": self._offsets[-1], "documents": len(self._offsets) - 1,
            "bytes": self._offsets[-1] * np.dtype(self.dtype).itemsize, "max_token_id": self._max_id,
            "sha256": self._hash.hexdigest(), "documents_sha256": file_sha256(self.folder / documents_name),
        })
        self._handle = None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# The whole command
# ---------------------------------------------------------------------------------------------
@dataclass
class PrepareOptions:
    inputs: list[str]
    tokenizer: str
    out: str
    text_field: str = "text"
    workers: int = 1
    dtype: str = "auto"
    eos: str = "auto"
    shard_tokens: int = DEFAULT_SHARD_TOKENS
    progress: bool = True


def check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise PrepareError(f"--out {out} is a file; pass a new (or empty) folder")
    if out.is_dir() and any(out.iterdir()):
        raise PrepareError(f"--out {out} already exists and is not empty; nothing was written: pass a new "
                           f"folder, or remove this one first")


def prepare(options: PrepareOptions) -> dict:
    """Run `spindle data prepare`; returns the manifest written to ``options.out``."""
    out = Path(options.out).expanduser()
    check_out(out)
    if options.workers < 1 or options.shard_tokens < 1:
        raise PrepareError(f"--workers {options.workers} / --shard-tokens {options.shard_tokens}: expected "
                           f"positive integers")
    tokenizer_path = tokenizer_file(options.tokenizer)
    tokenizer = load_tokenizer(tokenizer_path)
    vocab_size = int(tokenizer.get_vocab_size(with_added_tokens=True))
    dtype = choose_dtype(options.dtype, vocab_size)
    eos_id, eos_token = resolve_eos(tokenizer, options.eos)
    inputs = expand_inputs(options.inputs)
    created = _make_parents(out.parent)
    temporary = out.parent / f".{out.name}.partial-{os.getpid()}"
    try:
        temporary.mkdir()
        counts, shards = _write_shards(options, inputs, tokenizer_path, DocumentEncoder(tokenizer, eos_id),
                                       temporary, dtype)
        manifest = {
            "format": FORMAT, "version": VERSION, "dtype": dtype, "vocab_size": vocab_size,
            "max_token_id": max(shard["max_token_id"] for shard in shards),
            "tokens": counts.tokens, "documents": counts.documents, "skipped_empty_documents": counts.skipped,
            "eos_id": eos_id, "eos_token": eos_token,
            "tokenizer": {"file": str(tokenizer_path.resolve()), "sha256": file_sha256(tokenizer_path)},
            "text_field": options.text_field, "inputs": [str(path) for path in inputs],
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "shards": shards,
        }
        (temporary / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        if out.is_dir():
            out.rmdir()  # empty (checked above): the rename below puts the finished folder in its place
        temporary.rename(out)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        for folder in reversed(created):
            shutil.rmtree(folder, ignore_errors=True)
        raise
    return manifest


def _make_parents(folder: Path) -> list[Path]:
    """Create missing parent folders of --out; returns them (outermost first) to remove on failure."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        path.mkdir()
    return list(reversed(missing))


def _write_shards(options: PrepareOptions, inputs: list[Path], tokenizer_path: Path, encoder: DocumentEncoder,
                  folder: Path, dtype: str) -> tuple[Counts, list[dict]]:
    from tqdm import tqdm

    counts = Counts()
    writer = ShardWriter(folder, dtype, options.shard_tokens)
    # tqdm hides itself when stderr is not a terminal (disable=None).
    with tqdm(desc="prepare", unit=" docs", disable=None if options.progress else True, dynamic_ncols=True) as bar:
        for tokens, lengths in encoded_chunks(chunks_of(inputs, options.text_field, counts), tokenizer_path,
                                              encoder, options.workers):
            empty = lengths == 0  # text that encodes to nothing (whitespace only, with --eos none)
            if empty.any():
                counts.skipped += int(empty.sum())
                lengths = lengths[~empty]
            writer.add(tokens, lengths)
            counts.documents += len(lengths)
            counts.tokens += int(tokens.size)
            bar.set_postfix(tokens=counts.tokens, file=counts.current, refresh=False)
            bar.update(len(lengths))
    writer.close_shard()
    if counts.tokens == 0:
        raise PrepareError(f"the inputs hold no text ({counts.skipped} empty documents); nothing to prepare")
    return counts, writer.shards


# ---------------------------------------------------------------------------------------------
# Reading and verifying a prepared folder (used by training; no torch here)
# ---------------------------------------------------------------------------------------------
def _folder_error(folder: Path, problem: str) -> PrepareError:
    return PrepareError(f"{problem}; re-run `spindle data prepare` into a new folder (or restore the original "
                        f"files of {folder})")


def read_manifest(folder: str | os.PathLike) -> dict:
    """The parsed manifest of a prepared folder, checked for format and required keys."""
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise PrepareError(f"the folder {folder} has no {MANIFEST_NAME}: expected a folder written by "
                           f"`spindle data prepare`")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise _folder_error(folder, f"{path} is not valid JSON ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise _folder_error(folder, f"{path} is not a spindle prepared-data manifest (format {FORMAT!r})")
    if manifest.get("version") != VERSION:
        raise _folder_error(folder, f"{path} has version {manifest.get('version')!r}, this spindle reads {VERSION}")
    required = ("dtype", "tokens", "documents", "max_token_id", "shards")
    missing = [key for key in required if key not in manifest]
    if missing or manifest["dtype"] not in ("uint16", "uint32") or not manifest["shards"]:
        raise _folder_error(folder, f"{path} is incomplete (missing or bad: {', '.join(missing) or 'dtype/shards'})")
    return manifest


def check_sizes(folder: Path, manifest: dict) -> None:
    """Every shard file exists with the size (and document count) the manifest records: stat only."""
    itemsize = np.dtype(manifest["dtype"]).itemsize
    for shard in manifest["shards"]:
        tokens_path, documents_path = folder / shard["tokens_file"], folder / shard["documents_file"]
        for path in (tokens_path, documents_path):
            if not path.is_file():
                raise _folder_error(folder, f"{path} is missing")
        size = tokens_path.stat().st_size
        if size != shard["tokens"] * itemsize:
            raise _folder_error(folder, f"{tokens_path} has {size} bytes, the manifest says {shard['tokens'] * itemsize}")
        try:
            offsets = np.load(documents_path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as error:
            raise _folder_error(folder, f"{documents_path} is not a readable .npy array ({error})") from None
        if offsets.shape != (shard["documents"] + 1,):
            raise _folder_error(folder, f"{documents_path} holds {offsets.shape} offsets, the manifest says "
                                        f"{shard['documents'] + 1}")


def verify_folder(folder: str | os.PathLike, *, checksums: bool = True, use_cache: bool = True) -> dict:
    """Check a prepared folder against its manifest; returns the manifest.

    Sizes are checked every time (a stat per file). The sha256 of every shard is computed once per
    (file, size, mtime) and remembered in ``.spindle-verified.json`` beside the manifest (skipped
    when the folder is read-only): hashing runs at about 1 GB/s, so a 100 GB corpus costs a minute on
    its first use and nothing after. A file rewritten in place changes its mtime and is hashed again.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    check_sizes(folder, manifest)
    if not checksums:
        return manifest
    cache = _read_cache(folder) if use_cache else {}
    changed = False
    for shard in manifest["shards"]:
        for name, expected in ((shard["tokens_file"], shard["sha256"]), (shard["documents_file"], shard["documents_sha256"])):
            stat = (folder / name).stat()
            key = [stat.st_size, stat.st_mtime_ns, expected]
            if cache.get(name) == key:
                continue
            actual = file_sha256(folder / name)
            if actual != expected:
                raise _folder_error(folder, f"{folder / name} does not match the manifest's sha256 (the file "
                                            f"changed after it was prepared)")
            cache[name], changed = key, True
    if changed and use_cache:
        _write_cache(folder, cache)
    return manifest


def _read_cache(folder: Path) -> dict:
    try:
        cache = json.loads((folder / VERIFIED_CACHE_NAME).read_text(encoding="utf-8"))
        return cache if isinstance(cache, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(folder: Path, cache: dict) -> None:
    temporary = folder / f"{VERIFIED_CACHE_NAME}.{os.getpid()}"
    try:
        temporary.write_text(json.dumps(cache), encoding="utf-8")
        temporary.replace(folder / VERIFIED_CACHE_NAME)  # atomic: ranks racing here write the same thing
    except OSError:  # a read-only folder: verify again next time
        temporary.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spindle data", description="Prepare and check training data.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    prepare_parser = commands.add_parser(
        "prepare", help="tokenize text files into a prepared folder (data.source: DIR)",
        description="Tokenize .jsonl(.gz), .parquet and .txt files (or folders of them) into token shards, "
                    "document offsets and a manifest.")
    prepare_parser.add_argument("inputs", nargs="+", metavar="INPUT", help="input files or folders")
    prepare_parser.add_argument("--tokenizer", required=True, metavar="TOKENIZER",
                                help="local tokenizer.json, or a folder holding one (never downloaded)")
    prepare_parser.add_argument("--out", required=True, metavar="DIR", help="new (or empty) output folder")
    prepare_parser.add_argument("--text-field", default="text", metavar="NAME",
                                help="JSON field / Parquet column holding the text (default: text)")
    prepare_parser.add_argument("--workers", type=int, default=1, metavar="N",
                                help="tokenizer processes (default 1; one process already uses several threads)")
    prepare_parser.add_argument("--dtype", choices=("auto", "uint16", "uint32"), default="auto",
                                help="token id type (default auto: uint16 when the vocabulary fits)")
    prepare_parser.add_argument("--eos", default="auto", metavar="auto|none|TOKEN",
                                help="end-of-document token appended to each document (default auto)")
    prepare_parser.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, metavar="N",
                                help=f"tokens per shard file (default {DEFAULT_SHARD_TOKENS})")
    verify_parser = commands.add_parser("verify", help="check a prepared folder's files against its manifest")
    verify_parser.add_argument("folder", metavar="DIR")
    return parser


def main(argv: list[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    try:
        if arguments.command == "verify":
            manifest = verify_folder(arguments.folder, use_cache=False)
            print(f"{arguments.folder}: {len(manifest['shards'])} shards, {manifest['tokens']} tokens, "
                  f"{manifest['documents']} documents: every file matches the manifest")
            return 0
        manifest = prepare(PrepareOptions(
            inputs=arguments.inputs, tokenizer=arguments.tokenizer, out=arguments.out,
            text_field=arguments.text_field, workers=arguments.workers, dtype=arguments.dtype,
            eos=arguments.eos, shard_tokens=arguments.shard_tokens))
    except PrepareError as error:
        print(f"spindle data {arguments.command}: error: {error}", file=sys.stderr)
        return USAGE_ERROR
    eos = f"{manifest['eos_token']!r} (id {manifest['eos_id']})" if manifest["eos_id"] is not None else "none"
    print(f"spindle data prepare: {manifest['documents']} documents, {manifest['tokens']} tokens "
          f"({manifest['dtype']}, {len(manifest['shards'])} shards, end-of-document token {eos}, "
          f"{manifest['skipped_empty_documents']} empty documents skipped) in {arguments.out}; "
          f"train on it with data.source: {arguments.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
