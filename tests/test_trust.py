"""Checkpoint origin: manifests signed with a per-user key; loading refuses anything else unless the
user vouches for it, and never unpickles a file before the tag and the files' hashes verify."""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import stat
import zlib
from pathlib import Path

import pytest
from test_checkpoint import build, make_config, save_steps, step_dir

from spindle.launch import ckpt
from spindle.runtime.checkpoint import CheckpointError, Checkpointer, read_manifest
from spindle.runtime.trust import Origin, key_path, origin_of


@pytest.fixture
def other_user(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Switch to another user's config directory (another signing key) for the rest of the test."""
    directory = tmp_path / "other-user-config"
    monkeypatch.setenv("SPINDLE_CONFIG_DIR", str(directory))
    return directory


@pytest.fixture
def own_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "config"
    monkeypatch.setenv("SPINDLE_CONFIG_DIR", str(directory))
    return directory


class _Payload:
    """Unpickling this creates a file: the stand-in for code an attacker's checkpoint runs."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _rewrite_manifest(directory: Path, **changes: object) -> None:
    """Make the manifest match the files again (both digests), as a forger who can write files can."""
    manifest = json.loads((directory / "manifest.json").read_text())
    for name in manifest["files"]:
        data = (directory / name).read_bytes()
        manifest["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                                   "crc32": f"{zlib.crc32(data):08x}"}
    manifest.update(changes)
    (directory / "manifest.json").write_text(json.dumps(manifest))


def test_signing_key_is_private_and_created_once(own_key: Path) -> None:
    save_steps(own_key.parent / "run", make_config(), [1])
    path = key_path()
    assert path.parent == own_key and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(own_key.stat().st_mode) == 0o700
    manifest = read_manifest(step_dir(own_key.parent / "run", 1))
    assert origin_of(manifest) is Origin.VERIFIED
    os.chmod(path, 0o644)  # a key others can read cannot prove anything
    with pytest.raises(CheckpointError, match="readable by other users.*chmod 600"):
        origin_of(manifest)


def test_tampered_checkpoint_is_refused_before_anything_is_unpickled(tmp_path: Path, own_key: Path) -> None:
    """An attacker replaces .metadata (a pickle DCP reads) and fixes up the manifest's hashes: integrity
    verifies, the origin does not, and nothing is unpickled."""
    run_dir = tmp_path / "run"
    config = make_config()
    save_steps(run_dir, config, [1])
    directory, marker = step_dir(run_dir, 1), tmp_path / "code-ran"
    (directory / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    _rewrite_manifest(directory)
    model, optimizer = build(config, seed=0)
    for attempt in (lambda: Checkpointer(run_dir, config, model, optimizer).restore("auto"),
                    lambda: Checkpointer(run_dir, config, model, optimizer).load(directory)):
        with pytest.raises(CheckpointError, match="tag does not verify.*--trust-checkpoint"):
            attempt()
        assert not marker.exists()
    assert ckpt.main(["verify", str(directory)]) == ckpt.UNVERIFIED_ORIGIN
    # Removing the tag does not help either: unsigned is refused the same way.
    _rewrite_manifest(directory, auth=None)
    with pytest.raises(CheckpointError, match="unsigned"):
        Checkpointer(run_dir, config, model, optimizer).restore("auto")
    assert not marker.exists()


def test_another_users_checkpoint_needs_trust_checkpoint(tmp_path: Path, own_key: Path, other_user: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    config = make_config()
    theirs = tmp_path / "theirs"
    save_steps(theirs, config, [1])  # written under the other user's key
    mine = tmp_path / "mine"
    shutil.copytree(theirs, mine)
    os.environ["SPINDLE_CONFIG_DIR"] = str(own_key)  # back to this user (monkeypatch restores it)
    model, optimizer = build(config, seed=1)
    with pytest.raises(CheckpointError, match="signed with another key"):
        Checkpointer(mine, config, model, optimizer).restore("auto")
    resumed = Checkpointer(mine, config, model, optimizer, trust_checkpoint=True).restore("auto")
    assert resumed.step == 1
    # ckpt verify: integrity and origin are separate verdicts.
    capsys.readouterr()
    assert ckpt.main(["verify", str(step_dir(mine, 1))]) == ckpt.UNVERIFIED_ORIGIN
    report = capsys.readouterr().out
    assert "integrity: ok" in report and "origin: signed with another key" in report and "--trust-checkpoint" in report
    (step_dir(mine, 1) / "rng_rank0.pt").write_bytes(b"garbage")
    assert ckpt.main(["verify", str(step_dir(mine, 1))]) == ckpt.CORRUPT
    assert "integrity: CORRUPT" in capsys.readouterr().out
