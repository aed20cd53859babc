"""The shared benchmark harness: statistics, device defaults, out-of-memory rows, multi-rank timing."""

from __future__ import annotations

import pytest
import torch

from spindle.benchmarks import harness


def test_timing_statistics_from_known_samples() -> None:
    timing = harness.Timing.from_samples([4.0, 1.0, 3.0, 2.0, 5.0], warmup=2)
    assert (timing.median_ms, timing.min_ms, timing.max_ms, timing.repeats) == (3.0, 1.0, 5.0, 5)
    assert timing.iqr_ms == pytest.approx(2.0)  # inclusive quartiles 2 and 4
    assert timing.spread() == "3.000 ± 1.000"
    with pytest.raises(ValueError, match="no samples"):
        harness.Timing.from_samples([], warmup=0)


def test_time_function_counts_warmup_and_repeats() -> None:
    calls = []
    timing = harness.time_function(lambda: calls.append(1), "cpu", warmup=3, repeats=4)
    assert len(calls) == 7 and timing.repeats == 4 and len(timing.samples_ms) == 4
    assert all(sample >= 0 for sample in timing.samples_ms)
    assert harness.default_counts(torch.device("cpu"), None, None) == (2, 5)
    with pytest.raises(ValueError, match="repeats >= 1"):
        harness.time_function(lambda: None, "cpu", warmup=0, repeats=0)


def test_only_out_of_memory_becomes_a_row_note() -> None:
    def out_of_memory() -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    assert harness.guard_out_of_memory(lambda: 7) == (7, "")
    assert harness.guard_out_of_memory(out_of_memory) == (None, "out of memory")
    with pytest.raises(RuntimeError, match="shape mismatch"):
        harness.guard_out_of_memory(lambda: (_ for _ in ()).throw(RuntimeError("shape mismatch")))


def test_markdown_table_columns() -> None:
    lines = harness.markdown_table(["a", "b"], [[1, 2]])
    assert lines == ["| a | b |", "|---|---:|", "| 1 | 2 |"]
    with pytest.raises(ValueError, match="columns"):
        harness.markdown_table(["a"], [], align="lr")
