"""Apply parallelism to a built HybridModel, in a fixed, logged order.

    parallelize(model, context, config)
        apply_tp    tensor parallelism: DTensor plans for both mixers and the MLP       (tp > 1)
        apply_cp    context parallelism: every token mixer gets the cp group + scheme   (cp > 1)
        apply_ac    activation checkpointing per layer kind                              (policy)
        apply_fsdp  FSDP2 over the flattened dp x cp mesh                               (dp·cp > 1)

The model file has no distributed code: these functions only set the mixers' ``sequence_op`` /
``attention_op`` hooks, distribute parameters, and wrap block forwards. Order matters: TP first (it
turns parameters into DTensors on the tp mesh), then the forward-changing wrappers, FSDP2 last (it
shards whatever placement it finds over dp x cp).
"""
from __future__ import annotations

import functools
import logging
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInputOutput,
    RowwiseParallel,
    parallelize_module,
)

from spindle.parallel import cp as context_parallel
from spindle.parallel.layout import ParallelContext
from spindle.runtime.config import ACTIVATION_CHECKPOINTING, Config, ParallelConfig
from spindle.runtime.layers import LinearAttention, RAttention, SlidingWindowAttention, SoftmaxAttention
from spindle.runtime.model import HybridModel

log = logging.getLogger(__name__)

# config value -> public function name in spindle.parallel.cp
LINEAR_SCHEMES = {"lasp2": "lasp2", "lasp1": "lasp1"}
SOFTMAX_SCHEMES = {"allgather": "allgather_attention", "ring": "ring_attention", "ulysses": "ulysses_attention"}


def parallelize(model: HybridModel, context: ParallelContext, config: Config, device_type: str) -> HybridModel:
    """Apply tp, cp, activation checkpointing and FSDP2 as the layout and config ask; log each step."""
    degrees = context.degrees
    if degrees.tp > 1:
        apply_tp(model, context.mesh["tp"])
    if degrees.cp > 1:
        apply_cp(model, context.group("cp"), config.parallel)
    if config.parallel.activation_checkpointing != "none":
        apply_ac(model, config.parallel.activation_checkpointing)
    if degrees.dp * degrees.cp > 1 and config.parallel.dp_engine == "fsdp":
        apply_fsdp(model, context, bf16=(device_type == "cuda" and config.train.precision != "fp32"))
    return model


# --------------------------------------------------------------------------------------------- tp
def apply_tp(model: HybridModel, tp_mesh) -> None:
    """Megatron-style plans: q/k/v/gate column-wise and output projections row-wise, so each rank
    owns whole heads; the per-head decay slopes are sliced with the heads. Embedding, final norm and
    the output layer stay replicated (the chunked loss works on local hidden states)."""
    tp_size, tp_rank = tp_mesh.size(), tp_mesh.get_local_rank()
    for block in model.layers:
        mixer = block.mixer
        plan = {"q_proj": ColwiseParallel(), "k_proj": ColwiseParallel(), "v_proj": ColwiseParallel(),
                "out_proj": RowwiseParallel()}
        if isinstance(mixer, LinearAttention):
            plan["gate_proj"] = ColwiseParallel()
            if mixer.decay_proj is not None:
                plan["decay_proj"] = ColwiseParallel()
            _shard_head_norm(mixer.output_norm, tp_mesh)
            if mixer.log_decay_slopes is not None:
                # heads % tp == 0 is a config rule, so every rank gets whole heads.
                mixer.log_decay_slopes = mixer.log_decay_slopes.chunk(tp_size)[tp_rank].clone()
        if isinstance(mixer, RAttention):
            _shard_head_norm(mixer.local_norm, tp_mesh)
            _shard_head_norm(mixer.residual_norm, tp_mesh)
        parallelize_module(mixer, tp_mesh, plan)
        parallelize_module(block.mlp, tp_mesh, {"gate_proj": ColwiseParallel(), "up_proj": ColwiseParallel(),
                                                "down_proj": RowwiseParallel()})
    log.info("apply_tp: %d blocks sharded over tp=%d (heads and MLP columns)", len(model.layers), tp_size)


