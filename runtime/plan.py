"""The planner behind `spindle plan`: memory, communication, FLOPs and step time of a config.

Everything is per GPU (per rank) unless a name says otherwise. What can be read off the code is read off
it: parameter counts come from HybridModel built on the meta device (no memory, no initialization) and
hardware FLOPs from PyTorch's FlopCounterMode over one forward+backward of that meta model at two short
lengths, fitted per token as a + b·T (`counted_flops`). Peak FLOP/s and bandwidths come from
runtime/hardware.py; the time estimate divides work by peak × a stated achievable fraction. The
context-parallel communication is priced by one cost model (`cp_layer_cost`, also behind `spindle bench
cp`; assumptions in docs/algorithms.md). The remaining assumptions are about the GPU run:

- parameters, gradients and AdamW's two moments are fp32 (4 + 4 + 8 bytes per parameter); "bf16"
  (and "auto", since the plan is for a GPU) runs the forward under bf16 autocast (runtime/trainer.py).
  With FSDP2 over more than one replica (dp·cp > 1) parallel/parallelize.py adds a bf16
  MixedPrecisionPolicy: the forward then sees bf16 weights and the residual stream is bf16. Otherwise
  (one replica, or DeepSpeed) the weights stay fp32, the residual stream is fp32 and autocast keeps a
  bf16 copy of every matmul weight and a bf16 cast of every matmul input;
- both data-parallel engines shard over the dp × cp replicas (weights are replicated over cp,
  docs/design.md; parallel/parallelize.py's FSDP2 mesh);
- tensor parallelism shards the blocks' heads and MLP width; embedding, output layer and norms stay
  replicated, and activations on the residual stream are not split (no sequence parallelism);
- the token mixers run the kernels "auto" picks on the GPU (kernel_backends: flash-attn for softmax
  layers, the Triton chunked kernel for linear ones); what they keep for backward is read off them;
- all-gather attention re-gathers K/V in the backward pass and reduce-scatters fp32 dK/dV, ring
  attention carries fp32 dK/dV around the ring, so both move about 3× the forward bytes backward;
- a checkpointed layer keeps only its input and recomputes the rest (and repeats its forward
  communication) during the backward pass; memory counts every saved tensor once;
- packed documents (``data.packing = "documents"``) change none of these numbers: a batch adds
  cu_seqlens ([N + 1] integers) and [B, T] int64 RoPE positions, the document mask is never
  materialized (varlen flash-attn / aten flash kernels; the math path scores only each query block's
  key band), linear layers restart their state per document in the same kernels, and the CP schemes
  move the same bytes. FLOPs and time are those of full causal sequences, an upper bound: softmax
  attention inside short documents does less work.

Activation bytes are the tensors autograd saves (block_saved_bytes): one block of each kind runs forward
on fake tensors with the target device's kernel backends forced, under saved-tensor hooks (and again
under activation checkpointing), at two short lengths; the kernels allocate exactly what they keep and
compute nothing (kernels/shapes.py). tests/test_plan.py checks those bytes against real CPU forwards
(the CPU kernels, and the Triton kernels under TRITON_INTERPRET=1), and the whole peak against the live
CPU tensors of two real training steps (within 15% for two configs).

Memory is the peak over a step: model state + weight copies + every layer's saved activations
+ the loss buffers + the largest one-layer transient (a checkpointed layer's recomputed activations,
its gradients in flight, and the communication buffers of its context-parallel scheme). A plan fits
when that total is at most the device's usable memory (``GpuSpec.usable_bytes``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from dataclasses import dataclass
from typing import Sequence

from spindle.runtime.config import (
    ACTIVATION_CHECKPOINTING,
    Config,
    ConfigError,
    ModelConfig,
    layer_pattern,
    load_config,
    resolve,
)
from spindle.runtime.hardware import GPUS, GpuSpec, gpu_spec, spec_for_device_name  # noqa: F401  (re-exported)

GIB = 1024**3
# the policies of runtime/config.py, least recomputation first
CHECKPOINTING_POLICIES = tuple(sorted(ACTIVATION_CHECKPOINTING, key=lambda policy: len(ACTIVATION_CHECKPOINTING[policy])))
# Tokens per chunk of the chunked cross-entropy (kernels/cross_entropy/chunked.py's default).
LOSS_CHUNK_TOKENS = 4096
# Tokens per chunk of the linear-attention kernels (intra-chunk FLOPs in the hardware count).
LINEAR_CHUNK = 64
GPUS_PER_NODE = 8
# Fraction of the vendor's dense peak that well-tuned bf16 training reaches: the step-time estimate divides
# work by peak x this. Llama 3 reports 38-43% MFU for bf16 training on H100 (Llama 3 paper, table 4).
DEFAULT_EFFICIENCY = 0.4
DEFAULT_INTER_NODE_GBPS = 50.0


# ---------------------------------------------------------------------------------------------
# Hardware (the figures themselves live in runtime/hardware.py)
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Network:
    """Per-GPU, per-direction link bandwidths and per-message latencies."""

    intra_node_bytes_per_s: float
    inter_node_bytes_per_s: float
    intra_node_latency_s: float = 5e-6
    inter_node_latency_s: float = 15e-6
    gpus_per_node: int = GPUS_PER_NODE


def network_for(gpu: GpuSpec, inter_node_gbps: float = DEFAULT_INTER_NODE_GBPS) -> Network:
    """NVLink inside a node (the GPU's own figure), ``inter_node_gbps`` GB/s between nodes."""
    return Network(gpu.nvlink_bytes_per_s, inter_node_gbps * 1e9)


# ---------------------------------------------------------------------------------------------
# Model shape and parameter counts
# ---------------------------------------------------------------------------------------------
def default_ffn_dim(dim: int) -> int:
    """The model's width for ffn_dim = 0 (runtime/layers.py)."""
    from spindle.runtime.layers import default_ffn_dim as model_default

    return model_default(dim)


@dataclass(frozen=True)
class Shape:
    """The numbers of ModelConfig the arithmetic needs, with defaults resolved."""

    pattern: str
    dim: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn_dim: int
    vocab_size: int
    tie_embeddings: bool
    decay: str
    feature_map: str
    output_gate: str
    window: int = 0
    """model.window: keys per query of R and S layers (docs/rattention.md)."""
    model: ModelConfig | None = dataclasses.field(default=None, repr=False, compare=False)
    """The model section itself: parameter counts come from the model built from it on the meta device."""

    @property
    def linear_layers(self) -> int:
        return self.pattern.count("L")

    @property
    def softmax_layers(self) -> int:
        return self.pattern.count("A")

    @property
    def window_layers(self) -> int:
        """R and S layers: A's projections over a sliding window (R adds a linear branch)."""
        return self.pattern.count("R") + self.pattern.count("S")

    @property
    def rattention_layers(self) -> int:
        return self.pattern.count("R")


def shape_of(config: Config) -> Shape:
    model = config.model
    return Shape(
        pattern=layer_pattern(model), dim=model.dim, heads=model.heads, kv_heads=model.kv_heads,
        head_dim=model.dim // model.heads, ffn_dim=model.ffn_dim or default_ffn_dim(model.dim),
        vocab_size=model.vocab_size, tie_embeddings=model.tie_embeddings, decay=model.decay,
        feature_map=model.feature_map, output_gate=getattr(model, "output_gate", "sigmoid"),
        window=model.window, model=model)


@dataclass(frozen=True)
class ParameterCounts:
    """Parameters by place; ``*_sharded`` is what tensor parallelism splits, the rest is replicated."""

    embedding: int
    output: int
    """0 when tied to the embedding."""
    linear_layer: int
    softmax_layer: int
    final_norm: int
    linear_layer_replicated: int
    """Norm gains inside one linear layer (two block norms + the per-head output norm)."""
    softmax_layer_replicated: int
    total: int
    matmul: int
    """Every parameter except the input embedding table: the FLOP convention of model.flops_per_token."""
    per_kind: dict[str, int] = dataclasses.field(default_factory=dict)
    """Parameters of one block of each layer kind ("L", "A", "R", "S")."""
    replicated_per_kind: dict[str, int] = dataclasses.field(default_factory=dict)
    """Of those, the norm gains (replicated under tensor parallelism)."""


def parameter_counts(shape: Shape) -> ParameterCounts:
    """Exact counts of HybridModel(shape.model), read off the model built on the meta device (no memory,
    no initialization): one block of each kind, the embedding, the output layer and the final norm."""
    return _per_model(_COUNTS_CACHE, shape, _meta_parameter_counts, "parameter_counts")


# Results per model, keyed by repr(ModelConfig): recommend() plans many layouts of one model.
_COUNTS_CACHE: dict[str, ParameterCounts] = {}
_FLOPS_CACHE: dict = {}


def _per_model(cache: dict, shape: Shape, compute, caller: str):
    if shape.model is None:
        raise ValueError(f"{caller}: the Shape has no model config; build it with shape_of(config)")
    key = repr(shape.model)
    if key not in cache:
        cache[key] = compute(shape.model)
    return cache[key]


def _meta_parameter_counts(model_config: ModelConfig) -> ParameterCounts:
    import torch

    from spindle.runtime.model import HybridModel

    with torch.device("meta"):
        model = HybridModel(model_config)
    per_kind: dict[str, int] = {}
    replicated: dict[str, int] = {}
    for block in model.layers:
        if block.kind not in per_kind:
            per_kind[block.kind] = sum(p.numel() for p in block.parameters())
            # norm gains stay whole under tensor parallelism; everything else in a block is split
            replicated[block.kind] = sum(p.numel() for name, p in block.named_parameters() if "norm" in name)
    embedding = model.embedding.weight.numel()
    tied = model.output.weight is model.embedding.weight
    output = 0 if tied else model.output.weight.numel()
    total = sum(p.numel() for p in model.parameters())  # a tied table counts once
    softmax_kind = next((kind for kind in "ASR" if kind in per_kind), None)
    return ParameterCounts(
        embedding=embedding, output=output, linear_layer=per_kind.get("L", 0),
        softmax_layer=per_kind.get(softmax_kind, 0) if softmax_kind else 0,
        final_norm=model.norm.weight.numel(), linear_layer_replicated=replicated.get("L", 0),
        softmax_layer_replicated=replicated.get(softmax_kind, 0) if softmax_kind else 0, total=total,
        matmul=total - (0 if tied else embedding), per_kind=per_kind, replicated_per_kind=replicated)


def count_parameters(config: Config) -> int:
    """Total parameters of HybridModel(config.model) (a tied table counts once)."""
    return parameter_counts(shape_of(config)).total


def model_flops_per_token(shape: Shape, seq_len: int) -> float:
    """Training FLOPs per token by model.flops_per_token's convention (no recomputation):
    6·N_matmul + 12·head_dim·dim per linear layer + 6·seq_len·dim per softmax layer."""
    counts = parameter_counts(shape)
    return float(6 * counts.matmul + shape.linear_layers * 12 * shape.head_dim * shape.dim
                 + shape.softmax_layers * 6 * seq_len * shape.dim
                 + shape.window_layers * 12 * mean_window_keys(shape.window, seq_len) * shape.dim
                 + shape.rattention_layers * 24 * shape.head_dim * shape.dim)


def mean_window_keys(window: int, seq_len: int) -> float:
    """Keys per query of a causal window, averaged over the sequence (runtime/model.py's count)."""
    if window >= seq_len:
        return seq_len / 2
    return window - window * (window - 1) / (2 * seq_len)


# ---------------------------------------------------------------------------------------------
# Layout: degrees, batch split, precision
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    dp: int
    cp: int
    tp: int
    micro_batch: int
    accumulation: int
    """Micro-batches per optimizer step on one dp rank."""
    seq_len: int
    local_tokens: int
    """Tokens of one sequence on one cp rank: seq_len / cp."""
    checkpointing: str
    cp_layout: str
    cp_linear: str
    cp_softmax: str
    dp_engine: str
    zero_stage: int
    offload_optimizer: bool
    compute_bytes: int
    """Bytes per activation element: 2 under bf16 autocast, 4 in fp32."""
    device_type: str = "cuda"
    """The device whose kernels the plan assumes (kernel_backends): "cuda" or "cpu"."""

    @property
    def world_size(self) -> int:
        return self.dp * self.cp * self.tp

    @property
    def replicas(self) -> int:
        """Ranks holding the same weights (dp × cp): the group gradients are summed and sharded over."""
        return self.dp * self.cp

    @property
    def autocast(self) -> bool:
        return self.compute_bytes == 2

    @property
    def bf16_parameters(self) -> bool:
        """FSDP2 with a bf16 MixedPrecisionPolicy (parallel/parallelize.py applies it when dp·cp > 1):
        the forward runs on bf16 weights, so the residual stream is bf16 and autocast makes no copies."""
        return self.autocast and self.dp_engine == "fsdp" and self.replicas > 1

    @property
    def residual_bytes(self) -> int:
        """The residual stream follows the embedding's dtype: fp32 weights keep it fp32."""
        return 2 if self.bf16_parameters else 4

    @property
    def states_per_rank(self) -> int:
        """Contiguous chunks of the sequence one cp rank owns (zigzag: two)."""
        return 2 if self.cp_layout == "zigzag" and self.cp > 1 else 1


def layout_of(config: Config, world_size: int | None = None, device_type: str = "cuda") -> Layout:
    """Degrees and batch split of a validated config; ``world_size`` resolves parallel.dp = -1;
    ``device_type`` ("cuda" or "cpu") picks the kernels whose saved tensors the plan counts."""
    if device_type not in ("cuda", "cpu"):
        raise ValueError(f"device_type={device_type!r}: expected 'cuda' or 'cpu'.")
    parallel = config.parallel
    if parallel.dp == -1 and world_size is None:
        raise ValueError("parallel.dp = -1 infers dp from the number of GPUs, which the plan needs: pass it "
                         "(spindle plan --gpus N; world_size= in Python), or set parallel.dp.")
    resolved = resolve(config, world_size or parallel.dp * parallel.cp * parallel.tp)
    dp, micro = resolved.parallel.dp, resolved.train.micro_batch
    return Layout(
        dp=dp, cp=parallel.cp, tp=parallel.tp, micro_batch=micro,
        accumulation=config.train.global_batch // dp // micro, seq_len=config.data.seq_len,
        local_tokens=config.data.seq_len // parallel.cp, checkpointing=parallel.activation_checkpointing,
        cp_layout=parallel.cp_layout, cp_linear=parallel.cp_linear, cp_softmax=parallel.cp_softmax,
        dp_engine=parallel.dp_engine, zero_stage=parallel.zero_stage,
        offload_optimizer=parallel.offload_optimizer,
        compute_bytes=4 if config.train.precision == "fp32" else 2, device_type=device_type)


def checkpointed(kind: str, policy: str) -> bool:
    """Does ``policy`` recompute layers of kind "L" / "A" / "R" / "S" (runtime/config.py ACTIVATION_CHECKPOINTING)?"""
    return kind in ACTIVATION_CHECKPOINTING[policy]


# ---------------------------------------------------------------------------------------------
# Memory: model state
# ---------------------------------------------------------------------------------------------
@dataclass
class ModelStateMemory:
    parameters: float
    gradients: float
    optimizer: float
    optimizer_cpu: float
    """Optimizer bytes kept in host memory (DeepSpeed offload_optimizer)."""
    weight_copies: float
    """bf16 copies of the matmul weights that autocast makes (and keeps for backward) in the forward."""
    gathered: float
    """Unsharded weights and gradients of sharded engines: the root unit (embedding, output) stays
    gathered, two blocks are gathered at a time (current + prefetch), one block's gradients are
    reduce-scattered at a time."""
    optimizer_step: float
    """The AdamW (foreach) step's temporary: one fp32 buffer per optimized parameter."""


def _sharding(layout: Layout) -> tuple[int, int, int]:
    """Ways (parameters, gradients, optimizer state) are split over the dp × cp replicas: FSDP2 all
    three; ZeRO stage 1 the optimizer, 2 also gradients, 3 also parameters."""
    replicas = layout.replicas
    if layout.dp_engine == "fsdp":
        return replicas, replicas, replicas
    stage = layout.zero_stage
    return (replicas if stage >= 3 else 1), (replicas if stage >= 2 else 1), replicas


def local_parameters(shape: Shape, tp: int) -> float:
    """Parameters one tp rank holds before sharding: tensor parallelism splits the blocks' projection
    and MLP matrices; embedding, output layer and norm gains stay replicated (parallel/parallelize.py)."""
    counts = parameter_counts(shape)
    block_matrices = sum(shape.pattern.count(kind) * (count - counts.replicated_per_kind[kind])
                         for kind, count in counts.per_kind.items())
    return block_matrices / tp + (counts.total - block_matrices)


def _largest_block(shape: Shape, tp: int) -> float:
    return max(parameter_counts(shape).per_kind.values()) / tp


def model_state_memory(shape: Shape, layout: Layout) -> ModelStateMemory:
    """fp32 parameters (4 B), gradients (4 B) and AdamW moments (8 B), sharded per engine and stage."""
    counts = parameter_counts(shape)
    local = local_parameters(shape, layout.tp)
    parameter_shards, gradient_shards, optimizer_shards = _sharding(layout)
    optimizer = 8 * local / optimizer_shards
    offloaded = layout.dp_engine == "deepspeed" and layout.offload_optimizer
    copies = 0.0
    if layout.autocast and not layout.bf16_parameters:
        # every matmul weight (the output layer included, the embedding lookup not) is cast once
        copies = 2 * (local - (0 if shape.tie_embeddings else counts.embedding))
    gathered = 0.0
    if parameter_shards > 1:
        weight_bytes = 2 if layout.bf16_parameters else 4
        root = (counts.embedding + counts.output) * weight_bytes
        block = _largest_block(shape, layout.tp)
        gathered = root + 2 * block * weight_bytes + block * (weight_bytes + 4)
    return ModelStateMemory(
        parameters=4 * local / parameter_shards, gradients=4 * local / gradient_shards,
        optimizer=0.0 if offloaded else optimizer, optimizer_cpu=optimizer if offloaded else 0.0,
        weight_copies=copies, gathered=gathered,
        optimizer_step=0.0 if offloaded else 4 * local / optimizer_shards)


# ---------------------------------------------------------------------------------------------
# Memory: activations
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerActivations:
    """Bytes one layer needs for one micro-batch on one rank."""

    saved: float
    """Everything autograd keeps until the layer's backward pass, input included."""
    checkpoint: float
    """What a checkpointed layer keeps instead: its input (the residual stream)."""
    workspace: float
    """Gradients in flight while the layer's backward pass runs."""
    comm_saved: float
    """Context-parallel tensors saved for backward (LASP's incoming d×d states)."""
    comm_transient: float
    """Context-parallel buffers alive during the layer's forward or backward only."""


# Activation bytes are read off the model: one block of each kind runs forward on fake tensors (values-less
# tensors on the CPU device, FakeTensorMode, so autocast applies as in training) with the target device's
# kernel backends forced; the kernels allocate and keep exactly what they keep on that device and compute
# nothing (kernels/shapes.py). Saved-tensor hooks collect what autograd keeps; distinct storages are summed,
# weights and their autocast copies (counted as model state) and the shared RoPE tables (counted once) left
# out. Two lengths give the bytes as constant + per_token · T, exact at multiples of the chunk size.
SAVED_LENGTHS = (2 * LINEAR_CHUNK, 4 * LINEAR_CHUNK)
_SAVED_CACHE: dict = {}


@dataclass(frozen=True)
class SavedBytes:
    """Bytes one block (or the final norm) keeps for backward, for a micro-batch of one sequence."""

    constant: float
    """Independent of T (e.g. a constant per-head decay)."""
    per_token: float

    def at(self, batch: int, tokens: int) -> float:
        return self.constant + batch * tokens * self.per_token


def kernel_backends(shape: Shape, layout: Layout) -> tuple[str, str | None]:
    """(linear-attention, softmax-attention) backends the layout's device runs, as their "auto" picks them:
    CUDA: the Triton kernel for head dims 16-256 (else the torch path) and flash-attn for bf16; CPU: the
    torch path. Otherwise softmax attention is None, "auto" on the (CPU) fake tensors: sdpa_cpu, or math
    for windows; for fp32 on a GPU that stands for the memory-efficient kernel (o and lse alike) and math."""
    if layout.device_type == "cpu":
        return "torch", None
    import importlib.util

    # without triton installed here the Triton kernel's saves cannot be read; the torch path stands in
    triton = importlib.util.find_spec("triton") is not None
    linear = "triton" if triton and 16 <= shape.head_dim <= 256 else "torch"
    return linear, ("flash_attn" if layout.autocast else None)


def saved_tensor_bytes(run, module, shared=()) -> int:
    """Bytes of the distinct storages autograd saves while ``run()`` executes, leaving out ``module``'s
    parameters, tensors derived from one parameter alone (autocast's weight copies, transposes) and the
    ``shared`` tensors. Works on real and on fake tensors."""
    import torch

    parameters = {id(parameter) for parameter in module.parameters()}
    excluded = {_storage_key(tensor) for tensor in (*module.parameters(), *shared)}
    kept: list = []  # keeps every saved tensor alive, so no storage is reused while counting

    def pack(tensor):
        kept.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    storages = {_storage_key(tensor): tensor.untyped_storage().nbytes() for tensor in kept
                if _storage_key(tensor) not in excluded and not _from_one_parameter(tensor, parameters)}
    return sum(storages.values())


def _storage_key(tensor) -> int:
    return tensor.untyped_storage()._cdata  # the storage's identity, also for fake and meta tensors


def _from_one_parameter(tensor, parameters: set[int]) -> bool:
    """A cast or view of a parameter: the autograd chain from ``tensor`` has one input per step and ends at
    a parameter's accumulator."""
    node = tensor.grad_fn
    while node is not None:
        variable = getattr(node, "variable", None)  # AccumulateGrad
        if variable is not None:
            return id(variable) in parameters
        inputs = [edge for edge, _ in node.next_functions if edge is not None]
        if len(inputs) != 1:
            return False
        node = inputs[0]
    return False


def block_saved_bytes(kind: str, shape: Shape, layout: Layout, *, recomputed: bool = False) -> SavedBytes:
    """What one block of ``kind`` keeps for backward on one rank (tp-sharded), per kernel_backends; with
    ``recomputed`` (activation checkpointing) what torch.utils.checkpoint keeps instead. ``kind`` "norm":
    the final norm."""
    if shape.model is None:
        raise ValueError("block_saved_bytes: the Shape has no model config; build it with shape_of(config)")
    backends = kernel_backends(shape, layout)
    key = (repr(shape.model), kind, layout.tp, layout.autocast, layout.bf16_parameters, backends)
    if key not in _SAVED_CACHE:
        _SAVED_CACHE[key] = _measure_block(shape.model, kind, layout, backends)
    return _SAVED_CACHE[key][recomputed]


def _measure_block(model_config: ModelConfig, kind: str, layout: Layout,
                   backends: tuple[str, str | None]) -> tuple[SavedBytes, SavedBytes]:
    """(kept, kept under activation checkpointing), each fitted over SAVED_LENGTHS; one fake model."""
    import contextlib

    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from spindle.kernels import attn, linear_attn
    from spindle.runtime.model import HybridModel

    linear, attention = backends
    dtype = torch.bfloat16 if layout.bf16_parameters else torch.float32
    with FakeTensorMode(), contextlib.ExitStack() as stack:
        model = HybridModel(dataclasses.replace(model_config, layers="L" if kind == "norm" else kind, n_layers=1))
        module = model.norm if kind == "norm" else model.layers[0]
        _shard_for_tensor_parallel(module, layout.tp)
        if layout.bf16_parameters:
            _cast_parameters(module, torch.bfloat16)
        stack.enter_context(linear_attn.force_backend(linear))
        if attention is not None:
            stack.enter_context(attn.force_backend(attention))
        stack.enter_context(torch.autocast("cpu", dtype=torch.bfloat16, enabled=layout.autocast))
        fits = []
        for recomputed in (False, True):
            module.recompute = recomputed  # DecoderBlock: through torch.utils.checkpoint
            samples = []
            for length in SAVED_LENGTHS:
                x = torch.empty(1, length, model_config.dim, dtype=dtype, requires_grad=True)
                rotary = model.rotary(torch.arange(length), dtype)
                run = (lambda: module(x)) if kind == "norm" else (lambda: module(x, rotary))
                samples.append(saved_tensor_bytes(run, module, rotary))
            (t1, t2), (bytes1, bytes2) = SAVED_LENGTHS, samples
            per_token = (bytes2 - bytes1) / (t2 - t1)
            fits.append(SavedBytes(bytes1 - per_token * t1, per_token))
    return fits[0], fits[1]


def _shard_for_tensor_parallel(module, tp: int) -> None:
    """This rank's shard of a block, as parallel/parallelize.py's plans leave it: q/k/v/gate/decay and the
    MLP's gate/up column-wise, the output projections row-wise, the per-head decay slopes by head."""
    if tp == 1 or not hasattr(module, "mixer"):
        return
    from torch import nn

    mixer, mlp = module.mixer, module.mlp
    columns = [getattr(mixer, name, None) for name in ("q_proj", "k_proj", "v_proj", "gate_proj", "decay_proj")]
    for linear, axis in [(c, 0) for c in columns + [mlp.gate_proj, mlp.up_proj] if c is not None] + [
            (mixer.out_proj, 1), (mlp.down_proj, 1)]:
        sizes = list(linear.weight.shape)
        sizes[axis] //= tp
        linear.weight = nn.Parameter(linear.weight.new_empty(sizes))
        if axis == 0 and linear.bias is not None:
            linear.bias = nn.Parameter(linear.bias.new_empty(sizes[0]))
    if getattr(mixer, "log_decay_slopes", None) is not None:
        mixer.log_decay_slopes = mixer.log_decay_slopes.chunk(tp)[0].clone()


def _cast_parameters(module, dtype) -> None:
    """FSDP2's bf16 MixedPrecisionPolicy: the forward sees the parameters (not the buffers) in ``dtype``."""
    from torch import nn

    for owner in module.modules():
        for name, parameter in list(owner.named_parameters(recurse=False)):
            setattr(owner, name, nn.Parameter(parameter.detach().to(dtype)))


def _workspace_per_token(kind: str, shape: Shape, layout: Layout) -> float:
    """Per token, the gradients alive at once in a block's backward: the residual gradient coming in
    and going out, plus the widest intermediate gradients (MLP: d(h), d(gate), d(up); mixer: dq,
    dk, dv)."""
    e, tp = layout.compute_bytes, layout.tp
    kv_heads = shape.kv_heads if kind in "ARS" else shape.heads
    mixer_width = (shape.heads + 2 * kv_heads) * shape.head_dim / tp
    return 2 * layout.residual_bytes * shape.dim + max(3 * shape.ffn_dim / tp, mixer_width) * e


def _linear_state_bytes(shape: Shape, layout: Layout) -> float:
    """One d_k × d_v fp32 state per head of one micro-batch: B·H·dk·dv·4."""
    return layout.micro_batch * shape.heads / layout.tp * shape.head_dim**2 * 4


def _context_parallel_memory(kind: str, shape: Shape, layout: Layout) -> tuple[float, float]:
    """(saved, transient) bytes of one layer's context-parallel scheme."""
    P = layout.cp
    if P == 1:
        return 0.0, 0.0
    e, batch, n = layout.compute_bytes, layout.micro_batch, layout.local_tokens
    if kind in "RS":
        return _window_cp_memory(kind, shape, layout)
    if kind == "L":
        states = layout.states_per_rank * _linear_state_bytes(shape, layout)
        if layout.cp_linear == "lasp2":
            return states, P * states  # incoming states kept; all P ranks' states gathered
        return states, 2 * states  # LASP-1: incoming state kept; one in flight
    kv_local = 2 * batch * n * shape.kv_heads / layout.tp * shape.head_dim  # elements of local K and V
    if layout.cp_softmax == "allgather":
        # backward: the re-gathered K/V of the whole sequence plus their fp32 gradients
        return 0.0, P * kv_local * (e + 4)
    if layout.cp_softmax == "ring":
        # two K/V blocks and two fp32 dK/dV blocks in flight, plus the fp32 dQ accumulator
        hidden = batch * n * shape.heads / layout.tp * shape.head_dim
        return 0.0, 2 * kv_local * (e + 4) + 4 * hidden
    # Ulysses: all-to-all send and receive buffers of q, k, v
    qkv = batch * n * (shape.heads + 2 * shape.kv_heads) / layout.tp * shape.head_dim
    return 0.0, 2 * qkv * e


def halo_features(kind: str, shape: Shape, tp: int) -> float:
    """Elements per token of an R/S layer's halo exchange: k and v (S); rotated k, φ(k) and v (R)."""
    return (4 if kind == "R" else 2) * shape.kv_heads / tp * shape.head_dim


def _window_cp_memory(kind: str, shape: Shape, layout: Layout) -> tuple[float, float]:
    """R/S under cp: each chunk keeps its received halo (≤ window tokens) for backward; R also keeps
    its linear branch's incoming 2·D × D states and gathers every rank's during LASP-2."""
    halo = layout.states_per_rank * min(shape.window, layout.seq_len) * layout.micro_batch
    saved = halo * halo_features(kind, shape, layout.tp) * layout.compute_bytes
    transient = saved  # the halo gradients on their way back
    if kind == "R":
        states = 2 * layout.states_per_rank * _linear_state_bytes(shape, layout)
        saved += states
        transient += (layout.cp if layout.cp_linear == "lasp2" else 2) * states
    return saved, transient


def allgather_kv_bytes(shape: Shape, layout: Layout) -> float:
    """The gathered K/V of one all-gather attention layer: 2·B·T·H_kv·d·bytes (per tp rank)."""
    return 2 * layout.micro_batch * layout.seq_len * shape.kv_heads / layout.tp * shape.head_dim * layout.compute_bytes


def layer_activations(kind: str, shape: Shape, layout: Layout) -> LayerActivations:
    tokens = layout.micro_batch * layout.local_tokens
    comm_saved, comm_transient = _context_parallel_memory(kind, shape, layout)
    # the largest weight gradient is produced in the compute dtype, then accumulated in fp32
    largest_matrix = max(shape.dim * shape.ffn_dim, shape.dim * shape.heads * shape.head_dim) / layout.tp
    batch, length = layout.micro_batch, layout.local_tokens
    return LayerActivations(
        saved=block_saved_bytes(kind, shape, layout).at(batch, length),
        checkpoint=block_saved_bytes(kind, shape, layout, recomputed=True).at(batch, length),
        workspace=tokens * _workspace_per_token(kind, shape, layout) + largest_matrix * (layout.compute_bytes + 4),
        comm_saved=comm_saved, comm_transient=comm_transient)


@dataclass
class ActivationMemory:
    saved: float
    """All layers' saved tensors (inputs only for checkpointed layers), with RoPE tables."""
    transient: float
    """Peak one-layer extra during the backward pass (recompute + gradients + comm buffers)."""
    loss: float
    """Final norm and the chunked cross-entropy's stashed fp32 d(hidden) and d(output weight)."""
    loss_chunk: float
    """One [chunk, vocab] fp32 logits block and its gradient (forward only)."""
    allgather_kv: float
    """Gathered K/V of one all-gather attention layer (0 without it); part of ``transient``."""


def activation_memory(shape: Shape, layout: Layout) -> ActivationMemory:
    tokens = layout.micro_batch * layout.local_tokens
    saved, transient = 0.0, 0.0
    for kind in sorted(set(shape.pattern)):
        layer = layer_activations(kind, shape, layout)
        recomputed = checkpointed(kind, layout.checkpointing)
        kept = (layer.checkpoint if recomputed else layer.saved) + layer.comm_saved
        saved += shape.pattern.count(kind) * kept
        extra = (layer.saved - layer.checkpoint if recomputed else 0.0) + layer.workspace + layer.comm_transient
        transient = max(transient, extra)
    if shape.softmax_layers + shape.window_layers:
        saved += tokens * shape.head_dim * 4  # RoPE cos and sin tables, fp32, shared by all layers
    # final norm (its input, internals; its output is not saved) and the loss's fp32 d(hidden), d(weight)
    final_norm = block_saved_bytes("norm", shape, layout).at(layout.micro_batch, layout.local_tokens)
    loss = final_norm + tokens * shape.dim * 4 + shape.vocab_size * shape.dim * 4
    chunk = min(LOSS_CHUNK_TOKENS, tokens) * shape.vocab_size * 8  # fp32 logits + fp32 softmax gradient
    uses_allgather = shape.softmax_layers and layout.cp > 1 and layout.cp_softmax == "allgather"
    return ActivationMemory(saved=saved, transient=transient, loss=loss, loss_chunk=chunk,
                            allgather_kv=allgather_kv_bytes(shape, layout) if uses_allgather else 0.0)


# ---------------------------------------------------------------------------------------------
# Communication
# ---------------------------------------------------------------------------------------------
@dataclass
class CommVolume:
    """One kind of traffic in one optimizer step, seen from one rank."""

    name: str
    group: str
    """"cp", "tp" or "dp*cp": the process group it runs over."""
    bytes: float
    """Bytes each rank receives per step (for a ring/chain: on the critical path)."""
    messages: int
    """Dependent messages per step (latency terms)."""
    overlapped: bool
    """True when the scheme hides it behind computation (then only the excess shows)."""


def _linear_cp_volumes(shape: Shape, layout: Layout, passes: float) -> list[CommVolume]:
    """LASP-2: one all-gather of the d×d states per linear layer, forward and backward, independent of
    T: (P−1)·B·H·dk·dv·4 each; LASP-1 moves the same bytes in P−1 dependent hops."""
    P = layout.cp
    per_pass = (P - 1) * layout.states_per_rank * _linear_state_bytes(shape, layout)
    lasp2 = layout.cp_linear == "lasp2"
    name = "LASP-2 state all-gather" if lasp2 else "LASP-1 state chain"
    return [CommVolume(name, "cp", passes * per_pass, int(passes * (P - 1)), overlapped=lasp2)]


def _softmax_cp_volumes(shape: Shape, layout: Layout, forwards: float) -> list[CommVolume]:
    """Per softmax layer; ``forwards`` is 2 when the layer is recomputed, else 1."""
    P, e = layout.cp, layout.compute_bytes
    batch, n, tp, d = layout.micro_batch, layout.local_tokens, layout.tp, shape.head_dim
    if layout.cp_softmax == "ulysses":
        # all-to-all of q, k, v in and o out; backward mirrors it (dO in, dq, dk, dv out)
        local = batch * n * (2 * shape.heads + 2 * shape.kv_heads) / tp * d * e
        volume = (P - 1) / P * local
        return [CommVolume("Ulysses all-to-all", "cp", (forwards + 1) * volume, int(4 * (forwards + 1)), False)]
    kv = (P - 1) * 2 * batch * n * shape.kv_heads / tp * d  # elements of the other ranks' K and V
    forward, backward = kv * e, kv * (e + 4)  # backward: K/V again plus fp32 dK/dV
    ring = layout.cp_softmax == "ring"
    name = "ring attention K/V" if ring else "all-gather attention K/V"
    messages = int((forwards + 2) * (P - 1))
    return [CommVolume(name, "cp", forwards * forward + backward, messages, overlapped=ring)]


def halo_bytes(kind: str, shape: Shape, layout: Layout) -> float:
    """Bytes the busiest rank receives in one halo exchange of an R/S layer (either direction): at most
    one window per chunk it holds, independent of seq_len (parallel/cp/halo.py)."""
    halo = layout.states_per_rank * min(shape.window, layout.seq_len)
    return halo * layout.micro_batch * halo_features(kind, shape, layout.tp) * layout.compute_bytes


def _window_cp_volumes(kind: str, shape: Shape, layout: Layout, forwards: float) -> list[CommVolume]:
    """Per R/S layer: the halo forward (again when recomputed) and its gradient backward, one batch of
    point-to-point messages each; R adds LASP's gather of 2·D × D states (twice a linear layer's)."""
    P = layout.cp
    peers = min(P - 1, -(-shape.window // max(1, layout.local_tokens // layout.states_per_rank)))
    volumes = [CommVolume("window halo (R/S)", "cp", (forwards + 1) * halo_bytes(kind, shape, layout),
                          int((forwards + 1) * peers), overlapped=False)]
    if kind == "R":
        volumes += [dataclasses.replace(v, name=v.name + " (R)", bytes=2 * v.bytes)
                    for v in _linear_cp_volumes(shape, layout, forwards + 1)]
    return volumes


def _tensor_parallel_volumes(shape: Shape, layout: Layout) -> list[CommVolume]:
    """Megatron-style, without sequence parallelism: per block, forward all-reduces after out_proj and
    down_proj, backward one all-reduce of the input gradient per column-parallel projection (q, k, v,
    (gate), gate, up); a recomputed block repeats its forward ones."""
    t = layout.tp
    if t == 1:
        return []
    tokens = layout.micro_batch * layout.local_tokens
    all_reduce = 2 * (t - 1) / t * tokens * shape.dim * layout.compute_bytes
    count = 0
    for kind in shape.pattern:
        forwards = 2 if checkpointed(kind, layout.checkpointing) else 1
        count += 2 * forwards + (3 if kind in "ARS" else 4) + 2
    return [CommVolume("TP all-reduce", "tp", count * all_reduce, count, overlapped=False)]


def _data_parallel_volumes(shape: Shape, layout: Layout) -> list[CommVolume]:
    """Gradient synchronization over the dp × cp replicas (fp32) and the sharded engines' weight
    gathers (bf16 under FSDP2 mixed precision); one synchronization per optimizer step."""
    replicas = layout.replicas
    if replicas == 1:
        return []
    local = local_parameters(shape, layout.tp)
    parameter_shards, gradient_shards, _ = _sharding(layout)
    fraction = (replicas - 1) / replicas
    if gradient_shards > 1:
        volumes = [CommVolume("gradient reduce-scatter", "dp*cp", fraction * 4 * local, replicas - 1, True)]
    else:
        volumes = [CommVolume("gradient all-reduce", "dp*cp", 2 * fraction * 4 * local, 2 * (replicas - 1), True)]
    if parameter_shards > 1:
        weight_bytes = 2 if layout.bf16_parameters else 4
        gathers = 2 * layout.accumulation  # forward and backward of every micro-batch
        volumes.append(CommVolume("parameter all-gather", "dp*cp", gathers * fraction * weight_bytes * local,
                                  gathers * (replicas - 1), True))
    else:
        volumes.append(CommVolume("updated-parameter all-gather", "dp*cp", fraction * 4 * local, replicas - 1, True))
    return volumes


def communication(shape: Shape, layout: Layout) -> list[CommVolume]:
    """Every traffic of one optimizer step, per rank; empty on one GPU."""
    volumes: list[CommVolume] = []
    micro = layout.accumulation
    if layout.cp > 1:
        for kind in sorted(set(shape.pattern)):
            layers = shape.pattern.count(kind)
            forwards = 2 if checkpointed(kind, layout.checkpointing) else 1
            if kind in "RS":
                per_layer = _window_cp_volumes(kind, shape, layout, forwards)
            else:
                per_layer = (_linear_cp_volumes(shape, layout, forwards + 1) if kind == "L"
                             else _softmax_cp_volumes(shape, layout, forwards))
            volumes += [dataclasses.replace(v, bytes=v.bytes * layers * micro, messages=v.messages * layers * micro)
                        for v in per_layer]
    volumes += [dataclasses.replace(v, bytes=v.bytes * micro, messages=v.messages * micro)
                for v in _tensor_parallel_volumes(shape, layout)]
    volumes += _data_parallel_volumes(shape, layout)
    return volumes


def group_bandwidth(group: str, layout: Layout, network: Network) -> tuple[float, float]:
    """(bytes/s, latency) of a group: NVLink when all its ranks share a node (mesh order dp, cp, tp,
    tp innermost), the inter-node link otherwise."""
    span = {"tp": layout.tp, "cp": layout.cp * layout.tp, "dp*cp": layout.world_size}[group]
    if span <= network.gpus_per_node:
        return network.intra_node_bytes_per_s, network.intra_node_latency_s
    return network.inter_node_bytes_per_s, network.inter_node_latency_s


# ---------------------------------------------------------------------------------------------
# FLOPs and step time
# ---------------------------------------------------------------------------------------------
@dataclass
class Flops:
    model_per_token: float
    """model.flops_per_token(seq_len): what MFU divides by."""
    model_per_step: float
    """Model FLOPs of one optimizer step, all GPUs together."""
    hardware_per_step_per_gpu: float
    """FLOPs one GPU executes per step: recomputation included, and the slowest cp rank's causal
    attention share under the contiguous layout."""


def _forward_flops_per_token(kind: str, shape: Shape, seq_len: int) -> float:
    """Forward FLOPs per token of one layer (weights 2·N; attention as in the model's count / 3)."""
    counts = parameter_counts(shape)
    if kind == "L":
        return 2 * counts.linear_layer + 4 * shape.head_dim * shape.dim
    if kind in "RS":
        window = 4 * mean_window_keys(shape.window, seq_len) * shape.dim
        return 2 * counts.softmax_layer + window + (8 * shape.head_dim * shape.dim if kind == "R" else 0)
    return 2 * counts.softmax_layer + 2 * seq_len * shape.dim


# FLOPs per token as the code runs them: PyTorch's FlopCounterMode over one forward+backward of the model
# built on the meta device (nothing is computed), at two short lengths; per token they are a + b·T.
COUNTED_LENGTHS = (2 * LINEAR_CHUNK, 4 * LINEAR_CHUNK)
# The meta run's attention computes every query-key pair; causal GPU kernels skip the masked half.
CAUSAL_SHARE = 0.5


@dataclass(frozen=True)
class CountedFlops:
    """Per-token FLOPs fitted as constant + per_key · T from FlopCounterMode runs on the meta device."""

    step_constant: float
    """Forward + backward of the whole model (loss included), per token, T-independent part."""
    step_per_key: float
    """Forward + backward per token per key (softmax attention), before CAUSAL_SHARE."""
    forward_constant: dict[str, float]
    """Forward of one block of each layer kind, per token (what a checkpointed block recomputes)."""
    forward_per_key: dict[str, float]

    def step(self, seq_len: int) -> float:
        return self.step_constant + CAUSAL_SHARE * self.step_per_key * seq_len

    def forward(self, kind: str, seq_len: int) -> float:
        return self.forward_constant[kind] + CAUSAL_SHARE * self.forward_per_key[kind] * seq_len


def counted_flops(shape: Shape) -> CountedFlops:
    """FlopCounterMode on the meta-device model at COUNTED_LENGTHS, fitted per token to a + b·T."""
    return _per_model(_FLOPS_CACHE, shape, _count_flops, "counted_flops")


def _count_flops(model_config: ModelConfig) -> CountedFlops:
    """Counts a model with one block of each kind (same widths), then adds the other blocks by kind."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from spindle.runtime.model import HybridModel

    pattern = layer_pattern(model_config)
    kinds = "".join(dict.fromkeys(pattern))
    with torch.device("meta"):
        model = HybridModel(dataclasses.replace(model_config, layers=kinds, n_layers=len(kinds)))
    samples = []
    for length in COUNTED_LENGTHS:
        tokens = torch.zeros(1, length, dtype=torch.long, device="meta")
        with FlopCounterMode(display=False) as step_counter:  # backward inside: counted per module too
            loss, _ = model.loss(tokens, tokens)
            loss.backward()
        with FlopCounterMode(display=False) as forward_counter:
            model.loss(tokens, tokens)
        step_blocks = {kind: _block_flops(step_counter, index) / length for index, kind in enumerate(kinds)}
        forward = {kind: _block_flops(forward_counter, index) / length for index, kind in enumerate(kinds)}
        total = step_counter.get_total_flops() / length + sum(
            (pattern.count(kind) - 1) * step_blocks[kind] for kind in kinds)
        samples.append((length, total, forward))
    (t1, total1, forward1), (t2, total2, forward2) = samples
    slope = (total2 - total1) / (t2 - t1)
    slopes = {kind: (forward2[kind] - forward1[kind]) / (t2 - t1) for kind in kinds}
    return CountedFlops(total1 - slope * t1, slope, {kind: forward1[kind] - slopes[kind] * t1 for kind in kinds},
                        slopes)


def _block_flops(counter, index: int) -> float:
    """FLOPs FlopCounterMode attributes to block ``index`` (forward, and backward if it ran inside)."""
    suffix = f"layers.{index}"
    return float(next((sum(counts.values()) for name, counts in counter.get_flop_counts().items()
                       if name.endswith(suffix)), 0))


def flops(shape: Shape, layout: Layout) -> Flops:
    """Model FLOPs (model.flops_per_token's convention, for MFU) and hardware FLOPs as the code runs them.

    Hardware FLOPs come from counted_flops (the meta run) for models of L and A layers; window layers
    (R, S), whose cost stops growing with T at the window, use the analytic count."""
    per_token = model_flops_per_token(shape, layout.seq_len)
    tokens_per_step = layout.dp * layout.micro_batch * layout.accumulation * layout.seq_len
    if shape.window_layers:
        recompute = sum(_forward_flops_per_token(kind, shape, layout.seq_len)
                        for kind in shape.pattern if checkpointed(kind, layout.checkpointing))
        # intra-chunk products of the linear kernels (not in the model count): 2 matmuls over C/2 keys, ×3
        # (R's linear branch: keys of 2·D features, values of D: 1.5 times a linear layer's)
        linear_intra = (shape.linear_layers + 1.5 * shape.rattention_layers) * 3 * 2 * LINEAR_CHUNK * shape.dim
        hardware_per_token = per_token + recompute + linear_intra
    else:
        counted = counted_flops(shape)
        recompute = sum(counted.forward(kind, layout.seq_len)
                        for kind in shape.pattern if checkpointed(kind, layout.checkpointing))
        hardware_per_token = counted.step(layout.seq_len) + recompute
    if layout.cp_layout == "contiguous" and layout.cp > 1:
        # the last cp rank attends to the most keys: (2P−1)/P of the average
        attention = shape.softmax_layers * 6 * layout.seq_len * shape.dim
        hardware_per_token += attention * ((2 * layout.cp - 1) / layout.cp - 1)
    return Flops(model_per_token=per_token, model_per_step=per_token * tokens_per_step,
                 hardware_per_step_per_gpu=hardware_per_token * tokens_per_step / layout.world_size)


# ---------------------------------------------------------------------------------------------
# The context-parallel cost model: one layer of one scheme (used by step_time and `spindle bench cp`)
# ---------------------------------------------------------------------------------------------
# Launch and synchronization cost of one dependent hop of LASP-1's chain on top of link latency (an
# assumption: a point-to-point receive, a small kernel and a send per hop); docs/algorithms.md.
LASP1_HOP_OVERHEAD_S = 20e-6
# The chunked kernel's backward costs about two forwards. Under CP nothing is added: parallel/cp/linear.py
# runs the local kernel as the differentiable op between its two state-exchange steps, so the LASP backward
# is the kernel's own backward plus closed-form state terms, with no rerun of the local forward.
LINEAR_BACKWARD_FACTOR = 2.0
SOFTMAX_BACKWARD_FACTOR = 2.5  # flash-attention backward: about 2.5 forwards


@dataclass(frozen=True)
class CpShape:
    """One layer under context parallelism, seen from one rank."""

    world_size: int
    local_tokens: int
    batch: int
    heads: int
    kv_heads: int
    head_dim: int
    compute_bytes: int
    states_per_rank: int = 1
    """Contiguous chunks a rank owns (zigzag: 2): LASP moves one state per chunk."""


@dataclass(frozen=True)
class CpLayerCost:
    """Seconds and bytes of one layer's forward and backward on one rank."""

    scheme: str
    forward_compute_s: float
    backward_compute_s: float
    forward_exposed_s: float
    """Communication the forward cannot hide behind its computation."""
    backward_exposed_s: float
    bytes_received: float
    """Both directions, per rank."""

    @property
    def total_s(self) -> float:
        return self.forward_compute_s + self.backward_compute_s + self.forward_exposed_s + self.backward_exposed_s


def linear_kernel_flops(batch: int, heads: int, tokens: int, head_dim: int) -> float:
    """Forward FLOPs of chunked linear attention: per token and head, the intra-chunk products (q·kᵀ and
    the weighted sum of v over a chunk of LINEAR_CHUNK) and the state read and update (2·d² each)."""
    return 2.0 * batch * heads * tokens * (LINEAR_CHUNK * head_dim + 2 * head_dim * head_dim)


def softmax_kernel_flops(batch: int, heads: int, query_tokens: int, key_tokens: int, head_dim: int,
                         causal_share: float) -> float:
    """Forward FLOPs of attention: q·kᵀ and p·v, 4·Tq·Tk·d per head, times the unmasked share."""
    return 4.0 * batch * heads * query_tokens * key_tokens * head_dim * causal_share


def _hop(bytes_moved: float, bandwidth: float, latency: float) -> float:
    return latency + bytes_moved / bandwidth


def cp_layer_cost(scheme: str, shape: CpShape, bandwidth: float, latency: float, flop_rate: float) -> CpLayerCost:
    """Forward and backward of one layer with ``scheme`` on P = shape.world_size ranks.

    Compute runs at ``flop_rate``; every transfer costs latency + bytes / bandwidth per step of a ring
    (collectives over P ranks take P − 1 steps). Assumptions (docs/algorithms.md, "cost model"):
    - lasp2: one all-gather of the fp32 d×d states per direction; each overlaps the local kernel of its
      direction (forward: the intra-rank forward; backward: the local backward).
    - lasp1: the same bytes as a chain of P − 1 dependent hops per direction, each also paying
      LASP1_HOP_OVERHEAD_S; nothing to overlap, since a rank needs its incoming state to go on.
    - ring (zigzag): P equal steps; a hop moves local K and V (backward: also fp32 dK/dV) while a step
      computes, so only a hop longer than a step shows.
    - allgather: gather K/V before attention (forward), re-gather and reduce-scatter fp32 dK/dV
      (backward), not overlapped.
    - ulysses: all-to-all of q, k, v and o in each direction, not overlapped.
    """
    p, n, b, d = shape.world_size, shape.local_tokens, shape.batch, shape.head_dim
    if scheme in ("lasp2", "lasp1"):
        forward = linear_kernel_flops(b, shape.heads, n, d) / flop_rate
        backward = LINEAR_BACKWARD_FACTOR * forward
        state = shape.states_per_rank * b * shape.heads * d * d * 4
        if p == 1:
            return CpLayerCost(scheme, forward, backward, 0.0, 0.0, 0.0)
        if scheme == "lasp2":
            gather = (p - 1) * _hop(state, bandwidth, latency)
            return CpLayerCost(scheme, forward, backward, max(0.0, gather - forward), max(0.0, gather - backward),
                               2 * (p - 1) * state)
        chain = (p - 1) * (_hop(state, bandwidth, latency) + LASP1_HOP_OVERHEAD_S)
        return CpLayerCost(scheme, forward, backward, chain, chain, 2 * state)
    if scheme not in ("ring", "allgather", "ulysses"):
        raise ValueError(f"cp scheme {scheme!r}: expected one of lasp2, lasp1, ring, allgather, ulysses")
    # zigzag balances the causal mask: every rank does 1/P of the T×T/2 work
    forward = softmax_kernel_flops(b, shape.heads, n, n * p, d, 0.5) / flop_rate
    backward = SOFTMAX_BACKWARD_FACTOR * forward
    if p == 1:
        return CpLayerCost(scheme, forward, backward, 0.0, 0.0, 0.0)
    kv = 2 * b * n * shape.kv_heads * d * shape.compute_bytes  # local K and V
    kv_grad = 2 * b * n * shape.kv_heads * d * 4  # fp32 dK and dV
    if scheme == "ring":
        forward_step, backward_step = forward / p, backward / p
        return CpLayerCost(scheme, forward, backward,
                           (p - 1) * max(0.0, _hop(kv, bandwidth, latency) - forward_step),
                           (p - 1) * max(0.0, _hop(kv + kv_grad, bandwidth, latency) - backward_step),
                           (p - 1) * (2 * kv + kv_grad))
    if scheme == "allgather":
        gather = (p - 1) * _hop(kv, bandwidth, latency)
        reduce_scatter = (p - 1) * _hop(kv_grad, bandwidth, latency)
        return CpLayerCost(scheme, forward, backward, gather, gather + reduce_scatter, (p - 1) * (2 * kv + kv_grad))
    qkvo = b * n * (2 * shape.heads + 2 * shape.kv_heads) * d * shape.compute_bytes
    all_to_all = 4 * (p - 1) * latency + (p - 1) / p * qkvo / bandwidth
    return CpLayerCost(scheme, forward, backward, all_to_all, all_to_all, 2 * (p - 1) / p * qkvo)


def cp_shape(kind: str, shape: Shape, layout: Layout) -> CpShape:
    """The per-rank shape of one layer of ``kind`` ("L" / "A") under ``layout`` (heads split by tp)."""
    kv_heads = shape.heads if kind == "L" else shape.kv_heads
    return CpShape(layout.cp, layout.local_tokens, layout.micro_batch, shape.heads // layout.tp,
                   max(1, kv_heads // layout.tp), shape.head_dim, layout.compute_bytes, layout.states_per_rank)


def _cp_exposed_seconds(shape: Shape, layout: Layout, network: Network, flop_rate: float) -> float:
    """Exposed context-parallel communication of one optimizer step (recomputed layers repeat the forward)."""
    if layout.cp == 1:
        return 0.0
    bandwidth, latency = group_bandwidth("cp", layout, network)
    total = 0.0
    for kind in sorted(set(shape.pattern)):
        forwards = 2 if checkpointed(kind, layout.checkpointing) else 1
        if kind in "RS":
            # the halo is not overlapped; R's states go through cp_linear like an L layer with 2·D keys
            per_layer = (forwards + 1) * _hop(halo_bytes(kind, shape, layout), bandwidth, latency)
            if kind == "R":
                linear = dataclasses.replace(cp_shape("L", shape, layout), states_per_rank=2 * layout.states_per_rank)
                cost = cp_layer_cost(layout.cp_linear, linear, bandwidth, latency, flop_rate)
                per_layer += forwards * cost.forward_exposed_s + cost.backward_exposed_s
            total += shape.pattern.count(kind) * layout.accumulation * per_layer
            continue
        scheme = layout.cp_linear if kind == "L" else layout.cp_softmax
        cost = cp_layer_cost(scheme, cp_shape(kind, shape, layout), bandwidth, latency, flop_rate)
        per_layer = forwards * cost.forward_exposed_s + cost.backward_exposed_s
        total += shape.pattern.count(kind) * layout.accumulation * per_layer
    return total


@dataclass
class StepTime:
    compute_s: float
    communication_s: float
    """Communication that is not hidden behind computation."""
    optimizer_s: float
    step_s: float
    tokens_per_s: float
    """All GPUs together."""
    mfu: float
    """Model FLOPs utilization the estimate implies."""


def _exposed_seconds(volume: CommVolume, layout: Layout, network: Network, hide_under: float) -> float:
    bandwidth, latency = group_bandwidth(volume.group, layout, network)
    seconds = volume.bytes / bandwidth + volume.messages * latency
    return max(0.0, seconds - hide_under) if volume.overlapped else seconds


def step_time(shape: Shape, layout: Layout, gpu: GpuSpec, network: Network,
              efficiency: float = DEFAULT_EFFICIENCY) -> StepTime:
    """Compute at ``efficiency`` × peak, plus exposed communication, plus the memory-bound AdamW step.

    Context-parallel traffic is priced by cp_layer_cost (LASP-2 and ring attention overlap, LASP-1's
    chain does not); dp gradient sync only shows where it exceeds the backward pass (2/3 of compute).
    """
    counted = flops(shape, layout)
    flop_rate = gpu.peak_flops * efficiency
    compute = counted.hardware_per_step_per_gpu / flop_rate
    exposed = _cp_exposed_seconds(shape, layout, network, flop_rate)
    for volume in communication(shape, layout):
        if volume.group != "cp":  # context parallelism: cp_layer_cost above
            exposed += _exposed_seconds(volume, layout, network, compute * 2 / 3 if volume.overlapped else 0.0)
    state = model_state_memory(shape, layout)
    local_optimized = (state.optimizer + state.optimizer_cpu) / 8
    # AdamW reads parameter, gradient and both moments and writes three of them: 28 B per parameter
    if state.optimizer_cpu:
        optimizer = local_optimized * 28 / 50e9 + local_optimized * 8 / 25e9  # host memory + PCIe
    else:
        optimizer = local_optimized * 28 / gpu.hbm_bytes_per_s
    total = compute + exposed + optimizer
    tokens_per_s = layout.dp * layout.micro_batch * layout.accumulation * layout.seq_len / total
    mfu = counted.model_per_token * tokens_per_s / (gpu.peak_flops * layout.world_size)
    return StepTime(compute, exposed, optimizer, total, tokens_per_s, mfu)


# ---------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------
@dataclass
class MemoryPlan:
    """Peak bytes per GPU, by item; ``total`` is what must fit into ``usable``."""

    parameters: float
    gradients: float
    optimizer: float
    weight_copies: float
    gathered: float
    activations_saved: float
    activation_transient: float
    loss: float
    loss_chunk: float
    optimizer_step: float
    allgather_kv: float
    optimizer_cpu: float
    total: float
    usable: float


def memory_plan(shape: Shape, layout: Layout, gpu: GpuSpec) -> MemoryPlan:
    """The peak is the later of two moments: the start of the backward pass (every saved activation,
    the loss buffers, the weight copies and the largest transient) and the optimizer step (model
    state plus AdamW's temporary, activations freed)."""
    state = model_state_memory(shape, layout)
    activations = activation_memory(shape, layout)
    model_state = state.parameters + state.gradients + state.optimizer
    # the loss chunk lives at the end of the forward pass, a layer's transient during the backward
    backward = (state.weight_copies + state.gathered + activations.saved + activations.loss
                + max(activations.transient, activations.loss_chunk))
    return MemoryPlan(
        parameters=state.parameters, gradients=state.gradients, optimizer=state.optimizer,
        weight_copies=state.weight_copies, gathered=state.gathered,
        activations_saved=activations.saved, activation_transient=activations.transient,
        loss=activations.loss, loss_chunk=activations.loss_chunk, optimizer_step=state.optimizer_step,
        allgather_kv=activations.allgather_kv, optimizer_cpu=state.optimizer_cpu,
        total=model_state + max(backward, state.optimizer_step), usable=gpu.usable_bytes)


@dataclass
class Plan:
    gpu: GpuSpec
    network: Network
    shape: Shape
    layout: Layout
    parameters: int
    memory: MemoryPlan
    communication: list[CommVolume]
    flops: Flops
    time: StepTime

    @property
    def fits(self) -> bool:
        return self.memory.total <= self.memory.usable


def make_plan(config: Config, gpu: str | GpuSpec = "h200", *,
              inter_node_gbps: float = DEFAULT_INTER_NODE_GBPS, world_size: int | None = None,
              efficiency: float = DEFAULT_EFFICIENCY, device_type: str = "cuda") -> Plan:
    """Memory, communication, FLOPs and step time of a validated config on ``gpu``; ``device_type`` "cpu"
    counts the activations of the CPU kernels instead of the GPU ones (a CPU run's peak)."""
    spec = gpu_spec(gpu)
    if not 0 < efficiency <= 1:
        raise ValueError(f"efficiency={efficiency!r} must be in (0, 1]: the fraction of peak FLOP/s reached.")
    if not inter_node_gbps > 0:
        raise ValueError(f"inter_node_gbps={inter_node_gbps!r} must be positive (GB/s per GPU between nodes).")
    network = network_for(spec, inter_node_gbps)
    shape, layout = shape_of(config), layout_of(config, world_size, device_type)
    return Plan(gpu=spec, network=network, shape=shape, layout=layout,
                parameters=parameter_counts(shape).total, memory=memory_plan(shape, layout, spec),
                communication=communication(shape, layout), flops=flops(shape, layout),
                time=step_time(shape, layout, spec, network, efficiency))


class PlanDoesNotFit(ValueError):
    """The planned peak memory per GPU exceeds the device's usable memory."""


def _detected_gpu() -> GpuSpec | None:
    """The spec of cuda:0 with its real memory size; None without a GPU (nothing to check)."""
    import torch  # only here: the rest of the planner runs without torch

    if not torch.cuda.is_available():
        return None
    properties = torch.cuda.get_device_properties(0)
    known = spec_for_device_name(properties.name) or GPUS["h100"]
    return dataclasses.replace(known, name=properties.name, memory_bytes=float(properties.total_memory))


def check_fits(config: Config, gpu: str | GpuSpec | None = None, *, world_size: int | None = None) -> None:
    """Raise PlanDoesNotFit, with the numbers and a layout that fits, when the plan of ``config``
    needs more memory per GPU than ``gpu`` has. ``gpu=None`` checks against cuda:0 (its actual
    memory size) and does nothing on a machine without a GPU."""
    spec = _detected_gpu() if gpu is None else gpu_spec(gpu)
    if spec is None:
        return
    plan = make_plan(config, spec, world_size=world_size)
    if plan.fits:
        return
    memory = plan.memory
    items = ", ".join(f"{name} {value / GIB:.1f}" for name, value in _memory_items(memory) if value)
    layout = plan.layout
    message = (f"the plan needs {memory.total / GIB:.1f} GiB per GPU but the {spec.name} has "
               f"{memory.usable / GIB:.1f} GiB usable ({spec.memory_bytes / GIB:.1f} GiB total). "
               f"GiB per GPU: {items}. Layout: dp={layout.dp} cp={layout.cp} tp={layout.tp}, "
               f"micro_batch={layout.micro_batch}, seq_len={layout.seq_len}, "
               f"activation_checkpointing={layout.checkpointing!r}.")
    best = next((c for c in recommend(config, layout.world_size, spec) if c.fits), None)
    if best is not None:
        message += (f" A layout that fits on {layout.world_size} GPU(s): {best.settings()} "
                    f"({best.memory_bytes / GIB:.1f} GiB).")
    else:
        message += (f" No dp/cp/tp/checkpointing layout fits on {layout.world_size} GPU(s): use more GPUs, "
                    f"a shorter data.seq_len or a smaller model.")
    raise PlanDoesNotFit(message + " See `spindle plan CONFIG`.")


# ---------------------------------------------------------------------------------------------
# Recommendation
# ---------------------------------------------------------------------------------------------
@dataclass
class Candidate:
    dp: int
    cp: int
    tp: int
    micro_batch: int
    checkpointing: str
    memory_bytes: float
    step_s: float
    tokens_per_s: float
    mfu: float
    fits: bool

    def settings(self) -> str:
        """The --set arguments that select this layout."""
        return (f"--set parallel.dp={self.dp} --set parallel.cp={self.cp} --set parallel.tp={self.tp} "
                f"--set train.micro_batch={self.micro_batch} "
                f"--set parallel.activation_checkpointing={self.checkpointing}")


def _divisors(number: int) -> list[int]:
    return [d for d in range(1, number + 1) if number % d == 0]


def _layout_allowed(config: Config, dp: int, cp: int, tp: int) -> bool:
    """The config rules on degrees (runtime/config.py validate) for one candidate layout."""
    model, parallel = config.model, config.parallel
    if model.heads % tp or model.kv_heads % tp:
        return False
    chunks = 2 * cp if parallel.cp_layout == "zigzag" else cp
    if config.data.seq_len % chunks or config.train.global_batch % dp:
        return False
    if parallel.cp_softmax == "ulysses" and "A" in layer_pattern(model):
        return (model.heads // tp) % cp == 0 and (model.kv_heads // tp) % cp == 0
    return True


def _candidate_configs(config: Config, num_gpus: int) -> list[Config]:
    pattern = layer_pattern(config.model)
    # with one layer kind, "linear"/"softmax" equal "full" or "none": offer only distinct policies
    policies = CHECKPOINTING_POLICIES if len(set(pattern)) == 2 else ("none", "full")
    configs = []
    for tp in (t for t in _divisors(num_gpus) if t <= GPUS_PER_NODE):
        for cp in _divisors(num_gpus // tp):
            dp = num_gpus // (tp * cp)
            if not _layout_allowed(config, dp, cp, tp):
                continue
            per_rank = config.train.global_batch // dp
            for micro in sorted({per_rank, 1}):
                for policy in policies:
                    candidate = dataclasses.replace(
                        config, parallel=dataclasses.replace(config.parallel, dp=dp, cp=cp, tp=tp,
                                                             activation_checkpointing=policy),
                        train=dataclasses.replace(config.train, micro_batch=micro))
                    configs.append(candidate)
    return configs


def recommend(config: Config, num_gpus: int, gpu: str | GpuSpec = "h200", *,
              inter_node_gbps: float = DEFAULT_INTER_NODE_GBPS, target_seq_len: int | None = None,
              efficiency: float = DEFAULT_EFFICIENCY) -> list[Candidate]:
    """Every dp × cp × tp layout of ``num_gpus`` GPUs (tp inside a node), micro-batch and
    checkpointing policy for ``target_seq_len`` (default data.seq_len), best first: layouts that
    fit by estimated step time, then the rest by memory. The config's schemes (cp_linear,
    cp_softmax, cp_layout, dp_engine) are kept."""
    if isinstance(num_gpus, bool) or not isinstance(num_gpus, int) or num_gpus < 1:
        raise ValueError(f"num_gpus={num_gpus!r} must be a positive integer.")
    if target_seq_len is not None:
        if isinstance(target_seq_len, bool) or not isinstance(target_seq_len, int) or target_seq_len < 2:
            raise ValueError(f"target_seq_len={target_seq_len!r} must be an integer >= 2.")
        config = dataclasses.replace(config, data=dataclasses.replace(config.data, seq_len=target_seq_len))
    candidates = []
    for candidate in _candidate_configs(config, num_gpus):
        plan = make_plan(candidate, gpu, inter_node_gbps=inter_node_gbps, efficiency=efficiency)
        layout = plan.layout
        candidates.append(Candidate(layout.dp, layout.cp, layout.tp, layout.micro_batch, layout.checkpointing,
                                    plan.memory.total, plan.time.step_s, plan.time.tokens_per_s,
                                    plan.time.mfu, plan.fits))
    return sorted(candidates, key=lambda c: (not c.fits, c.step_s if c.fits else c.memory_bytes, c.memory_bytes))


# ---------------------------------------------------------------------------------------------
# Output: JSON and the human-readable table
# ---------------------------------------------------------------------------------------------
def _memory_items(memory: MemoryPlan) -> list[tuple[str, float]]:
    return [
        ("parameters (fp32)", memory.parameters),
        ("gradients (fp32)", memory.gradients),
        ("optimizer states (fp32 AdamW)", memory.optimizer),
        ("bf16 weight copies (autocast)", memory.weight_copies),
        ("gathered weights and gradients (sharded)", memory.gathered),
        ("activations saved for backward", memory.activations_saved),
        ("loss buffers (final norm, d_hidden, d_weight)", memory.loss),
        ("peak transient: one layer's backward", memory.activation_transient),
        ("peak transient: loss chunk (forward)", memory.loss_chunk),
        ("AdamW step temporary (after backward)", memory.optimizer_step),
    ]


def plan_to_dict(plan: Plan) -> dict:
    """Everything in the plan as JSON-ready data (bytes, seconds, FLOPs)."""
    return {
        "gpu": dataclasses.asdict(plan.gpu) | {"peak_flops": plan.gpu.peak_flops, "usable_bytes": plan.gpu.usable_bytes},
        "network": dataclasses.asdict(plan.network),
        "model": dataclasses.asdict(plan.shape) | {"parameters": plan.parameters},
        "layout": dataclasses.asdict(plan.layout) | {"world_size": plan.layout.world_size},
        "memory": dataclasses.asdict(plan.memory),
        "fits": plan.fits,
        "communication": [dataclasses.asdict(volume) for volume in plan.communication],
        "flops": dataclasses.asdict(plan.flops),
        "time": dataclasses.asdict(plan.time),
    }


def _human(number: float, unit: str = "") -> str:
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(number) >= scale:
            return f"{number / scale:.2f} {prefix}{unit}"
    return f"{number:.2f} {unit}".rstrip()


def format_plan(plan: Plan) -> str:
    shape, layout, memory, gpu = plan.shape, plan.layout, plan.memory, plan.gpu
    lines = [
        f"GPU      {gpu.name}: {gpu.peak_flops / 1e12:.0f} TFLOP/s bf16, {gpu.hbm_bytes_per_s / 1e12:.1f} TB/s HBM, "
        f"{gpu.memory_bytes / 1e9:.0f} GB; links {plan.network.intra_node_bytes_per_s / 1e9:.0f} GB/s in a node, "
        f"{plan.network.inter_node_bytes_per_s / 1e9:.0f} GB/s between nodes",
        f"model    {len(shape.pattern)} layers ({shape.linear_layers} linear, {shape.softmax_layers} softmax"
        + (f", {shape.rattention_layers} RAttention, {shape.window_layers - shape.rattention_layers} window; "
           f"window {shape.window}" if shape.window_layers else "") + "; "
        f"{_abbreviated(shape.pattern)}), dim {shape.dim}, heads {shape.heads}/{shape.kv_heads} kv, "
        f"ffn {shape.ffn_dim}, vocab {shape.vocab_size}: {plan.parameters:,} parameters",
        f"layout   dp {layout.dp} × cp {layout.cp} × tp {layout.tp} = {layout.world_size} GPU(s); seq_len "
        f"{layout.seq_len:,} ({layout.local_tokens:,} per cp rank); micro_batch {layout.micro_batch} × "
        f"{layout.accumulation} accumulation; checkpointing {layout.checkpointing}; "
        f"{'bf16 autocast' if layout.autocast else 'fp32'}; {_engine(layout)}",
        "",
    ]
    # MiB for toy configs, so their table does not read as a column of zeros
    unit, scale = ("GiB", GIB) if memory.total >= GIB else ("MiB", 2**20)
    lines.append(f"{'memory per GPU':<48}{unit:>10}")
    lines += [f"  {name:<46}{value / scale:>10.2f}" for name, value in _memory_items(memory) if value]
    verdict = "fits" if plan.fits else "DOES NOT FIT"
    lines.append(f"  {'total':<46}{memory.total / scale:>10.2f}   of {memory.usable / GIB:.1f} GiB usable: {verdict}")
    if memory.optimizer_cpu:
        lines.append(f"  {'optimizer states in host memory':<46}{memory.optimizer_cpu / scale:>10.2f}")
    if memory.allgather_kv:
        lines.append(f"  (all-gather attention K/V of one layer: {memory.allgather_kv / scale:.2f} {unit}, in the transient)")
    lines += ["", f"{'communication per step per GPU':<48}{'GiB':>10}{'group':>8}{'overlap':>9}"]
    for volume in plan.communication:
        lines.append(f"  {volume.name:<46}{volume.bytes / GIB:>10.3f}{volume.group:>8}"
                     f"{'yes' if volume.overlapped else 'no':>9}")
    if not plan.communication:
        lines.append("  none (one GPU)")
    time = plan.time
    lines += [
        "",
        f"FLOPs    {_human(plan.flops.model_per_token, 'FLOP')} per token (model), "
        f"{_human(plan.flops.model_per_step, 'FLOP')} per step (all GPUs), "
        f"{_human(plan.flops.hardware_per_step_per_gpu, 'FLOP')} per GPU incl. recompute",
        f"time     {time.step_s:.3f} s per step = compute {time.compute_s:.3f} + exposed communication "
        f"{time.communication_s:.3f} + optimizer {time.optimizer_s:.3f}; {time.tokens_per_s:,.0f} tokens/s, "
        f"MFU {100 * time.mfu:.1f}%",
    ]
    return "\n".join(lines)


def _abbreviated(pattern: str) -> str:
    return pattern if len(pattern) <= 16 else pattern[:16] + "…"


def _engine(layout: Layout) -> str:
    if layout.replicas == 1:
        return "one replica (no data-parallel engine)"
    if layout.dp_engine == "fsdp":
        return "FSDP2 over dp×cp" + (" with bf16 weights" if layout.bf16_parameters else "")
    return f"DeepSpeed ZeRO-{layout.zero_stage}" + (" + optimizer offload" if layout.offload_optimizer else "")


def format_candidates(candidates: list[Candidate], num_gpus: int, seq_len: int, limit: int = 8) -> str:
    lines = [f"recommendation for {num_gpus} GPU(s) at seq_len {seq_len:,} (best first)",
             f"  {'dp':>4}{'cp':>5}{'tp':>4}{'micro':>6}  {'checkpointing':<14}{'GiB':>8}{'step s':>10}"
             f"{'tokens/s':>12}{'MFU':>7}  fits"]
    for candidate in candidates[:limit]:
        lines.append(f"  {candidate.dp:>4}{candidate.cp:>5}{candidate.tp:>4}{candidate.micro_batch:>6}  "
                     f"{candidate.checkpointing:<14}{candidate.memory_bytes / GIB:>8.1f}{candidate.step_s:>10.3f}"
                     f"{candidate.tokens_per_s:>12,.0f}{100 * candidate.mfu:>6.1f}%  {'yes' if candidate.fits else 'no'}")
    if not candidates:
        lines.append("  no layout satisfies the divisibility rules (heads, kv_heads, seq_len, global_batch)")
    elif candidates[0].fits:
        lines.append(f"  use: {candidates[0].settings()}")
    else:
        lines.append("  nothing fits: use more GPUs, a shorter sequence or a smaller model")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# CLI: spindle plan CONFIG [--set k=v ...] [--json] [--gpu NAME] [--link-gbps N] [--target-seq-len N]
# ---------------------------------------------------------------------------------------------
def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive integer")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive number")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spindle plan",
        description="Per-GPU memory, communication, FLOPs and step time of a training config, and the "
                    "dp/cp/tp/checkpointing layout that fits a sequence length on a number of GPUs.")
    parser.add_argument("config", help="YAML config file (e.g. configs/hybrid-1m-1gpu.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set data.seq_len=262144 (repeatable)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument("--gpu", default="h200", type=str.lower, choices=sorted(GPUS),
                        help="GPU to plan for (default h200)")
    parser.add_argument("--link-gbps", type=_positive_float, default=DEFAULT_INTER_NODE_GBPS, metavar="N",
                        help="inter-node bandwidth per GPU in GB/s (gigabytes per second; default 50); "
                             "GPUs inside a node use the GPU's NVLink figure")
    parser.add_argument("--target-seq-len", type=_positive_int, default=None, metavar="N",
                        help="sequence length the recommendation must fit (default data.seq_len)")
    parser.add_argument("--gpus", type=_positive_int, default=None, metavar="N",
                        help="GPUs for the recommendation and for parallel.dp = -1 (default dp*cp*tp)")
    parser.add_argument("--efficiency", type=_positive_float, default=DEFAULT_EFFICIENCY, metavar="F",
                        help=f"fraction of peak FLOP/s assumed reachable (default {DEFAULT_EFFICIENCY})")
    return parser


def run(args: argparse.Namespace) -> tuple[dict, str]:
    """The plan and recommendation as (JSON data, table text); raises ValueError on bad input."""
    if args.efficiency > 1:
        raise ValueError(f"--efficiency {args.efficiency} must be at most 1 (a fraction of peak FLOP/s).")
    config = load_config(args.config, args.overrides, world_size=args.gpus)
    plan = make_plan(config, args.gpu, inter_node_gbps=args.link_gbps, world_size=args.gpus,
                     efficiency=args.efficiency)
    num_gpus = args.gpus or plan.layout.world_size
    seq_len = args.target_seq_len or config.data.seq_len
    candidates = recommend(config, num_gpus, args.gpu, inter_node_gbps=args.link_gbps,
                           target_seq_len=seq_len, efficiency=args.efficiency)
    data = {"config": str(args.config), "overrides": list(args.overrides), **plan_to_dict(plan),
            "recommendation": {"num_gpus": num_gpus, "seq_len": seq_len,
                               "best": dataclasses.asdict(candidates[0]) if candidates and candidates[0].fits else None,
                               "candidates": [dataclasses.asdict(c) for c in candidates[:8]]}}
    text = (f"spindle plan {args.config}" + "".join(f" --set {o}" for o in args.overrides) + "\n\n"
            + format_plan(plan) + "\n\n" + format_candidates(candidates, num_gpus, seq_len))
    return data, text


def main(argv: Sequence[str] | None = None) -> int:
    """`spindle plan`: 0 on success, 2 on bad input (argparse, config or planner errors)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_request:  # argparse: --help (0) or a usage error (2), already printed
        return int(exit_request.code or 0)
    try:
        data, text = run(args)
    except (ConfigError, ValueError) as error:
        print(f"spindle plan: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(data, indent=2) if args.json else text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
