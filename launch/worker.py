"""The trainer entry on a Ray Train worker, and how a restarted worker group resumes.

Every worker calls ``spindle.runtime.main.train_entry`` (the same entry torchrun uses) with the typed
``Config`` the driver parsed and validated (it travels pickled; no worker parses it again). The entry
beats the heartbeat of ``spindle.runtime.heartbeat``, so a failed collective is reported with the ranks
that never entered it. A worker group that starts after a checkpoint was committed during this launch
resumes from RUN_DIR/checkpoints/latest (``resume="auto"``); otherwise it starts the way the user asked.

Preemption: SIGTERM to the driver, or to any worker process, writes RUN_DIR/.spindle/stop, and the
trainer on every worker finishes its step, commits a checkpoint and returns
(spindle.runtime.preemption). On a worker, Ray Train runs this module's function in a thread, but a
signal is handled on the process's main thread, where Ray installed a handler that exits the process
(a worker failure). The actor's own tasks run on that main thread, so the function installs its
handler there by calling its own actor, and puts Ray's back when training ends.
"""
from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from spindle.runtime.config import Config


def latest_checkpoint_marker(run_dir: str | os.PathLike) -> str | None:
    """What RUN_DIR/checkpoints/latest names now (None when there is none yet)."""
    latest = Path(run_dir) / "checkpoints" / "latest"
    try:
        if latest.is_symlink():
            return os.readlink(latest)
        return latest.read_text(encoding="utf-8").strip() if latest.is_file() else None
    except OSError:
        return None


def resume_for_attempt(job: dict) -> str:
    """The user's --resume for the first worker group; "auto" once this launch has committed a
    checkpoint, so a restarted group continues from it rather than starting over."""
    marker = latest_checkpoint_marker(job["run_dir"])
    if marker is not None and marker != job["latest_at_launch"]:
        return "auto"
    return job["resume"]


def train_worker(job: dict) -> dict:
    """One Ray Train worker: the per-process trainer, with heartbeats, a readable hang report and
    SIGTERM turned into a preemption of the whole job."""
    from spindle.runtime.main import train_entry

    config = job["config"]
    if not isinstance(config, Config):  # the driver hands the typed config on; nothing parses it here
        raise TypeError(f"the job's config is a {type(config).__name__}, expected the driver's validated Config")
    resume = agreed_resume(job)
    # The driver removed any stale stop request before the workers started.
    options = {"trust_checkpoint": bool(job.get("trust_checkpoint", False)), "clear_stale_stop": False}
    with sigterm_requests_stop(job["run_dir"]):
        # train_entry beats the heartbeat and reports a stalled collective with the ranks behind it.
        final = train_entry(config, job["run_dir"], resume, **options)
    return dict(final or {})  # Ray Train hands rank 0's return value to the driver


@contextlib.contextmanager
def sigterm_requests_stop(run_dir: str) -> Iterator[None]:
    """While training runs in this worker, SIGTERM to its process asks every rank to stop (the stop
    file) instead of exiting. The handler is installed on the process's main thread by a task on this
    worker's own actor (a synchronous actor runs its tasks there; Ray Train's training thread leaves it
    free). Without that actor method the job still trains, and SIGTERM stays a worker failure."""
    import ray

    from spindle.runtime.preemption import restore_sigterm, write_stop_file_on_sigterm

    try:
        actor = ray.get_runtime_context().current_actor
        run_on_main_thread = actor.execute  # Ray Train's worker actor: execute(fn, *args) -> fn(*args)
    except (AttributeError, RuntimeError) as error:
        print(f"spindle: warning: SIGTERM to this worker cannot become a clean stop ({error}); SIGTERM to the "
              f"driver still can", file=sys.stderr, flush=True)
        yield
        return
    ray.get(run_on_main_thread.remote(write_stop_file_on_sigterm, run_dir))
    try:
        yield
    finally:
        ray.get(run_on_main_thread.remote(restore_sigterm))


def agreed_resume(job: dict) -> str:
    """Rank 0 decides how this worker group resumes and tells the others (one view of the files)."""
    import torch.distributed as dist

    choice = [resume_for_attempt(job)]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(choice, src=0)
    return choice[0]
