"""Whole-model checks that only mean something on a CUDA GPU (run by `pytest -m gpu`, part of `make gpu-check`).

The kernel files test each op on the GPU; these tests check what the ops add up to: the hybrid model in bf16
autocast on the GPU against the same weights in float64 on the CPU (loss and every parameter gradient), and a
training step that never waits for the GPU (no host synchronization on the hot path).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from spindle.runtime.config import load_config
from spindle.runtime.model import HybridModel

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

TINY = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"
# both layer kinds, GQA, head_dim 32, several chunks of the linear-attention kernels
MODEL = ["model.layers=LA", "model.n_layers=2", "model.dim=128", "model.heads=4", "model.kv_heads=2",
         "model.vocab_size=256", "data.seq_len=1024"]


def _relative_rmse(value: torch.Tensor, reference: torch.Tensor) -> float:
    value, reference = value.detach().double().cpu(), reference.detach().double().cpu()
    return float((value - reference).norm() / reference.norm().clamp_min(1e-300))


def _loss_and_gradients(model: torch.nn.Module, tokens: torch.Tensor, labels: torch.Tensor,
                        precision: torch.dtype | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    with torch.autocast(tokens.device.type, dtype=precision or torch.float32, enabled=precision is not None):
        loss_sum, count = model.loss(tokens, labels)
    loss = loss_sum / count
    loss.backward()
    return loss.detach(), {name: parameter.grad for name, parameter in model.named_parameters()}


def test_hybrid_model_bf16_on_gpu_matches_float64():
    config = load_config(str(TINY), MODEL)
    torch.manual_seed(0)
    model = HybridModel(config.model)
    tokens = torch.randint(0, config.model.vocab_size, (2, config.data.seq_len + 1))
    reference_loss, reference_grads = _loss_and_gradients(copy.deepcopy(model).double(), tokens[:, :-1],
                                                          tokens[:, 1:], None)
    gpu_tokens = tokens.cuda()
    loss, grads = _loss_and_gradients(copy.deepcopy(model).cuda(), gpu_tokens[:, :-1], gpu_tokens[:, 1:],
                                      torch.bfloat16)
    assert torch.isfinite(loss) and abs(loss.item() - reference_loss.item()) <= 1e-2 * reference_loss.item()
    errors = {name: _relative_rmse(grads[name], reference_grads[name]) for name in reference_grads}
    worst = max(errors, key=errors.get)
    every = _relative_rmse(torch.cat([grads[n].flatten().double().cpu() for n in errors]),
                           torch.cat([reference_grads[n].flatten() for n in errors]))
    assert every < 5e-2, f"all gradients: relative RMSE {every:.3g} (worst {worst}: {errors[worst]:.3g})"
    assert errors[worst] < 0.2, f"{worst}: relative RMSE {errors[worst]:.3g}"


def test_train_step_does_not_synchronize_with_the_gpu():
    """After a warm-up step, a bf16 training step (forward, backward, clipping, AdamW) runs without a single
    synchronizing CUDA call: torch raises on the first one, naming it."""
    from spindle.parallel.layout import ParallelContext
    from spindle.runtime.optim import build_optimizer
    from spindle.runtime.trainer import train_step

    config = load_config(str(TINY), MODEL)
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = HybridModel(config.model).to(device)
    optimizer = build_optimizer(model, config.train)
    context = ParallelContext.single_process(device)
    tokens = torch.randint(0, config.model.vocab_size, (1, config.data.seq_len + 1), device=device)
    batch = [(tokens[:, :-1], tokens[:, 1:])]

    def step():
        return train_step(model, optimizer, batch, context, lr=config.train.lr, grad_clip=1.0,
                          precision=torch.bfloat16)

    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        result = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(torch.as_tensor(result.grad_norm)).item()
