"""The trainer entry on a Ray Train worker, and how a restarted worker group resumes.

Every worker calls ``spindle.runtime.main.train_entry`` (the same entry torchrun uses), which beats
the heartbeat of ``spindle.runtime.heartbeat``, so a failed collective is reported with the ranks that
never entered it. A worker group that starts after a checkpoint was committed during this launch
resumes from RUN_DIR/checkpoints/latest (``resume="auto"``); otherwise it starts the way the user asked.
A driver told to stop (SIGTERM) writes RUN_DIR/.spindle/stop, and the trainer on every worker finishes
its step, commits a checkpoint and returns (spindle.runtime.preemption).
"""
from __future__ import annotations

import os
from pathlib import Path



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
    """One Ray Train worker: the per-process trainer, with heartbeats and a readable hang report."""
    from spindle.runtime.main import train_entry

    resume = agreed_resume(job)
    options = {"trust_checkpoint": bool(job.get("trust_checkpoint", False))}
    # train_entry beats the heartbeat and reports a stalled collective with the ranks behind it.
    final = train_entry(job["config"], job["run_dir"], resume, **options)
    return dict(final or {})  # Ray Train hands rank 0's return value to the driver


def agreed_resume(job: dict) -> str:
    """Rank 0 decides how this worker group resumes and tells the others (one view of the files)."""
    import torch.distributed as dist

    choice = [resume_for_attempt(job)]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(choice, src=0)
    return choice[0]
