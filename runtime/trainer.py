"""The per-process training loop.

    Trainer.fit
      for each step:  micro-batches of this rank's share of the global batch  (BatchProvider)
                      -> train_step: forward/backward per micro-batch, clip, AdamW step, through an
                         OptimizerEngine (TorchEngine for FSDP2 / TP / one process, ZeroEngine for DeepSpeed)
                      -> metrics.jsonl, wandb, progress bar on rank 0

The loss is the global-token mean: the sum of token losses over the whole global batch divided by
the number of label tokens in it (docs/algorithms.md §5), so the same global batch gives the same loss
and gradients however it is split into ranks and micro-batches.

Everything that depends on where this process sits in a parallel job goes through the
``ParallelContext`` (spindle.parallel.layout): it moves batches to the device, shards them over
context-parallel ranks, sums over the ranks that share the global batch and clips the global
gradient norm over sharded parameters.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

from spindle.runtime.config import Config
from spindle.runtime.data import IGNORE_INDEX, Dataset, PackedBatch
from spindle.runtime.metrics import (
    MetricsWriter,
    model_flops_utilization,
    peak_flops_per_second,
    peak_memory_gb,
)
from spindle.runtime.optim import learning_rate, set_learning_rate
from spindle.runtime.progress import ProgressDisplay
from spindle.runtime.tracking import NullTracker, Tracker

if TYPE_CHECKING:  # the trainer receives the layout; runtime/ never imports parallel/ at load time
    from spindle.parallel.layout import ParallelContext
    from spindle.runtime.checkpoint import Checkpointer
    from spindle.runtime.preemption import StopAgreement

Batch = tuple[torch.Tensor, torch.Tensor] | PackedBatch
"""(tokens [B, T], labels [B, T]), or a PackedBatch that adds the documents' cu_seqlens."""


