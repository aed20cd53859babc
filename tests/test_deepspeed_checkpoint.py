"""DeepSpeed ZeRO checkpoints through spindle's one Checkpointer (the same commit protocol, SHA-256
manifest and HMAC tag as FSDP2 runs), on configs/tiny.yaml in fp32 with a global batch of 6.

- Same layout (2 gloo ranks), per ZeRO stage 1/2/3 (3 also with every parameter partitioned) and with
  the optimizer offloaded: train 2 steps, save, train 2 more; a fresh engine restores and trains the
  same 2 steps: the full fp32 weights and Adam moments (read through DeepSpeed's own
  ``safe_get_full_*`` API, independent of the code under test) and the losses are bitwise equal. Some
  cases accumulate micro-batches; every uninterrupted run's losses match the one-process run's.
- Another dp size and engine: each 2-rank checkpoint loads onto 3 ranks with another ZeRO stage, and
  into the one-process (FSDP2-format) model; a one-process checkpoint loads into ZeRO-3 at dp=2. The
  weights and moments are bitwise the saved ones; the next losses agree to ``TOLERANCE``.
- The real entry (``run_training``) with ``checkpoint.every``: a run that dies before its step-4 manifest
  resumes from step 2 with the uninterrupted run's metrics.
- Integrity and origin (``spindle ckpt verify``), and what cannot be converted, with its message.

DeepSpeed's first engine takes ~10 s to start on two cores, so each world size runs all its cases in one
spawned job (module-scoped fixtures).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from distributed_utils import run_distributed

from spindle.launch import ckpt
from spindle.parallel.layout import ParallelContext, ParallelDegrees
from spindle.runtime.checkpoint import (
    FAULT_ENV,
    CheckpointError,
    Checkpointer,
    ChecksumMismatchError,
    InjectedCheckpointFault,
    flat_range_blocks,
    resolve_resume,
)
from spindle.runtime.config import Config, load_config, resolve, to_dict
from spindle.runtime.data import build_dataset
from spindle.runtime.main import build_engine, build_model, run_training
from spindle.runtime.metrics import read_metrics
from spindle.runtime.optim import build_optimizer, learning_rate
from spindle.runtime.trainer import BatchProvider, train_step

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                 reason="needs the optional dependency deepspeed")]

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
GLOBAL_BATCH = 6  # splits over dp = 1, 2 and 3
SAVED_AT = 2
TOLERANCE = 1e-5  # relative, for losses after a change of dp (other reduction orders); same layout: exact

@dataclass(frozen=True)
class Case:
    stage: int
    offload: bool = False
    partition_everything: bool = False
    """ZeRO-3: no parameter stays whole (DeepSpeed keeps small ones whole, "persistent", by default)."""
    async_save: bool = False
    micro_batch: int = 0
    """1: three accumulated micro-batches per rank and step at dp = 2 (0: one)."""


CASES = {
    "zero1": Case(1, micro_batch=1),
    "zero2": Case(2),
    "zero3": Case(3),
    "zero3-partitioned": Case(3, partition_everything=True, async_save=True, micro_batch=1),
    "zero2-offload": Case(2, offload=True, async_save=True),
    "zero3-offload": Case(3, offload=True, micro_batch=1),
}
ON_THREE_RANKS = {  # the 2-rank checkpoint of each case loads into this engine at dp = 3
    "zero1": "zero3-partitioned", "zero2": "zero2", "zero3": "zero1", "zero3-partitioned": "zero3",
    "zero2-offload": "zero3-offload", "zero3-offload": "zero2-offload",
}


# ------------------------------------------------------------------------------------------ helpers
def case_config(case: str | None, world_size: int, *extra: str) -> Config:
    """The tiny config for a DeepSpeed case (None: the default engine) on ``world_size`` ranks of dp."""
    overrides = [f"parallel.dp={world_size}", "train.precision=fp32", f"train.global_batch={GLOBAL_BATCH}",
                 "checkpoint.every=2", "logging.progress=false"]
    if case is not None:
        settings = CASES[case]
        overrides += ["parallel.dp_engine=deepspeed", f"parallel.zero_stage={settings.stage}",
                      f"parallel.offload_optimizer={str(settings.offload).lower()}",
                      f"checkpoint.async_save={str(settings.async_save).lower()}",
                      f"train.micro_batch={settings.micro_batch}"]
    return resolve(load_config(TINY, [*overrides, *extra], world_size=world_size), world_size)


def context_of(config: Config) -> ParallelContext:
    if not dist.is_initialized():
        return ParallelContext.single_process()
    degrees = ParallelDegrees.resolve(config.parallel.dp, 1, 1, dist.get_world_size())
    return ParallelContext.build(degrees, torch.device("cpu"))


def build(case: str | None, config: Config, context: ParallelContext) -> tuple[torch.nn.Module, Any]:
    """Model and engine through the real build path (a torch AdamW for the default engine)."""
    from spindle.parallel.zero import initialize_zero

    model = build_model(config, context)
    optimizer = build_optimizer(model, config.train)
    if case is None:
        return model, optimizer
    if CASES[case].partition_everything:  # tiny parameters would all stay whole by DeepSpeed's default
        return model, initialize_zero(model, optimizer, context, config,
                                      zero_overrides={"stage3_param_persistence_threshold": 0})
    return model, build_engine(config, model, optimizer, context)


def train(model: torch.nn.Module, engine: Any, config: Config, context: ParallelContext, steps: range) -> list[float]:
    dataset = build_dataset(config.data, config.model.vocab_size, config.train.seed)
    batches = BatchProvider(dataset, config.train.global_batch, config.train.micro_batch, context.dp_rank,
                            context.dp_size)
    return [float(train_step(model, engine, batches.micro_batches(step), context, lr=learning_rate(step, config.train),
                             grad_clip=config.train.grad_clip, precision=None).loss) for step in steps]


def full_state(model: torch.nn.Module, engine: Any) -> dict[str, torch.Tensor]:
    """Every parameter's whole fp32 weight and Adam moments, and Adam's steps: through DeepSpeed's own
    ``safe_get_full_*`` API for an engine (collective), from the module and AdamW for one process."""
    state: dict[str, torch.Tensor] = {}
    if isinstance(engine, torch.optim.Optimizer):
        for name, parameter in model.named_parameters():
            adam = engine.state[parameter]
            state |= {name: parameter.detach().clone(), f"{name}.exp_avg": adam["exp_avg"].clone(),
                      f"{name}.exp_avg_sq": adam["exp_avg_sq"].clone(), f"{name}.step": adam["step"].clone()}
        return state
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    if engine.zero_stage < 3:  # DeepSpeed links parameters to Adam's state only at the first group's first step
        engine.engine.optimizer._hp_optimizer_states_linked = False
        engine.engine.optimizer._lazy_init_hp_params_optimizer_state()
    steps = {float(adam["step"]) for adam in engine.engine.optimizer.optimizer.state.values()}
    assert len(steps) == 1, steps  # DeepSpeed keeps one step per flat partition; all took the same steps
    step = torch.tensor(steps.pop())
    for name, parameter in engine.engine.module.named_parameters():
        state |= {name: safe_get_full_fp32_param(parameter).clone(),
                  f"{name}.exp_avg": safe_get_full_optimizer_state(parameter, "exp_avg").clone(),
                  f"{name}.exp_avg_sq": safe_get_full_optimizer_state(parameter, "exp_avg_sq").clone(),
                  f"{name}.step": step}
    return state


def max_difference(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> float:
    assert state.keys() == expected.keys(), sorted(set(state) ^ set(expected))
    return max(float((state[key].float() - expected[key].float()).abs().max()) for key in expected)


def absolute_difference(values: list[float], expected: list[float]) -> float:
    return max(abs(value - target) for value, target in zip(values, expected, strict=True))


def relative_difference(values: list[float], expected: list[float]) -> float:
    return max(abs(value - target) / abs(target) for value, target in zip(values, expected, strict=True))


def save_then_continue(case: str | None, config: Config, context: ParallelContext, run_dir: Path) -> dict:
    """Train to SAVED_AT, save, train 2 more steps (while an asynchronous save is still writing)."""
    model, engine = build(case, config, context)
    checkpointer = Checkpointer(run_dir, to_dict(config), model, engine, degrees=context.degrees)
    train(model, engine, config, context, range(SAVED_AT))
    checkpointer.save(SAVED_AT, data_cursor=SAVED_AT * GLOBAL_BATCH)
    reference = full_state(model, engine)
    losses = train(model, engine, config, context, range(SAVED_AT, SAVED_AT + 2))
    checkpointer.close()
    return {"state": reference, "losses": losses, "model": model, "engine": engine}


def restore_and_continue(case: str | None, config: Config, context: ParallelContext, run_dir: Path) -> dict:
    """A fresh model and engine restore ``run_dir``'s latest checkpoint and train 2 steps."""
    model, engine = build(case, config, context)
    resumed = Checkpointer(run_dir, to_dict(config), model, engine, degrees=context.degrees).restore("auto")
    state = full_state(model, engine)
    losses = train(model, engine, config, context, range(SAVED_AT, SAVED_AT + 2))
    return {"step": resumed.step, "layout_changed": resumed.layout_changed, "state": state, "losses": losses}


