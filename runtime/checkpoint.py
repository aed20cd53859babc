"""Sharded checkpoints: save, commit, verify, resume and reshard.

A checkpoint is a directory ``RUN_DIR/checkpoints/step_<8 digits>/`` holding

- the torch.distributed.checkpoint (DCP) files of the model, the optimizer and the train counters
  (``.metadata`` and ``__<rank>_<n>.distcp``; the trainer computes the learning rate from the step, so
  there is no scheduler state); model and optimizer state are keyed by parameter FQN
  (``get_state_dict``), which is what lets DCP reshard them onto another dp/cp/tp layout. The DeepSpeed
  engine writes the same entries (it is an ``EngineState``: its flat partitions become ``FlatRange``
  parts of each tensor), so its checkpoints reshard onto another dp size, ZeRO stage or FSDP2 too;
- one ``rng_rank<k>.pt`` per rank (torch CPU/CUDA, python ``random`` and numpy generator states);
- ``manifest.json``, written last by rank 0: the SHA-256 and size of every file, the parameter shapes,
  the config and layout, and an HMAC tag over all of it under this user's key (``trust.py``).

Commit protocol: every rank finishes writing -> rank 0 hashes every file (SHA-256) and writes the
signed manifest atomically -> ``checkpoints/latest`` (a text file naming the directory) moves atomically ->
old checkpoints are pruned down to ``checkpoint.keep``. A directory without a manifest is not a
checkpoint; a crash at any point leaves the previous committed checkpoint as ``latest``.

Loading verifies the manifest's tag and the files' hashes before anything reads DCP's pickled
``.metadata`` or unpickles a non-tensor entry; a checkpoint from elsewhere loads only with
``trust_checkpoint`` (``--trust-checkpoint``).

The trainer needs four calls::

    checkpointer = Checkpointer(run_dir, config, model, optimizer, degrees=context.degrees)  # or engine
    resumed = checkpointer.restore(resume)          # None on a fresh start
    ...  # every optimizer step:
    checkpointer.maybe_save(step, data_cursor=cursor)
    checkpointer.close()                            # waits for an asynchronous save to commit

No Ray import here; the ``spindle ckpt`` command lives in ``spindle.launch.ckpt``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
import warnings
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Protocol, runtime_checkable

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType
from torch.distributed.checkpoint.staging import AsyncStager
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

import spindle
from spindle.runtime.degrees import ParallelDegrees
from spindle.runtime.trust import check_origin, sign

log = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 2
"""2: SHA-256 per file, parameter shapes and an origin tag; 1 (read for resumes): crc32 per file."""
READABLE_FORMATS = (1, 2)
STEP_PREFIX = "step_"
FAULT_ENV = "SPINDLE_CHECKPOINT_FAULT"
"""Test hook: ``before_manifest`` (or ``before_manifest@STEP``) raises after the shards are written and
before the manifest, the window a crash of rank 0 would hit."""

_CHECKSUM_CHUNK = 16 << 20


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, incomplete, corrupt or incompatible with the run."""


class ChecksumMismatchError(CheckpointError):
    """A file of a committed checkpoint differs from what its manifest recorded."""


class InjectedCheckpointFault(RuntimeError):
    """Raised by the ``SPINDLE_CHECKPOINT_FAULT`` test hook."""


# ----------------------------------------------------------------------------------------------
# Names and listing
# ----------------------------------------------------------------------------------------------

def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


def checkpoints_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR


def _step_of(directory: Path) -> int | None:
    """The step encoded in a ``step_<digits>`` directory name, None for any other name."""
    name = directory.name
    digits = name[len(STEP_PREFIX):]
    if not name.startswith(STEP_PREFIX) or not digits.isdigit():
        return None
    return int(digits)


@dataclass(frozen=True)
class CheckpointInfo:
    """One committed checkpoint as its manifest describes it."""

    path: Path
    step: int
    layout: dict[str, int]
    size_bytes: int
    manifest: dict[str, Any]


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of checkpoint directory ``path``; CheckpointError if there is none (not committed)."""
    manifest_path = Path(path) / MANIFEST_FILE
    if not manifest_path.is_file() and _is_deepspeed_engine_checkpoint(Path(path)):
        raise CheckpointError(
            f"{path} is a checkpoint of DeepSpeed's own engine.save_checkpoint: per-rank ZeRO partitions tied to "
            f"the dp size and ZeRO stage that wrote them, which spindle does not load. spindle resumes from its own "
            f"checkpoints (RUN_DIR/checkpoints/step_<8 digits>/, written every checkpoint.every steps by either "
            f"engine); start afresh with --resume never (DeepSpeed's zero_to_fp32.py extracts its weights).")
    if not manifest_path.is_file():
        raise CheckpointError(
            f"{path} is not a committed checkpoint: it has no {MANIFEST_FILE} (the save did not finish, or "
            f"this is not a checkpoint directory). Pass a checkpoints/step_<8 digits> directory that has one.")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(
            f"{manifest_path} cannot be read as JSON ({error}); the checkpoint is damaged.") from error
    if not isinstance(manifest, dict) or manifest.get("format") not in READABLE_FORMATS:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise CheckpointError(
            f"{manifest_path} has format {found!r}; this spindle reads formats "
            f"{', '.join(map(str, READABLE_FORMATS))}.")
    return manifest


def _is_deepspeed_engine_checkpoint(path: Path) -> bool:
    """A directory DeepSpeed's ``save_checkpoint`` wrote (or one of its ``global_step*`` folders)."""
    patterns = ("*_optim_states.pt", "*_model_states.pt")
    return path.is_dir() and any(any(path.glob(pattern)) or any(path.glob(f"global_step*/{pattern}"))
                                 for pattern in patterns)


