"""Run-directory and resume checks, done before any training process starts.

    decision = prepare_run(config, run_dir, resume, overwrite=..., trust_checkpoint=...)

Everything a user can get wrong about a run directory or a ``--resume`` path is refused here with
one message (ConfigError, exit 2), before Ray or torchrun start anything:

- ``--resume PATH`` that is not a committed checkpoint (or a run directory holding one);
- a checkpoint whose parameters do not fit this config's model (shapes from its manifest, JSON: the
  check never reads DCP's pickled ``.metadata``);
- a checkpoint whose origin tag does not verify, unless ``--trust-checkpoint`` (see ``trust.py``);
- a run directory that belongs to a different config (the keys that differ are listed);
- ``--resume never`` on a run directory that holds a run, unless ``--overwrite``, which moves the old
  run aside to ``RUN_DIR.old-<UTC time>`` (nothing is deleted);
- ``--resume auto`` on a run that stopped without a committed checkpoint (it would start over in place).

A run that already reached ``train.steps`` is reported as finished (nothing to do). ``config.yaml``
of an existing run is never rewritten: each launch's effective config goes to
``RUN_DIR/.spindle/launches/``.
"""
from __future__ import annotations

import datetime
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from spindle.runtime.config import Config, ConfigError, save_config, to_dict

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
LAUNCHES_DIR = Path(".spindle") / "launches"
RUN_MARKERS = (CONFIG_FILE, METRICS_FILE, "checkpoints")
"""What makes a directory hold a run."""
RESUMABLE_SECTIONS = ("parallel", "checkpoint", "logging", "launch")
"""Sections a resumed run may change (layouts reshard; bookkeeping does not change the trajectory)."""
RESUMABLE_KEYS = ("train.steps", "train.micro_batch")
"""Single keys a resumed run may change: train longer; split the same global batch differently."""


@dataclass(frozen=True)
class RunDecision:
    """What a launch does with its run directory."""

    resume: str
    """What the trainer gets: "auto", "never" or an absolute checkpoint path."""
    checkpoint: Path | None
    """The checkpoint it will resume from (None: a fresh start)."""
    start_step: int
    finished: bool
    """The run already reached train.steps: nothing to do."""
    moved_aside: Path | None = None
    """Where ``--overwrite`` moved the previous run."""


def utc_stamp() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")


def holds_run(run_dir: Path) -> bool:
    """True when ``run_dir`` has a config, metrics or checkpoints of an earlier launch."""
    return run_dir.is_dir() and any((run_dir / marker).exists() for marker in RUN_MARKERS)


