"""dp x cp x tp composition and the DeepSpeed engine against the one-process run of configs/tiny.yaml.

Every layout trains the same 3 steps (same seed, same global batches, fp32) through the real build
path (build_model -> build_optimizer -> build_engine -> BatchProvider -> train_step on a
ParallelContext.build mesh) and must give the one-process per-step losses and gradient norms to 1e-4
relative, and FSDP2 / TP / CP layouts the one-process gradients (full tensors) of step 1. Spawning
ranks dominates the cost on two cores, so each world size runs all its layouts in one process group.
"""
from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from distributed_utils import run_distributed
from spindle.parallel.layout import ParallelContext, ParallelDegrees
from spindle.parallel.zero import initialize_zero
from spindle.runtime.config import Config, load_config, resolve
from spindle.runtime.data import build_dataset
from spindle.runtime.main import build_engine, build_model, main
from spindle.runtime.metrics import read_metrics
from spindle.runtime.optim import build_optimizer, learning_rate
from spindle.runtime.trainer import BatchProvider, train_step

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
STEPS = 3
TOLERANCE = 1e-4  # relative, fp32: the layouts sum the same terms in other orders
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
NEEDS_DEEPSPEED = pytest.mark.skipif(not HAS_DEEPSPEED, reason="needs the optional dependency deepspeed")

CP_SCHEMES = [f"cp2-{linear}-{softmax}-{layout}" for linear in ("lasp2", "lasp1")
              for softmax in ("allgather", "ring", "ulysses") for layout in ("zigzag", "contiguous")]
TWO_RANK_LAYOUTS = ["dp2", *CP_SCHEMES, "tp2"] + (["dp2-zero1", "dp2-zero2", "cp2-zero2", "dp2-zero3",
                                                  "dp2-zero2-offload"] if HAS_DEEPSPEED else [])
FOUR_RANK_LAYOUTS = ["dp2-cp2", "cp2-tp2", "dp2-cp2-ring-contiguous"]


def overrides_of(layout: str) -> list[str]:
    """--set overrides of a layout name such as "cp2-lasp1-ring-contiguous" or "dp2-zero2-offload"."""
    values = {"train.precision": "fp32", "train.steps": str(STEPS)}
    for word in layout.split("-"):
        if word[:2] in ("dp", "cp", "tp") and word[2:].isdigit():
            values[f"parallel.{word[:2]}"] = word[2:]
        elif word in ("lasp1", "lasp2"):
            values["parallel.cp_linear"] = word
        elif word in ("allgather", "ring", "ulysses"):
            values["parallel.cp_softmax"] = word
        elif word in ("zigzag", "contiguous"):
            values["parallel.cp_layout"] = word
        elif word.startswith("zero"):
            values["parallel.dp_engine"], values["parallel.zero_stage"] = "deepspeed", word[4:]
        elif word == "offload":
            values["parallel.offload_optimizer"] = "true"
        else:
            raise ValueError(f"unknown layout word {word!r} in {layout!r}")
    return [f"{key}={value}" for key, value in values.items()]


def layout_config(layout: str, world_size: int) -> Config:
    return resolve(load_config(TINY, overrides_of(layout), world_size=world_size), world_size)


def train_layout(config: Config, context: ParallelContext) -> dict:
    """STEPS steps through the real build path; losses, gradient norms and step-1 gradients (full tensors)."""
    dataset = build_dataset(config.data, config.model.vocab_size, config.train.seed)
    model = build_model(config, context)
    optimizer = build_optimizer(model, config.train)
    if config.parallel.dp_engine == "deepspeed" and config.parallel.zero_stage == 3:
        # Tiny parameters would all stay gathered (DeepSpeed's persistence threshold); partition them.
        engine = initialize_zero(model, optimizer, context, config,
                                 zero_overrides={"stage3_param_persistence_threshold": 0})
    else:
        engine = build_engine(config, model, optimizer, context)
    batches = BatchProvider(dataset, config.train.global_batch, config.train.micro_batch,
                            context.dp_rank, context.dp_size)
    losses, norms, gradients = [], [], {}
    for step in range(STEPS):
        result = train_step(model, engine, batches.micro_batches(step), context,
                            lr=learning_rate(step, config.train), grad_clip=config.train.grad_clip, precision=None)
        losses.append(float(result.loss))
        norms.append(float(result.grad_norm))
        if step == 0 and config.parallel.dp_engine == "fsdp":
            # The (clipped) gradients of step 1; DeepSpeed keeps its reduced gradients in its partitions.
            for name, parameter in model.named_parameters():
                gradient = parameter.grad
                gradient = gradient.full_tensor() if hasattr(gradient, "full_tensor") else gradient
                gradients[name] = gradient.detach().numpy().copy()  # by value through the result queue
    return {"losses": losses, "grad_norms": norms, "gradients": gradients}