def list_checkpoints(run_dir: str | os.PathLike, *, warn_incomplete: bool = True) -> list[CheckpointInfo]:
    """Committed checkpoints of ``run_dir``, oldest first. Incomplete directories are skipped (logged)."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = []
    for directory in sorted(root.iterdir()):
        step = _step_of(directory)
        if step is None or not directory.is_dir():
            continue
        if not (directory / MANIFEST_FILE).is_file():
            if warn_incomplete:
                log.warning("skipping %s: no %s, the save did not complete", directory, MANIFEST_FILE)
            continue
        try:
            manifest = read_manifest(directory)
        except CheckpointError as error:
            log.warning("skipping %s: %s", directory, error)
            continue
        size = sum(entry["bytes"] for entry in manifest["files"].values())
        found.append(CheckpointInfo(directory, manifest["step"], manifest["layout"], size, manifest))
    return sorted(found, key=lambda info: info.step)


def read_latest(run_dir: str | os.PathLike) -> Path | None:
    """The directory ``checkpoints/latest`` names, or None when there is no pointer yet."""
    pointer = checkpoints_dir(run_dir) / LATEST_FILE
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    return checkpoints_dir(run_dir) / name if name else None


# ----------------------------------------------------------------------------------------------
# Checksums
# ----------------------------------------------------------------------------------------------

def _file_crc32(path: Path) -> str:
    checksum = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHECKSUM_CHUNK):
            checksum = zlib.crc32(chunk, checksum)
    return f"{checksum:08x}"


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHECKSUM_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


_DIGESTS = {"sha256": _file_sha256, "crc32": _file_crc32}
"""Per-file digests a manifest may record, strongest first (crc32: format 1, integrity only)."""


def _digest_kind(entry: Mapping[str, Any]) -> str:
    return next(kind for kind in _DIGESTS if kind in entry)


def checksum_files(directory: Path) -> dict[str, dict[str, Any]]:
    """SHA-256 and size of every file of a checkpoint directory except the manifest. hashlib releases
    the GIL on large buffers, so a small thread pool reads several shards at once."""
    names = sorted(entry.name for entry in directory.iterdir()
                   if entry.is_file() and entry.name != MANIFEST_FILE and not entry.name.endswith(".tmp"))
    with ThreadPoolExecutor(max_workers=min(8, max(1, len(names)))) as pool:
        sums = list(pool.map(lambda name: _file_sha256(directory / name), names))
    return {name: {"bytes": (directory / name).stat().st_size, "sha256": digest} for name, digest in zip(names, sums)}


def verify_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Check every file of a committed checkpoint against its manifest; returns the manifest.

    Raises CheckpointError when there is no manifest and ChecksumMismatchError naming the first file
    that is missing or differs."""
    directory = Path(path)
    manifest = read_manifest(directory)
    recorded = manifest["files"]
    for name in recorded:
        if not (directory / name).is_file():
            raise ChecksumMismatchError(f"checkpoint {directory} is corrupt: file {name} is missing.")
    names = sorted(recorded)
    kinds = {name: _digest_kind(recorded[name]) for name in names}
    with ThreadPoolExecutor(max_workers=min(8, max(1, len(names)))) as pool:
        actual = dict(zip(names, pool.map(lambda name: _DIGESTS[kinds[name]](directory / name), names)))
    for name in names:
        size, kind = (directory / name).stat().st_size, kinds[name]
        if actual[name] != recorded[name][kind] or size != recorded[name]["bytes"]:
            raise ChecksumMismatchError(
                f"checkpoint {directory} is corrupt: file {name} has {kind} {actual[name]} and {size} bytes, the "
                f"manifest recorded {kind} {recorded[name][kind]} and {recorded[name]['bytes']} bytes. Resume "
                f"from an earlier checkpoint (--resume auto falls back to one).")
    return manifest


# ----------------------------------------------------------------------------------------------
# Choosing the checkpoint to resume from
# ----------------------------------------------------------------------------------------------

