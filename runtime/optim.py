"""AdamW with decoupled weight decay on matrices only, and the warm-up + cosine learning-rate schedule."""
from __future__ import annotations

import math

import torch
from torch import nn

from spindle.runtime.config import TrainConfig


def uses_weight_decay(name: str, parameter: torch.Tensor) -> bool:
    """Weight decay shrinks matrices toward zero; norms' gains, biases and (log-)decay parameters are
    scales and offsets whose zero is meaningless, so they are left alone."""
    return parameter.ndim >= 2 and "decay" not in name and "norm" not in name


def build_optimizer(model: nn.Module, train: TrainConfig) -> torch.optim.AdamW:
    """AdamW with two parameter groups: matrices with ``train.weight_decay``, everything else without."""
    decayed, not_decayed = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (decayed if uses_weight_decay(name, parameter) else not_decayed).append(parameter)
    groups = [{"params": decayed, "weight_decay": train.weight_decay},
              {"params": not_decayed, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=train.lr, betas=(train.beta1, train.beta2))


def learning_rate(step: int, train: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up to ``train.lr`` over
    ``warmup_steps`` steps, then a cosine decay to ``min_lr_ratio · lr`` at the last step.

    A pure function of the step, so resuming needs no scheduler state.
    """
    if step < train.warmup_steps:
        return train.lr * (step + 1) / train.warmup_steps
    decay_steps = max(train.steps - 1 - train.warmup_steps, 1)
    progress = min((step - train.warmup_steps) / decay_steps, 1.0)
    minimum = train.lr * train.min_lr_ratio
    return minimum + (train.lr - minimum) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_learning_rate(optimizer: torch.optim.Optimizer, value: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = value