def _layouts_worker(rank: int, world_size: int, group: object, layouts: list[str]) -> dict | None:
    results = {}
    for layout in layouts:
        config = layout_config(layout, world_size)
        degrees = ParallelDegrees.resolve(config.parallel.dp, config.parallel.cp, config.parallel.tp, world_size)
        context = ParallelContext.build(degrees, torch.device("cpu"), cp_layout=config.parallel.cp_layout)
        started = time.perf_counter()
        results[layout] = train_layout(config, context)
        results[layout]["seconds"] = time.perf_counter() - started
    return results if rank == 0 else None


@pytest.fixture(scope="module")
def reference() -> dict:
    """The one-process run (no mesh), in the test process."""
    return train_layout(layout_config("dp1", 1), ParallelContext.single_process())


@pytest.fixture(scope="module")
def two_rank_results() -> dict:
    return run_distributed(_layouts_worker, 2, TWO_RANK_LAYOUTS, timeout=300)[0]


@pytest.fixture(scope="module")
def four_rank_results() -> dict:
    return run_distributed(_layouts_worker, 4, FOUR_RANK_LAYOUTS, timeout=300)[0]


def relative_difference(values: list[float], expected: list[float]) -> float:
    return max(abs(value - target) / abs(target) for value, target in zip(values, expected, strict=True))


def max_gradient_difference(gradients: dict, expected: dict) -> float:
    """max over parameters of max|g - g_ref| / max|g_ref| (names must match exactly)."""
    assert gradients.keys() == expected.keys()
    return max(float(abs(gradients[name] - expected[name]).max() / abs(expected[name]).max()) for name in expected)


def check_against_reference(results: dict, reference: dict) -> None:
    table = {layout: (relative_difference(result["losses"], reference["losses"]),
                      relative_difference(result["grad_norms"], reference["grad_norms"]))
             for layout, result in results.items()}
    report = "\n".join(f"  {layout:31s} loss {loss:.1e}  grad_norm {norm:.1e}  ({results[layout]['seconds']:.1f} s)"
                       for layout, (loss, norm) in table.items())
    print(f"max relative difference vs one process over {STEPS} steps:\n{report}")
    assert all(math.isfinite(loss) for loss in reference["losses"])
    bad = [layout for layout, differences in table.items() if not max(differences) <= TOLERANCE]
    assert not bad, f"layouts {bad} differ from the one-process run by more than {TOLERANCE}:\n{report}"


def test_two_rank_layouts_match_one_process(two_rank_results: dict, reference: dict) -> None:
    assert set(two_rank_results) == set(TWO_RANK_LAYOUTS)
    check_against_reference(two_rank_results, reference)


def test_four_rank_layouts_match_one_process(four_rank_results: dict, reference: dict) -> None:
    assert set(four_rank_results) == set(FOUR_RANK_LAYOUTS)
    check_against_reference(four_rank_results, reference)


def test_sharded_gradients_match_one_process(two_rank_results: dict, four_rank_results: dict,
                                             reference: dict) -> None:
    """Step-1 gradients (full tensors of the FSDP2 / TP DTensors) of every FSDP2 layout, cp ones included."""
    results = {**two_rank_results, **four_rank_results}
    sharded = {layout: result for layout, result in results.items() if "zero" not in layout}
    assert all(result["gradients"] for result in sharded.values())
    assert {layout for layout in sharded if "cp2" in layout} >= set(CP_SCHEMES) | {"dp2-cp2", "cp2-tp2"}
    differences = {layout: max_gradient_difference(result["gradients"], reference["gradients"])
                   for layout, result in sharded.items()}
    bad = {layout: difference for layout, difference in differences.items() if not difference <= TOLERANCE}
    assert not bad, f"step-1 gradients differ from the one-process gradients: {bad}"