def prepare_run(config: Config, run_dir: str | os.PathLike, resume: str, *, overwrite: bool = False,
                trust_checkpoint: bool = False, apply: bool = True) -> RunDecision:
    """Check the run directory and ``--resume`` against ``config``; raise ConfigError with one message.

    ``apply``: perform the decision's side effect (``--overwrite`` moving the old run aside); False
    on ranks other than the one that owns the run directory.
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--run-dir {run_dir} is a file, not a directory: choose another --run-dir.")
    if overwrite and resume != "never":
        raise ConfigError(f"--overwrite starts the run over (the old one is moved aside), which needs --resume never; "
                          f"got --resume {resume}.")
    if resume == "never":
        return _start_afresh(run_dir, overwrite=overwrite, apply=apply)
    check_same_config(config, run_dir)
    if resume == "auto":
        checkpoint = _latest_committed(run_dir)
        if checkpoint is None:
            _refuse_restart_in_place(config, run_dir)
            finished_step = _finished_without_checkpoint(config, run_dir)
            if finished_step is not None:
                return RunDecision("auto", None, finished_step, finished=True)
            return RunDecision("auto", None, 0, finished=False)
    else:
        checkpoint = resume_path(resume)
    manifest = check_checkpoint(config, checkpoint, trust_checkpoint=trust_checkpoint)
    step = int(manifest["step"])
    return RunDecision("auto" if resume == "auto" else str(checkpoint), checkpoint, step,
                       finished=step >= config.train.steps)


# ---------------------------------------------------------------------------------------------
# --resume never, --overwrite
# ---------------------------------------------------------------------------------------------
def _start_afresh(run_dir: Path, *, overwrite: bool, apply: bool) -> RunDecision:
    if not holds_run(run_dir):
        return RunDecision("never", None, 0, finished=False)
    if not overwrite:
        raise ConfigError(
            f"--resume never would start a new run in {run_dir}, which holds a run ({describe_run(run_dir)}). "
            f"Pass --overwrite to move that run aside to {run_dir}.old-<time> and start afresh, or choose another "
            f"--run-dir.")
    aside = _aside_path(run_dir)
    if apply:
        os.replace(run_dir, aside)
    return RunDecision("never", None, 0, finished=False, moved_aside=aside)


def _aside_path(run_dir: Path) -> Path:
    base = run_dir.with_name(f"{run_dir.name}.old-{utc_stamp()}")
    candidate, counter = base, 1
    while candidate.exists():
        candidate, counter = base.with_name(f"{base.name}-{counter}"), counter + 1
    return candidate


def describe_run(run_dir: Path) -> str:
    """A few words on what a run directory holds: its last logged step and committed checkpoints."""
    from spindle.runtime.checkpoint import list_checkpoints

    parts = []
    last = last_logged_step(run_dir)
    if last is not None:
        parts.append(f"metrics up to step {last}")
    steps = [info.step for info in list_checkpoints(run_dir, warn_incomplete=False)]
    if steps:
        parts.append(f"checkpoints at step {', '.join(map(str, steps))}")
    return "; ".join(parts) or "a config.yaml"


def last_logged_step(run_dir: Path) -> int | None:
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return None
    last = None
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            last = int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue
    return last


# ---------------------------------------------------------------------------------------------
# The run's config
# ---------------------------------------------------------------------------------------------
def _flatten(values: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _comparable(values: dict) -> dict[str, Any]:
    flat = _flatten(values)
    source = flat.get("data.source")
    if isinstance(source, str) and source and not source.startswith("synthetic:"):
        flat["data.source"] = os.path.abspath(source)  # the launcher hands workers absolute paths
    return {key: value for key, value in flat.items()
            if key.split(".")[0] not in RESUMABLE_SECTIONS and key not in RESUMABLE_KEYS}


def config_differences(saved: dict, config: Config) -> list[str]:
    """``key: saved value in the run, new value now`` for every key that defines the run's trajectory."""
    old, new = _comparable(saved), _comparable(to_dict(config))
    # A key only one side has comes from another spindle version: not a difference of the user's.
    return [f"{key}: {old[key]!r} in the run, {new[key]!r} now" for key in sorted(old.keys() & new.keys())
            if old[key] != new[key]]


def check_same_config(config: Config, run_dir: Path) -> None:
    """Refuse a run directory whose config.yaml describes a different run."""
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        return
    try:
        saved = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"{path} cannot be read ({error}): is {run_dir} a spindle run directory? Choose another "
                          f"--run-dir.") from None
    differences = config_differences(saved if isinstance(saved, dict) else {}, config)
    if differences:
        shown = "; ".join(differences[:8]) + (f"; and {len(differences) - 8} more" if len(differences) > 8 else "")
        raise ConfigError(
            f"run directory {run_dir} belongs to a different config ({shown}). Resuming would mix two runs: "
            f"use another --run-dir for this config, or start over here with --resume never --overwrite (the old "
            f"run is moved aside).")


def record_config(config: Config, run_dir: Path) -> None:
    """config.yaml for a new run; an existing run keeps its own, and this launch's effective config is
    kept under .spindle/launches/ (train.steps or the layout may change on resume)."""
    path = run_dir / CONFIG_FILE
    if not path.exists():
        save_config(config, path)
        return
    launches = run_dir / LAUNCHES_DIR
    launches.mkdir(parents=True, exist_ok=True)
    save_config(config, launches / f"config-{utc_stamp()}-{os.getpid()}.yaml")


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------
def resume_path(resume: str) -> Path:
    """``--resume PATH`` as the checkpoint directory it names (absolute): a committed checkpoint, or a
    run directory whose newest committed checkpoint is meant."""
    from spindle.runtime.checkpoint import MANIFEST_FILE, checkpoints_dir

    path = Path(resume).resolve()
    expected = ("expected 'auto', 'never', a checkpoint directory RUN_DIR/checkpoints/step_<8 digits> (with "
                f"{MANIFEST_FILE}) or a run directory that has one")
    if not path.exists():
        raise ConfigError(f"--resume {resume}: no such file or directory; {expected}.")
    if (path / MANIFEST_FILE).is_file():
        return path
    if checkpoints_dir(path).is_dir():
        latest = _latest_committed(path)
        if latest is None:
            raise ConfigError(f"--resume {resume}: the run directory has no committed checkpoint under "
                              f"{checkpoints_dir(path)}; {expected}.")
        return latest
    what = "a file" if path.is_file() else "a directory without " + MANIFEST_FILE
    raise ConfigError(f"--resume {resume} is not a checkpoint ({what}); {expected}.")


