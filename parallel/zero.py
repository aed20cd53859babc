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
the trainer every step. Not supported (rejected by config validation): tp > 1.

Checkpoints: the engine is an ``EngineState`` of the one ``Checkpointer`` (same commit protocol, manifest
and signature as FSDP2 runs). It hands over, per parameter FQN, this rank's part of the fp32 master
weight and of each Adam moment (``FlatRange``: DeepSpeed's partitions split tensors at any element) and
the Adam step, in the entries ``get_state_dict`` gives for FSDP2. So a checkpoint of any ZeRO stage, with
or without offloading, resumes onto another dp x cp size, another stage, or FSDP2, and the reverse.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from spindle.parallel.layout import ParallelContext
from spindle.runtime.checkpoint import CheckpointError, FlatRange
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
    # DeepSpeed replaces the groups' parameters by its flat partitions: name them first (checkpoints).
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    group_names = [[names[id(parameter)] for parameter in group["params"]] for group in optimizer.param_groups]
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, mpu=unit,
                                           config=deepspeed_config(config, context, zero_overrides),
                                           dist_init_required=False)
    if config.parallel.zero_stage == 3:
        _gather_output_weight_for_the_loss(model)
    log.info("initialize_zero: DeepSpeed ZeRO-%d over dp x cp = %d ranks%s", config.parallel.zero_stage,
             unit.get_data_parallel_world_size(), ", optimizer offloaded to CPU" if config.parallel.offload_optimizer
             else "")
    return ZeroEngine(engine, config.train.grad_clip, config.parallel.zero_stage, group_names)


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


@dataclass(frozen=True)
class _Part:
    """This rank's part of one parameter in DeepSpeed's flat fp32 partitions."""

    name: str
    parameter: nn.Parameter
    shape: torch.Size
    start: int
    """Row-major index, in the whole parameter, of the first element held here."""
    length: int
    flat: torch.Tensor
    """The fp32 partition holding it: the wrapped AdamW's parameter, the key of its state."""
    offset: int
    """Where the part begins in ``flat``."""
    group: int
    """The AdamW parameter group."""

    def of(self, flat_like: torch.Tensor) -> torch.Tensor:
        """The part's elements of a tensor laid out like ``flat`` (the master weights, a moment)."""
        return flat_like.narrow(0, self.offset, self.length)


def _stage_1_2_parts(optimizer: Any, names: dict[int, str]) -> Iterator[_Part]:
    """ZeRO-1/2: each group's parameters are concatenated, padded and cut into equal partitions; a
    parameter's fragment mapping says which of its elements this rank's partition holds, and where."""
    for group, (parameters, flat) in enumerate(zip(optimizer.bit16_groups, optimizer.single_partition_of_fp32_groups,
                                                   strict=True)):
        for parameter in parameters:
            mapping = parameter._hp_mapping  # None: no element of this parameter in this rank's partition
            start, length, offset = ((0, 0, 0) if mapping is None else
                                     (mapping.lp_fragment_address.start, mapping.lp_fragment_address.numel,
                                      mapping.hp_fragment_address.start))
            yield _Part(names[id(parameter)], parameter, parameter.shape, start, length, flat, offset, group)


def _stage_3_parts(optimizer: Any, names: dict[int, str]) -> Iterator[_Part]:
    """ZeRO-3: every parameter is cut into equal partitions of ceil(numel / ranks) elements (the last one
    padded); each sub-group's fp32 partitions are concatenated in one flat tensor."""
    for sub_group, parameters in enumerate(optimizer.fp16_groups):
        flat = optimizer.fp32_partitioned_groups_flat[sub_group]
        for parameter in parameters:
            _, offset, size = optimizer.grad_position[optimizer.get_param_id(parameter)]
            start = dist.get_rank(group=parameter.ds_process_group) * size
            length = max(0, min(size, parameter.ds_numel - start))
            yield _Part(names[id(parameter)], parameter, parameter.ds_shape, start, length, flat, offset,
                        optimizer.sub_group_to_group_id[sub_group])


