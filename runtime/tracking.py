"""The one place that talks to Weights & Biases.

``start_tracking`` returns a tracker with ``log(metrics, step)`` and ``finish()``:
- logging.wandb = "offline" (default): a real wandb run written under RUN_DIR/wandb, no network, no login;
- "online": a normal wandb run (needs the user's wandb login);
- "disabled", a rank other than 0, or wandb not importable: a ``NullTracker`` that does nothing.
The wandb run id is kept in RUN_DIR/wandb_run_id so that a resumed run continues the same wandb run.
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Protocol

from spindle.runtime.config import LoggingConfig

RUN_ID_FILE = "wandb_run_id"


class Tracker(Protocol):
    def log(self, metrics: dict, step: int) -> None: ...

    def finish(self) -> None: ...


class NullTracker:
    """Stands in for wandb when tracking is off: every call does nothing."""

    def log(self, metrics: dict, step: int) -> None:
        pass

    def finish(self) -> None:
        pass


class WandbTracker:
    """A wandb run; ``None`` metric values (e.g. MFU on CPU) are left out rather than logged."""

    def __init__(self, run: object) -> None:
        self.run = run

    def log(self, metrics: dict, step: int) -> None:
        self.run.log({key: value for key, value in metrics.items() if value is not None}, step=step)

    def finish(self) -> None:
        self.run.finish()


def _import_wandb() -> object | None:
    try:
        return importlib.import_module("wandb")
    except ImportError:
        return None


def _stored_run_id(run_dir: Path, resuming: bool) -> str | None:
    """The id of the wandb run to continue when resuming; None lets wandb start a new run."""
    id_file = run_dir / RUN_ID_FILE
    if resuming and id_file.is_file():
        return id_file.read_text(encoding="utf-8").strip() or None
    return None


def start_tracking(logging: LoggingConfig, run_dir: str | os.PathLike, config: dict, *,
                   is_main: bool, resuming: bool = False) -> Tracker:
    """A wandb tracker on the main rank (offline into RUN_DIR/wandb by default), else a NullTracker."""
    if not is_main or logging.wandb == "disabled":
        return NullTracker()
    wandb = _import_wandb()
    if wandb is None:
        return NullTracker()
    run_dir = Path(run_dir)
    run = wandb.init(
        project=logging.project,
        name=logging.run_name or run_dir.resolve().name,
        id=_stored_run_id(run_dir, resuming),
        resume="allow",
        dir=str(run_dir),  # wandb writes into <dir>/wandb/
        mode=logging.wandb,
        config=config,
        settings=wandb.Settings(silent=True, console="off"),
    )
    (run_dir / RUN_ID_FILE).write_text(run.id + "\n", encoding="utf-8")
    return WandbTracker(run)
