"""DeepSpeed ZeRO as the alternative data-parallel engine (``parallel.dp_engine: deepspeed``).

    engine = initialize_zero(model, optimizer, context, config)    # after parallelize (no FSDP2)
    engine.set_learning_rate(lr); engine.zero_grad()
    engine.backward(loss)                                          # per micro-batch
    grad_norm = engine.clip_and_step(config.train.grad_clip)

The engine has the same four calls as the trainer's default ``TorchEngine`` (FSDP2 + AdamW), so
``train_step`` does not know which one runs. Gradient semantics match FSDP2's: DeepSpeed averages
gradients over its data-parallel group, which is spindle's flattened dp x cp group (weights are
replicated over cp, docs/algorithms.md §5), and the trainer multiplies each rank's loss by
``ParallelContext.gradient_scale`` (= dp·cp) exactly as for FSDP2. The optimizer is the trainer's own
AdamW (same parameter groups, same update), which ZeRO partitions; the learning rate is still set by
the trainer every step. Not supported (rejected by config validation): tp > 1, and checkpoints.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from spindle.parallel.layout import ParallelContext
from spindle.runtime.config import Config
from spindle.runtime.optim import set_learning_rate

log = logging.getLogger(__name__)

_NEVER_PRINT = 1 << 30  # DeepSpeed prints a progress line every steps_per_print steps; spindle has its own


class DataParallelUnit:
    """The part of Megatron's "mpu" interface DeepSpeed queries, answered from spindle's groups.

    DeepSpeed reduces and partitions over ``get_data_parallel_group``: here the flattened dp x cp
    group. The model-parallel group is this rank's tp group (size 1: DeepSpeed with tp > 1 is not
    supported). No sequence-parallel methods on purpose: with them DeepSpeed would divide the
    gradient by dp instead of dp·cp, which is not what the trainer's gradient scale assumes.
    """

    def __init__(self, data_parallel_group: dist.ProcessGroup, model_parallel_group: dist.ProcessGroup) -> None:
        self.data_parallel_group = data_parallel_group
        self.model_parallel_group = model_parallel_group

    def get_data_parallel_group(self) -> dist.ProcessGroup:
        return self.data_parallel_group

    def get_data_parallel_rank(self) -> int:
        return dist.get_rank(self.data_parallel_group)

    def get_data_parallel_world_size(self) -> int:
        return dist.get_world_size(self.data_parallel_group)

    def get_model_parallel_group(self) -> dist.ProcessGroup:
        return self.model_parallel_group

    def get_model_parallel_rank(self) -> int:
        return dist.get_rank(self.model_parallel_group)

    def get_model_parallel_world_size(self) -> int:
        return dist.get_world_size(self.model_parallel_group)


def deepspeed_config(config: Config, context: ParallelContext,
                     zero_overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The DeepSpeed config dict for a resolved spindle config (micro_batch filled in).

    Gradient accumulation: the trainer runs global_batch / dp / micro_batch micro-batches per step
    and scales their losses itself, so DeepSpeed is told that many accumulation steps (it then
    reduces and steps once per optimizer step) and ``backward`` passes ``scale_wrt_gas=False``.
    """
    parallel, train = config.parallel, config.train
    micro_batches = train.global_batch // context.degrees.dp // train.micro_batch
    zero: dict[str, Any] = {"stage": parallel.zero_stage, "contiguous_gradients": True, "overlap_comm": False}
    zero.update(zero_overrides or {})
    if parallel.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": context.device.type == "cuda"}
    return {
        "train_micro_batch_size_per_gpu": train.micro_batch,
        "gradient_accumulation_steps": micro_batches,
        # DeepSpeed counts every rank of its data-parallel group (dp x cp) as a batch holder.
        "train_batch_size": train.micro_batch * micro_batches * context.degrees.dp * context.degrees.cp,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": zero,
        # Mixed precision is the trainer's autocast over fp32 weights, as with FSDP2.
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        # The client optimizer is torch AdamW; with offloading it steps the CPU partitions.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": _NEVER_PRINT,
        "wall_clock_breakdown": False,
    }