class ZeroEngine:
    """The trainer's engine calls (see ``spindle.runtime.trainer.TorchEngine``) on a DeepSpeed engine, and
    the ``EngineState`` the Checkpointer saves and loads through (see the module docstring)."""

    def __init__(self, engine: Any, grad_clip: float, zero_stage: int, group_names: list[list[str]]) -> None:
        self.engine = engine
        self.grad_clip = grad_clip  # DeepSpeed fixes the clipping threshold when it builds the optimizer
        self.device = next(engine.module.parameters()).device
        self.zero_stage = zero_stage
        self.micro_batches_done = 0
        """Backward calls since ``zero_grad``: the last of the step is DeepSpeed's accumulation boundary."""
        self.group_names = group_names
        """FQNs of each AdamW parameter group's parameters, in the client optimizer's order."""

    @property
    def optimizer(self) -> Any:
        """DeepSpeed's ZeRO optimizer (its param_groups are the wrapped AdamW's)."""
        return self.engine.optimizer

    def set_learning_rate(self, lr: float) -> None:
        set_learning_rate(self.engine.optimizer, lr)

    def zero_grad(self) -> None:
        self.engine.zero_grad()
        self.micro_batches_done = 0

    def backward(self, loss: torch.Tensor) -> None:
        # DeepSpeed counts accumulation by its step() calls, one per micro-batch; the trainer steps once
        # per optimizer step, so the boundary (reduce, then step) is set explicitly: the last micro-batch.
        self.micro_batches_done += 1
        self.engine.set_gradient_accumulation_boundary(
            self.micro_batches_done == self.engine.gradient_accumulation_steps())
        # DeepSpeed's engine.forward does this; the trainer calls the model's loss itself. Without it ZeRO-3
        # never advances its micro-step and overwrites, instead of adding, each micro-batch's gradients.
        new_micro_batch = getattr(self.engine.optimizer, "clear_backward_seen_flag", None)
        if new_micro_batch is not None:
            new_micro_batch()
        # The loss is already the micro-batch's share of the global-token mean: no 1/accumulation.
        self.engine.backward(loss, scale_wrt_gas=False)

    def clip_and_step(self, max_norm: float) -> torch.Tensor:
        """Reduce, clip to ``max_norm`` and step; the global gradient norm before clipping."""
        if max_norm != self.grad_clip:
            raise ValueError(f"clip_and_step: max_norm = {max_norm}, but this DeepSpeed engine was built with "
                             f"gradient_clipping = {self.grad_clip}; rebuild it to change train.grad_clip.")
        if self.micro_batches_done != self.engine.gradient_accumulation_steps():
            raise ValueError(f"clip_and_step after {self.micro_batches_done} micro-batches, but this DeepSpeed engine "
                             f"accumulates {self.engine.gradient_accumulation_steps()} per step (train.global_batch "
                             f"/ parallel.dp / train.micro_batch); call zero_grad, then backward once per micro-batch.")
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            raise RuntimeError("DeepSpeed did not compute the gradient norm of this step.")
        return torch.as_tensor(norm, dtype=torch.float32, device=self.device).detach()

    # -- checkpoints: the EngineState the Checkpointer saves and loads through ----------------------

    @property
    def _adam(self) -> torch.optim.Optimizer:
        """The wrapped AdamW: its parameters are DeepSpeed's flat fp32 partitions."""
        return self.engine.optimizer.optimizer

    def _parts(self) -> list[_Part]:
        names = {id(parameter): name for name, parameter in self.engine.module.named_parameters()}
        optimizer = self.engine.optimizer
        try:
            parts = list(_stage_3_parts(optimizer, names) if self.zero_stage == 3
                         else _stage_1_2_parts(optimizer, names))
        except (AttributeError, KeyError) as error:
            import deepspeed

            raise RuntimeError(f"DeepSpeed {deepspeed.__version__} lays out its ZeRO-{self.zero_stage} partitions "
                               f"differently from what spindle's checkpoints read ({error!r}); install the deepspeed "
                               f"version pyproject.toml names, or use parallel.dp_engine = 'fsdp'.") from error
        outside = sorted(set(names.values()) - {part.name for part in parts})
        if outside:
            raise CheckpointError(f"parameters {outside[:5]} are not in DeepSpeed's optimizer partitions (frozen?); "
                                  f"checkpoints of the DeepSpeed engine hold the optimizer's parameters only: keep "
                                  f"every parameter trainable, or use parallel.dp_engine = 'fsdp'.")
        return parts

    def _param_groups(self) -> list[dict[str, Any]]:
        """Each AdamW group's hyperparameters and its parameters' FQNs, as ``get_state_dict`` writes them."""
        adam = self._adam
        return [{**{key: value for key, value in group.items() if key in adam.defaults}, "params": list(names)}
                for group, names in zip(adam.param_groups, self.group_names, strict=True)]

    def state_for_save(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """This rank's parts of the fp32 master weights and Adam moments (views), and the Adam steps."""
        adam = self._adam
        model_state: dict[str, Any] = {}
        optimizer_state: dict[str, Any] = {}
        for part in self._parts():
            model_state[part.name] = FlatRange(part.shape, part.start, part.of(part.flat))
            state = adam.state.get(part.flat)
            if not state:
                raise CheckpointError("the DeepSpeed optimizer has no state to save yet (AdamW creates it at the "
                                      "first step): save after an optimizer step.")
            optimizer_state[part.name] = {
                key: FlatRange(part.shape, part.start, part.of(value)) if _per_element(value, part.flat) else value
                for key, value in state.items()}
        return model_state, {"state": optimizer_state, "param_groups": self._param_groups()}

    def state_for_load(self, saved: Metadata) -> tuple[dict[str, Any], dict[str, Any]]:
        """Destinations in DeepSpeed's own partitions, so loading writes in place: the master weights, and
        Adam's moments (created, zero, when the optimizer has not stepped yet)."""
        model_state: dict[str, Any] = {}
        optimizer_state: dict[str, Any] = {}
        for part in self._parts():
            model_state[part.name] = FlatRange(part.shape, part.start, part.of(part.flat))
            optimizer_state[part.name] = self._optimizer_destination(part, _saved_optimizer_entries(saved, part.name))
        return model_state, {"state": optimizer_state, "param_groups": self._param_groups()}

    def _optimizer_destination(self, part: _Part, saved: dict[str, Any]) -> dict[str, Any]:
        """Where the checkpoint's optimizer entries of ``part`` load: its moments into (views of) Adam's
        state, scalars (the step) into fresh tensors that ``finish_load`` applies."""
        state = self._adam.state.setdefault(part.flat, {})
        lacking = sorted(set(state) - set(saved))
        if not saved or lacking:
            raise CheckpointError(
                f"the checkpoint has no optimizer state {lacking or ''} for parameter {part.name} (it has "
                f"{sorted(saved)}): it was written with another optimizer setup and cannot be converted; resume "
                f"with the setup that wrote it, or start afresh with --resume never.")
        destination: dict[str, Any] = {}
        for key, entry in sorted(saved.items()):
            if not isinstance(entry, TensorStorageMetadata):
                raise CheckpointError(f"optimizer state {key} of parameter {part.name} is not a tensor in the "
                                      f"checkpoint; the DeepSpeed engine loads tensor optimizer states only (use "
                                      f"parallel.dp_engine = 'fsdp' to load this checkpoint).")
            if len(entry.size) == 0:
                destination[key] = torch.zeros((), dtype=entry.properties.dtype)
                continue
            if key not in state:
                state[key] = torch.zeros_like(part.flat)
            destination[key] = FlatRange(part.shape, part.start, part.of(state[key]))
        return destination

    def finish_load(self, model_state: dict[str, Any], optimizer_state: dict[str, Any]) -> None:
        """Set the Adam steps and hyperparameters, then refresh the model's weights from the loaded fp32
        master weights (collective over the dp x cp group)."""
        parts = self._parts()
        self._apply_scalars(parts, optimizer_state["state"])
        self._apply_param_groups(optimizer_state["param_groups"])
        if self.zero_stage == 3:
            _refresh_stage_3_weights(parts)
        else:
            self.engine.optimizer.update_lp_params()  # fp32 partitions -> model weights, all-gathered

    def _apply_scalars(self, parts: list[_Part], loaded: dict[str, dict[str, Any]]) -> None:
        """Adam's step: DeepSpeed keeps one per flat partition, so every parameter in it must agree."""
        values: dict[tuple[int, str], tuple[str, torch.Tensor]] = {}
        for part in parts:
            for key, value in loaded[part.name].items():
                if isinstance(value, FlatRange):
                    continue
                first, seen = values.setdefault((id(part.flat), key), (part.name, value))
                if not torch.equal(seen, value):
                    raise CheckpointError(
                        f"cannot convert this checkpoint to DeepSpeed: parameters {first} and {part.name} have "
                        f"optimizer {key} {seen.item()} and {value.item()}, but DeepSpeed keeps one {key} per "
                        f"partition of AdamW group {part.group}. Resume it with parallel.dp_engine = 'fsdp'.")
                state = self._adam.state[part.flat]
                current = state.get(key)
                state[key] = (value.to(current.device, current.dtype, copy=True) if torch.is_tensor(current)
                              else value.clone())

    def _apply_param_groups(self, saved_groups: list[dict[str, Any]]) -> None:
        """The checkpoint's hyperparameters, as torch's ``load_state_dict`` restores them for FSDP2 runs."""
        for index, (saved, names, group) in enumerate(zip(saved_groups, self.group_names, self._adam.param_groups,
                                                          strict=True)):
            if set(saved["params"]) != set(names):
                difference = sorted(set(saved["params"]) ^ set(names))
                raise CheckpointError(
                    f"cannot convert this checkpoint: AdamW parameter group {index} holds other parameters in the "
                    f"checkpoint than in this run (differing: {difference[:5]}); resume with the optimizer setup "
                    f"that wrote it, or start afresh with --resume never.")
            group.update({key: value for key, value in saved.items() if key != "params"})


def _saved_optimizer_entries(saved: Metadata, name: str) -> dict[str, Any]:
    """The checkpoint's optimizer state entries of parameter ``name`` (DCP flattens the nested dict to
    ``optimizer.state.<FQN>.<key>``), by key."""
    prefix = f"optimizer.state.{name}."
    return {entry_name[len(prefix):]: entry for entry_name, entry in saved.state_dict_metadata.items()
            if entry_name.startswith(prefix) and "." not in entry_name[len(prefix):]}


def _per_element(value: Any, flat: torch.Tensor) -> bool:
    """An optimizer state laid out like its flat partition (a moment), not a scalar (the step)."""
    return torch.is_tensor(value) and value.shape == flat.shape


def _refresh_stage_3_weights(parts: list[_Part]) -> None:
    """ZeRO-3 weights are partitions of their own (``ds_tensor``): copy the loaded fp32 partitions in, and
    gather the parameters DeepSpeed keeps whole (small ones, "persistent") again from them."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    for part in parts:
        partition = part.parameter.ds_tensor
        partition.data.copy_(part.flat.narrow(0, part.offset, partition.numel()))
    whole = [part.parameter for part in parts if part.parameter.ds_status == ZeroParamStatus.AVAILABLE]
    if whole:
        whole[0].partition(param_list=whole)  # drops the stale whole copies (the partitions are current)
        whole[0].all_gather(param_list=whole)