def refusal(action) -> str:
    """The message of the CheckpointError ``action`` raises ("" when it raises none)."""
    try:
        action()
    except CheckpointError as error:
        return str(error)
    return ""


# --------------------------------------------------------------------------------- the spawned jobs
def _two_rank_job(rank: int, world_size: int, group: object, root: str) -> dict | None:
    root_path, results = Path(root), {}
    for case in CASES:
        started = time.perf_counter()
        config = case_config(case, world_size)
        context = context_of(config)
        saved = save_then_continue(case, config, context, root_path / case)
        if case == "zero2":  # DeepSpeed's own (layout-bound) format, for the refusal test
            saved["engine"].engine.save_checkpoint(str(root_path / "deepspeed-native"), tag="global_step4")
        resumed = restore_and_continue(case, config, context, root_path / case)
        if rank == 0:
            torch.save({"state": saved["state"], "losses": saved["losses"]}, root_path / f"{case}.reference.pt")
        results[case] = {"step": resumed["step"], "layout_changed": resumed["layout_changed"],
                         "state_difference": max_difference(resumed["state"], saved["state"]),
                         "continued": saved["losses"], "resumed": resumed["losses"],
                         "seconds": time.perf_counter() - started}

    # A one-process checkpoint (the FSDP2 format) into ZeRO-3 at dp = 2.
    config = case_config("zero3", world_size)
    context = context_of(config)
    resumed = restore_and_continue("zero3", config, context, root_path / "one-process")
    reference = torch.load(root_path / "one-process.reference.pt")
    results["one-process->zero3"] = {"step": resumed["step"], "layout_changed": resumed["layout_changed"],
                                     "state_difference": max_difference(resumed["state"], reference["state"]),
                                     "continued": reference["losses"], "resumed": resumed["losses"]}
    # ... but not one whose parameters of one AdamW group took different numbers of steps.
    config = case_config("zero2", world_size)
    model, engine = build("zero2", config, context)
    results["step-mismatch"] = refusal(lambda: Checkpointer(root_path / "one-process-step-mismatch", to_dict(config),
                                                            model, engine, degrees=context.degrees).restore("auto"))

    # The real entry: a run that dies before its step-4 manifest resumes from step 2 like an uninterrupted run.
    config = case_config("zero2", world_size, "train.steps=4", "logging.log_every=1")
    metrics = {}
    for name, fault in (("uninterrupted", None), ("interrupted", "before_manifest@4"), ("interrupted", None)):
        run_dir = root_path / f"entry-{name}"
        run_dir.mkdir(exist_ok=True)
        os.environ.pop(FAULT_ENV, None)
        if fault:
            os.environ[FAULT_ENV] = fault
        try:
            run_training(config, run_dir, context_of(config), "auto")
        except InjectedCheckpointFault:
            assert fault is not None
        finally:
            os.environ.pop(FAULT_ENV, None)
        dist.barrier()
        metrics[name] = read_metrics(run_dir / "metrics.jsonl") if rank == 0 else None
    results["entry"] = metrics
    return results if rank == 0 else None