def resolve_resume(run_dir: str | os.PathLike, resume: str | os.PathLike) -> Path | None:
    """The checkpoint directory a run should resume from, verified against its manifest's checksums.

    ``resume``: "never" -> None. "auto" -> the checkpoint ``checkpoints/latest`` names (or the newest
    committed one when there is no pointer); if it is corrupt, the previous committed one, with a
    warning; None when RUN_DIR has no committed checkpoint. Anything else is a PATH: a checkpoint
    directory, or a run directory whose latest checkpoint is meant; errors say why it cannot be used.
    """
    resume = os.fspath(resume)
    if resume == "never":
        return None
    if resume == "auto":
        return _resolve_auto(run_dir, required=False)
    if not resume:
        raise ValueError("resume must be 'auto', 'never' or a checkpoint path; got an empty string.")
    path = Path(resume)
    if not path.exists():
        raise CheckpointError(f"--resume {resume}: no such file or directory. Pass a checkpoints/step_<8 digits> "
                              f"directory, a run directory, 'auto' or 'never'.")
    if not (path / MANIFEST_FILE).is_file() and checkpoints_dir(path).is_dir():
        return _resolve_auto(path, required=True)
    verify_checkpoint(path)
    return path


def _resolve_auto(run_dir: str | os.PathLike, *, required: bool) -> Path | None:
    committed = list_checkpoints(run_dir)
    latest = read_latest(run_dir)
    if latest is not None:
        latest_step = _step_of(latest)
        newer = [info for info in committed if latest_step is not None and info.step > latest_step]
        if newer:
            log.warning("checkpoints newer than latest (%s) are ignored: %s", latest.name,
                        ", ".join(info.path.name for info in newer))
        committed = [info for info in committed if latest_step is None or info.step <= latest_step]
    if not committed:
        if required:
            raise CheckpointError(f"{run_dir} has no committed checkpoint under {CHECKPOINTS_DIR}/.")
        log.info("no committed checkpoint in %s: starting from scratch", checkpoints_dir(run_dir))
        return None
    failures = []
    for info in reversed(committed):
        try:
            verify_checkpoint(info.path)
        except CheckpointError as error:
            failures.append(str(error))
            log.warning("skipping %s and falling back to an earlier checkpoint: %s", info.path.name, error)
            continue
        return info.path
    raise CheckpointError(
        f"every committed checkpoint of {run_dir} failed verification:\n  " + "\n  ".join(failures)
        + "\nStart over with --resume never, or repair the files.")


# ----------------------------------------------------------------------------------------------
# Random number generator state
# ----------------------------------------------------------------------------------------------