class BatchProvider:
    """Micro-batches of one rank's share of each global batch.

    Step s uses global sample indices [s·G, (s+1)·G) with G = global_batch; data-parallel rank r takes
    the r-th contiguous slice of G / dp samples and splits it into micro-batches. Samples depend only
    on their index, so a resumed run and a run on another layout see exactly the same data.
    """

    def __init__(self, dataset: Dataset, global_batch: int, micro_batch: int, dp_rank: int = 0,
                 dp_size: int = 1) -> None:
        if global_batch % dp_size or (global_batch // dp_size) % micro_batch:
            raise ValueError(f"global_batch={global_batch} must split into dp_size={dp_size} ranks of whole "
                             f"micro-batches of micro_batch={micro_batch}")
        self.dataset, self.global_batch, self.micro_batch = dataset, global_batch, micro_batch
        self.per_rank = global_batch // dp_size
        self.dp_rank = dp_rank

    def indices(self, step: int) -> range:
        """This rank's global sample indices at ``step``."""
        start = step * self.global_batch + self.dp_rank * self.per_rank
        return range(start, start + self.per_rank)

    def micro_batches(self, step: int) -> list[Batch]:
        indices = self.indices(step)
        return [self.dataset.batch(indices[offset : offset + self.micro_batch])
                for offset in range(0, self.per_rank, self.micro_batch)]


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 for "bf16", and for "auto" on a GPU; None (plain fp32) otherwise."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@dataclass
class StepResult:
    loss: torch.Tensor
    """Global-token mean loss of the step (a scalar tensor; read it only when logging)."""
    grad_norm: torch.Tensor
    """Gradient norm before clipping."""
    lr: float


class OptimizerEngine(Protocol):
    """What ``train_step`` needs from the data-parallel engine; two implementations: ``TorchEngine``
    (plain, FSDP2- or TP-sharded model + AdamW) and ``spindle.parallel.zero.ZeroEngine`` (DeepSpeed)."""

    def set_learning_rate(self, lr: float) -> None: ...

    def zero_grad(self) -> None: ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def clip_and_step(self, max_norm: float) -> torch.Tensor:
        """Clip the global gradient norm to ``max_norm`` (0: measure only), step; the norm before clipping."""
        ...


class TorchEngine:
    """The default engine: autograd backward, the context's global-norm clipping over any mix of
    plain, FSDP2- and TP-sharded gradients, and a torch optimizer's step."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, context: ParallelContext) -> None:
        self.model, self.optimizer, self.context = model, optimizer, context

    def set_learning_rate(self, lr: float) -> None:
        set_learning_rate(self.optimizer, lr)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip_and_step(self, max_norm: float) -> torch.Tensor:
        grad_norm = self.context.clip_grad_norm(self.model.parameters(), max_norm)
        self.optimizer.step()
        return grad_norm


def as_engine(optimizer: "torch.optim.Optimizer | OptimizerEngine", model: nn.Module,
              context: ParallelContext) -> OptimizerEngine:
    """A torch optimizer becomes a ``TorchEngine``; an engine is used as it is."""
    if isinstance(optimizer, torch.optim.Optimizer):
        return TorchEngine(model, optimizer, context)
    return optimizer


def train_step(model: nn.Module, optimizer: "torch.optim.Optimizer | OptimizerEngine", micro_batches: list[Batch],
               context: ParallelContext, *, lr: float, grad_clip: float,
               precision: torch.dtype | None) -> StepResult:
    """One optimizer step over this rank's micro-batches of the global batch, through ``optimizer``: a
    torch optimizer (FSDP2 / plain data parallelism) or an ``OptimizerEngine`` such as DeepSpeed ZeRO."""
    engine = as_engine(optimizer, model, context)
    # This rank's part of every micro-batch (cp ranks keep their shard of each sequence). Count the
    # label tokens of the whole global batch first: each micro-batch's loss sum is divided by that
    # count, so accumulated gradients are those of the global-token mean.
    prepared = [context.prepare(*micro_batch) for micro_batch in micro_batches]
    # counted on the device: no host sync (the all-reduce is queued like any other kernel)
    local_count = torch.stack([(batch[1] != IGNORE_INDEX).sum() for batch in prepared]).sum().float()
    global_count = context.sum_over_batch_ranks(local_count).clamp_min(1.0)

    engine.set_learning_rate(lr)
    engine.zero_grad()
    loss_sum = torch.zeros((), device=context.device)
    for tokens, labels, positions, cu_seqlens in prepared:
        with _autocast(context.device, precision):
            micro_loss_sum, _ = (model.loss(tokens, labels, positions) if cu_seqlens is None
                                 else model.loss(tokens, labels, positions, cu_seqlens))
        # The data-parallel engines average gradients over dp x cp; gradient_scale turns that into a sum.
        engine.backward(micro_loss_sum * context.gradient_scale / global_count)
        loss_sum += micro_loss_sum.detach().float()

    # The norm before clipping, over every rank's gradient shards; grad_clip = 0 only measures it.
    grad_norm = engine.clip_and_step(grad_clip)
    return StepResult(loss=context.sum_over_batch_ranks(loss_sum) / global_count, grad_norm=grad_norm, lr=lr)


class Trainer:
    """Runs ``train.steps`` optimizer steps; the main rank writes metrics.jsonl, wandb and the progress bar."""

    def __init__(self, config: Config, model: nn.Module, optimizer: "torch.optim.Optimizer | OptimizerEngine",
                 batches: BatchProvider, context: ParallelContext, run_dir: str | Path,
                 tracker: Tracker | None = None, metrics: MetricsWriter | None = None,
                 checkpointer: "Checkpointer | None" = None, stop: "StopAgreement | None" = None) -> None:
        self.config, self.model = config, model
        self.stop = stop
        """Preemption: consulted at every step boundary (spindle.runtime.preemption)."""
        self.engine = as_engine(optimizer, model, context)
        self.checkpointer = checkpointer
        self.batches, self.context, self.run_dir = batches, context, Path(run_dir)
        self.tracker = tracker or NullTracker()
        self.metrics = metrics
        self.precision = autocast_dtype(config.train.precision, context.device)
        self.tokens_per_step = config.train.global_batch * config.data.seq_len
        self.flops_per_token = float(model.flops_per_token(config.data.seq_len))
        peak_per_device = peak_flops_per_second(context.device, self.precision or torch.float32)
        # tokens_per_s counts the whole job's tokens, so MFU compares against the whole job's peak.
        self.peak_flops = None if peak_per_device is None else peak_per_device * context.world_size

    def fit(self, start_step: int = 0) -> dict:
        """Train from ``start_step`` to ``train.steps``; returns the last metrics record."""
        train, log_every = self.config.train, self.config.logging.log_every
        progress = ProgressDisplay(train.steps, start_step,
                                   enabled=self.context.is_main and self.config.logging.progress)
        self.model.train()
        started = window_start = time.perf_counter()
        window_steps, last_record = 0, {}
        try:
            for step in range(start_step, train.steps):
                result = train_step(self.model, self.engine, self.batches.micro_batches(step), self.context,
                                    lr=learning_rate(step, train), grad_clip=train.grad_clip,
                                    precision=self.precision)
                window_steps += 1
                record = None
                if (step + 1) % log_every == 0 or step + 1 == train.steps:
                    now = time.perf_counter()
                    record = self._record(step + 1, result, window_steps / (now - window_start), now - started)
                    self._publish(record)
                    last_record, window_start, window_steps = record, time.perf_counter(), 0
                progress.advance(step + 1, record)
                # After the metrics line: a run that dies right after a commit has logged that step.
                saved = self.checkpointer is not None and self.checkpointer.maybe_save(
                    step + 1, data_cursor=(step + 1) * train.global_batch)
                if step + 1 < train.steps and self.stop is not None and self.stop.should_stop():
                    now = time.perf_counter()
                    return self._preempted(step + 1, result, record, saved,
                                           steps_per_s=window_steps / max(now - window_start, 1e-9),
                                           elapsed_s=now - started)
            if self.stop is not None:
                self.stop.finish()  # the reduction started at the last boundary (not on an error path)
        finally:
            progress.close()
        return last_record

    def _preempted(self, step: int, result: StepResult, record: dict | None, saved: bool, *,
                   steps_per_s: float, elapsed_s: float) -> dict:
        """Every rank agreed to stop after ``step``: commit a checkpoint there (unless this step's
        regular one just started) and return its record, marked ``preempted``."""
        self.stop.finish()
        if record is None:  # not a logging step: log it, so metrics.jsonl ends where the checkpoint is
            record = self._record(step, result, steps_per_s, elapsed_s)
            self._publish(record)
        if self.checkpointer is not None:
            if not saved:
                self.checkpointer.save(step, data_cursor=step * self.config.train.global_batch)
            self.checkpointer.wait()
        return {**record, "preempted": True, "checkpointed": self.checkpointer is not None}

    def _record(self, step: int, result: StepResult, steps_per_s: float, elapsed_s: float) -> dict:
        # the one host sync of a logged step (train_step itself makes none); other steps make none
        loss, grad_norm = torch.stack([result.loss.float(), result.grad_norm.float()]).tolist()
        if not math.isfinite(loss):
            raise FloatingPointError(f"the loss is {loss} at step {step}: training diverged; lower train.lr "
                                     f"(now {self.config.train.lr}) or raise train.warmup_steps.")
        tokens_per_s = steps_per_s * self.tokens_per_step
        return {
            "step": step,
            "loss": loss,
            "lr": result.lr,
            "grad_norm": grad_norm,
            "tokens": step * self.tokens_per_step,
            "tokens_per_s": tokens_per_s,
            "elapsed_s": elapsed_s,
            "peak_mem_gb": peak_memory_gb(self.context.device),
            "mfu": model_flops_utilization(self.flops_per_token, tokens_per_s, self.peak_flops),
        }

    def _publish(self, record: dict) -> None:
        if not self.context.is_main:
            return
        if self.metrics is not None:
            self.metrics.write(record)
        self.tracker.log(record, step=record["step"])
