"""Console progress of a run, shown by one process: rank 0 under torchrun or alone, the driver under Ray.

On a terminal, one tqdm bar (loss, tokens/s, MFU where the device's peak is known, peak memory; tqdm
adds the ETA); otherwise a plain line every tenth of the run (logs of `make run`, CI). Under Ray the
workers have no terminal, so the driver follows rank 0's metrics.jsonl (``MetricsFollower``) and
renders it here.
"""
from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path
from typing import TextIO

from spindle.runtime.metrics import METRICS_FILE

FOLLOW_INTERVAL_S = 0.5


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


class ProgressDisplay:
    """Renders metrics records of a run from step ``initial`` to ``total``."""

    def __init__(self, total: int, initial: int = 0, *, enabled: bool = True, stream: TextIO | None = None,
                 bar_stream: TextIO | None = None, terminal: bool | None = None) -> None:
        """Lines go to ``stream`` (stdout), the bar to ``bar_stream`` (stderr) when that is a terminal."""
        self.total, self.initial, self.enabled = total, initial, enabled
        self.stream, self.bar_stream = stream or sys.stdout, bar_stream or sys.stderr
        self.terminal = self.bar_stream.isatty() if terminal is None else terminal
        self.line_every, self.last_line_step, self.step = max(1, (total - initial) // 10), initial, initial
        self.bar = None
        if enabled and self.terminal:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True,
                            file=self.bar_stream)

    def advance(self, step: int, record: dict | None = None) -> None:
        """Training reached ``step``; ``record`` is its metrics record when one was written."""
        if not self.enabled:
            return
        if self.bar is not None:
            if record is not None:
                self.bar.set_postfix_str(self._postfix(record), refresh=False)
            self.bar.update(max(0, step - self.bar.n))
        elif record is not None and (step - self.last_line_step >= self.line_every or step >= self.total):
            self.last_line_step = step
            print(self.line(record), file=self.stream, flush=True)
        self.step = max(self.step, step)

    def update(self, record: dict) -> None:
        self.advance(int(record["step"]), record)

    def line(self, record: dict) -> str:
        """The plain progress line of a record: step, loss, throughput, MFU, memory, time and ETA."""
        step, elapsed = int(record["step"]), float(record.get("elapsed_s", 0.0))
        parts = [f"step {step:>6}/{self.total}", f"loss {record['loss']:.4f}",
                 f"{record['tokens_per_s']:.0f} tokens/s"]
        if record.get("mfu") is not None:
            parts.append(f"MFU {100 * record['mfu']:.1f}%")
        parts.append(f"peak mem {record.get('peak_mem_gb', 0.0):.2f} GB")
        parts.append(f"{elapsed:.1f} s")
        done = step - self.initial
        if 0 < done and step < self.total:
            parts.append(f"ETA {format_duration(elapsed / done * (self.total - step))}")
        return "  ".join(parts)

    @staticmethod
    def _postfix(record: dict) -> str:
        parts = [f"loss={record['loss']:.4f}", f"tok/s={record['tokens_per_s']:.0f}"]
        if record.get("mfu") is not None:
            parts.append(f"MFU={100 * record['mfu']:.1f}%")
        parts.append(f"mem={record.get('peak_mem_gb', 0.0):.2f}GB")
        return ", ".join(parts)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class MetricsFollower:
    """Follows RUN_DIR/metrics.jsonl from a daemon thread and hands each new record to a display.

    Starts at the file's current end (records already there belong to earlier launches). A restarted
    worker group truncates the file to its resume step; the follower then continues from the new end.
    """

    def __init__(self, run_dir: str | os.PathLike, display: ProgressDisplay,
                 interval_s: float = FOLLOW_INTERVAL_S) -> None:
        self.path = Path(run_dir) / METRICS_FILE
        self.display, self.interval_s = display, interval_s
        self.offset = self.path.stat().st_size if self.path.is_file() else 0
        self.last_record: dict | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="spindle-progress", daemon=True)

    def __enter__(self) -> "MetricsFollower":
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.poll()  # the last records written before the job ended
        self.display.close()

    def poll(self) -> None:
        """Read the complete lines appended since the last poll and show them."""
        try:
            size = self.path.stat().st_size
        except OSError:
            return
        if size < self.offset:  # truncated by a resumed attempt: what is left was shown already
            self.offset = size
            return
        with open(self.path, "rb") as handle:
            handle.seek(self.offset)
            data = handle.read(size - self.offset)
        complete = data[: data.rfind(b"\n") + 1]  # a line still being written waits for the next poll
        self.offset += len(complete)
        for line in complete.decode("utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if "step" in record and "loss" in record:
                self.last_record = record
                self.display.update(record)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.poll()
