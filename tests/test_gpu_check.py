"""The GPU check's plumbing, proven on a CPU: `make gpu-check DRY_RUN=1` runs every part of
benchmarks/gpu_check.py with tiny shapes and writes a complete report.

The dry run installs spindle with pip (no dependencies, no index) into a throwaway virtualenv that sees this
environment's packages except ray, wandb, deepspeed, megatron-core and fla, as on the GPU machine, so it also
shows that the trainer (alone and on two torchrun ranks), `spindle plan` and `spindle bench` work without them
and that `spindle train` names the way out. One run serves every assertion (module-scoped fixture).
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PARTS = ("install", "environment", "cli", "pytest-gpu", "cp-2rank", "bench-kernels", "preset-1m", "bench-e2e")
# bench-kernels belongs to the kernel benchmark, which the check calls through its CLI and tolerates failing
MUST_PASS = tuple(name for name in PARTS if name != "bench-kernels")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, str]:
    out = tmp_path_factory.mktemp("gpu-check")
    # budget scale 3: the report must be complete even on a busy machine; the default budgets are what a
    # quiet one needs, and the test asserts nothing ran out of time.
    command = ["make", "--no-print-directory", "gpu-check", "DRY_RUN=1", f"GPU_CHECK_OUT={out}",
               f"GPU_PYTHON={sys.executable}", "GPU_CHECK_ARGS=--budget-scale 3"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    report = out / "gpu-check.json"
    assert report.is_file(), f"no report; make said:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return out, json.loads(report.read_text()), result.stdout + result.stderr


def _parts(document: dict) -> dict[str, dict]:
    return {part["name"]: part for part in document["parts"]}


def test_every_part_has_a_status(dry_run):
    out, document, output = dry_run
    parts = _parts(document)
    assert document["finished"] and document["dry_run"]
    assert tuple(parts) == PARTS
    for name, part in parts.items():
        assert part["status"] in ("ran", "skipped", "over budget"), (name, part["status"])
        if part["status"] == "ran":
            assert part["outcome"] in ("ok", "failed"), (name, part)
        else:
            assert part["reason"], f"{name}: {part['status']} without a reason"
        assert part["summary"] or part["reason"], name
    failing = {name: parts[name]["summary"] or parts[name]["reason"] for name in MUST_PASS
               if (parts[name]["status"], parts[name]["outcome"]) != ("ran", "ok")}
    assert not failing, f"{failing}\n{output[-4000:]}"
    markdown = (out / "gpu-check.md").read_text()
    for name in PARTS:
        assert re.search(rf"^\| {re.escape(name)} \| (ran: ok|ran: failed|skipped|over budget)", markdown, re.M), name
        assert f"## {name}:" in markdown


def test_report_files_and_plots(dry_run):
    out, document, _ = dry_run
    files = sorted(path.name for path in out.iterdir())
    assert len(files) <= 8, files  # what one remote command can bring back
    markdown = (out / "gpu-check.md").read_text()
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    assert {"gpu-check-parts.png", "e2e.png"} <= set(images)
    for image in images:
        assert (out / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", image
    assert "gpu-check.log" in files and "pip install --no-deps --no-index --no-build-isolation" in (
        out / "gpu-check.log").read_text()
    environment = document["environment"]
    for key in ("torch", "triton", "python", "git_commit", "date_utc"):
        assert environment.get(key), key
    for name in ("gpu", "driver"):  # absent on a CPU; the report says so
        assert name in markdown.lower()


def test_runs_without_ray_wandb_deepspeed(dry_run):
    """The throwaway environment really lacks them, and every entry point that should work did."""
    _, document, _ = dry_run
    modules = document["environment"]["optional_modules"]
    assert not any(modules[name] for name in ("ray", "wandb", "deepspeed", "megatron.core")), modules
    parts = _parts(document)
    refusal = parts["cli"]["details"]["train_without_ray"]
    assert refusal["exit_code"] == 1 and "torchrun" in refusal["message"] and "ray" in refusal["message"].lower()
    assert parts["cli"]["details"]["plan_1m"]["fits"] is True
    steps = parts["preset-1m"]["details"]["steps"]  # python -m spindle.runtime.main
    assert [step["step"] for step in steps] == [1, 2] and all(math.isfinite(step["loss"]) for step in steps)
    rows = parts["bench-e2e"]["details"]["rows"]  # spindle bench e2e
    ok_rows = [row for row in rows if row["status"] == "ok"]
    assert {"linear", "hybrid-1:7", "softmax"} <= {row["model"] for row in ok_rows}
    assert {row["model"] for row in rows} == {"linear", "hybrid-1:7", "softmax", "rattention-1:7"}
    assert all(row["planned_gib"] > 0 and row["peak_gib"] > 0 for row in ok_rows)


def test_two_rank_context_parallel_checks(dry_run):
    _, document, _ = dry_run
    cp = _parts(document)["cp-2rank"]["details"]
    assert cp["backend"] == "gloo" and cp["world_size"] == 2
    checks = {check["name"]: check for check in cp["checks"]}
    assert set(checks) == {"collectives", "lasp2", "allgather_attention", "ring_attention", "trainer cp=2"}
    assert all(check["status"] == "ok" for check in checks.values()), checks
    for name in ("lasp2", "allgather_attention", "ring_attention"):  # fp32 on a CPU against float64
        assert max(checks[name]["relative_error"].values()) < 1e-5, checks[name]
    assert len(checks["trainer cp=2"]["losses"]) == 3


def test_gpu_wheels_are_pinned():
    """`make gpu-wheels` downloads exact versions of pure-Python wheels (checked without a network)."""
    makefile = (REPO / "Makefile").read_text()
    wheels = re.search(r"^GPU_WHEELS :?= (.+)$", makefile, re.M).group(1).split()
    assert {wheel.split("==")[0] for wheel in wheels} >= {"fla-core", "flash-linear-attention"}
    assert all(re.fullmatch(r"[A-Za-z0-9_.-]+==[0-9][0-9A-Za-z.]*", wheel) for wheel in wheels), wheels
    recipe = makefile[makefile.index("\ngpu-wheels:"):]
    assert "--no-deps" in recipe and "--only-binary=:all:" in recipe and ".whl" in recipe
    assert ".whl/" in (REPO / ".gitignore").read_text().split()


def test_e2e_step_time_prediction():
    """The e2e budget's predictor: exact on linear and quadratic costs, quadratic from one point."""
    from spindle.benchmarks.e2e import predicted_step_s

    assert predicted_step_s([(1024, 0.5), (2048, 1.0)], 8192) == pytest.approx(4.0)
    assert predicted_step_s([(1024, 1.0), (2048, 4.0)], 8192) == pytest.approx(64.0)
    mixed = [(t, 1e-3 * t + 1e-6 * t * t) for t in (1000, 3000)]
    assert predicted_step_s(mixed, 9000) == pytest.approx(1e-3 * 9000 + 1e-6 * 9000**2)
    assert predicted_step_s([(1000, 2.0)], 2000) == pytest.approx(8.0)
    assert predicted_step_s([], 2000) == 0.0


def test_real_check_refuses_without_torch_or_gpu(tmp_path: Path):
    """Without --dry-run the check needs a Python with torch and a CUDA GPU; otherwise it says which, exits 2
    and installs nothing."""
    script = str(REPO / "benchmarks" / "gpu_check.py")
    missing = subprocess.run([sys.executable, script, "--python", str(tmp_path / "no-python"), "--out",
                              str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "did not run" in missing.stderr and "Nothing was installed" in missing.stderr
    assert not (tmp_path / "out").exists()
    import torch

    if torch.cuda.is_available():
        return
    cpu_only = subprocess.run([sys.executable, script, "--out", str(tmp_path / "out")], cwd=REPO,
                              capture_output=True, text=True, timeout=300)
    assert cpu_only.returncode == 2 and "DRY_RUN=1" in cpu_only.stderr, cpu_only.stderr
    assert not (tmp_path / "out").exists()