def initialize_zero(model: nn.Module, optimizer: torch.optim.Optimizer, context: ParallelContext, config: Config,
                    *, zero_overrides: Mapping[str, Any] | None = None) -> "ZeroEngine":
    """Wrap ``model`` (cp/AC applied, no FSDP2) and its AdamW in a DeepSpeed ZeRO engine over dp x cp.

    ``zero_overrides``: extra entries of DeepSpeed's ``zero_optimization`` section (tuning knobs such as
    ``stage3_param_persistence_threshold``; tests set it to 0 so that ZeRO-3 partitions every parameter).
    """
    import deepspeed  # optional dependency: config validation checked that it imports

    if context.degrees.tp != 1:
        raise ValueError(f"initialize_zero: parallel.tp = {context.degrees.tp}, but the DeepSpeed engine supports "
                         f"tp = 1 only; use parallel.dp_engine = 'fsdp' with tensor parallelism.")
    if context.mesh is None:
        raise ValueError("initialize_zero: DeepSpeed needs an initialized process group (start the job with "
                         "torchrun or `spindle train`); use parallel.dp_engine = 'fsdp' for a single process.")
    # DeepSpeed insists on LOCAL_RANK; torchrun and Ray Train set it, a bare spawned process (tests) may not.
    os.environ.setdefault("LOCAL_RANK", str(context.device.index or 0))
    unit = DataParallelUnit(context.data_parallel_mesh.get_group(), context.group("tp"))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, mpu=unit,
                                           config=deepspeed_config(config, context, zero_overrides),
                                           dist_init_required=False)
    if config.parallel.zero_stage == 3:
        _gather_output_weight_for_the_loss(model)
    log.info("initialize_zero: DeepSpeed ZeRO-%d over dp x cp = %d ranks%s", config.parallel.zero_stage,
             unit.get_data_parallel_world_size(), ", optimizer offloaded to CPU" if config.parallel.offload_optimizer
             else "")
    return ZeroEngine(engine, config.train.grad_clip)


def _gather_output_weight_for_the_loss(model: nn.Module) -> None:
    """ZeRO-3 gathers a parameter only around the forward of the module that owns it, but the model's
    fused loss reads the output weight after the model's forward (it never calls ``model.output``).
    Registering it with the root module gathers it with the root's forward; marking it external (what
    DeepSpeed itself does for parameters that escape a forward) keeps it gathered through the loss
    and its backward, until the optimizer step partitions every parameter again. It costs the memory
    of one whole output weight per rank during forward and backward."""
    from deepspeed.runtime.zero.partition_parameters import register_external_parameter

    weight = model.output_weight
    register_external_parameter(model, weight)
    weight.is_external_param = True


class ZeroEngine:
    """The trainer's engine calls (see ``spindle.runtime.trainer.TorchEngine``) on a DeepSpeed engine."""

    def __init__(self, engine: Any, grad_clip: float) -> None:
        self.engine = engine
        self.grad_clip = grad_clip  # DeepSpeed fixes the clipping threshold when it builds the optimizer
        self.device = next(engine.module.parameters()).device

    @property
    def optimizer(self) -> Any:
        """DeepSpeed's ZeRO optimizer (its param_groups are the wrapped AdamW's)."""
        return self.engine.optimizer

    def set_learning_rate(self, lr: float) -> None:
        set_learning_rate(self.engine.optimizer, lr)

    def zero_grad(self) -> None:
        self.engine.zero_grad()

    def backward(self, loss: torch.Tensor) -> None:
        # The loss is already the micro-batch's share of the global-token mean: no 1/accumulation.
        self.engine.backward(loss, scale_wrt_gas=False)

    def clip_and_step(self, max_norm: float) -> torch.Tensor:
        """Reduce, clip to ``max_norm`` and step; the global gradient norm before clipping."""
        if max_norm != self.grad_clip:
            raise ValueError(f"clip_and_step: max_norm = {max_norm}, but this DeepSpeed engine was built with "
                             f"gradient_clipping = {self.grad_clip}; rebuild it to change train.grad_clip.")
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            raise RuntimeError("DeepSpeed did not compute the gradient norm of this step.")
        return torch.as_tensor(norm, dtype=torch.float32, device=self.device).detach()
