"""Sharded checkpoints: round trip, commit protocol, integrity, compatibility checks, resharding.

Real files in tmp_path, real torch.distributed.checkpoint, the real HybridModel and AdamW; the
resharding tests run FSDP2 over 2 gloo ranks and load on 1 rank (and the reverse).
"""
from __future__ import annotations

import copy
import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from distributed_utils import run_distributed

from spindle.launch import ckpt
from spindle.parallel.layout import ParallelContext, ParallelDegrees
from spindle.runtime import checkpoint
from spindle.runtime.checkpoint import (
    CheckpointError,
    Checkpointer,
    ChecksumMismatchError,
    InjectedCheckpointFault,
    list_checkpoints,
    read_latest,
    read_manifest,
    resolve_resume,
)
from spindle.runtime.config import Config, ModelConfig
from spindle.runtime.model import HybridModel
from spindle.runtime.optim import build_optimizer

VOCAB = 32


def make_config(dim: int = 32, every: int = 1, keep: int = 2, async_save: bool = False, dp: int = 1,
                global_batch: int = 4) -> Config:
    config = Config(model=ModelConfig(layers="LA", n_layers=2, dim=dim, heads=2, kv_heads=1, vocab_size=VOCAB))
    config.checkpoint.every, config.checkpoint.keep, config.checkpoint.async_save = every, keep, async_save
    config.parallel.dp, config.train.global_batch, config.train.seed = dp, global_batch, 7
    return config


def build(config: Config, seed: int) -> tuple:
    """Model and AdamW (the trainer computes the LR per step: no scheduler state to checkpoint)."""
    torch.manual_seed(seed)
    model = HybridModel(config.model)
    return model, build_optimizer(model, config.train)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: int = 2) -> float:
    """One step whose data depends on all three global generators, so a wrong RNG restore shows up."""
    tokens = torch.randint(0, VOCAB, (batch, 16))
    tokens = (tokens + random.randrange(VOCAB) + int(np.random.randint(VOCAB))) % VOCAB
    loss_sum, count = model.loss(tokens, tokens.roll(-1, dims=1))
    (loss_sum / count).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum.item()


def assert_same_state(left, right, where: str = "") -> None:
    """Bitwise equality of nested state (tensors compared with torch.equal, dtype included)."""
    if isinstance(left, torch.Tensor):
        assert isinstance(right, torch.Tensor) and left.dtype == right.dtype, where
        assert torch.equal(left, right), f"{where} differs"
    elif isinstance(left, dict):
        assert set(left) == set(right), f"{where}: keys {sorted(set(left) ^ set(right))} differ"
        for key in left:
            assert_same_state(left[key], right[key], f"{where}.{key}")
    elif isinstance(left, (list, tuple)):
        assert len(left) == len(right), where
        for index, (a, b) in enumerate(zip(left, right)):
            assert_same_state(a, b, f"{where}[{index}]")
    else:
        assert left == right, f"{where}: {left!r} != {right!r}"


def save_steps(run_dir: Path, config: Config, steps: list[int]) -> tuple:
    model, optimizer = build(config, seed=0)
    checkpointer = Checkpointer(run_dir, config, model, optimizer)
    for step in steps:
        train_step(model, optimizer)
        checkpointer.save(step, data_cursor=4 * step)
    checkpointer.close()
    return model, optimizer, checkpointer


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:08d}"


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_round_trip_is_bit_exact(tmp_path: Path, async_save: bool) -> None:
    config = make_config(async_save=async_save)
    model, optimizer = build(config, seed=0)
    for _ in range(2):
        train_step(model, optimizer)
    checkpointer = Checkpointer(tmp_path, config, model, optimizer)
    random.seed(11)  # the save must capture these exact streams
    saved_model, saved_optimizer = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    checkpointer.save(2, data_cursor=8)
    # Training continues while an asynchronous save is still writing: the checkpoint must hold step 2.
    reference_losses = [train_step(model, optimizer) for _ in range(3)]
    checkpointer.close()

    fresh_model, fresh_optimizer = build(config, seed=1)
    resumed = Checkpointer(tmp_path, config, fresh_model, fresh_optimizer).restore("auto")
    assert (resumed.step, resumed.data_cursor) == (2, 8)
    assert not resumed.layout_changed
    assert_same_state(fresh_model.state_dict(), saved_model, "model")
    assert_same_state(fresh_optimizer.state_dict(), saved_optimizer, "optimizer")
    losses = [train_step(fresh_model, fresh_optimizer) for _ in range(3)]
    assert losses == reference_losses
    assert_same_state(fresh_model.state_dict(), model.state_dict(), "model after 3 more steps")
    assert_same_state(fresh_optimizer.state_dict(), optimizer.state_dict(), "optimizer after 3 more steps")