def _three_rank_job(rank: int, world_size: int, group: object, root: str) -> dict | None:
    root_path, results = Path(root), {}
    for source, target in ON_THREE_RANKS.items():
        started = time.perf_counter()
        config = case_config(target, world_size)
        context = context_of(config)
        resumed = restore_and_continue(target, config, context, root_path / source)
        reference = torch.load(root_path / f"{source}.reference.pt")
        results[source] = {"target": target, "step": resumed["step"], "layout_changed": resumed["layout_changed"],
                           "state_difference": max_difference(resumed["state"], reference["state"]),
                           "continued": reference["losses"], "resumed": resumed["losses"],
                           "seconds": time.perf_counter() - started}
    config = case_config("zero2", world_size, "model.dim=128")
    context = context_of(config)
    model, engine = build("zero2", config, context)
    results["other-model"] = refusal(lambda: Checkpointer(root_path / "zero2", to_dict(config), model, engine,
                                                          degrees=context.degrees).restore("auto"))
    return results if rank == 0 else None


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run directories; first a one-process run (the default engine) saved at step 2, and a copy of
    it in which one parameter's Adam step differs from its group's (it skipped a step)."""
    root = tmp_path_factory.mktemp("deepspeed-checkpoints")
    config = case_config(None, 1)
    saved = save_then_continue(None, config, ParallelContext.single_process(), root / "one-process")
    torch.save({"state": saved["state"], "losses": saved["losses"]}, root / "one-process.reference.pt")
    model, optimizer = saved["model"], saved["engine"]
    optimizer.state[model.output_weight]["step"] -= 1
    Checkpointer(root / "one-process-step-mismatch", to_dict(config), model, optimizer).save(4, data_cursor=24)
    return root


@pytest.fixture(scope="module")
def two_ranks(root: Path) -> dict:
    return run_distributed(_two_rank_job, 2, str(root), timeout=300)[0]


@pytest.fixture(scope="module")
def three_ranks(root: Path, two_ranks: dict) -> dict:
    return run_distributed(_three_rank_job, 3, str(root), timeout=300)[0]


# --------------------------------------------------------------------------------------------- tests
def test_flat_range_blocks_tile_the_range() -> None:
    """The rectangular blocks of any flat range, in order, are exactly that range of the tensor."""
    generator = torch.Generator().manual_seed(0)
    for shape in [(7,), (3, 5), (2, 3, 4), (4, 1, 6), (5, 2, 3, 2)]:
        values = torch.arange(torch.Size(shape).numel()).view(shape)
        for _ in range(40):
            start, stop = sorted(torch.randint(0, values.numel() + 1, (2,), generator=generator).tolist())
            pieces = []
            for offsets, sizes in flat_range_blocks(shape, start, stop):
                block = values
                for dimension, (offset, size) in enumerate(zip(offsets, sizes, strict=True)):
                    block = block.narrow(dimension, offset, size)
                pieces.append(block.reshape(-1))
            assert torch.equal(torch.cat(pieces) if pieces else torch.zeros(0, dtype=values.dtype),
                               torch.arange(start, stop)), (shape, start, stop)


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_same_layout_resume_is_exact(root: Path, two_ranks: dict, case: str) -> None:
    result = two_ranks[case]
    print(f"{case}: same layout, max |loss difference| after resume "
          f"{absolute_difference(result['resumed'], result['continued']):.1e} ({result['seconds']:.1f} s)")
    assert result["step"] == SAVED_AT and not result["layout_changed"]
    assert result["state_difference"] == 0.0
    assert result["resumed"] == result["continued"]
    # The uninterrupted DeepSpeed run itself trains like the one-process run (accumulation included).
    one_process = torch.load(root / "one-process.reference.pt")["losses"]
    assert relative_difference(result["continued"], one_process) <= TOLERANCE
    assert result["continued"][1] != result["continued"][0]  # it trained on


@pytest.mark.parametrize("case", list(CASES), ids=[f"{case}-to-dp3-{ON_THREE_RANKS[case]}" for case in CASES])
def test_resume_onto_three_ranks_and_another_stage(three_ranks: dict, case: str) -> None:
    result = three_ranks[case]
    difference = relative_difference(result["resumed"], result["continued"])
    print(f"{case} -> dp 3 {result['target']}: max |loss difference| after resume "
          f"{absolute_difference(result['resumed'], result['continued']):.1e} (relative {difference:.1e}; "
          f"{result['seconds']:.1f} s)")
    assert result["step"] == SAVED_AT and result["layout_changed"]
    assert result["state_difference"] == 0.0
    assert difference <= TOLERANCE


@pytest.mark.parametrize("case", list(CASES), ids=[f"{case}-to-one-process" for case in CASES])
def test_resume_onto_one_process(root: Path, two_ranks: dict, case: str) -> None:
    config = case_config(None, 1)
    resumed = restore_and_continue(None, config, ParallelContext.single_process(), root / case)
    reference = torch.load(root / f"{case}.reference.pt")
    difference = relative_difference(resumed["losses"], reference["losses"])
    print(f"{case} -> one process: max |loss difference| after resume "
          f"{absolute_difference(resumed['losses'], reference['losses']):.1e} (relative {difference:.1e})")
    assert resumed["step"] == SAVED_AT and resumed["layout_changed"]
    assert max_difference(resumed["state"], reference["state"]) == 0.0
    assert difference <= TOLERANCE


def test_one_process_checkpoint_resumes_in_deepspeed(two_ranks: dict) -> None:
    result = two_ranks["one-process->zero3"]
    print(f"one process -> dp 2 zero3: max |loss difference| after resume "
          f"{absolute_difference(result['resumed'], result['continued']):.1e}")
    assert result["step"] == SAVED_AT and result["layout_changed"]
    assert result["state_difference"] == 0.0
    assert relative_difference(result["resumed"], result["continued"]) <= TOLERANCE


def test_training_entry_resumes_like_an_uninterrupted_run(two_ranks: dict, root: Path) -> None:
    metrics = two_ranks["entry"]
    assert [record["step"] for record in metrics["uninterrupted"]] == [1, 2, 3, 4]
    assert [record["step"] for record in metrics["interrupted"]] == [1, 2, 3, 4]
    for resumed, expected in zip(metrics["interrupted"][2:], metrics["uninterrupted"][2:], strict=True):
        assert (resumed["loss"], resumed["grad_norm"], resumed["lr"]) == \
            (expected["loss"], expected["grad_norm"], expected["lr"])
    assert ckpt.main(["verify", str(root / "entry-interrupted")]) == 0


def test_unconvertible_checkpoints_are_refused_with_the_reason(root: Path, two_ranks: dict,
                                                               three_ranks: dict) -> None:
    assert "does not fit the model" in three_ranks["other-model"]
    assert "model.dim: 64 in the checkpoint, 128 now" in three_ranks["other-model"]
    assert "cannot convert this checkpoint to DeepSpeed" in two_ranks["step-mismatch"]
    assert "output.weight" in two_ranks["step-mismatch"] and "have optimizer step" in two_ranks["step-mismatch"]
    assert "parallel.dp_engine = 'fsdp'" in two_ranks["step-mismatch"]
    native = root / "deepspeed-native"
    for path in (native, native / "global_step4"):
        with pytest.raises(CheckpointError, match="DeepSpeed's own engine.save_checkpoint.*--resume never"):
            resolve_resume(root / "elsewhere", str(path))


def test_verify_reports_integrity_and_a_modified_shard_is_refused(root: Path, two_ranks: dict,
                                                                  capsys: pytest.CaptureFixture) -> None:
    for case in CASES:
        assert ckpt.main(["verify", str(root / case)]) == 0, case
    run_dir = root / "tampered"
    shutil.copytree(root / "zero3", run_dir)
    directory = run_dir / "checkpoints" / f"step_{SAVED_AT:08d}"
    shard = max(directory.glob("*.distcp"), key=lambda path: path.stat().st_size)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    capsys.readouterr()
    assert ckpt.main(["verify", str(directory)]) == ckpt.CORRUPT
    assert shard.name in capsys.readouterr().out
    with pytest.raises(ChecksumMismatchError, match=shard.name):
        resolve_resume(run_dir, str(directory))
    # Rewriting the manifest's hashes to match does not help: its HMAC tag no longer verifies.
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["files"][shard.name]["sha256"] = hashlib.sha256(bytes(data)).hexdigest()
    (directory / "manifest.json").write_text(json.dumps(manifest))
    assert ckpt.main(["verify", str(directory)]) == ckpt.UNVERIFIED_ORIGIN
    config = case_config(None, 1)
    model, optimizer = build(None, config, ParallelContext.single_process())
    with pytest.raises(CheckpointError, match="tag does not verify"):
        Checkpointer(run_dir, to_dict(config), model, optimizer).restore("auto")
