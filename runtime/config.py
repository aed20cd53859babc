"""Typed configuration for spindle.

Seven small sections (model, data, parallel, train, checkpoint, logging, launch). Every field
carries a docstring (the string literal right below it). Loading, ``--set`` overrides and
validation live further down in this module; validation runs once, before anything starts.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ModelConfig:
    layers: str = "LLLA"
    """Layer pattern: one letter per layer, L = linear attention (with decay), A = softmax
    attention. Repeated (and truncated) to ``n_layers``, e.g. "LLLA" with 8 layers -> LLLALLLA."""
    n_layers: int = 4
    """Number of decoder layers."""
    dim: int = 128
    """Model (residual stream) width. Must be divisible by ``heads``."""
    heads: int = 4
    """Query heads of every token mixer. head_dim = dim // heads."""
    kv_heads: int = 4
    """Key/value heads of softmax layers (GQA). Must divide ``heads``."""
    vocab_size: int = 256
    """Vocabulary size of the embedding and output layer."""
    ffn_dim: int = 0
    """Hidden width of the SwiGLU MLP; 0 picks 8/3 * dim rounded up to a multiple of 64."""
    decay: str = "constant"
    """Decay of linear layers: "none", "constant" (per-head slopes, Lightning Attention) or
    "data" (a data-dependent per-head, per-token log-decay gate)."""
    feature_map: str = "identity"
    """Feature map applied to q and k in linear layers: "identity", "silu", "relu" or "elu1" (elu + 1)."""
    rope_theta: float = 10000.0
    """RoPE base of softmax layers."""
    norm_eps: float = 1e-6
    """RMSNorm epsilon."""
    tie_embeddings: bool = False
    """Share the input embedding and the output projection."""
    init_std: float = 0.02
    """Standard deviation of the normal weight init (output projections are scaled by depth)."""


@dataclass
class DataConfig:
    source: str = "synthetic:recall"
    """Where tokens come from: "synthetic:recall" (associative recall), "synthetic:copy", or a path
    to a token file (.bin raw memmap of ``dtype``, or .npy)."""
    seq_len: int = 256
    """Tokens per training sequence (global, before context-parallel sharding)."""
    dtype: str = "uint16"
    """Element type of a .bin token file: "uint16" or "uint32" (ignored for .npy and synthetic)."""
    num_samples: int = 0
    """Distinct synthetic samples before the stream repeats; 0 means unlimited."""


@dataclass
class ParallelConfig:
    dp: int = 1
    """Data-parallel degree. -1 infers it from the world size."""
    cp: int = 1
    """Context-parallel degree (sequence sharding)."""
    tp: int = 1
    """Tensor-parallel degree (heads and MLP sharding)."""
    cp_layout: str = "zigzag"
    """Token layout across cp ranks: "zigzag" (load-balanced for causal attention) or "contiguous"."""
    cp_linear: str = "lasp2"
    """Context-parallel scheme of linear layers: "lasp2" (one AllGather of states) or "lasp1" (ring)."""
    cp_softmax: str = "allgather"
    """Context-parallel scheme of softmax layers: "allgather", "ring" or "ulysses"."""
    dp_engine: str = "fsdp"
    """Data-parallel engine: "fsdp" (FSDP2) or "deepspeed" (ZeRO)."""
    zero_stage: int = 2
    """ZeRO stage (1, 2 or 3) when ``dp_engine`` is "deepspeed"."""
    offload_optimizer: bool = False
    """DeepSpeed only: keep optimizer states in CPU memory."""
    activation_checkpointing: str = "none"
    """Recompute activations in backward: "none", "full", "linear" (linear layers only) or
    "softmax" (softmax layers only)."""


@dataclass
class TrainConfig:
    steps: int = 100
    """Optimizer steps to run."""
    global_batch: int = 8
    """Sequences per optimizer step, split over dp ranks; the same global batch gives the same loss
    on every layout."""
    micro_batch: int = 0
    """Sequences per forward/backward on one dp rank; 0 means global_batch // dp (no accumulation)."""
    lr: float = 3e-3
    """Peak learning rate of AdamW."""
    min_lr_ratio: float = 0.1
    """Final learning rate of the cosine schedule as a fraction of ``lr``."""
    warmup_steps: int = 10
    """Linear warm-up steps before the cosine decay."""
    weight_decay: float = 0.1
    """AdamW weight decay (not applied to norms, biases and decays)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    seed: int = 0
    """Seed of model init and data sampling."""
    precision: str = "auto"
    """"auto" (bf16 autocast on GPU, fp32 on CPU), "bf16" or "fp32"."""


@dataclass
class CheckpointConfig:
    every: int = 0
    """Save a sharded checkpoint every this many steps; 0 disables checkpointing."""
    keep: int = 2
    """Committed checkpoints to keep on disk (at least 1)."""
    async_save: bool = False
    """Write shards in the background while training continues."""


@dataclass
class LoggingConfig:
    log_every: int = 1
    """Write a metrics line every this many steps."""
    wandb: str = "offline"
    """Weights & Biases mode: "offline" (into RUN_DIR/wandb), "online" or "disabled"."""
    project: str = "spindle"
    """wandb project name."""
    run_name: str = ""
    """wandb run name; empty uses the run directory's name."""
    progress: bool = True
    """Show a live progress bar on the console (rank 0 only)."""


@dataclass
class LaunchConfig:
    max_failures: int = 0
    """Restarts after a worker dies before the job fails (Ray launcher)."""
    use_gpu: str = "auto"
    """"auto" (GPUs when the cluster has them), "true" or "false"."""
    cpus_per_worker: int = 1
    """CPUs reserved for each Ray worker."""
    collective_timeout_s: float = 600.0
    """Timeout of collectives; a rank that stops answering fails the job with a clear error."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
