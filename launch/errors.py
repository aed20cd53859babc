"""The launcher's error type, shared by `spindle train`, `spindle submit` and the cluster helpers."""
from __future__ import annotations


class LaunchError(RuntimeError):
    """A job that cannot start or did not finish: one message saying what happened and what to do."""


def last_line(error: BaseException) -> str:
    """The last non-empty line of an error's text (Ray wraps the cause in a traceback)."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__
