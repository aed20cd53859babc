"""The `spindle` command line: subcommands, exit codes, nothing on disk after a config error."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from spindle.launch.cli import build_parser, main

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
SPINDLE = Path(sys.executable).with_name("spindle")


def test_command_set_is_frozen() -> None:
    # Users and outside tests rely on these (docs/design.md); changing them is a deliberate decision.
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # argparse keeps subcommands here
    assert set(commands) == {"train", "submit", "plan", "bench", "report", "ckpt", "data"}
    train_options = {option for action in commands["train"]._actions for option in action.option_strings}
    assert train_options == {"-h", "--help", "--set", "--run-dir", "--address", "--resume", "--overwrite",
                             "--trust-checkpoint"}


def test_help_exits_zero(capsys: pytest.CaptureFixture) -> None:
    assert main(["--help"]) == 0
    assert "train" in capsys.readouterr().out
    assert main(["train", "--help"]) == 0


@pytest.mark.parametrize("arguments, fragments", [
    (["--set", "parallel.cp_softmax=rng"], ["parallel.cp_softmax", "'rng'", "'ring'"]),
    (["--set", "train.stpes=3"], ["train.stpes", "Did you mean 'steps'"]),
    (["--set", "model.heads=3"], ["model.dim", "model.heads = 3"]),
    (["--set", "data.source=/no/such/file.bin"], ["data.source", "/no/such/file.bin", "does not exist"]),
])
def test_bad_config_exits_2_and_creates_nothing(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                arguments: list[str], fragments: list[str]) -> None:
    run_dir = tmp_path / "never-created"
    assert main(["train", str(TINY), "--run-dir", str(run_dir), *arguments]) == 2
    error = capsys.readouterr().err
    assert error.startswith("spindle: error: ") and error.count("\n") == 1
    for fragment in fragments:
        assert fragment in error
    assert not run_dir.exists()


def test_missing_config_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["train", str(tmp_path / "nope.yaml"), "--run-dir", str(tmp_path / "run")]) == 2
    assert "nope.yaml" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_console_script_exit_code_and_default_run_dir(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("modle:\n  dim: 64\n", encoding="utf-8")
    finished = subprocess.run([str(SPINDLE), "train", str(bad)], cwd=tmp_path, capture_output=True, text=True,
                              timeout=120)
    assert finished.returncode == 2
    assert "modle" in finished.stderr and "Did you mean 'model'" in finished.stderr
    assert not (tmp_path / "runs").exists()  # the default run dir runs/bad was not created


@pytest.mark.parametrize("arguments, fragment", [
    (["ckpt", "list"], "invalid choice: 'list'"),
    (["bench"], "kernels, cp, e2e"),
    (["bench", "speed"], "'speed'"),
    (["report", "/no/such/run"], "does not exist"),
])
def test_bad_commands_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture,
                                             arguments: list[str], fragment: str) -> None:
    assert main(arguments) == 2
    assert fragment in capsys.readouterr().err


def test_unknown_command_is_a_usage_error(capsys: pytest.CaptureFixture) -> None:
    assert main(["fly"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_plan_is_dispatched(capsys: pytest.CaptureFixture) -> None:
    assert main(["plan", "--help"]) == 0
    assert "usage" in capsys.readouterr().out


def test_bench_help_exits_zero(capsys: pytest.CaptureFixture) -> None:
    assert main(["bench", "--help"]) == 0 and main(["bench", "-h"]) == 0
    assert "kernels, cp, e2e" in capsys.readouterr().out


def test_plan_exit_code_says_whether_the_config_fits(capsys: pytest.CaptureFixture) -> None:
    preset = REPO / "configs" / "hybrid-1m-1gpu.yaml"  # fits as shipped (tests/test_plan.py); 4M tokens do not
    assert main(["plan", str(preset), "--set", "data.seq_len=4194304"]) == 1
    captured = capsys.readouterr()
    assert "DOES NOT FIT" in captured.out and "does not fit" in captured.err


def test_submit_to_an_unreachable_address_gives_submit_advice() -> None:
    import socket

    from spindle.launch.errors import LaunchError
    from spindle.launch.submit import dashboard_address

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    with pytest.raises(LaunchError, match="cannot reach a Ray cluster") as error:
        dashboard_address(f"http://127.0.0.1:{closed}")
    assert "leave out --address" not in str(error.value)  # submit has no embedded cluster to fall back on


def test_quick_start_shows_progress_and_the_demo_checkpoints() -> None:
    from spindle.runtime.config import load_config

    tiny = load_config(TINY)
    assert tiny.logging.progress is True
    demo = load_config(REPO / "configs" / "demo.yaml")
    assert demo.checkpoint.every > 0 and demo.train.steps % demo.checkpoint.every == 0  # the last step commits


def test_world_size_rules_are_checked_once_the_embedded_cluster_size_is_known(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """parallel.dp = -1 on an embedded cluster: `spindle train` learns dp from this machine's cores (2
    here, pinned), then checks the rules that need it (config.check_world_size) before Ray starts:
    the message `validate` would give, exit 2, nothing on disk."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 CPU cores to pin the embedded cluster's size to 2 workers")
    cores = os.sched_getaffinity(0)
    run_dir = tmp_path / "never-created"
    os.sched_setaffinity(0, sorted(cores)[:2])
    try:
        code = main(["train", str(TINY), "--run-dir", str(run_dir), "--set", "parallel.dp=-1",
                     "--set", "train.global_batch=3", "--set", "launch.use_gpu=false"])
    finally:
        os.sched_setaffinity(0, cores)
    assert code == 2
    error = capsys.readouterr().err
    assert error == ("spindle: error: train.global_batch = 3 is not divisible by parallel.dp = 2: every "
                     "data-parallel rank takes the same number of sequences.\n")
    assert not run_dir.exists()
