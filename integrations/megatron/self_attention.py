"""What spindle's Megatron self-attention replacements share ("L" and "R" layers of ``hybrid_block_spec``).

Megatron builds a ``self_attention`` submodule with (config, submodules, layer_number, cp_comm_type,
pg_collection) and calls it with its attention keyword arguments, expecting ``(output [s, b, h], bias)``.
``SpindleSelfAttention`` is that interface once: the process groups from ``pg_collection``, the CP scheme
of the linear-attention part, the column-parallel input and row-parallel output projections, and a
``forward`` that checks Megatron's arguments, calls the subclass's ``mix`` on this rank's tokens and
projects its heads back. Helpers for per-head work under tensor parallelism live here too.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig

from spindle.parallel.cp import lasp1, lasp2
from spindle.runtime.layers import RMSNorm

from .core_attention import check_scheme, context_parallel_group

LINEAR_SCHEMES = ("lasp2", "lasp1")
"""Context-parallel schemes of linear-attention layers (``cp_linear``)."""

_LINEAR_SCHEME_OPS: dict[str, Callable[..., torch.Tensor]] = {"lasp2": lasp2, "lasp1": lasp1}


class SpindleSelfAttention(MegatronModule):
    """Megatron's self-attention interface around a spindle token mixer.

    A subclass names its projections' dataclass (``submodules_type``, the default submodules), builds its
    layers in ``build`` (which receives the layer's own keyword options, e.g. from a ModuleSpec's params)
    and computes its heads in ``mix``. scheme: "lasp2" or "lasp1", the CP op of the layer's linear
    attention (``self.lasp``).
    """

    submodules_type: type

    def __init__(
        self,
        config: TransformerConfig,
        submodules: Any = None,
        layer_number: int = 1,
        cp_comm_type: str | None = None,
        pg_collection: ProcessGroupCollection | None = None,
        *,
        scheme: str = "lasp2",
        **options: Any,
    ) -> None:
        super().__init__(config=config)
        check_scheme("cp_linear", scheme, LINEAR_SCHEMES)
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        self.cp_group = context_parallel_group(pg_collection)
        self.tp_group = pg_collection.tp
        self.layer_number, self.scheme = layer_number, scheme
        self.lasp = _LINEAR_SCHEME_OPS[scheme]
        self.build(submodules or self.submodules_type(), **options)

    def build(self, submodules: Any, **options: Any) -> None:
        """Create the layer's modules from its submodule specs and options (config and groups are set)."""
        raise NotImplementedError

    def build_input_projection(self, spec: ModuleSpec | type, width: int) -> torch.nn.Module:
        """The column-parallel projection [s, b, h] -> [s, b, width] (the subclass names it, as Megatron's
        checkpoints do)."""
        config = self.config
        return build_module(
            spec, config.hidden_size, width, config=config, init_method=config.init_method, gather_output=False,
            bias=config.add_bias_linear or config.add_qkv_bias, skip_bias_add=False, is_expert=False,
            tp_comm_buffer_name="qkv", tp_group=self.tp_group)

    def build_output_projection(self, spec: ModuleSpec | type, heads_width: int) -> None:
        """``linear_proj``, row-parallel: the heads [s, b, heads_width] -> [s, b, h], its bias returned apart."""
        config = self.config
        self.linear_proj = build_module(
            spec, heads_width, config.hidden_size, config=config, init_method=config.output_layer_init_method,
            bias=config.add_bias_linear, input_is_parallel=True, skip_bias_add=True, is_expert=False,
            tp_comm_buffer_name="proj", tp_group=self.tp_group)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        key_value_states: torch.Tensor | None = None,
        inference_context: Any = None,
        rotary_pos_emb: Any = None,
        rotary_pos_cos: Any = None,
        rotary_pos_sin: Any = None,
        rotary_pos_cos_sin: Any = None,
        attention_bias: Any = None,
        packed_seq_params: Any = None,
        sequence_len_offset: Any = None,
        **unused: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """hidden_states [s, b, h] (this rank's tokens in Megatron's CP order) -> (output [s, b, h], bias)."""
        name = type(self).__name__
        if key_value_states is not None:
            raise NotImplementedError(f"{name} is a self-attention: key_value_states must be None")
        if inference_context is not None:
            raise NotImplementedError(
                f"{name} has no inference (KV-cache / recurrent-state) path yet; run it without inference_context")
        if packed_seq_params is not None:
            raise NotImplementedError(f"{name} does not support packed (THD) sequences; pass unpacked [s, b] batches")
        mixed = self.mix(hidden_states, rotary_pos_emb)  # [b, s, H_local, D]
        length, batch = hidden_states.shape[:2]
        return self.linear_proj(mixed.transpose(0, 1).reshape(length, batch, -1))

    def mix(self, hidden_states: torch.Tensor, rotary_pos_emb: Any) -> torch.Tensor:
        """hidden_states [s, b, h] -> the mixer's per-head output [b, s, H_local, D] (batch-first, as spindle's
        ops take their shards)."""
        raise NotImplementedError


def head_rms_norm(output: torch.Tensor, norm: RMSNorm, tp_group: torch.distributed.ProcessGroup) -> torch.Tensor:
    """RMSNorm over head_dim of [..., H, D] with one weight shared by all heads (as the native layers)."""
    weight = norm.weight
    if tp_group.size() > 1:
        # Each tensor-parallel rank normalizes different heads with the shared weight: its gradient
        # is the sum over ranks (identity forward, all-reduce backward).
        weight = copy_to_tensor_model_parallel_region(weight, group=tp_group)
    compute = output.float() if output.dtype in (torch.float16, torch.bfloat16) else output
    normed = compute * torch.rsqrt(compute.pow(2).mean(dim=-1, keepdim=True) + norm.eps)
    return normed.to(output.dtype) * weight.to(output.dtype)


def local_heads(heads: int, tp_group: torch.distributed.ProcessGroup,
                what: str = "num_attention_heads") -> tuple[int, int]:
    """(heads on this tensor-parallel rank, index of its first head)."""
    tp_size = tp_group.size()
    if heads % tp_size:
        raise ValueError(
            f"spindle's Megatron layers: {what}={heads} is not divisible by the tensor-parallel size {tp_size}; "
            f"pick a multiple of tensor_model_parallel_size"
        )
    local = heads // tp_size
    return local, tp_group.rank() * local