def capture_rng_state() -> dict[str, Any]:
    """This process's generator states in a form ``torch.load(weights_only=True)`` accepts."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state: dict[str, Any] = {
        "torch_cpu": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gaussian),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch_cpu"])
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    kind, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["torch_cuda"])


def reseed_rng(seed: int, step: int, rank: int) -> None:
    """Seed every generator from (seed, step, rank): used when the layout changed, so per-rank streams
    cannot be carried over, but the result must still be reproducible."""
    words = np.random.SeedSequence([seed, step, rank]).generate_state(4, dtype=np.uint32)
    torch.manual_seed(int(words[0]) << 32 | int(words[1]))
    random.seed(int(words[2]))
    np.random.seed(int(words[3]))


# ----------------------------------------------------------------------------------------------
# Compatibility of a checkpoint with the run that wants to load it
# ----------------------------------------------------------------------------------------------

def _as_dict(config: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return dataclasses.asdict(config)
    if isinstance(config, Mapping):
        return json.loads(json.dumps(dict(config), default=str))
    raise TypeError(f"config must be a Config dataclass or a mapping of sections, got {type(config).__name__}.")


def _layout_of(degrees: ParallelDegrees) -> dict[str, int]:
    return {"dp": degrees.dp, "cp": degrees.cp, "tp": degrees.tp, "world_size": degrees.world_size}


def check_layout_change(manifest: Mapping[str, Any], config: Mapping[str, Any], degrees: ParallelDegrees) -> bool:
    """True when the layout differs from the checkpoint's. A change of dp is refused unless the global
    batch is unchanged: the data cursor and the loss curve are defined per global batch."""
    saved = manifest["layout"]
    current = _layout_of(degrees)
    changed = any(saved[name] != current[name] for name in ("dp", "cp", "tp"))
    saved_batch = manifest["config"]["train"]["global_batch"]
    batch = config["train"]["global_batch"]
    if saved["dp"] != current["dp"] and saved_batch != batch:
        raise CheckpointError(
            f"the checkpoint was saved with parallel.dp={saved['dp']} and train.global_batch={saved_batch}; "
            f"this run has parallel.dp={current['dp']} and train.global_batch={batch}. Changing dp is allowed "
            f"only with the same global batch: set train.global_batch={saved_batch}.")
    return changed


def check_shapes(path: Path, model_state: Mapping[str, Any], manifest: Mapping[str, Any],
                 config: Mapping[str, Any]) -> None:
    """Refuse a checkpoint whose model parameters do not match this model, naming the parameter."""
    metadata = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    saved = {key[len("model."):]: entry.size for key, entry in metadata.items()
             if key.startswith("model.") and isinstance(entry, TensorStorageMetadata)}
    problems = []
    for name, value in model_state.items():
        if not isinstance(value, torch.Tensor):
            continue  # non-tensor entries (a module's extra state, e.g. Megatron's linears) carry no shape
        if name not in saved:
            problems.append(f"parameter {name} is in this model but not in the checkpoint")
        elif tuple(saved[name]) != tuple(value.shape):
            problems.append(f"parameter {name} has shape {tuple(saved[name])} in the checkpoint and "
                            f"{tuple(value.shape)} in this model")
    problems += [f"parameter {name} is in the checkpoint but not in this model"
                 for name in saved if name not in model_state]
    if problems:
        saved_model, model = manifest["config"].get("model", {}), config.get("model", {})
        differences = [f"model.{key}: {saved_model.get(key)!r} in the checkpoint, {model.get(key)!r} now"
                       for key in sorted(set(saved_model) | set(model)) if saved_model.get(key) != model.get(key)]
        hint = ("; config differences: " + ", ".join(differences)) if differences else ""
        raise CheckpointError(
            f"checkpoint {path} does not fit the model: " + "; ".join(problems[:5])
            + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else "") + hint
            + ". Resume with the checkpoint's model config, or start a new run with --resume never.")


# ----------------------------------------------------------------------------------------------
# State held in flat partitions (DeepSpeed ZeRO): ranges of flattened tensors
# ----------------------------------------------------------------------------------------------

def flat_range_blocks(shape: tuple[int, ...], start: int, stop: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """The rectangular blocks (offsets, sizes), in row-major order, that make up elements [start, stop) of a
    tensor of ``shape`` flattened in row-major order: a partial first row, the whole rows, a partial last
    row (each partial row split the same way one dimension down)."""
    if start >= stop:
        return []
    if len(shape) <= 1:
        return [((start,), (stop - start,))] if shape else [((), ())]
    inner = math.prod(shape[1:])
    if inner == 0:
        return []
    first_whole, end_whole = -(-start // inner), stop // inner
    blocks = []

    def within(row: int, row_start: int, row_stop: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        return [((row, *offsets), (1, *sizes)) for offsets, sizes in flat_range_blocks(shape[1:], row_start, row_stop)]

    if first_whole > end_whole:  # inside one row
        row = start // inner
        return within(row, start - row * inner, stop - row * inner)
    if start % inner:
        row = start // inner
        blocks += within(row, start - row * inner, inner)
    if end_whole > first_whole:
        blocks.append(((first_whole, *[0] * (len(shape) - 1)), (end_whole - first_whole, *shape[1:])))
    if stop % inner:
        blocks += within(end_whole, 0, stop - end_whole * inner)
    return blocks


class FlatRange(torch.Tensor):
    """This rank's elements [start, start + len(local)) of a tensor of ``shape`` flattened in row-major order,
    as torch.distributed.checkpoint sees it: a tensor of the full shape of which this rank holds a few
    rectangular blocks (``flat_range_blocks``), views of ``local``.

    DeepSpeed ZeRO keeps parameters and Adam moments in flat partitions that split tensors at any
    element, which neither DTensor placements nor FSDP2 shards can describe. Written this way they are
    the same checkpoint entries (FQN, full shape, chunks) as FSDP2's, so DCP reshards them onto any
    layout and either engine. Reading loads straight into ``local`` (which may be a view of the
    engine's partition). Only checkpoint I/O is supported: any torch operation on it raises.
    """

    _local: torch.Tensor
    _start: int
    _blocks: list[tuple[torch.Size, torch.Size, torch.Tensor]]

    @staticmethod
    def __new__(cls, shape: tuple[int, ...] | torch.Size, start: int, local: torch.Tensor) -> "FlatRange":
        if local.dim() != 1 or not 0 <= start <= start + local.numel() <= math.prod(shape):
            raise ValueError(f"FlatRange: a 1-D part of {local.numel()} elements at {start} does not fit in a "
                             f"tensor of shape {tuple(shape)}.")
        tensor = torch.Tensor._make_wrapper_subclass(cls, torch.Size(shape), dtype=local.dtype, device=local.device,
                                                     requires_grad=False)
        tensor._local, tensor._start = local, start
        tensor._blocks, position = [], 0
        for offsets, sizes in flat_range_blocks(tuple(shape), start, start + local.numel()):
            count = math.prod(sizes)
            tensor._blocks.append((torch.Size(offsets), torch.Size(sizes),
                                   local.narrow(0, position, count).view(sizes)))
            position += count
        return tensor

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        raise TypeError(f"FlatRange holds part of a tensor for checkpoint I/O only; {func} is not supported.")

    def __repr__(self) -> str:
        return (f"FlatRange(shape={tuple(self.shape)}, elements [{self._start}, "
                f"{self._start + self._local.numel()}), dtype={self.dtype})")

    def copy_to(self, device: torch.device | str = "cpu") -> "FlatRange":
        """The same range over a copy of ``local`` (an asynchronous save writes the copy)."""
        return FlatRange(self.shape, self._start, self._local.detach().to(device, copy=True))

    # torch.distributed.checkpoint's _Checkpointable protocol (what DTensor implements)
    def __create_write_items__(self, fqn: str, object: Any) -> list[WriteItem]:
        properties = TensorProperties.create_from_tensor(self._local)
        return [WriteItem(index=MetadataIndex(fqn, offsets), type=WriteItemType.SHARD,
                          tensor_data=TensorWriteData(chunk=ChunkStorageMetadata(offsets=offsets, sizes=sizes),
                                                      properties=properties, size=self.shape))
                for offsets, sizes, _ in self._blocks]

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return [ChunkStorageMetadata(offsets=offsets, sizes=sizes) for offsets, sizes, _ in self._blocks]

    def __get_tensor_shard__(self, index: MetadataIndex) -> torch.Tensor:
        for offsets, _, view in self._blocks:
            if offsets == index.offset:
                return view
        raise ValueError(f"FlatRange {index.fqn}: no block at {index.offset} on this rank.")


@runtime_checkable
class EngineState(Protocol):
    """A data-parallel engine that keeps model and optimizer state in partitions of its own (DeepSpeed
    ZeRO, ``spindle.parallel.zero.ZeroEngine``) and hands it to the Checkpointer, which writes, commits,
    signs, verifies and loads exactly as for FSDP2.

    The state is what ``get_state_dict`` gives for a plain or FSDP2 model: ``model`` maps parameter FQNs
    to tensors of their full shape, ``optimizer`` is ``{"state": {FQN: {key: tensor}}, "param_groups":
    [{..., "params": [FQN, ...]}]}``; every rank passes its own parts (``FlatRange``)."""

    def state_for_save(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(model, optimizer) state; tensors may be views that training changes later."""
        ...

    def state_for_load(self, saved: Metadata) -> tuple[dict[str, Any], dict[str, Any]]:
        """(model, optimizer) destinations for the checkpoint described by ``saved`` (DCP's metadata);
        CheckpointError, naming what and why, for a checkpoint the engine cannot take."""
        ...

    def finish_load(self, model_state: dict[str, Any], optimizer_state: dict[str, Any]) -> None:
        """Apply the loaded destinations (collective over the engine's ranks)."""
        ...


class TorchState:
    """``EngineState`` of a plain, FSDP2- or TP-sharded module and its torch optimizer (``get_state_dict``
    keys everything by FQN; DTensor shards reshard through DCP)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer

    def state_for_save(self) -> tuple[dict[str, Any], dict[str, Any]]:
        return get_state_dict(self.model, self.optimizer)

    def state_for_load(self, saved: Metadata) -> tuple[dict[str, Any], dict[str, Any]]:
        return get_state_dict(self.model, self.optimizer)

    def finish_load(self, model_state: dict[str, Any], optimizer_state: dict[str, Any]) -> None:
        set_state_dict(self.model, self.optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state)


def _copied(value: Any) -> Any:
    """A copy of a nested state whose tensors later training cannot change (on the CPU)."""
    if isinstance(value, FlatRange):
        return value.copy_to("cpu")
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, Mapping):
        return {key: _copied(entry) for key, entry in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_copied(entry) for entry in value)
    return value


class _AlreadyStaged(AsyncStager):
    """For ``dcp.async_save`` of a state that ``_copied`` staged: DCP's default stager copies plain
    tensors and DTensors only."""

    _synchronize_after_execute = False

    def stage(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        return state_dict

    def synchronize_staging(self) -> None:
        pass

    def close(self) -> None:
        pass


# ----------------------------------------------------------------------------------------------
# The checkpointer the trainer owns
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ResumeState:
    """What a loaded checkpoint tells the trainer besides the restored objects."""

    path: Path
    step: int
    """Optimizer steps already taken; training continues with step + 1."""
    data_cursor: int
    """Global index of the next training sample."""
    layout_changed: bool
    """The checkpoint was written on another dp/cp/tp layout (resharded on load, RNG reseeded)."""
    saved_layout: dict[str, int]
    """The layout it was written on (dp, cp, tp, world_size)."""


@dataclass
class SaveStats:
    step: int
    blocking_s: float
    """Time training was held up by the save (staging only, when asynchronous)."""
    total_s: float
    """From the start of the save to the commit."""
    size_bytes: int


class Checkpointer:
    """Saves and restores model, optimizer, counters and per-rank RNG of one run.

    Works for plain modules and FSDP2/DTensor-parallel ones alike (``get_state_dict`` keys everything
    by parameter FQN), and for an engine that partitions the state itself (``optimizer`` an
    ``EngineState``: DeepSpeed ZeRO), whose checkpoints have the same entries, so either engine and any
    layout reads them. Collective: every rank of ``process_group`` (default: the world) calls every
    method. With ``checkpoint.async_save`` the shards are written by a background thread over a
    dedicated gloo group, so they never interleave with training collectives on the default group.
    """

    def __init__(self, run_dir: str | os.PathLike, config: Any, model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer | EngineState, *,
                 degrees: ParallelDegrees | None = None, process_group: dist.ProcessGroup | None = None,
                 trust_checkpoint: bool = False) -> None:
        self.run_dir = Path(run_dir)
        self.trust_checkpoint = trust_checkpoint
        """Load checkpoints whose origin tag does not verify (the user vouches for them)."""
        self.config = _as_dict(config)
        self.model, self.optimizer = model, optimizer
        if not isinstance(optimizer, (torch.optim.Optimizer, EngineState)):
            raise TypeError(f"Checkpointer takes a torch optimizer or an EngineState (such as the DeepSpeed engine), "
                            f"got a {type(optimizer).__name__}.")
        self.state: EngineState = (TorchState(model, optimizer) if isinstance(optimizer, torch.optim.Optimizer)
                                   else optimizer)
        self.degrees = degrees or ParallelDegrees(1, 1, 1)
        section = self.config["checkpoint"]
        self.every, self.keep = int(section["every"]), int(section["keep"])
        self.async_save = bool(section["async_save"])
        if self.keep < 1:
            raise ValueError(f"checkpoint.keep={self.keep}: at least one committed checkpoint must be kept; "
                             f"use keep >= 1.")
        self.distributed = dist.is_available() and dist.is_initialized()
        if not self.distributed:
            # DCP warns on every single-process save/load that it "assumes" one process; that is the intent.
            warnings.filterwarnings("ignore", category=UserWarning,
                                    message="torch.distributed is disabled, unavailable or uninitialized")
        if self.distributed and self.async_save and process_group is None:
            process_group = dist.new_group(backend="gloo")
        self.group = process_group
        self.rank = dist.get_rank(self.group) if self.distributed else 0
        self.last_save: SaveStats | None = None
        self._pending: Future | None = None

    # -- saving ---------------------------------------------------------------------------------

    def maybe_save(self, step: int, *, data_cursor: int) -> bool:
        """Save when ``checkpoint.every`` divides ``step``; returns whether a save started."""
        if self.every <= 0 or step % self.every != 0:
            return False
        self.save(step, data_cursor=data_cursor)
        return True

    def save(self, step: int, *, data_cursor: int) -> None:
        """Write ``checkpoints/step_<step>/`` and commit it (asynchronously with ``async_save``).

        A write that fails for lack of space or permission raises CheckpointError naming the cause;
        the partial directory is removed, the last commit and the training state are untouched."""
        directory = checkpoints_dir(self.run_dir) / step_dir_name(step)
        try:
            with _interrupt_after():
                self._save(step, directory, data_cursor=data_cursor)
        except Exception as error:
            failure = storage_failure(error, directory, self.run_dir, remove_partial=self.rank == 0)
            if failure is None:
                raise
            raise failure from error

    def _save(self, step: int, directory: Path, *, data_cursor: int) -> None:
        self.wait()
        started = time.perf_counter()
        self._prepare_directory(directory)
        torch.save(capture_rng_state(), directory / f"rng_rank{self.rank}.pt")
        model_state, optimizer_state = self.state.state_for_save()
        state = {"model": model_state, "optimizer": optimizer_state,
                 "train": {"step": step, "data_cursor": data_cursor}}
        manifest = self._manifest(step, data_cursor)
        manifest["shapes"] = {name: list(value.shape) for name, value in model_state.items()
                              if isinstance(value, torch.Tensor)}
        if self.async_save:
            stager = None  # DCP's own: copies plain tensors and DTensors
            if not isinstance(self.state, TorchState):  # an engine's views (FlatRange) are copied here
                state, stager = _copied(state), _AlreadyStaged()
            upload = dcp.async_save(state, checkpoint_id=str(directory), process_group=self.group,
                                    no_dist=not self.distributed, async_stager=stager)
            upload = getattr(upload, "upload_completion", upload)
            blocking = time.perf_counter() - started
            pending: Future = Future()
            self._pending = pending
            upload.add_done_callback(
                lambda done: self._commit_when_written(done, pending, directory, manifest, started, blocking))
        else:
            dcp.save(state, checkpoint_id=str(directory), process_group=self.group, no_dist=not self.distributed)
            blocking = time.perf_counter() - started
            self._commit(directory, manifest, started, blocking)

    def wait(self) -> None:
        """Block until an asynchronous save is written and committed; re-raise its failure."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        """End of training: the last asynchronous save must commit before the process exits."""
        self.wait()

    def _prepare_directory(self, directory: Path) -> None:
        """Rank 0 clears leftovers of an earlier attempt at this step (files of another world size
        would otherwise be checksummed into the manifest); everyone then waits for the fresh directory."""
        if self.rank == 0:
            if directory.exists():
                _remove_checkpoint(directory)
            directory.mkdir(parents=True)
        if self.distributed:
            dist.barrier(group=self.group)

    def _manifest(self, step: int, data_cursor: int) -> dict[str, Any]:
        return {
            "format": MANIFEST_FORMAT, "step": step, "data_cursor": data_cursor,
            "layout": _layout_of(self.degrees), "config": self.config,
            "versions": {"torch": torch.__version__, "spindle": spindle.__version__,
                         "python": sys.version.split()[0]},
        }

    def _commit_when_written(self, upload: Future, pending: Future, directory: Path, manifest: dict[str, Any],
                             started: float, blocking: float) -> None:
        """Runs on the DCP writer thread when the shards are on disk (or the write failed)."""
        try:
            upload.result()
            self._commit(directory, manifest, started, blocking)
        except BaseException as error:  # handed to the training thread through wait()
            pending.set_exception(error)
            return
        pending.set_result(None)

    def _commit(self, directory: Path, manifest: dict[str, Any], started: float, blocking: float) -> None:
        """Manifest, then ``latest``, then pruning; rank 0 only. DCP returns on rank 0 only after every
        rank reported its writes, and each rank wrote its RNG file before entering DCP."""
        _maybe_inject_fault(manifest["step"])
        if self.rank != 0:
            return
        files = checksum_files(directory)
        total = time.perf_counter() - started
        manifest = sign({**manifest, "files": files, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                         "save_blocking_s": round(blocking, 4), "save_total_s": round(total, 4)})
        _write_atomically(directory / MANIFEST_FILE, json.dumps(manifest, indent=1, sort_keys=True))
        _write_atomically(checkpoints_dir(self.run_dir) / LATEST_FILE, directory.name + "\n")
        self.last_save = SaveStats(manifest["step"], blocking, total, sum(entry["bytes"] for entry in files.values()))
        log.info("checkpoint %s committed: %.1f MB, %.2f s (%.2f s blocking)", directory.name,
                 self.last_save.size_bytes / 1e6, total, blocking)
        prune_checkpoints(self.run_dir, self.keep, committed_step=manifest["step"])

    # -- restoring ------------------------------------------------------------------------------

    def restore(self, resume: str | os.PathLike) -> ResumeState | None:
        """Resolve ``--resume`` on rank 0 (files are hashed once, the origin tag checked), share the
        choice, and load it."""
        choice: list[Any] = [None]
        if self.rank == 0:
            try:
                choice[0] = resolve_resume(self.run_dir, resume)
                if choice[0] is not None:
                    check_origin(choice[0], read_manifest(choice[0]), trust_checkpoint=self.trust_checkpoint)
            except (CheckpointError, ValueError) as error:
                choice[0] = error
        if self.distributed:
            dist.broadcast_object_list(choice, src=dist.get_global_rank(self.group, 0) if self.group else 0,
                                       group=self.group)
        if isinstance(choice[0], Exception):
            raise choice[0]
        return None if choice[0] is None else self.load(choice[0], verified=True)

    def load(self, path: str | os.PathLike, *, verified: bool = False) -> ResumeState:
        """Load checkpoint ``path`` into the model and optimizer (resharding when the layout
        differs) and restore, or deterministically reseed, this rank's RNG. ``verified``: ``restore``
        already checked the files' hashes and the origin tag; otherwise this rank checks them first."""
        path = Path(path)
        if verified:
            manifest = read_manifest(path)
        else:  # before anything below reads (and unpickles) the checkpoint's files
            manifest = verify_checkpoint(path)
            check_origin(path, manifest, trust_checkpoint=self.trust_checkpoint)
        layout_changed = check_layout_change(manifest, self.config, self.degrees)
        model_state, optimizer_state = self.state.state_for_load(dcp.FileSystemReader(str(path)).read_metadata())
        check_shapes(path, model_state, manifest, self.config)
        state = {"model": model_state, "optimizer": optimizer_state, "train": {"step": 0, "data_cursor": 0}}
        try:
            dcp.load(state, checkpoint_id=str(path), process_group=self.group, no_dist=not self.distributed)
        except CheckpointException as error:
            raise CheckpointError(
                f"loading {path} failed: {error}\nThe checkpoint does not hold the state this run expects (was it "
                f"saved with another optimizer setup?); resume with that setup or use --resume "
                f"never.") from error
        self.state.finish_load(state["model"], state["optimizer"])
        step = int(state["train"]["step"])
        if layout_changed:
            log.info("layout changed from %s: reseeding RNG from (seed, step, rank)", manifest["layout"])
            reseed_rng(int(self.config["train"]["seed"]), step, self.rank)
        else:
            restore_rng_state(torch.load(path / f"rng_rank{self.rank}.pt", weights_only=True))
        log.info("resumed from %s at step %d", path, step)
        return ResumeState(path, step, int(state["train"]["data_cursor"]), layout_changed,
                           dict(manifest["layout"]))


# ----------------------------------------------------------------------------------------------
# Files on disk
# ----------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _interrupt_after():
    """Hold Ctrl-C (SIGINT) until the block ends, then raise KeyboardInterrupt.

    A KeyboardInterrupt inside torch.distributed.checkpoint surfaces as a CheckpointException (a
    traceback instead of the "interrupted; the last committed checkpoint is ..." message) and can
    leave a half-written step directory: a save that has started is worth the second it takes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
    if received:
        raise KeyboardInterrupt


def _write_atomically(path: Path, text: str) -> None:
    """Readers see the old file or the whole new one: write a temporary file, fsync, os.replace."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT})
FULL_BELOW_BYTES = 1 << 20
"""A failed write with less free space than this on the run directory's filesystem: the disk is full."""


def storage_failure(error: BaseException, directory: Path, run_dir: Path, *,
                    remove_partial: bool) -> CheckpointError | None:
    """A clear CheckpointError when saving ``directory`` failed for lack of space or permission (None
    for any other failure); removes the partial directory when ``remove_partial``."""
    reason = _storage_reason(error, directory)
    if reason is None:
        return None
    if remove_partial and not (directory / MANIFEST_FILE).exists():
        shutil.rmtree(directory, ignore_errors=True)  # frees the space the partial save took
    latest = read_latest(run_dir)
    kept = (f"the last committed checkpoint {latest} is intact" if latest is not None
            else "no checkpoint was committed before this one")
    return CheckpointError(f"could not save the checkpoint {directory}: {reason}. The training state is unchanged "
                           f"and {kept}; free space on (or make writable) the filesystem of {directory.parent}, "
                           f"then resume from the last commit (--resume auto).")


def _storage_reason(error: BaseException, directory: Path) -> str | None:
    """The errno's text when the failure kept it; else what the filesystem says (torch's writers can
    turn ENOSPC into "iostream error")."""
    for cause in _causes(error):
        if isinstance(cause, OSError) and cause.errno in STORAGE_ERRNOS:
            return os.strerror(cause.errno)
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        stats = os.statvfs(existing)
    except OSError:
        return None
    if stats.f_flag & os.ST_RDONLY:
        return os.strerror(errno.EROFS)
    free = stats.f_bavail * stats.f_frsize
    if free < FULL_BELOW_BYTES:
        return f"{os.strerror(errno.ENOSPC)} ({free} bytes free)"
    return None


def _causes(error: BaseException) -> list[BaseException]:
    """The error, its causes and contexts, and the per-rank failures DCP gathered."""
    found: list[BaseException] = []
    pending = [error]
    while pending:
        current = pending.pop()
        if current is None or any(current is seen for seen in found):
            continue
        found.append(current)
        pending += [current.__cause__, current.__context__]
        if isinstance(current, CheckpointException):
            pending += [failure[0] if isinstance(failure, tuple) else failure for failure in current.failures.values()]
    return found


def _remove_checkpoint(directory: Path) -> None:
    """Un-commit first (the manifest goes), so a crash halfway through deleting never leaves a
    directory that looks committed but misses files."""
    (directory / MANIFEST_FILE).unlink(missing_ok=True)
    shutil.rmtree(directory)


def prune_checkpoints(run_dir: str | os.PathLike, keep: int, *, committed_step: int) -> list[Path]:
    """Delete committed checkpoints beyond the ``keep`` newest up to ``committed_step`` and incomplete
    directories older than it; never the one just committed. Checkpoints after ``committed_step``
    (left by an abandoned timeline) are not touched. Returns the deleted directories."""
    keep = max(1, keep)
    root = checkpoints_dir(run_dir)
    candidates = [(step, directory) for directory in root.iterdir()
                  if directory.is_dir() and (step := _step_of(directory)) is not None and step <= committed_step]
    committed = sorted((step, directory) for step, directory in candidates if (directory / MANIFEST_FILE).is_file())
    kept = {directory for _, directory in committed[-keep:]}
    removed = []
    for step, directory in sorted(candidates):
        if directory in kept or step == committed_step:
            continue
        _remove_checkpoint(directory)
        removed.append(directory)
    if removed:
        log.info("pruned %s", ", ".join(directory.name for directory in removed))
    return removed


def _maybe_inject_fault(step: int) -> None:
    value = os.environ.get(FAULT_ENV, "")
    if not value:
        return
    point, _, only_step = value.partition("@")
    if point == "before_manifest" and (not only_step or int(only_step) == step):
        raise InjectedCheckpointFault(f"{FAULT_ENV}={value}: failing the save of step {step} before its manifest")