@NEEDS_DEEPSPEED
def test_zero2_matches_fsdp2(two_rank_results: dict) -> None:
    fsdp, zero = two_rank_results["dp2"], two_rank_results["dp2-zero2"]
    assert relative_difference(zero["losses"], fsdp["losses"]) <= TOLERANCE, (zero["losses"], fsdp["losses"])
    assert relative_difference(zero["grad_norms"], fsdp["grad_norms"]) <= TOLERANCE
    # The run trained: the loss moved, so equal losses are not three copies of the initial value.
    assert zero["losses"][-1] != zero["losses"][0]


# ------------------------------------------------------------------------------------------ the CLI
def run_cli(*arguments: str, world_size: int, tmp_path: Path, torchrun: bool = False,
            timeout: float = 240) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if torchrun:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world_size),
                   "--standalone", "-m", "spindle.runtime.main"]
    else:
        # One process that claims to be rank 0 of a larger job: validation must refuse it before it
        # tries to join a process group (there is no rendezvous to join).
        environment.update(WORLD_SIZE=str(world_size), RANK="0", LOCAL_RANK="0")
        command = [sys.executable, "-m", "spindle.runtime.main"]
    return subprocess.run([*command, str(TINY), *arguments], cwd=tmp_path, env=environment, capture_output=True,
                          text=True, timeout=timeout)


def test_torchrun_cp2_tp2_trains_and_writes_metrics(tmp_path: Path, reference: dict) -> None:
    run_dir = tmp_path / "run"
    settings = [f"--set={override}" for override in overrides_of("cp2-tp2")]
    completed = run_cli(*settings, "--run-dir", str(run_dir), "--resume", "never", world_size=4,
                        tmp_path=tmp_path, torchrun=True)
    assert completed.returncode == 0, completed.stderr[-4000:]
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [record["step"] for record in records] == list(range(1, STEPS + 1))
    losses = [record["loss"] for record in records]
    assert relative_difference(losses, reference["losses"]) <= TOLERANCE, (losses, reference["losses"])


@pytest.mark.parametrize("world_size, settings, message", [
    (4, ["parallel.dp=1", "parallel.cp=2"],
     "parallel.dp * parallel.cp * parallel.tp = 1 * 2 * 1 does not match the world size 4"),
    (4, ["parallel.tp=4"], "model.kv_heads = 2 is not divisible by parallel.tp = 4"),
    (4, ["parallel.cp=4", "data.seq_len=36"], "data.seq_len = 36 is not divisible by 8 (2 * parallel.cp"),
    (4, ["parallel.cp=4", "parallel.cp_softmax=ulysses"],
     "model.kv_heads = 2 does not split over parallel.cp = 4 with parallel.cp_softmax = 'ulysses'"),
    (2, ["parallel.tp=2", "parallel.dp_engine=deepspeed"],
     "parallel.tp = 2 is not supported with parallel.dp_engine = 'deepspeed'"),
    (1, ["parallel.dp_engine=deepspeed"], "parallel.dp_engine = 'deepspeed' needs a multi-process job"),
    (2, ["parallel.dp=2", "parallel.offload_optimizer=true"],
     "parallel.offload_optimizer = true needs parallel.dp_engine = 'deepspeed'"),
])
def test_misconfigured_layouts_fail_at_start(world_size: int, settings: list[str], message: str, tmp_path: Path,
                                             capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process (the same main() as `python -m spindle.runtime.main`): exit code 2, one line, no run dir."""
    for name, value in {"WORLD_SIZE": str(world_size), "RANK": "0", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("MASTER_ADDR", raising=False)  # should validation let it through, joining fails fast
    run_dir = tmp_path / "run"
    arguments = [str(TINY), "--run-dir", str(run_dir)] + [f"--set={setting}" for setting in settings]
    assert main(arguments) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("spindle: error: ") and message in errors[0], errors
    assert not run_dir.exists()


def test_misconfigured_layout_exit_code_from_the_command_line(tmp_path: Path) -> None:
    completed = run_cli("--set", "parallel.tp=3", "--run-dir", str(tmp_path / "run"), world_size=3,
                        tmp_path=tmp_path)
    assert completed.returncode == 2, completed.stderr[-4000:]
    assert "model.heads = 4 is not divisible by parallel.tp = 3" in completed.stderr
    assert "Traceback" not in completed.stderr
