"""`spindle data prepare` and `spindle data verify`: real files, a tokenizer trained in the test, every
input format, shards and manifest against an independent encoding, and one clear message (exit 2, no
output folder left behind) for each kind of bad input."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from spindle.launch.cli import main as spindle
from spindle.runtime.config import ConfigError, DataConfig
from spindle.runtime.data import build_dataset
from spindle.runtime.prepare import VERIFIED_CACHE_NAME, file_sha256, verify_folder
from text_corpus import (
    large_vocabulary_tokenizer,
    make_documents,
    reference_ids,
    train_tokenizer,
    write_jsonl,
    write_parquet,
)


@pytest.fixture(scope="module")
def text(tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("text")
    documents = make_documents(90, seed=0)
    tokenizer = train_tokenizer(folder / "tokenizer.json", documents)
    (folder / "tokenizer-folder").mkdir()
    (folder / "tokenizer-folder" / "tokenizer.json").write_bytes(tokenizer.read_bytes())
    inputs = {
        "jsonl": write_jsonl(folder / "a.jsonl", documents[:30] + [""]),  # one empty document: skipped
        "gz": write_jsonl(folder / "b.jsonl.gz", documents[30:50] + [None]),  # a null text: skipped
        "parquet": write_parquet(folder / "c.parquet", documents[50:89]),
        "txt": folder / "d.txt",
    }
    inputs["txt"].write_text(documents[89], encoding="utf-8")
    return {"folder": folder, "documents": documents, "tokenizer": tokenizer, "inputs": inputs}


def run(capsys: pytest.CaptureFixture, *arguments: str) -> tuple[int, str, str]:
    code = spindle(["data", *[str(argument) for argument in arguments]])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def read_documents(folder: Path) -> list[list[int]]:
    """The documents of a prepared folder, read back through its shards and offsets."""
    manifest = json.loads((folder / "manifest.json").read_text())
    documents = []
    for shard in manifest["shards"]:
        tokens = np.fromfile(folder / shard["tokens_file"], dtype=manifest["dtype"])
        offsets = np.load(folder / shard["documents_file"])
        documents += [tokens[start:end].tolist() for start, end in zip(offsets[:-1], offsets[1:])]
    return documents


# ---------------------------------------------------------------------------------------------
# what it writes
# ---------------------------------------------------------------------------------------------
def test_prepare_every_format(text: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    inputs = text["inputs"]
    out = tmp_path / "new" / "prepared"  # missing parents are created
    code, stdout, stderr = run(capsys, "prepare", inputs["jsonl"], inputs["gz"], inputs["parquet"], inputs["txt"],
                               "--tokenizer", text["folder"] / "tokenizer-folder", "--out", out,
                               "--shard-tokens", 300)
    assert code == 0, stderr
    assert "90 documents" in stdout and "2 empty documents skipped" in stdout and "data.source" in stdout
    expected = reference_ids(text["tokenizer"], text["documents"])
    assert read_documents(out) == expected  # input order: jsonl, gz, parquet, txt
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dtype"] == "uint16" and manifest["documents"] == 90
    assert manifest["tokens"] == sum(map(len, expected)) and manifest["skipped_empty_documents"] == 2
    assert manifest["eos_token"] == "<|endoftext|>" and all(document[-1] == manifest["eos_id"] for document in expected)
    assert manifest["tokenizer"]["sha256"] == file_sha256(text["tokenizer"])
    assert len(manifest["shards"]) > 3 and all(shard["tokens"] >= 300 for shard in manifest["shards"][:-1])
    for shard in manifest["shards"]:
        assert shard["sha256"] == file_sha256(out / shard["tokens_file"])
        assert shard["max_token_id"] == int(np.fromfile(out / shard["tokens_file"], dtype=np.uint16).max())
    assert sorted(path.name for path in out.parent.iterdir()) == ["prepared"]  # no temporary folder left


def test_workers_and_eos_options(text: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    inputs = [text["inputs"]["jsonl"], text["inputs"]["parquet"]]
    one, two = tmp_path / "one", tmp_path / "two"
    assert run(capsys, "prepare", *inputs, "--tokenizer", text["tokenizer"], "--out", one)[0] == 0
    assert run(capsys, "prepare", *inputs, "--tokenizer", text["tokenizer"], "--out", two, "--workers", 2)[0] == 0
    assert read_documents(one) == read_documents(two)  # the same bytes whatever the worker count
    plain = tmp_path / "no-eos"
    assert run(capsys, "prepare", inputs[0], "--tokenizer", text["tokenizer"], "--out", plain, "--eos", "none")[0] == 0
    assert read_documents(plain) == reference_ids(text["tokenizer"], text["documents"][:30], eos=None)
    assert json.loads((plain / "manifest.json").read_text())["eos_id"] is None


def test_text_field_and_large_vocabulary(text: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    tokenizer = large_vocabulary_tokenizer(tmp_path / "large.json")
    source = write_jsonl(tmp_path / "words.jsonl", ["w2 w65535 w65536", "w69999 w7"], field="body")
    out = tmp_path / "wide"
    code, _, stderr = run(capsys, "prepare", source, "--tokenizer", tokenizer, "--out", out, "--text-field", "body")
    assert code == 0, stderr
    assert json.loads((out / "manifest.json").read_text())["dtype"] == "uint32"  # auto: the vocabulary is 70000
    assert read_documents(out) == [[2, 65535, 65536, 1], [69999, 7, 1]]


def test_trains_from_the_prepared_folder(text: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "prepared"
    assert run(capsys, "prepare", text["inputs"]["jsonl"], "--tokenizer", text["tokenizer"], "--out", out)[0] == 0
    from spindle.runtime.main import main as train

    run_dir = tmp_path / "run"
    code = train([str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"), "--run-dir", str(run_dir),
                  "--set", f"data.source={out}", "--set", "data.seq_len=32", "--set", "model.vocab_size=128",
                  "--set", "train.steps=2", "--set", "train.global_batch=2", "--set", "train.precision=fp32"])
    assert code == 0, capsys.readouterr().err
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2] and all(np.isfinite(line["loss"]) for line in lines)


# ---------------------------------------------------------------------------------------------
# bad inputs: one message, exit 2, nothing left on disk
# ---------------------------------------------------------------------------------------------
def _write(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


BAD_INPUTS = {
    "missing-field": (lambda folder: write_jsonl(folder / "x.jsonl", ["fine"], field="body"), [],
                      ["x.jsonl, line 1", "no field 'text'", "'body'", "--text-field"]),
    "binary-jsonl": (lambda folder: _write(folder / "x.jsonl", bytes(range(256)) * 4), [],
                     ["x.jsonl, line 1", "binary"]),
    "binary-txt": (lambda folder: _write(folder / "x.txt", b"\xff\xfe\x00garbage" * 10), [], ["x.txt", "binary"]),
    "latin1-txt": (lambda folder: _write(folder / "x.txt", "caf\xe9".encode("latin-1")), [], ["x.txt", "not UTF-8"]),
    "bad-json": (lambda folder: _write(folder / "x.jsonl", b'{"text": "a"}\n{"text": \n'), [],
                 ["x.jsonl, line 2", "not valid JSON"]),
    "not-text-field": (lambda folder: _write(folder / "x.jsonl", b'{"text": 5}\n'), [], ["field 'text' holds a JSON number", "--text-field"]),
    "empty-file": (lambda folder: _write(folder / "x.jsonl", b""), [], ["x.jsonl is empty"]),
    "only-empty-documents": (lambda folder: write_jsonl(folder / "x.jsonl", ["", None]), [], ["no text"]),
    "unknown-type": (lambda folder: _write(folder / "x.csv", b"text\nhello\n"), [], ["x.csv", "unknown file type"]),
    "missing-input": (lambda folder: folder / "absent.jsonl", [], ["absent.jsonl does not exist"]),
    "junk-parquet": (lambda folder: _write(folder / "x.parquet", b"PAR1 not really"), [],
                     ["x.parquet is not a readable Parquet file"]),
    "parquet-column": (lambda folder: write_parquet(folder / "x.parquet", ["a"], field="body"), [],
                       ["no column 'text'", "'body'"]),
    "corrupt-gzip": (lambda folder: _write(folder / "x.jsonl.gz", b"\x1f\x8b\x08\x00junkjunk"), [],
                     ["x.jsonl.gz", "corrupt gzip"]),
    "uint16-too-small": (lambda folder: write_jsonl(folder / "x.jsonl", ["w2"]), ["--dtype", "uint16", "LARGE"],
                         ["vocabulary of 70000 tokens does not fit in uint16", "--dtype uint32"]),
    "missing-tokenizer": (lambda folder: write_jsonl(folder / "x.jsonl", ["a"]), ["--tokenizer", "nowhere/tok.json"],
                          ["--tokenizer nowhere/tok.json", "no such local file"]),
    "hub-name": (lambda folder: write_jsonl(folder / "x.jsonl", ["a"]), ["--tokenizer", "gpt2"],
                 ["never downloads"]),
    "bad-tokenizer": (lambda folder: write_jsonl(folder / "x.jsonl", ["a"]), ["--tokenizer", "JUNK"],
                      ["not a readable Hugging Face tokenizer.json"]),
    "unknown-eos": (lambda folder: write_jsonl(folder / "x.jsonl", ["a"]), ["--eos", "<nope>"],
                    ["--eos <nope>", "no such token"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS), ids=list(BAD_INPUTS))
def test_bad_input_one_message_no_output(text: dict, tmp_path: Path, capsys: pytest.CaptureFixture, case: str) -> None:
    make_input, extra, fragments = BAD_INPUTS[case]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    source = make_input(inputs)
    tokenizer = text["tokenizer"]
    if "LARGE" in extra:
        extra, tokenizer = [argument for argument in extra if argument != "LARGE"], large_vocabulary_tokenizer(
            tmp_path / "large.json")
    if "JUNK" in extra:
        extra = ["--tokenizer", str(_write(tmp_path / "junk.json", b"{not json"))]
    if "--tokenizer" not in extra:
        extra = [*extra, "--tokenizer", str(tokenizer)]
    # A first good input, so a failure in the second file happens after shards were written.
    good = [] if case == "only-empty-documents" else [write_jsonl(tmp_path / "good.jsonl", text["documents"][:20])]
    out = tmp_path / "out"
    code, stdout, stderr = run(capsys, "prepare", *good, source, *extra, "--out", out, "--shard-tokens", 50)
    assert code == 2, stdout
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("spindle data prepare: error: "), stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert not [path.name for path in tmp_path.iterdir() if path.name.startswith((".out", "out"))]


def test_existing_output_is_never_touched(text: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, stderr = run(capsys, "prepare", text["inputs"]["jsonl"], "--tokenizer", text["tokenizer"], "--out", out)
    assert code == 2 and "already exists and is not empty" in stderr
    assert [path.name for path in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    empty = tmp_path / "empty"
    empty.mkdir()  # an empty folder is fine
    assert run(capsys, "prepare", text["inputs"]["txt"], "--tokenizer", text["tokenizer"], "--out", empty)[0] == 0


# ---------------------------------------------------------------------------------------------
# a run refuses a folder that does not match its manifest
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def prepared(text: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> Path:
    out = tmp_path / "prepared"
    assert run(capsys, "prepare", text["inputs"]["jsonl"], text["inputs"]["parquet"], "--tokenizer",
               text["tokenizer"], "--out", out, "--shard-tokens", 400)[0] == 0
    return out


def check(folder: Path) -> None:
    build_dataset(DataConfig(source=str(folder), seq_len=16), 128, seed=0)


def test_checksums_are_cached_by_size_and_mtime(prepared: Path) -> None:
    check(prepared)
    cache = json.loads((prepared / VERIFIED_CACHE_NAME).read_text())
    manifest = json.loads((prepared / "manifest.json").read_text())
    assert set(cache) == {name for shard in manifest["shards"] for name in (shard["tokens_file"], shard["documents_file"])}
    # Same size, same mtime, other bytes: the cache trusts it (documented), a full verify does not.
    shard = prepared / manifest["shards"][1]["tokens_file"]
    stat = shard.stat()
    data = bytearray(shard.read_bytes())
    data[0] ^= 1
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    check(prepared)
    with pytest.raises(Exception, match=f"{shard.name} does not match the manifest's sha256"):
        verify_folder(prepared, use_cache=False)
    # A later mtime (any ordinary write) invalidates the cached result.
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.raises(ConfigError, match=f"data.source = .*{shard.name} does not match"):
        check(prepared)


@pytest.mark.parametrize("damage, fragment", [
    ("truncate", "has 10 bytes, the manifest says"),
    ("delete", "tokens_00001.bin is missing"),
    ("documents", "documents_00001.npy holds"),
    ("manifest", "manifest.json is not valid JSON"),
    ("no-manifest", "has no manifest.json"),
], ids=["truncated-shard", "missing-shard", "wrong-offsets", "broken-manifest", "no-manifest"])
def test_damaged_folder_is_refused_naming_the_file(prepared: Path, capsys: pytest.CaptureFixture, damage: str,
                                                   fragment: str) -> None:
    shard = prepared / "tokens_00001.bin"
    if damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:10])
    elif damage == "delete":
        shard.unlink()
    elif damage == "documents":
        np.save(prepared / "documents_00001.npy", np.zeros(3, dtype=np.int64))
    elif damage == "manifest":
        (prepared / "manifest.json").write_text("{")
    else:
        (prepared / "manifest.json").unlink()
    with pytest.raises(ConfigError, match=fragment) as raised:
        check(prepared)
    assert str(raised.value).startswith(f"data.source = {str(prepared)!r}")
    code, _, stderr = run(capsys, "verify", prepared)
    assert code == 2 and fragment.split(" ")[0] in stderr and len(stderr.strip().splitlines()) == 1


def test_verify_command(prepared: Path, capsys: pytest.CaptureFixture) -> None:
    code, stdout, _ = run(capsys, "verify", prepared)
    assert code == 0 and "every file matches the manifest" in stdout
