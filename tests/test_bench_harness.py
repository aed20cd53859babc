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


@pytest.mark.slow
def test_cp_benchmark_compares_like_with_like(tmp_path) -> None:
    """Rows from 2 gloo ranks (tests/two_rank_checks.py): a linear table against lasp2, a softmax table
    against ring, exact bytes, and the planner's projection for every scheme."""
    import two_rank_checks

    from spindle.benchmarks import cp

    measurements = [cp.Measurement(**row) for row in two_rank_checks.results()["bench"]]
    args = cp._parse(["--world-sizes", "2", "--lengths", "64"])
    projected = cp.projection(args)
    text = cp.markdown(args, [], measurements, projected, None)
    linear, softmax = text.split("### Linear layers")[1].split("### Softmax layers")
    softmax = softmax.split("## Projection")[0]
    assert "| lasp1 |" in linear and "| ring |" not in linear and "× lasp2" in linear
    assert "| allgather |" in softmax and "| lasp2 |" not in softmax and "× ring" in softmax
    rows = {m.method: m for m in measurements}
    assert rows["lasp2"].timing["repeats"] == 2 and rows["lasp2"].note == ""
    # exact bytes: LASP-2 gathers one fp32 state per zigzag chunk (2 x B x H x d x d x 4) from the other rank
    assert rows["lasp2"].backward_bytes == 2 * 1 * 2 * 8 * 8 * 4
    layers = projected["layers"]
    assert set(layers) == set(cp.METHODS) and layers["lasp1"]["total_s"] > layers["lasp2"]["total_s"]
