"""The single-process trainer: global-token mean loss, accumulation, schedule, run directory contents."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from numerics import assert_tensors_close

from spindle.launch import report
from spindle.runtime.config import ConfigError, load_config, resolve
from spindle.runtime.data import IGNORE_INDEX, build_dataset
from spindle.runtime.main import train_entry
from spindle.runtime.metrics import read_metrics
from spindle.runtime.model import HybridModel
from spindle.runtime.optim import build_optimizer, learning_rate, uses_weight_decay
from spindle.runtime.tracking import RUN_ID_FILE, NullTracker, start_tracking
from spindle.parallel.layout import ParallelContext
from spindle.runtime.trainer import BatchProvider, train_step

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
METRIC_KEYS = {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "elapsed_s", "peak_mem_gb", "mfu"}


def tiny_config(*overrides: str):
    return resolve(load_config(TINY, list(overrides)))


# ---------------------------------------------------------------------------------------------
# one full run: loss, metrics, config.yaml, wandb offline, report
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    config = tiny_config("train.steps=60", "logging.wandb=offline")
    final = train_entry(config, str(run_dir), resume="never")
    return run_dir, final


def test_loss_decreases_on_the_recall_task(tiny_run: tuple[Path, dict]) -> None:
    run_dir, final = tiny_run
    losses = [record["loss"] for record in read_metrics(run_dir / "metrics.jsonl")]
    assert len(losses) == 60
    vocab, values = 32, (32 - 2) // 3
    assert abs(losses[0] - math.log(vocab)) < 0.3, "an untrained model is near uniform over the vocabulary"
    # Within 60 steps the model has at least learned that answers are value tokens (loss ~ ln 10).
    assert sum(losses[-10:]) / 10 < math.log(values) + 0.25 < losses[0] - 0.8
    assert final["step"] == 60 and final["loss"] == losses[-1]


def test_metrics_schema(tiny_run: tuple[Path, dict]) -> None:
    run_dir, _ = tiny_run
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [record["step"] for record in records] == list(range(1, 61))
    for record in records:
        assert set(record) == METRIC_KEYS
        assert record["tokens_per_s"] > 0 and record["elapsed_s"] > 0 and record["grad_norm"] > 0
        assert 0 < record["peak_mem_gb"] < 64 and record["lr"] > 0
        assert record["mfu"] is None  # CPU: no peak FLOPs to compare against
    assert records[-1]["tokens"] == 60 * 8 * 64
    assert records[4]["lr"] == pytest.approx(3e-3)  # end of the 5 warm-up steps
    assert [record["elapsed_s"] for record in records] == sorted(record["elapsed_s"] for record in records)


def test_resolved_config_is_written(tiny_run: tuple[Path, dict]) -> None:
    run_dir, _ = tiny_run
    written = load_config(run_dir / "config.yaml", [])
    assert written == tiny_config("train.steps=60", "logging.wandb=offline")
    assert written.train.micro_batch == 8 and written.parallel.dp == 1


def test_wandb_runs_offline_in_the_run_dir(tiny_run: tuple[Path, dict]) -> None:
    run_dir, _ = tiny_run
    run_id = (run_dir / RUN_ID_FILE).read_text().strip()
    offline_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1 and offline_runs[0].name.endswith(run_id)
    assert list(offline_runs[0].glob(f"run-{run_id}.wandb"))


def test_report_writes_png_plots(tiny_run: tuple[Path, dict]) -> None:
    run_dir, _ = tiny_run
    assert report.main([str(run_dir)]) == 0
    for name in ("loss.png", "throughput.png"):
        assert (run_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert report.main([str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert report.main([str(tmp_path)]) == 2
    assert "metrics.jsonl" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# the training step against an independent computation
# ---------------------------------------------------------------------------------------------
def reference_loss_and_gradients(model: HybridModel, tokens: torch.Tensor, labels: torch.Tensor):
    """Mean cross-entropy over all label tokens from full float64 logits, and its gradients."""
    model = model.double()
    hidden = model(tokens)  # [B, T, dim]
    logits = hidden @ model.output_weight.T  # [B, T, vocab]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX)
    gradients = torch.autograd.grad(loss, list(model.parameters()))
    model.float()
    names = ["grad_" + name for name, _ in model.named_parameters()]
    return loss.detach(), dict(zip(names, gradients))


@pytest.mark.parametrize("micro_batch", [8, 2, 1], ids=["one-micro-batch", "four-micro-batches", "eight-micro-batches"])
def test_step_is_the_global_token_mean_for_any_micro_batch(micro_batch: int) -> None:
    config = tiny_config(f"train.micro_batch={micro_batch}", "train.grad_clip=0")
    torch.manual_seed(0)
    model = HybridModel(config.model)
    dataset = build_dataset(config.data, config.model.vocab_size, seed=0)
    tokens, labels = dataset.batch(range(8))
    # Samples hold different numbers of labels only if the task varies them; make it so by dropping some.
    labels[:3, -4:] = IGNORE_INDEX
    reference_loss, reference_gradients = reference_loss_and_gradients(model, tokens, labels)

    micro_batches = [(tokens[start : start + micro_batch], labels[start : start + micro_batch])
                     for start in range(0, 8, micro_batch)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # keep parameters: compare gradients
    result = train_step(model, optimizer, micro_batches, ParallelContext.single_process(), lr=0.0, grad_clip=0.0, precision=None)

    assert float(result.loss) == pytest.approx(float(reference_loss), rel=1e-5)
    gradients = {"grad_" + name: parameter.grad for name, parameter in model.named_parameters()}
    assert_tensors_close(gradients, reference_gradients, 1e-4, f"micro_batch={micro_batch}")  # fp32 sums of 8 samples
    reference_norms = [torch.linalg.vector_norm(gradient) for gradient in reference_gradients.values()]
    reference_norm = torch.linalg.vector_norm(torch.stack(reference_norms))
    assert float(result.grad_norm) == pytest.approx(float(reference_norm), rel=1e-4)


def test_gradient_clipping_limits_the_norm() -> None:
    config = tiny_config()
    torch.manual_seed(0)
    model = HybridModel(config.model)
    batch = build_dataset(config.data, config.model.vocab_size, seed=0).batch(range(8))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    result = train_step(model, optimizer, [batch], ParallelContext.single_process(), lr=0.0, grad_clip=0.01, precision=None)
    clipped = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    assert float(result.grad_norm) > 0.01 and float(clipped) == pytest.approx(0.01, rel=1e-3)


def test_batch_provider_splits_the_global_batch_over_ranks() -> None:
    config = tiny_config()
    dataset = build_dataset(config.data, config.model.vocab_size, seed=0)
    whole = BatchProvider(dataset, global_batch=8, micro_batch=8)
    ranks = [BatchProvider(dataset, global_batch=8, micro_batch=2, dp_rank=rank, dp_size=2) for rank in range(2)]
    for step in (0, 3):
        expected_tokens, expected_labels = whole.micro_batches(step)[0]
        pieces = [batch for provider in ranks for batch in provider.micro_batches(step)]
        assert len(pieces) == 4
        assert torch.equal(torch.cat([tokens for tokens, _ in pieces]), expected_tokens)
        assert torch.equal(torch.cat([labels for _, labels in pieces]), expected_labels)
    assert list(whole.indices(3)) == list(range(24, 32))


# ---------------------------------------------------------------------------------------------
# optimizer, schedule, tracking
# ---------------------------------------------------------------------------------------------
def test_learning_rate_schedule() -> None:
    train = tiny_config("train.steps=100", "train.warmup_steps=10", "train.lr=1.0", "train.min_lr_ratio=0.1").train
    rates = [learning_rate(step, train) for step in range(100)]
    assert rates[:10] == pytest.approx([(step + 1) / 10 for step in range(10)])
    assert rates[10] == pytest.approx(1.0) and rates[-1] == pytest.approx(0.1)
    assert all(later <= earlier + 1e-12 for earlier, later in zip(rates[10:], rates[11:]))
    assert rates[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 45 / 89)))


def test_no_weight_decay_on_norms_biases_and_decays() -> None:
    config = tiny_config("model.decay=data")
    model = HybridModel(config.model)
    optimizer = build_optimizer(model, config.train)
    decayed = {id(parameter) for parameter in optimizer.param_groups[0]["params"]}
    assert optimizer.param_groups[0]["weight_decay"] == config.train.weight_decay
    assert optimizer.param_groups[1]["weight_decay"] == 0.0
    for name, parameter in model.named_parameters():
        expected = parameter.ndim >= 2 and "norm" not in name and "decay" not in name
        assert (id(parameter) in decayed) == expected == uses_weight_decay(name, parameter), name
    assert any("norm" in name for name, _ in model.named_parameters())


def test_tracking_disabled_is_a_null_object(tmp_path: Path) -> None:
    logging = tiny_config("logging.wandb=disabled").logging
    assert isinstance(start_tracking(logging, tmp_path, {}, is_main=True), NullTracker)
    offline = dataclasses.replace(logging, wandb="offline")
    assert isinstance(start_tracking(offline, tmp_path, {}, is_main=False), NullTracker)  # only rank 0 logs
    assert list(tmp_path.iterdir()) == []


def test_wandb_resume_keeps_the_run_id(tmp_path: Path) -> None:
    logging = tiny_config("logging.wandb=offline").logging
    first = start_tracking(logging, tmp_path, {"a": 1}, is_main=True)
    first.log({"loss": 1.0, "mfu": None}, step=1)
    first.finish()
    run_id = (tmp_path / RUN_ID_FILE).read_text().strip()
    second = start_tracking(logging, tmp_path, {"a": 1}, is_main=True, resuming=True)
    second.log({"loss": 0.5}, step=2)
    second.finish()
    assert (tmp_path / RUN_ID_FILE).read_text().strip() == run_id
    offline_runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert offline_runs and all(f"-{run_id}" in path.name for path in offline_runs)


# ---------------------------------------------------------------------------------------------
# entry point: errors before anything is written
# ---------------------------------------------------------------------------------------------
def test_world_size_mismatch_is_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun would set it, with a config for one process
    with pytest.raises(ConfigError, match=r"parallel.dp \* parallel.cp \* parallel.tp = 1 \* 1 \* 1 = 1, but the job has 2 workers"):
        train_entry(tiny_config(), str(tmp_path / "run"), "never")
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised on a machine without a GPU")
def test_use_gpu_true_without_a_gpu(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="launch.use_gpu = 'true'"):
        train_entry(tiny_config("launch.use_gpu=true"), str(tmp_path / "run"), "never")
    assert not (tmp_path / "run").exists()


def test_resume_truncates_metrics_past_the_checkpoint_and_a_torn_last_line(tmp_path: Path) -> None:
    from spindle.runtime.main import truncate_metrics

    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"ste', encoding="utf-8")
    truncate_metrics(tmp_path, 2)
    assert (tmp_path / "metrics.jsonl").read_text(encoding="utf-8") == '{"step": 1}\n{"step": 2}\n'