def _latest_committed(run_dir: Path) -> Path | None:
    """The checkpoint ``--resume auto`` starts from (by manifests; the workers verify its files and fall
    back to an earlier one if they are damaged)."""
    from spindle.runtime.checkpoint import list_checkpoints, read_latest

    committed = list_checkpoints(run_dir, warn_incomplete=False)
    latest = read_latest(run_dir)
    if latest is not None:
        committed = [info for info in committed if info.path.name <= latest.name]
    return committed[-1].path if committed else None


def _refuse_restart_in_place(config: Config, run_dir: Path) -> None:
    """``--resume auto`` without a committed checkpoint starts at step 0: refuse it where an unfinished
    run's metrics would be overwritten."""
    last = last_logged_step(run_dir)
    if last is None or last >= config.train.steps:
        return
    raise ConfigError(
        f"{run_dir} holds a run that stopped at step {last} without a committed checkpoint (checkpoint.every = "
        f"{config.checkpoint.every}), so there is nothing to resume from. Start it over with --resume never "
        f"--overwrite (the old run is moved aside), or choose another --run-dir.")


def _finished_without_checkpoint(config: Config, run_dir: Path) -> int | None:
    last = last_logged_step(run_dir)
    return last if last is not None and last >= config.train.steps else None


def check_checkpoint(config: Config, path: Path, *, trust_checkpoint: bool) -> dict[str, Any]:
    """The manifest of checkpoint ``path`` once its origin is trusted and its parameters fit ``config``'s
    model; ConfigError otherwise. Reads JSON only (never DCP's pickled metadata)."""
    from spindle.runtime.checkpoint import CheckpointError, read_manifest
    from spindle.runtime.trust import check_origin

    try:
        manifest = read_manifest(path)
        check_origin(path, manifest, trust_checkpoint=trust_checkpoint)
    except CheckpointError as error:
        raise ConfigError(str(error)) from None
    check_model_fits(config, path, manifest)
    return manifest


def _normalized(name: str) -> str:
    for wrapper in ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module."):
        name = name.replace(wrapper, "")
    return name


def model_shapes(config: Config) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of ``config``'s model, built on the meta device (no memory, no compute)."""
    import torch

    from spindle.runtime.model import HybridModel

    with torch.device("meta"):
        model = HybridModel(config.model)
    return {_normalized(name): tuple(value.shape) for name, value in model.state_dict().items()}


def check_model_fits(config: Config, path: Path, manifest: dict[str, Any]) -> None:
    """Refuse a checkpoint whose parameter shapes (recorded in its manifest) differ from the model's."""
    saved_model = manifest.get("config", {}).get("model", {})
    recorded = manifest.get("shapes")
    problems: list[str] = []
    if recorded is not None:
        saved = {_normalized(name): tuple(shape) for name, shape in recorded.items()}
        current = model_shapes(config)
        problems += [f"parameter {name} has shape {saved[name]} in the checkpoint and {shape} in this model"
                     for name, shape in current.items() if name in saved and saved[name] != shape]
        problems += [f"parameter {name} is in this model but not in the checkpoint"
                     for name in current if name not in saved]
        problems += [f"parameter {name} is in the checkpoint but not in this model" for name in saved
                     if name not in current]
    differences = [f"model.{key}: {saved_model[key]!r} in the checkpoint, {value!r} now"
                   for key, value in to_dict(config)["model"].items() if key in saved_model and saved_model[key] != value]
    if recorded is None:  # a manifest from before shapes were recorded: compare the model config
        problems = differences
    if problems:
        hint = f"; config differences: {', '.join(differences)}" if differences and recorded is not None else ""
        raise ConfigError(
            f"checkpoint {path} does not fit the model: " + "; ".join(problems[:5])
            + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else "") + hint
            + ". Resume with the checkpoint's model config, or start a new run with --resume never.")


def interrupted_message(run_dir: Path, config_path: str | os.PathLike) -> str:
    """What Ctrl-C leaves behind and how to continue."""
    latest = _latest_committed(run_dir)
    command = f"spindle train {config_path} --run-dir {run_dir}"
    if latest is None:
        return (f"interrupted; no checkpoint was committed in {run_dir} (set checkpoint.every to save some), so a "
                f"new start is needed: `{command} --resume never --overwrite` (the partial run is moved aside).")
    from spindle.runtime.checkpoint import read_manifest

    step = read_manifest(latest).get("step", "?")
    return (f"interrupted; the last committed checkpoint is {latest} (step {step}). Resume from it with the same "
            f"command (--resume auto is the default): `{command}`.")
