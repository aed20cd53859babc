"""``spindle ckpt``: look at the checkpoints of a run.

    spindle ckpt ls RUN_DIR        committed checkpoints with step, layout, size and save time
    spindle ckpt verify PATH       check a checkpoint's (or a run's latest) files against its manifest

Also runnable as ``python -m spindle.launch.ckpt ...``. Exit codes: 0 fine, 1 a checkpoint failed
verification, 2 bad arguments (missing run directory, not a checkpoint).
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
    latest = read_latest(run_dir)
    if not checkpoints:
        print(f"no committed checkpoints in {checkpoints_dir(run_dir)}")
        return 0
    print(f"{'':2}{'step':>10}  {'layout':<18}{'size':>10}  {'saved':<25}checkpoint")
    for info in checkpoints:
        layout = "dp={dp} cp={cp} tp={tp}".format(**info.layout)
        marker = "* " if latest is not None and info.path.name == latest.name else "  "
        saved = info.manifest.get("created", "")
        print(f"{marker}{info.step:>10}  {layout:<18}{format_size(info.size_bytes):>10}  {saved:<25}{info.path}")
    if latest is not None:
        print(f"* = latest ({latest.name}), what --resume auto loads")
    return 0


def verify_command(path: str) -> int:
    """Verify one checkpoint directory, or every committed checkpoint of a run directory."""
    target = Path(path)
    if (target / MANIFEST_FILE).is_file():
        directories = [target]
    elif checkpoints_dir(target).is_dir():
        directories = [info.path for info in list_checkpoints(target)]
    else:
        print(f"spindle ckpt verify: {path} is neither a committed checkpoint (no {MANIFEST_FILE}) nor a run "
              f"directory with {checkpoints_dir(target)}/.", file=sys.stderr)
        return 2
    corrupt = 0
    for directory in directories:
        try:
            verify_checkpoint(directory)
        except CheckpointError as error:
            corrupt += 1
            print(f"CORRUPT {error}")
        else:
            print(f"ok      {directory}")
    return 1 if corrupt else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spindle ckpt", description="Inspect the checkpoints of a run.")
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("ls", help="list committed checkpoints with step, layout and size")
    listing.add_argument("run_dir", metavar="RUN_DIR")
    verify = commands.add_parser("verify", help="check a checkpoint's files against its manifest checksums")
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
