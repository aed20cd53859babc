"""`spindle report RUN_DIR`: loss and throughput plots (PNG) from RUN_DIR/metrics.jsonl."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from spindle.runtime.metrics import METRICS_FILE

LOSS_PLOT = "loss.png"
THROUGHPUT_PLOT = "throughput.png"


class ReportError(ValueError):
    """RUN_DIR cannot be reported on (missing directory, missing or empty metrics)."""


def load_records(run_dir: Path) -> list[dict]:
    if not run_dir.is_dir():
        raise ReportError(f"run directory {str(run_dir)!r} does not exist: pass the --run-dir of a "
                          f"`spindle train` run (default runs/<config name>).")
    metrics_path = run_dir / METRICS_FILE
    if not metrics_path.is_file():
        raise ReportError(f"{str(metrics_path)!r} does not exist: {str(run_dir)!r} is not a run directory, "
                          f"or its training has not logged a step yet.")
    records = []
    with open(metrics_path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                # A run killed mid-write leaves a partial last line; everything before it is still good.
                print(f"spindle report: skipping unreadable line {line_number} of {metrics_path}", file=sys.stderr)
    records = [record for record in records if "step" in record]
    if not records:
        raise ReportError(f"{str(metrics_path)!r} holds no metrics records yet: nothing to plot.")
    return records


def _series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    points = [(record["step"], record[key]) for record in records if record.get(key) is not None]
    return [step for step, _ in points], [value for _, value in points]


def _plot(path: Path, title: str, ylabel: str, series: dict[str, tuple[list[float], list[float]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(7, 4))
    for label, (steps, values) in series.items():
        axes.plot(steps, values, label=label, linewidth=1.2)
    axes.set_xlabel("step")
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    if len(series) > 1:
        axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)


def write_report(run_dir: str | Path, records: list[dict] | None = None) -> list[Path]:
    """Write loss.png and throughput.png into RUN_DIR; returns their paths."""
    run_dir = Path(run_dir)
    records = records if records is not None else load_records(run_dir)
    name = run_dir.resolve().name
    loss_path, throughput_path = run_dir / LOSS_PLOT, run_dir / THROUGHPUT_PLOT
    _plot(loss_path, f"{name}: training loss", "loss (global-token mean)", {"loss": _series(records, "loss")})
    _plot(throughput_path, f"{name}: throughput", "tokens / s", {"tokens/s": _series(records, "tokens_per_s")})
    return [loss_path, throughput_path]


def _summary(records: list[dict]) -> str:
    steps, losses = _series(records, "loss")
    if not losses:
        return f"steps {records[0]['step']}..{records[-1]['step']}"
    return f"steps {steps[0]}..{steps[-1]}: loss {losses[0]:.4f} -> {losses[-1]:.4f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="spindle report", description=__doc__)
    parser.add_argument("run_dir", metavar="RUN_DIR", help="run directory holding metrics.jsonl")
    arguments = parser.parse_args(argv)
    try:
        records = load_records(Path(arguments.run_dir))
    except ReportError as error:
        print(f"spindle report: error: {error}", file=sys.stderr)
        return 2
    paths = write_report(arguments.run_dir, records)
    print(f"{_summary(records)}; wrote {', '.join(str(path) for path in paths)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
