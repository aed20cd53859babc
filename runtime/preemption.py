"""Preemption: SIGTERM (what Slurm and Kubernetes send before killing a job) ends training cleanly.

A rank notices a stop request in one of two ways: its process received SIGTERM while training on
its main thread (a torchrun worker, or a single process), or the run directory holds
``.spindle/stop``. The stop file is what SIGTERM writes in processes whose training runs elsewhere:
the `spindle train` driver (its ranks are Ray workers, other processes) and each Ray Train worker
(Ray runs the training function in a thread, while signals reach the main thread, where Ray's own
handler would exit the process). The ranks then agree on the step to stop at, finish it, commit a
checkpoint there and return normally, so every process exits 0 and a later run with the same
command resumes from that step.

Agreement without a host sync on the training path: at every step boundary each rank waits for the
all-reduce (MAX) it started at the previous boundary and starts the next one, on a dedicated gloo
group of one-element CPU tensors. By the time it is waited for, that reduction finished long ago
(a whole training step ran in between), so the wait costs microseconds, and reading a CPU tensor
never waits for a GPU. Every rank reads the result of the same reduction at the same boundary, so
all stop after the same step: one step after the first rank saw the request.
"""
from __future__ import annotations

import contextlib
import os
import shlex
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

import torch
import torch.distributed as dist

from spindle.runtime.heartbeat import LAUNCHER_DIR

STOP_FILE = LAUNCHER_DIR / "stop"
"""Relative to the run directory: present while the driver asks the workers to stop."""


def request_stop(run_dir: str | os.PathLike) -> None:
    """Ask every rank of the job training in ``run_dir`` to stop at the next step boundary."""
    path = Path(run_dir) / STOP_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{os.getpid()}\n", encoding="utf-8")


def clear_stop(run_dir: str | os.PathLike) -> None:
    """Remove a stop request left by an earlier, preempted attempt (a new start must not stop at once)."""
    (Path(run_dir) / STOP_FILE).unlink(missing_ok=True)


class SignalCatcher:
    """While active, SIGTERM sets ``received`` instead of killing the process (main thread only:
    elsewhere Python cannot install signal handlers, and the stop file is the way in)."""

    def __init__(self) -> None:
        self.received = threading.Event()
        self._previous: object = None
        self._installed = False

    def __enter__(self) -> "SignalCatcher":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)  # type: ignore[arg-type]
            self._installed = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received.set()


class StopAgreement:
    """``should_stop()`` at every step boundary, on every rank: True on all ranks at the same boundary,
    one boundary after any rank saw SIGTERM or the stop file."""

    def __init__(self, run_dir: str | os.PathLike, catcher: SignalCatcher) -> None:
        self.stop_file = Path(run_dir) / STOP_FILE
        self.catcher = catcher
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        # Its own gloo group: CPU tensors whatever the training backend, never queued behind training
        # collectives. Created by every rank (new_group is collective).
        self.group = dist.new_group(backend="gloo") if distributed else None
        self._flag = torch.zeros(1, dtype=torch.int32)
        self._pending: dist.Work | None = None

    def requested_here(self) -> bool:
        return self.catcher.received.is_set() or self.stop_file.exists()

    def should_stop(self) -> bool:
        """Collect the previous boundary's verdict, then start this boundary's reduction."""
        agreed = self._collect()
        if self.group is None:
            return self.requested_here()
        self._flag = torch.tensor([int(self.requested_here())], dtype=torch.int32)
        self._pending = dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        return agreed

    def finish(self) -> None:
        """End of training: wait for the reduction still in flight (every rank calls this)."""
        self._collect()

    def _collect(self) -> bool:
        pending, self._pending = self._pending, None
        if pending is None:
            return False
        pending.wait()
        return bool(self._flag[0])  # a CPU tensor: reading it waits for no GPU


def resume_command(tokens: list[str]) -> str:
    """The command that continues a preempted run: the one that started it, less --resume and
    --overwrite (--resume auto, the default, picks up the checkpoint just committed)."""
    kept, skip = [], False
    for token in tokens:
        if skip:
            skip = False
        elif token == "--resume":
            skip = True
        elif not (token.startswith("--resume=") or token == "--overwrite"):
            kept.append(token)
    return shlex.join(kept)


def launching_command() -> list[str]:
    """How this process was started as the user typed it: torchrun's command line (read from the
    parent process) for a torchrun worker, else ``python -m spindle.runtime.main`` and its arguments."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        with contextlib.suppress(OSError):
            parent = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().split(b"\0")
            tokens = [token.decode() for token in parent if token]
            if tokens:
                return tokens
    return [sys.executable, "-m", "spindle.runtime.main", *sys.argv[1:]]


def preempted_message(record: dict, command: str) -> str:
    step = record["step"]
    if not record.get("checkpointed"):  # a Trainer built without a Checkpointer (the library API)
        return f"preempted at step {step}; no checkpoint was saved, so a rerun starts over: {command}"
    return f"preempted at step {step}; resume with {command}"


_replaced_handlers: list[object] = []
"""SIGTERM handlers that ``write_stop_file_on_sigterm`` replaced in this process, innermost last."""


def write_stop_file_on_sigterm(run_dir: str | os.PathLike) -> None:
    """From now on SIGTERM to this process writes the stop file of ``run_dir`` instead of ending the
    process; ``restore_sigterm`` puts back the handler it replaced. Main thread only (Python installs
    signal handlers nowhere else): a Ray worker runs it there through its own actor (launch/worker.py)."""
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("write_stop_file_on_sigterm must run on the main thread (signal handlers live there)")
    run_dir = Path(run_dir)

    def handle(signum: int, frame: FrameType | None) -> None:
        print(f"spindle: SIGTERM received by process {os.getpid()}: every rank finishes its step and commits "
              f"a checkpoint", file=sys.stderr, flush=True)
        request_stop(run_dir)

    _replaced_handlers.append(signal.signal(signal.SIGTERM, handle))


def restore_sigterm() -> None:
    """Undo the last ``write_stop_file_on_sigterm`` of this process (main thread only)."""
    if _replaced_handlers:
        signal.signal(signal.SIGTERM, _replaced_handlers.pop())  # type: ignore[arg-type]


@contextlib.contextmanager
def stopping_workers_on_sigterm(run_dir: str | os.PathLike) -> Iterator[None]:
    """For a driver whose ranks run in other processes (`spindle train` on Ray): SIGTERM writes the
    stop file, and the workers finish the step, checkpoint and return. Replaces Ray's own handler
    (which exits at once) for the duration. A stop request of an earlier attempt is removed first
    (before any worker starts: from then on every request is this job's), and the stop file is
    removed afterwards (also one that a worker's SIGTERM wrote)."""
    clear_stop(run_dir)
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    write_stop_file_on_sigterm(run_dir)
    try:
        yield
    finally:
        restore_sigterm()
        clear_stop(run_dir)
