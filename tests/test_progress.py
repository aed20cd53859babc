"""Console progress: the bar's fields on a terminal, plain lines otherwise, and the driver's follower
of metrics.jsonl (partial lines, truncation by a resumed attempt)."""
from __future__ import annotations

import io
import json
from pathlib import Path

from spindle.runtime.progress import MetricsFollower, ProgressDisplay, format_duration


def record(step: int, elapsed: float, mfu: float | None = 0.25) -> dict:
    return {"step": step, "loss": 2.5, "tokens_per_s": 1000.0, "mfu": mfu, "peak_mem_gb": 1.5, "elapsed_s": elapsed}


def test_terminal_bar_shows_loss_throughput_mfu_memory_and_eta() -> None:
    stream = io.StringIO()
    display = ProgressDisplay(100, 40, bar_stream=stream, terminal=True)
    display.update(record(50, 10.0))
    display.close()
    shown = stream.getvalue()
    assert "50/100" in shown and "loss=2.5000" in shown and "tok/s=1000" in shown
    assert "MFU=25.0%" in shown and "mem=1.50GB" in shown and "<" in shown  # tqdm's elapsed<remaining


def test_plain_lines_every_tenth_with_eta() -> None:
    stream = io.StringIO()
    display = ProgressDisplay(20, 0, stream=stream, terminal=False)
    for step in range(1, 21):
        display.advance(step, record(step, step * 0.5, mfu=None))
    lines = stream.getvalue().splitlines()
    assert [line.split()[1] for line in lines] == [f"{step}/20" for step in range(2, 21, 2)]
    assert lines[0].endswith("ETA 0:09") and "MFU" not in lines[0] and "peak mem 1.50 GB" in lines[0]
    assert "ETA" not in lines[-1]
    assert format_duration(3725) == "1:02:05"


def test_follower_reads_complete_lines_and_survives_truncation(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps(record(1, 1.0)) + "\n")  # an earlier launch's record: not shown again
    stream = io.StringIO()
    follower = MetricsFollower(tmp_path, ProgressDisplay(10, 1, stream=stream, terminal=False))
    with open(path, "a") as handle:
        handle.write(json.dumps(record(2, 2.0)) + "\n" + json.dumps(record(3, 3.0))[:20])  # a torn last line
    follower.poll()
    assert follower.last_record["step"] == 2
    path.write_text(json.dumps(record(1, 1.0)) + "\n")  # a restarted attempt truncates to its resume step
    follower.poll()
    with open(path, "a") as handle:
        handle.write(json.dumps(record(10, 9.0)) + "\n")
    follower.poll()
    assert follower.last_record["step"] == 10 and "10/10" in stream.getvalue()
