"""`spindle bench kernels` on CPU: one run writes markdown, JSON and PNG with the command line; rows carry
medians with spread, floors and ratios; a missing provider is a row note; only out-of-memory errors become
notes (anything else fails the run); the nominal work counts match brute force."""

from __future__ import annotations

import json

import pytest
import torch

from spindle.benchmarks import kernels as bench


def test_quick_run_writes_markdown_json_and_plot(tmp_path):
    argv = ["--quick", "--lengths", "32", "--linear", "spindle-torch,fla-chunk", "--softmax",
            "spindle-attention,torch-sdpa", "--kv-heads", "1", "--out", str(tmp_path)]
    assert bench.main(argv) == 0
    report = json.loads((tmp_path / "kernels.json").read_text())
    assert report["command"].startswith("spindle bench kernels --quick")
    timed = [row for row in report["rows"] if row["median_ms"] is not None]
    assert {(row["provider"], row["mode"]) for row in timed} >= {
        ("spindle-torch", "fwd"), ("spindle-torch", "bwd"), ("spindle-torch", "fwd+bwd"),
        ("spindle-attention", "fwd+bwd")}
    for row in timed:
        timing = row["timing"]
        assert timing["min_ms"] <= row["median_ms"] <= timing["max_ms"] and timing["repeats"] == 2
        assert row["floor_ms"] > 0 and row["flops"] > 0 and row["bytes"] > 0
    fla = [row for row in report["rows"] if row["provider"] == "fla-chunk"]
    assert fla and all(row["median_ms"] is None and "not installed" in row["note"] for row in fla)
    torch_sdpa = [row for row in report["rows"] if row["provider"] == "torch-sdpa"]
    assert all(row["output_difference"] < 1e-5 and "output vs spindle-attention" in row["note"] for row in torch_sdpa)
    markdown = (tmp_path / "kernels.md").read_text()
    assert "spindle bench kernels --quick" in markdown and "CPU run" in markdown and "x fla" in markdown
    assert (tmp_path / "kernels.png").stat().st_size > 0


def test_window_run_notes_providers_without_a_window(tmp_path):
    argv = ["--quick", "--lengths", "32", "--linear", "", "--softmax", "spindle-attention,torch-sdpa", "--window", "8",
            "--modes", "fwd", "--out", str(tmp_path)]
    assert bench.main(argv) == 0
    rows = json.loads((tmp_path / "kernels.json").read_text())["rows"]
    assert [row["median_ms"] is not None for row in rows] == [True, False]
    assert "sliding window" in rows[1]["note"]  # torch SDPA has no window without a dense mask


def _case():
    return bench.Case(1, 2, 2, 8, 16, torch.float32, "none", None, torch.device("cpu"))


def test_only_out_of_memory_becomes_a_note():
    def out_of_memory(case):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    rows = bench.run_provider("linear", "oom", out_of_memory, _case(), ["fwd", "bwd"], 0, 1)
    assert [row.note for row in rows] == ["out of memory", "out of memory"]

    def broken(case):
        raise RuntimeError("a real bug")

    with pytest.raises(RuntimeError, match="a real bug"):
        bench.run_provider("linear", "broken", broken, _case(), ["fwd"], 0, 1)


@pytest.mark.parametrize("length, window", [(10, None), (10, 1), (10, 4), (10, 10), (10, 25)])
def test_visible_pairs_matches_brute_force(length, window):
    expected = sum(1 for i in range(length) for j in range(length)
                   if j <= i and (window is None or j > i - window))
    assert bench.visible_pairs(length, window) == expected


def test_ratio_against_fla_and_floor():
    rows = [bench.Row("linear", "fla-chunk", 16, "fwd", bench.Timing.from_samples([2.0], 0), 1e12, 1e9),
            bench.Row("linear", "spindle-triton", 16, "fwd", bench.Timing.from_samples([1.0], 0), 1e12, 1e9)]
    peak = bench.Peak("test", 1e15, 1e12, True)
    bench.add_floors_and_ratios(rows, peak)
    assert rows[1].relative_to_fla == pytest.approx(2.0)
    assert rows[1].floor_ms == pytest.approx(1.0)  # max(1e12 / 1e15, 1e9 / 1e12) s = 1 ms
    assert rows[1].floor_fraction == pytest.approx(1.0)


def test_bad_arguments_are_rejected():
    with pytest.raises(SystemExit):
        bench.parse(["--linear", "fla-nope"])
    with pytest.raises(SystemExit):
        bench.parse(["--heads", "6", "--kv-heads", "4"])