def test_manifest_records_the_run(tmp_path: Path) -> None:
    config = make_config()
    save_steps(tmp_path, config, [3])
    directory = step_dir(tmp_path, 3)
    manifest = read_manifest(directory)
    assert manifest["step"] == 3 and manifest["data_cursor"] == 12
    assert manifest["layout"] == {"dp": 1, "cp": 1, "tp": 1, "world_size": 1}
    assert manifest["config"]["model"]["dim"] == 32 and manifest["config"]["train"]["seed"] == 7
    assert manifest["versions"]["torch"] == torch.__version__
    on_disk = {path.name for path in directory.iterdir()} - {"manifest.json"}
    assert set(manifest["files"]) == on_disk and {".metadata", "rng_rank0.pt"} <= on_disk
    assert all(len(entry["sha256"]) == 64 for entry in manifest["files"].values())
    assert manifest["shapes"]["embedding.weight"] == [config.model.vocab_size, 32]
    assert manifest["auth"]["scheme"] == "hmac-sha256" and len(manifest["auth"]["tag"]) == 64
    assert read_latest(tmp_path) == directory
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000003"


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_fault_before_manifest_keeps_previous_checkpoint(tmp_path: Path, monkeypatch, caplog,
                                                         async_save: bool) -> None:
    config = make_config(keep=1, async_save=async_save)
    model, optimizer = build(config, seed=0)
    checkpointer = Checkpointer(tmp_path, config, model, optimizer)
    train_step(model, optimizer)
    checkpointer.save(1, data_cursor=4)
    checkpointer.wait()
    monkeypatch.setenv(checkpoint.FAULT_ENV, "before_manifest@2")
    train_step(model, optimizer)
    with pytest.raises(InjectedCheckpointFault):
        checkpointer.save(2, data_cursor=8)
        checkpointer.wait()  # an asynchronous save fails here, on the training thread
    # The shards of step 2 are on disk, but without a manifest it is not a checkpoint.
    assert any(path.suffix == ".distcp" for path in step_dir(tmp_path, 2).iterdir())
    assert not (step_dir(tmp_path, 2) / "manifest.json").exists()
    assert read_latest(tmp_path) == step_dir(tmp_path, 1)
    assert (step_dir(tmp_path, 1) / "manifest.json").exists()  # keep=1 did not delete the last good one
    with caplog.at_level(logging.WARNING, logger="spindle.runtime.checkpoint"):
        assert resolve_resume(tmp_path, "auto") == step_dir(tmp_path, 1)
    assert "step_00000002" in caplog.text and "did not complete" in caplog.text
    assert [info.step for info in list_checkpoints(tmp_path)] == [1]

    # The next good save commits, then prunes both the old checkpoint and the incomplete directory.
    train_step(model, optimizer)
    checkpointer.save(3, data_cursor=12)
    checkpointer.close()
    assert sorted(path.name for path in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_00000003"]


def test_retention_keeps_the_newest(tmp_path: Path) -> None:
    save_steps(tmp_path, make_config(keep=2), [1, 2, 3, 4])
    assert [info.step for info in list_checkpoints(tmp_path)] == [3, 4]
    assert read_latest(tmp_path) == step_dir(tmp_path, 4)


def flip_bytes(path: Path, offset: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupt_shard_is_named_and_auto_resume_falls_back(tmp_path: Path, caplog) -> None:
    config = make_config()
    save_steps(tmp_path, config, [1, 2])
    shard = max(step_dir(tmp_path, 2).glob("*.distcp"), key=lambda path: path.stat().st_size)
    flip_bytes(shard)
    with pytest.raises(ChecksumMismatchError, match=shard.name):
        resolve_resume(tmp_path, str(step_dir(tmp_path, 2)))
    with caplog.at_level(logging.WARNING, logger="spindle.runtime.checkpoint"):
        assert resolve_resume(tmp_path, "auto") == step_dir(tmp_path, 1)
    assert shard.name in caplog.text
    model, optimizer = build(config, seed=1)
    assert Checkpointer(tmp_path, config, model, optimizer).restore("auto").step == 1
    flip_bytes(step_dir(tmp_path, 1) / "rng_rank0.pt", offset=10)
    with pytest.raises(CheckpointError, match="every committed checkpoint"):
        resolve_resume(tmp_path, "auto")


def test_resolve_resume_modes_and_errors(tmp_path: Path) -> None:
    assert resolve_resume(tmp_path, "never") is None
    assert resolve_resume(tmp_path, "auto") is None  # nothing saved yet: start from scratch
    with pytest.raises(CheckpointError, match="no such file"):
        resolve_resume(tmp_path, str(tmp_path / "missing"))
    incomplete = step_dir(tmp_path, 5)
    incomplete.mkdir(parents=True)
    with pytest.raises(CheckpointError, match="not a committed checkpoint"):
        resolve_resume(tmp_path, str(incomplete))
    with pytest.raises(ValueError, match="resume"):
        resolve_resume(tmp_path, "")
    other_run = tmp_path / "other"
    save_steps(other_run, make_config(), [1, 2])
    assert resolve_resume(tmp_path, str(other_run)) == step_dir(other_run, 2)  # a run dir means its latest


def test_shape_mismatch_names_the_parameter(tmp_path: Path) -> None:
    save_steps(tmp_path, make_config(dim=32), [1])
    wider = make_config(dim=64)
    model, optimizer = build(wider, seed=0)
    with pytest.raises(CheckpointError, match=r"embedding\.weight has shape \(32, 32\) in the checkpoint and "
                                              r"\(32, 64\) in this model") as error:
        Checkpointer(tmp_path, wider, model, optimizer).restore("auto")
    assert "model.dim: 32 in the checkpoint, 64 now" in str(error.value)


def test_ckpt_ls_lists_committed_checkpoints(tmp_path: Path, capsys) -> None:
    save_steps(tmp_path, make_config(keep=3), [1, 2])
    step_dir(tmp_path, 3).mkdir()  # an interrupted save: not listed
    assert ckpt.main(["ls", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line for line in lines if "step_0000000" in line and "dp=" in line]
    assert len(rows) == 2 and "step_00000003" not in "\n".join(lines[:-1])
    assert rows[0].split()[:4] == ["1", "dp=1", "cp=1", "tp=1"]
    assert rows[1].startswith("*") and rows[1].split()[1] == "2"
    size = sum(entry["bytes"] for entry in read_manifest(step_dir(tmp_path, 2))["files"].values())
    assert ckpt.format_size(size) in rows[1]
    assert ckpt.main(["verify", str(tmp_path)]) == 0
    flip_bytes(step_dir(tmp_path, 2) / ".metadata", offset=5)
    assert ckpt.main(["verify", str(tmp_path)]) == 1
    capsys.readouterr()
    # ls marks what --resume auto really loads: the damaged latest is skipped for step 1.
    assert ckpt.main(["ls", str(tmp_path)]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if "dp=" in line]
    assert rows[0].startswith("*") and rows[0].split()[1] == "1", rows
    assert not rows[1].startswith("*") and rows[1].endswith("CORRUPT"), rows
    assert ckpt.main(["ls", str(tmp_path / "missing")]) == 2
    assert "not a directory" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# Resharding across layouts (FSDP2 over gloo)
# ----------------------------------------------------------------------------------------------

def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Unsharded model and optimizer state keyed by FQN (a collective under FSDP2)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model_state, optimizer_state = get_state_dict(
        model, optimizer, options=StateDictOptions(full_state_dict=True))  # every rank gets it all
    return {"model": model_state, "optimizer": optimizer_state["state"]}


def build_sharded(config: Config, seed: int) -> tuple[HybridModel, torch.optim.Optimizer, ParallelDegrees]:
    """The tiny model with FSDP2 over the flattened dp x cp mesh of the real parallel layout."""
    from torch.distributed.fsdp import fully_shard

    degrees = ParallelDegrees.resolve(config.parallel.dp, 1, 1, torch.distributed.get_world_size())
    context = ParallelContext.build(degrees, torch.device("cpu"))
    torch.manual_seed(seed)
    model = HybridModel(config.model)
    for block in model.layers:
        fully_shard(block, mesh=context.data_parallel_mesh)
    fully_shard(model, mesh=context.data_parallel_mesh)
    return model, build_optimizer(model, config.train), degrees


def _two_rank_phase(rank: int, world_size: int, group, one_rank_run: str, two_rank_run: str) -> None:
    config = make_config(dp=2, global_batch=4)
    # 1 -> 2 ranks: the single-process checkpoint reshards onto FSDP2 shards.
    model, optimizer, degrees = build_sharded(config, seed=3)
    resumed = Checkpointer(one_rank_run, config, model, optimizer, degrees=degrees).restore("auto")
    assert resumed.step == 2 and resumed.layout_changed
    assert_same_state(full_state(model, optimizer), torch.load(Path(one_rank_run) / "reference.pt"), "1 -> 2")

    # A 2-rank run saves asynchronously while training goes on.
    config.checkpoint.async_save = True
    model, optimizer, degrees = build_sharded(config, seed=0)
    checkpointer = Checkpointer(two_rank_run, config, model, optimizer, degrees=degrees)
    torch.manual_seed(100 + rank)  # each rank draws its own half of the global batch
    for _ in range(2):
        train_step(model, optimizer, batch=2)
    reference = full_state(model, optimizer)
    if rank == 0:
        torch.save(reference, Path(two_rank_run) / "reference.pt")
    checkpointer.save(2, data_cursor=8)
    expected_random = torch.rand(4)  # the RNG stream right after the save, different on each rank
    train_step(model, optimizer, batch=2)  # FSDP collectives while the writer thread saves
    checkpointer.close()

    # Same layout: state and per-rank RNG streams come back exactly.
    torch.manual_seed(0)
    resumed = checkpointer.restore("auto")
    assert resumed.step == 2 and not resumed.layout_changed
    assert torch.equal(torch.rand(4), expected_random)
    assert_same_state(full_state(model, optimizer), reference, "2 -> 2")


@pytest.mark.slow
def test_resharding_between_one_and_two_ranks(tmp_path: Path) -> None:
    one_rank_run, two_rank_run = tmp_path / "one_rank", tmp_path / "two_ranks"
    config = make_config(global_batch=4)
    model, optimizer = build(config, seed=0)
    for _ in range(2):
        train_step(model, optimizer, batch=4)
    Checkpointer(one_rank_run, config, model, optimizer).save(2, data_cursor=8)
    torch.save(full_state(model, optimizer), one_rank_run / "reference.pt")
    two_rank_run.mkdir()

    run_distributed(_two_rank_phase, 2, str(one_rank_run), str(two_rank_run))

    # 2 -> 1 rank: a change of dp needs the same global batch ...
    assert read_manifest(step_dir(two_rank_run, 2))["layout"]["dp"] == 2
    bigger_batch = make_config(global_batch=8)
    model, optimizer = build(bigger_batch, seed=1)
    with pytest.raises(CheckpointError, match=r"parallel\.dp=2 and train\.global_batch=4.*parallel\.dp=1 "
                                              r"and train\.global_batch=8"):
        Checkpointer(two_rank_run, bigger_batch, model, optimizer).restore("auto")
    # ... and then model and optimizer state come back whole from the shards.
    model, optimizer = build(config, seed=1)
    resumed = Checkpointer(two_rank_run, config, model, optimizer).restore("auto")
    assert resumed.step == 2 and resumed.layout_changed
    assert_same_state(full_state(model, optimizer), torch.load(two_rank_run / "reference.pt"), "2 -> 1")
    # The layout changed, so the generators were reseeded from (seed, step, rank).
    drawn = torch.rand(4), random.random(), np.random.rand()
    checkpoint.reseed_rng(config.train.seed, 2, 0)
    assert torch.equal(drawn[0], torch.rand(4)) and drawn[1:] == (random.random(), np.random.rand())


def test_resume_with_another_global_batch_warns(capsys: pytest.CaptureFixture) -> None:
    from spindle.runtime.main import warn_if_data_moved

    assert not warn_if_data_moved(8, 2, 4) and capsys.readouterr().err == ""
    assert warn_if_data_moved(8, 2, 8)  # batches are read by step: 8..15 would never be trained on
    assert "samples 8..15 are skipped" in capsys.readouterr().err
    assert warn_if_data_moved(8, 2, 2)
    assert "samples 4..7 are seen twice" in capsys.readouterr().err
