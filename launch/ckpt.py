"""``spindle ckpt``: look at the checkpoints of a run.

    spindle ckpt ls RUN_DIR        committed checkpoints with step, layout, size and save time; the one
                                   --resume auto loads is marked (damaged ones are marked CORRUPT)
    spindle ckpt verify PATH       a checkpoint's (or every committed checkpoint of a run's) integrity
                                   (files against the manifest's hashes) and origin (the manifest's tag
                                   against this user's key), reported separately

Also runnable as ``python -m spindle.launch.ckpt ...``. Exit codes: 0 fine, 1 a checkpoint is corrupt,
2 bad arguments (missing run directory, not a checkpoint), 3 intact but of unverified origin (loading
it needs --trust-checkpoint).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from spindle.runtime.checkpoint import (
    MANIFEST_FILE,
    CheckpointError,
    checkpoints_dir,
    list_checkpoints,
    read_latest,
    verify_checkpoint,
)
from spindle.runtime.trust import Origin, key_path, origin_of

CORRUPT, UNVERIFIED_ORIGIN = 1, 3


def format_size(size_bytes: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size_bytes < 1024 or unit == "GB":
            return f"{size_bytes:.0f} {unit}" if unit == "B" else f"{size_bytes:.1f} {unit}"
        size_bytes /= 1024
    raise AssertionError("unreachable")


def list_command(run_dir: str) -> int:
    if not Path(run_dir).is_dir():
        print(f"spindle ckpt ls: {run_dir} is not a directory; pass a run directory (it holds "
              f"config.yaml and checkpoints/).", file=sys.stderr)
        return 2
    checkpoints = list_checkpoints(run_dir)
    if not checkpoints:
        print(f"no committed checkpoints in {checkpoints_dir(run_dir)}")
        return 0
    loaded, damaged = _auto_resume_choice(run_dir, checkpoints)
    print(f"{'':2}{'step':>10}  {'layout':<18}{'size':>10}  {'saved':<25}checkpoint")
    for info in checkpoints:
        layout = "dp={dp} cp={cp} tp={tp}".format(**info.layout)
        marker = "* " if info.path == loaded else "  "
        saved = info.manifest.get("created", "")
        note = "  CORRUPT" if info.path in damaged else ""
        print(f"{marker}{info.step:>10}  {layout:<18}{format_size(info.size_bytes):>10}  {saved:<25}{info.path}{note}")
    latest = read_latest(run_dir)
    if loaded is not None:
        fallback = f" (latest, {latest.name}, is corrupt)" if latest is not None and latest != loaded else ""
        print(f"* = what --resume auto loads: {loaded.name}{fallback}")
    else:
        print("every committed checkpoint is corrupt: --resume auto would fail; see `spindle ckpt verify`")
    return 0


def _auto_resume_choice(run_dir: str, checkpoints: list) -> tuple[Path | None, set[Path]]:
    """The checkpoint --resume auto loads (newest up to ``latest`` whose files verify) and the damaged
    ones it skips on the way."""
    latest = read_latest(run_dir)
    candidates = [info for info in checkpoints if latest is None or info.path.name <= latest.name]
    damaged: set[Path] = set()
    for info in reversed(candidates):
        try:
            verify_checkpoint(info.path)
        except CheckpointError:
            damaged.add(info.path)
            continue
        return info.path, damaged
    return None, damaged


def verify_command(path: str) -> int:
    """Integrity and origin of one checkpoint directory, or of every committed checkpoint of a run."""
    target = Path(path)
    if (target / MANIFEST_FILE).is_file():
        directories = [target]
    elif checkpoints_dir(target).is_dir():
        directories = [info.path for info in list_checkpoints(target)]
    else:
        print(f"spindle ckpt verify: {path} is neither a committed checkpoint (no {MANIFEST_FILE}) nor a run "
              f"directory with {checkpoints_dir(target)}/.", file=sys.stderr)
        return 2
    status = 0
    for directory in directories:
        try:
            manifest = verify_checkpoint(directory)
        except CheckpointError as error:
            print(f"{directory}\n  integrity: CORRUPT: {error}")
            status = CORRUPT
            continue
        kind = "sha256" if all("sha256" in entry for entry in manifest["files"].values()) else "crc32"
        print(f"{directory}\n  integrity: ok ({len(manifest['files'])} files match the manifest's {kind})")
        try:
            origin = origin_of(manifest)
        except CheckpointError as error:  # the key itself is unusable (e.g. readable by others)
            print(f"  origin: cannot check: {error}")
            status = status or UNVERIFIED_ORIGIN
            continue
        print(f"  origin: {origin.value}")
        if origin is not Origin.VERIFIED:
            print(f"          loading it needs --trust-checkpoint (this user's key: {key_path()})")
            status = status or UNVERIFIED_ORIGIN
    return status


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spindle ckpt", description="Inspect the checkpoints of a run.")
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("ls", help="list committed checkpoints with step, layout and size")
    listing.add_argument("run_dir", metavar="RUN_DIR")
    verify = commands.add_parser("verify", help="check a checkpoint's integrity (file hashes) and origin (signature)")
    verify.add_argument("path", metavar="PATH", help="a checkpoints/step_<8 digits> directory or a run directory")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry of ``spindle ckpt``; ``argv`` is what follows ``ckpt`` on the command line."""
    arguments = build_parser().parse_args(argv)
    if arguments.command == "ls":
        return list_command(arguments.run_dir)
    return verify_command(arguments.path)


if __name__ == "__main__":
    sys.exit(main())
