"""A small text corpus and a tokenizer trained on it in-process, for the data-preparation tests.

    documents = make_documents(200, seed=0)          # strings of 1..60 words
    tokenizer_path = train_tokenizer(tmp / "tokenizer.json", documents)
    reference_ids(tokenizer_path, documents)         # what `spindle data prepare` must write
"""
from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

EOS = "<|endoftext|>"
WORDS = ("the cat sat on a mat and dog ran far away while birds sing over green hills under quiet "
         "blue skies each morning river stones glow softly").split()


def make_documents(count: int, seed: int, max_words: int = 60) -> list[str]:
    """Random documents of 1..max_words words (some with punctuation and non-ASCII letters)."""
    generator = random.Random(seed)
    documents = []
    for _ in range(count):
        words = [generator.choice(WORDS) for _ in range(generator.randint(1, max_words))]
        if generator.random() < 0.2:
            words.append(generator.choice(["é", "ü!", "ß.", "。"]))
        documents.append(" ".join(words))
    return documents


def train_tokenizer(path: Path, documents: list[str], vocab_size: int = 120) -> Path:
    """A byte-level-free BPE tokenizer (whitespace pre-tokenizer) with [UNK] and the EOS token; < 1 s."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(documents, trainers.BpeTrainer(vocab_size=vocab_size,
                                                                  special_tokens=["[UNK]", EOS]))
    tokenizer.save(str(path))
    return path


def large_vocabulary_tokenizer(path: Path, size: int = 70_000) -> Path:
    """A word-level tokenizer whose vocabulary does not fit in uint16 (ids up to size - 1)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocabulary = {"[UNK]": 0, EOS: 1, **{f"w{index}": index for index in range(2, size)}}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocabulary, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(path))
    return path


def reference_ids(tokenizer_path: Path, documents: list[str], eos: str | None = EOS) -> list[list[int]]:
    """Each non-empty document encoded one at a time, with the EOS id appended."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    eos_ids = [tokenizer.token_to_id(eos)] if eos else []
    return [tokenizer.encode(text).ids + eos_ids for text in documents if text]


def write_jsonl(path: Path, documents: list[str | None], field: str = "text") -> Path:
    lines = "".join(json.dumps({field: text, "source": "test"}) + "\n" for text in documents)
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(lines.encode("utf-8")))
    else:
        path.write_text(lines, encoding="utf-8")
    return path


def write_parquet(path: Path, documents: list[str | None], field: str = "text") -> Path:
    import pyarrow
    import pyarrow.parquet

    pyarrow.parquet.write_table(pyarrow.table({field: pyarrow.array(documents, type=pyarrow.string())}), path,
                                row_group_size=16)
    return path
