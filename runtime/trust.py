"""Checkpoint origin: an HMAC tag over the manifest, keyed by a secret of this user.

A manifest lists every file of a checkpoint with its SHA-256, so it proves the files' integrity; but
whoever wrote the files could write a matching manifest. Loading a checkpoint unpickles DCP's
``.metadata`` and non-tensor entries (``torch.load(weights_only=False)``), which can run code, so a
checkpoint must also prove its origin: checkpoints this installation writes carry
``auth = {scheme, key_id, tag}``, the HMAC-SHA256 of the rest of the manifest under a per-user key.

The key is 32 random bytes in ``~/.config/spindle/checkpoint.key`` (``$SPINDLE_CONFIG_DIR`` or
``$XDG_CONFIG_HOME/spindle`` when set), created on first use with mode 0600 in a 0700 directory.
Jobs spread over several hosts need the same key on each (a shared home directory, or the file
copied to every node); otherwise their checkpoints read as coming from elsewhere.
"""
from __future__ import annotations

import enum
import hashlib
import hmac
import json
import logging
import os
import secrets
import stat
from pathlib import Path
from typing import Any, Mapping

log = logging.getLogger(__name__)

CONFIG_DIR_ENV = "SPINDLE_CONFIG_DIR"
KEY_FILE = "checkpoint.key"
SCHEME = "hmac-sha256"
AUTH_FIELD = "auth"
TRUST_FLAG = "--trust-checkpoint"


class Origin(enum.Enum):
    """What a manifest's tag says about who wrote the checkpoint."""

    VERIFIED = "written by this installation (tag verifies with this user's key)"
    UNSIGNED = "unsigned (written by an older spindle or another tool): origin unknown"
    OTHER_KEY = "signed with another key (another user or machine): origin unknown"
    BAD_TAG = "tag does not verify: the manifest was changed after it was signed"


def config_dir() -> Path:
    """This user's spindle configuration directory."""
    if os.environ.get(CONFIG_DIR_ENV):
        return Path(os.environ[CONFIG_DIR_ENV])
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "spindle"


def key_path() -> Path:
    return config_dir() / KEY_FILE


def load_key(create: bool = True) -> bytes | None:
    """The signing key; created (0600) when missing and ``create``. Refuses a key others can read."""
    path = key_path()
    if not path.exists():
        if not create:
            return None
        _create_key(path)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        from spindle.runtime.checkpoint import CheckpointError

        raise CheckpointError(f"the checkpoint signing key {path} is readable by other users (mode {mode:o}): "
                              f"anyone who can read it can forge checkpoints that load here. Run "
                              f"`chmod 600 {path}`.")
    key = bytes.fromhex(path.read_text(encoding="ascii").strip())
    return key


def _create_key(path: Path) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process of this job created it first
        return
    with os.fdopen(descriptor, "w", encoding="ascii") as handle:
        handle.write(secrets.token_hex(32) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    log.info("created the checkpoint signing key %s", path)


def key_id(key: bytes) -> str:
    """A public name of a key (no information about the key itself)."""
    return hashlib.sha256(b"spindle checkpoint key id\0" + key).hexdigest()[:16]


def _canonical(manifest: Mapping[str, Any]) -> bytes:
    unsigned = {name: value for name, value in manifest.items() if name != AUTH_FIELD}
    return json.dumps(unsigned, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def sign(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest with its ``auth`` field: the HMAC of everything else under this user's key."""
    key = load_key(create=True)
    tag = hmac.new(key, _canonical(manifest), hashlib.sha256).hexdigest()
    return {**manifest, AUTH_FIELD: {"scheme": SCHEME, "key_id": key_id(key), "tag": tag}}


def origin_of(manifest: Mapping[str, Any]) -> Origin:
    auth = manifest.get(AUTH_FIELD)
    if not isinstance(auth, Mapping) or auth.get("scheme") != SCHEME:
        return Origin.UNSIGNED
    key = load_key(create=False)
    if key is None or auth.get("key_id") != key_id(key):
        return Origin.OTHER_KEY
    expected = hmac.new(key, _canonical(manifest), hashlib.sha256).hexdigest()
    return Origin.VERIFIED if hmac.compare_digest(expected, str(auth.get("tag", ""))) else Origin.BAD_TAG


def check_origin(path: str | os.PathLike, manifest: Mapping[str, Any], *, trust_checkpoint: bool) -> Origin:
    """Refuse (CheckpointError) a checkpoint whose origin does not verify, unless the user vouches for it
    with --trust-checkpoint. Must run before anything unpickles the checkpoint's files."""
    from spindle.runtime.checkpoint import CheckpointError

    origin = origin_of(manifest)
    if origin is Origin.VERIFIED:
        return origin
    if trust_checkpoint:
        log.warning("loading checkpoint %s although its origin is not verified (%s): %s given", path,
                    origin.value, TRUST_FLAG)
        return origin
    raise CheckpointError(
        f"checkpoint {path} is {origin.value}. Loading a checkpoint unpickles some of its files, which can run "
        f"code, so spindle loads only checkpoints signed with this user's key ({key_path()}). If you trust "
        f"whoever wrote it, pass {TRUST_FLAG} (check its files first with `spindle ckpt verify {path}`).")