def _shard_head_norm(norm: nn.Module, tp_mesh) -> None:
    """The per-head output norm of a linear mixer sees only this rank's heads, so its (replicated)
    weight gets a partial gradient on each tp rank. Running it on DTensors sharded over the head
    dimension lets DTensor sum that gradient over tp in backward."""
    for name, parameter in list(norm.named_parameters(recurse=False)):
        norm.register_parameter(name, nn.Parameter(
            torch.distributed.tensor.distribute_tensor(parameter.data, tp_mesh, [Replicate()])))
    parallelize_module(norm, tp_mesh, PrepareModuleInputOutput(
        input_layouts=(Shard(2),), desired_input_layouts=(Shard(2),), use_local_input=False,
        output_layouts=(Shard(2),), desired_output_layouts=(Shard(2),), use_local_output=True))


# --------------------------------------------------------------------------------------------- cp
def apply_cp(model: HybridModel, cp_group: dist.ProcessGroup, parallel: ParallelConfig) -> None:
    """Point every token mixer at its context-parallel scheme over ``cp_group``. Tokens, labels and
    positions are sharded with the same layout by the trainer's batch preparation."""
    linear_scheme = getattr(context_parallel, LINEAR_SCHEMES[parallel.cp_linear])
    softmax_scheme = getattr(context_parallel, SOFTMAX_SCHEMES[parallel.cp_softmax])
    linear_op = functools.partial(linear_scheme, group=cp_group, layout=parallel.cp_layout)
    softmax_op = functools.partial(softmax_scheme, group=cp_group, layout=parallel.cp_layout)
    for block in model.layers:
        if isinstance(block.mixer, LinearAttention):
            block.mixer.sequence_op = linear_op
        elif isinstance(block.mixer, SoftmaxAttention):
            block.mixer.attention_op = softmax_op
        elif isinstance(block.mixer, SlidingWindowAttention):
            # one halo exchange of the window's keys/values, whatever parallel.cp_softmax says
            block.mixer.attention_op = functools.partial(context_parallel.window_attention, group=cp_group,
                                                         layout=parallel.cp_layout)
        elif isinstance(block.mixer, RAttention):
            # both branches over one halo exchange; the residual branch's states go through cp_linear
            block.mixer.branch_op = functools.partial(context_parallel.rattention_branches, group=cp_group,
                                                      layout=parallel.cp_layout, lasp=linear_scheme)
    log.info("apply_cp: cp=%d layout=%s linear=%s softmax=%s", dist.get_world_size(cp_group), parallel.cp_layout,
             parallel.cp_linear, parallel.cp_softmax)


# --------------------------------------------------------------------------------------------- ac
AC_POLICIES = ACTIVATION_CHECKPOINTING  # policy -> recomputed layer kinds (runtime/config.py)


def apply_ac(model: HybridModel, policy: str) -> None:
    """Recompute the chosen blocks in backward: each sets ``DecoderBlock.recompute``, which runs its
    forward through torch.utils.checkpoint (non-reentrant). Modules and parameter names, and therefore
    checkpoints, do not change."""
    kinds = AC_POLICIES[policy]
    wrapped = 0
    for block in model.layers:
        block.recompute = block.kind in kinds
        wrapped += block.recompute
    log.info("apply_ac: policy=%s, %d of %d blocks recompute activations", policy, wrapped, len(model.layers))


# --------------------------------------------------------------------------------------------- fsdp
def apply_fsdp(model: HybridModel, context: ParallelContext, *, bf16: bool) -> None:
    """FSDP2 over dp x cp (weights are replicated over cp, docs/algorithms.md §5): one unit per block,
    then the root. FSDP2 averages gradients over dp x cp; the trainer scales each rank's loss by
    ``ParallelContext.gradient_scale`` (= dp·cp) so that average is the gradient of the global-token
    mean. (A divide factor of 1 would say the same, but needs PREMUL_SUM, which gloo lacks.)"""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = context.data_parallel_mesh
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
        else MixedPrecisionPolicy()
    for block in model.layers:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    log.info("apply_fsdp: FSDP2 over dp x cp = %d ranks (%s)", mesh.size(), "bf16 params" if bf16 else "fp32")

