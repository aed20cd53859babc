"""Typed configuration for spindle.

Seven small sections (model, data, parallel, train, checkpoint, logging, launch). Every field
carries a docstring (the string literal right below it). Loading, ``--set`` overrides and
validation live further down in this module; validation runs once, before anything starts.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import yaml

from spindle.runtime.degrees import LayoutError, ParallelDegrees


@dataclass
class ModelConfig:
    layers: str = "LLLA"
    """Layer pattern: one letter per layer, L = linear attention (with decay), A = softmax
    attention, R = RAttention (sliding-window softmax attention plus linear attention over the
    tokens that left the window), S = sliding-window softmax attention. Repeated (and truncated)
    to ``n_layers``, e.g. "LLLA" with 8 layers -> LLLALLLA."""
    window: int = 512
    """Sliding window w of R and S layers: query i sees keys i - w < j <= i (R's linear branch
    covers the rest). At least 1 and below data.seq_len when R or S layers are present; any size
    relative to the context-parallel chunk (each rank fetches the w tokens before its chunks)."""
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
    output_gate: str = "sigmoid"
    """Activation of the output gate of linear layers (TransNormerLLM style): "sigmoid" or "silu"."""
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
    """Where tokens come from: "synthetic:recall" (associative recall), "synthetic:copy", a folder
    written by `spindle data prepare`, or a path to a token file (.bin raw memmap of ``dtype``, or .npy)."""
    seq_len: int = 256
    """Tokens per training sequence (global, before context-parallel sharding)."""
    dtype: str = "uint16"
    """Element type of a .bin token file: "uint16" or "uint32" (ignored for .npy and synthetic)."""
    num_samples: int = 0
    """Distinct synthetic samples before the stream repeats; 0 means unlimited."""
    recall_pairs: int = 0
    """Key-value pairs (and queries) per sequence of "synthetic:recall"; 0 picks seq_len // 16.
    Capped by the number of distinct keys, (vocab_size - 2) // 3."""
    packing: str = "documents"
    """How a prepared folder's documents fill sequences: "documents" keeps their boundaries (batches
    carry cu_seqlens: attention, linear-attention state and RoPE positions restart at each document, and
    no token is predicted across one) or "concat" (one plain token stream). Other sources have no
    recorded boundaries and train alike under both."""


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
    """Recompute activations in backward: "none", "full" (every layer), "linear" (L layers only) or
    "softmax" (A and S layers only)."""


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
    """Restarts after a worker or a whole node dies before the job fails (Ray launcher); each restart
    continues from the last committed checkpoint. 0: the first failure ends the job with an error
    naming the lost host and its ranks, and the command that resumes."""
    min_workers: int = 0
    """Fewest workers (dp * cp * tp) a restart may continue on when a lost node left too little room for
    the full job: dp shrinks (cp and tp stay; the checkpoint reshards onto the new layout and the global
    batch stays, so the loss curve continues). A multiple of cp * tp, at most the job's workers;
    0 (default) means the full job, i.e. never shrink."""
    capacity_timeout_s: float = 600.0
    """How long a restart after a lost node waits for the cluster to have room again (for the full job,
    or for ``min_workers``) before failing with an error; a message says what it waits for meanwhile.
    Counted from when Ray has declared the lost node dead (its health checks take about 15 s by default).
    0 fails at once."""
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


# ---------------------------------------------------------------------------------------------
# Errors, allowed values
# ---------------------------------------------------------------------------------------------
class ConfigError(ValueError):
    """A configuration the user can fix: the message names the key, the bad value and what is allowed."""


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "parallel": ParallelConfig,
    "train": TrainConfig,
    "checkpoint": CheckpointConfig,
    "logging": LoggingConfig,
    "launch": LaunchConfig,
}

# Allowed values, each defined once here and imported by the code that acts on them
# (runtime/layers.py, runtime/model.py, parallel/parallelize.py, runtime/plan.py).
DECAY_KINDS = ("none", "constant", "data")
FEATURE_MAPS = ("identity", "silu", "relu", "elu1")
OUTPUT_GATES = ("sigmoid", "silu")
# parallel.activation_checkpointing -> the layer kinds whose blocks recompute their activations
ACTIVATION_CHECKPOINTING = {"none": "", "full": "LARS", "linear": "L", "softmax": "AS"}

CHOICES: dict[str, tuple[str, ...]] = {
    "model.decay": DECAY_KINDS,
    "model.feature_map": FEATURE_MAPS,
    "model.output_gate": OUTPUT_GATES,
    "data.dtype": ("uint16", "uint32"),
    "data.packing": ("documents", "concat"),
    "parallel.cp_layout": ("zigzag", "contiguous"),
    "parallel.cp_linear": ("lasp2", "lasp1"),
    "parallel.cp_softmax": ("allgather", "ring", "ulysses"),
    "parallel.dp_engine": ("fsdp", "deepspeed"),
    "parallel.activation_checkpointing": tuple(ACTIVATION_CHECKPOINTING),
    "train.precision": ("auto", "bf16", "fp32"),
    "logging.wandb": ("offline", "online", "disabled"),
    "launch.use_gpu": ("auto", "true", "false"),
}

SYNTHETIC_SOURCES = ("synthetic:recall", "synthetic:copy")
LAYER_LETTERS = {"L": "linear attention", "A": "softmax attention", "R": "RAttention",
                 "S": "sliding-window attention"}


def quoted(values: Iterable[object]) -> str:
    """'a', 'b', 'c': allowed values as they appear in error messages."""
    return ", ".join(repr(value) for value in values)


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """The suffix ` Did you mean 'x'?` for the closest candidate, or an empty string."""
    matches = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f" Did you mean '{matches[0]}'?" if matches else ""


# ---------------------------------------------------------------------------------------------
# Building a Config from plain data: unknown keys and wrong types are caught here
# ---------------------------------------------------------------------------------------------
def _field_types(section_class: type) -> dict[str, type]:
    # The dataclasses use postponed annotations (strings); get_type_hints resolves them to classes.
    return typing.get_type_hints(section_class)


def _type_name(kind: type) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[kind]


def _coerce_value(key: str, value: object, kind: type) -> object:
    """Check a value read from YAML (or a dict) against the field type; returns the typed value."""
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # PyYAML reads "3e-3" (no dot) as a string; accept any spelling float() accepts.
            try:
                return float(value)
            except ValueError:
                pass
    elif kind is str:
        if isinstance(value, str):
            return value
        if isinstance(value, bool):
            # YAML turns unquoted true/false/yes/no into booleans; string fields such as
            # launch.use_gpu take them by their lower-case name.
            return "true" if value else "false"
    raise ConfigError(f"{key} = {value!r} has the wrong type: expected {_type_name(kind)}.")


def _section_from_dict(section: str, values: object) -> object:
    section_class = SECTIONS[section]
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(
            f"{section} = {values!r} is not a mapping: expected a section of 'key: value' lines "
            f"(keys: {quoted(_field_types(section_class))}).")
    types = _field_types(section_class)
    typed: dict[str, object] = {}
    for name, value in values.items():
        if name not in types:
            raise ConfigError(
                f"{section}.{name} = {value!r} is not a known key of section '{section}'."
                f"{did_you_mean(str(name), types)} Allowed keys: {quoted(types)}.")
        typed[name] = _coerce_value(f"{section}.{name}", value, types[name])
    return section_class(**typed)


def config_from_dict(values: dict) -> Config:
    """Build a Config from nested plain data (YAML or ``to_dict`` output); no range checks."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"the config is {type(values).__name__} {values!r}: expected a mapping of sections "
                          f"({quoted(SECTIONS)}).")
    for section in values:
        if section not in SECTIONS:
            raise ConfigError(
                f"{section} = {values[section]!r} is not a known config section.{did_you_mean(str(section), SECTIONS)} "
                f"Allowed sections: {quoted(SECTIONS)}.")
    return Config(**{section: _section_from_dict(section, values.get(section)) for section in SECTIONS})


def to_dict(config: Config) -> dict:
    """Nested plain dict of every section and field (round-trips through ``config_from_dict``)."""
    return dataclasses.asdict(config)


def save_config(config: Config, path: str | os.PathLike) -> None:
    """Write the config as YAML (sections and keys in declaration order)."""
    with open(path, "w", encoding="utf-8") as handle:
        yaml.safe_dump(to_dict(config), handle, sort_keys=False, default_flow_style=False)


# ---------------------------------------------------------------------------------------------
# --set overrides
# ---------------------------------------------------------------------------------------------
_TRUE_WORDS = ("true", "1", "yes", "on")
_FALSE_WORDS = ("false", "0", "no", "off")


def _parse_override_value(key: str, text: str, kind: type) -> object:
    """Turn the text of ``--set key=text`` into the field's type."""
    try:
        if kind is bool:
            if text.lower() in _TRUE_WORDS:
                return True
            if text.lower() in _FALSE_WORDS:
                return False
            raise ValueError(text)
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
    except ValueError:
        raise ConfigError(f"--set {key}={text}: {text!r} is not {_type_name(kind)}, which {key} expects.") from None
    return text


def apply_overrides(values: dict, overrides: Iterable[str]) -> dict:
    """Apply ``section.key=value`` strings to nested plain data; returns a new dict."""
    result = {section: dict(content) if isinstance(content, dict) else content
              for section, content in (values or {}).items()}
    for override in overrides:
        key, separator, text = override.partition("=")
        key = key.strip()
        section, dot, name = key.partition(".")
        if not separator or not dot or not section or not name:
            raise ConfigError(f"--set {override!r} is not of the form section.key=value "
                              f"(for example --set train.steps=200).")
        if section not in SECTIONS:
            raise ConfigError(f"--set {key}: '{section}' is not a known config section."
                              f"{did_you_mean(section, SECTIONS)} Allowed sections: {quoted(SECTIONS)}.")
        types = _field_types(SECTIONS[section])
        if name not in types:
            raise ConfigError(f"--set {key}: '{name}' is not a known key of section '{section}'."
                              f"{did_you_mean(name, types)} Allowed keys: {quoted(types)}.")
        content = result.get(section)
        content = dict(content) if isinstance(content, dict) else {}
        content[name] = _parse_override_value(key, text, types[name])
        result[section] = content
    return result


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------
def read_yaml(path: str | os.PathLike) -> dict:
    """Read a YAML config file into plain data; missing files and YAML syntax errors are ConfigErrors."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist: pass the path of a YAML config "
                          f"(for example configs/demo.yaml).")
    try:
        with open(path, encoding="utf-8") as handle:
            values = yaml.safe_load(handle)
    except yaml.YAMLError as error:
        # PyYAML's messages span lines; a ConfigError is one line.
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {' '.join(str(error).split())}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"config file {str(path)!r} holds a {type(values).__name__}: expected a mapping of "
                          f"sections ({quoted(SECTIONS)}).")
    return values


def load_config(path: str | os.PathLike, overrides: Iterable[str] = (), *,
                world_size: int | None = None) -> Config:
    """Read YAML, apply ``--set`` overrides, build the typed config and validate it once.

    Raises ConfigError (a ValueError) with one message naming the key, the value and what is allowed.
    """
    values = apply_overrides(read_yaml(path), overrides)
    config = config_from_dict(values)
    validate(config, world_size=world_size)
    return config


# ---------------------------------------------------------------------------------------------
# Validation: ranges, scheme names, cross-field rules, data files. Runs once, before anything starts.
# ---------------------------------------------------------------------------------------------
def _check_choices(config: Config) -> None:
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        if value not in allowed:
            raise ConfigError(f"{key} = {value!r} is not allowed: expected one of {quoted(allowed)}."
                              f"{did_you_mean(str(value), allowed)}")


def _check_at_least(key: str, value: float, minimum: float) -> None:
    if value < minimum:
        raise ConfigError(f"{key} = {value!r} is out of range: expected a value >= {minimum}.")


def _check_positive(key: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{key} = {value!r} is out of range: expected a value > 0.")


def _check_ranges(config: Config) -> None:
    model, data, train = config.model, config.data, config.train
    for key, value, minimum in [
        ("model.n_layers", model.n_layers, 1), ("model.dim", model.dim, 1), ("model.heads", model.heads, 1),
        ("model.kv_heads", model.kv_heads, 1), ("model.vocab_size", model.vocab_size, 2),
        ("model.ffn_dim", model.ffn_dim, 0), ("model.window", model.window, 1), ("data.seq_len", data.seq_len, 2),
        ("data.num_samples", data.num_samples, 0), ("data.recall_pairs", data.recall_pairs, 0),
        ("parallel.cp", config.parallel.cp, 1),
        ("parallel.tp", config.parallel.tp, 1), ("train.steps", train.steps, 1),
        ("train.global_batch", train.global_batch, 1), ("train.micro_batch", train.micro_batch, 0),
        ("train.warmup_steps", train.warmup_steps, 0), ("train.weight_decay", train.weight_decay, 0),
        ("train.grad_clip", train.grad_clip, 0), ("train.seed", train.seed, 0),
        ("checkpoint.every", config.checkpoint.every, 0), ("checkpoint.keep", config.checkpoint.keep, 1),
        ("logging.log_every", config.logging.log_every, 1), ("launch.max_failures", config.launch.max_failures, 0),
        ("launch.cpus_per_worker", config.launch.cpus_per_worker, 1),
        ("launch.min_workers", config.launch.min_workers, 0),
        ("launch.capacity_timeout_s", config.launch.capacity_timeout_s, 0),
    ]:
        _check_at_least(key, value, minimum)
    for key, value in [("model.rope_theta", model.rope_theta), ("model.norm_eps", model.norm_eps),
                       ("model.init_std", model.init_std), ("train.lr", train.lr),
                       ("launch.collective_timeout_s", config.launch.collective_timeout_s)]:
        _check_positive(key, value)
    if config.parallel.dp != -1:
        _check_at_least("parallel.dp", config.parallel.dp, 1)
    if config.parallel.zero_stage not in (1, 2, 3):
        raise ConfigError(f"parallel.zero_stage = {config.parallel.zero_stage!r} is not allowed: expected 1, 2 or 3.")
    if not 0.0 <= train.min_lr_ratio <= 1.0:
        raise ConfigError(f"train.min_lr_ratio = {train.min_lr_ratio!r} is out of range: expected 0 <= value <= 1.")
    for key, value in [("train.beta1", train.beta1), ("train.beta2", train.beta2)]:
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"{key} = {value!r} is out of range: expected 0 <= value < 1.")
    if not config.logging.project:
        raise ConfigError("logging.project = '' is empty: expected a wandb project name such as 'spindle'.")


def layer_pattern(model: ModelConfig) -> str:
    """The resolved layer pattern: ``model.layers`` repeated and truncated to ``model.n_layers`` letters."""
    repeats = -(-model.n_layers // max(len(model.layers), 1))
    return (model.layers * repeats)[: model.n_layers]


def _check_model(model: ModelConfig) -> None:
    bad_letters = sorted(set(model.layers) - set(LAYER_LETTERS))
    if not model.layers or bad_letters:
        raise ConfigError(
            f"model.layers = {model.layers!r} is not a layer pattern: expected a non-empty string of the letters "
            f"{quoted(LAYER_LETTERS)} (L = linear attention, A = softmax attention, R = RAttention, "
            f"S = sliding-window attention), e.g. 'LLLA'"
            + (f"; found {quoted(bad_letters)}." if bad_letters else "."))
    if model.dim % model.heads:
        raise ConfigError(f"model.dim = {model.dim} is not divisible by model.heads = {model.heads}: "
                          f"dim must be a multiple of heads (head_dim = dim // heads).")
    if model.heads % model.kv_heads:
        raise ConfigError(f"model.heads = {model.heads} is not divisible by model.kv_heads = {model.kv_heads}: "
                          f"kv_heads must divide heads (grouped-query attention).")
    if (model.dim // model.heads) % 2:
        raise ConfigError(f"model.dim // model.heads = {model.dim // model.heads} is odd: rotary position "
                          f"embeddings need an even head_dim; change model.dim or model.heads.")


def _check_parallel(config: Config, world_size: int | None) -> None:
    model, parallel, seq_len = config.model, config.parallel, config.data.seq_len
    for name, heads in [("model.heads", model.heads), ("model.kv_heads", model.kv_heads)]:
        if heads % parallel.tp:
            raise ConfigError(f"{name} = {heads} is not divisible by parallel.tp = {parallel.tp}: tensor "
                              f"parallelism shards heads, so tp must divide both model.heads and model.kv_heads.")
    chunks = 2 * parallel.cp if parallel.cp_layout == "zigzag" else parallel.cp
    if seq_len % chunks:
        raise ConfigError(
            f"data.seq_len = {seq_len} is not divisible by {chunks} ({'2 * ' if parallel.cp_layout == 'zigzag' else ''}"
            f"parallel.cp with parallel.cp_layout = {parallel.cp_layout!r}): use a multiple of {chunks}.")
    if parallel.cp_softmax == "ulysses" and "A" in layer_pattern(model):
        for name, heads in [("model.heads", model.heads), ("model.kv_heads", model.kv_heads)]:
            if (heads // parallel.tp) % parallel.cp:
                raise ConfigError(
                    f"{name} = {heads} does not split over parallel.cp = {parallel.cp} with "
                    f"parallel.cp_softmax = 'ulysses' (heads per tp rank: {heads // parallel.tp}): Ulysses needs "
                    f"{name} / parallel.tp divisible by parallel.cp; use 'allgather' or 'ring', or change the heads.")
    if world_size is not None:
        _check_degrees_match(parallel, world_size)
    _check_min_workers(config, world_size)
    _check_dp_engine(config, world_size)


def _check_degrees_match(parallel: ParallelConfig, world_size: int) -> None:
    dp = parallel.dp if parallel.dp != -1 else world_size // (parallel.cp * parallel.tp)
    if dp < 1 or dp * parallel.cp * parallel.tp != world_size:
        raise ConfigError(
            f"parallel.dp * parallel.cp * parallel.tp = {parallel.dp} * {parallel.cp} * {parallel.tp} does not "
            f"match the world size {world_size}: the product must equal the number of processes "
            f"(or set parallel.dp = -1 with cp * tp dividing {world_size}).")


def _check_min_workers(config: Config, world_size: int | None) -> None:
    """launch.min_workers: whole cp * tp groups (only dp shrinks), and no more than the job has."""
    minimum, parallel = config.launch.min_workers, config.parallel
    if minimum == 0:
        return
    group = parallel.cp * parallel.tp
    if minimum % group:
        raise ConfigError(
            f"launch.min_workers = {minimum} is not a multiple of parallel.cp * parallel.tp = {group}: a restart "
            f"on fewer workers drops whole data-parallel groups (cp and tp stay), so use a multiple of {group} "
            f"(e.g. {max(group, minimum - minimum % group)}), or 0 for the full job.")
    workers = parallel.dp * group if parallel.dp != -1 else world_size
    if workers is not None and minimum > workers:
        raise ConfigError(
            f"launch.min_workers = {minimum} is more than the job's {workers} worker(s) (parallel.dp * parallel.cp "
            f"* parallel.tp = {parallel.dp if parallel.dp != -1 else workers // group} * {parallel.cp} * "
            f"{parallel.tp}): use a value up to {workers} (the fewest workers a restart may continue on), or 0 "
            f"for the full job.")


def _check_dp_engine(config: Config, world_size: int | None) -> None:
    """What the DeepSpeed engine (spindle.parallel.zero) does not support yet, refused up front."""
    parallel = config.parallel
    if parallel.dp_engine != "deepspeed":
        if parallel.offload_optimizer:
            raise ConfigError("parallel.offload_optimizer = true needs parallel.dp_engine = 'deepspeed' (ZeRO-Offload); "
                              "FSDP2 keeps optimizer states on the device. Set one or drop the other.")
        return
    if parallel.tp != 1:
        raise ConfigError(f"parallel.tp = {parallel.tp} is not supported with parallel.dp_engine = 'deepspeed' "
                          f"(ZeRO runs over dp x cp only): use parallel.dp_engine = 'fsdp' for tensor parallelism, "
                          f"or set parallel.tp = 1.")
    if world_size == 1:
        raise ConfigError("parallel.dp_engine = 'deepspeed' needs a multi-process job (it shards over dp x cp): "
                          "start 2 or more processes with torchrun or `spindle train`, or use 'fsdp' for one process.")
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError("parallel.dp_engine = 'deepspeed' but the deepspeed package is not installed: install it "
                          "with `DS_BUILD_OPS=0 pip install --no-build-isolation deepspeed` (or "
                          "pip install 'spindle[deepspeed]'), or use parallel.dp_engine = 'fsdp'.")


def _check_batch(config: Config, world_size: int | None) -> None:
    train, parallel = config.train, config.parallel
    dp = parallel.dp
    if dp == -1:
        if world_size is None:
            return
        dp = _resolved_degrees(parallel, world_size).dp
    if train.global_batch % dp:
        raise ConfigError(f"train.global_batch = {train.global_batch} is not divisible by parallel.dp = {dp}: "
                          f"every data-parallel rank takes the same number of sequences.")
    per_rank = train.global_batch // dp
    if train.micro_batch and per_rank % train.micro_batch:
        raise ConfigError(f"train.micro_batch = {train.micro_batch} does not divide train.global_batch / "
                          f"parallel.dp = {per_rank}: use a divisor of {per_rank} (or 0 for no accumulation).")


def _check_window(config: Config) -> None:
    """A window that covers the whole sequence is no window: R's linear branch would never see a token."""
    window, seq_len = config.model.window, config.data.seq_len
    windowed = sorted(set(layer_pattern(config.model)) & {"R", "S"})
    if windowed and window >= seq_len:
        raise ConfigError(
            f"model.window = {window} is not below data.seq_len = {seq_len}, so the {quoted(windowed)} layers "
            f"would see every earlier token (no sliding window; R's linear branch would stay empty): use a "
            f"window below {seq_len}, or A layers for full attention.")


def _check_types(config: Config) -> None:
    """Configs built in code (not from YAML) get the same type errors as loaded ones."""
    for section, section_class in SECTIONS.items():
        values = getattr(config, section)
        if not isinstance(values, section_class):
            raise ConfigError(f"{section} = {values!r} has the wrong type: expected a {section_class.__name__}.")
        for name, kind in _field_types(section_class).items():
            value = getattr(values, name)
            if type(value) is not kind and not (kind is float and type(value) is int):
                raise ConfigError(f"{section}.{name} = {value!r} has the wrong type: expected {_type_name(kind)}.")


def validate(config: Config, world_size: int | None = None) -> None:
    """Check every rule the config must satisfy; raises ConfigError on the first violation.

    ``world_size`` (the number of processes) adds the rule dp * cp * tp == world_size when it is known.
    """
    _check_types(config)
    _check_choices(config)
    _check_ranges(config)
    _check_model(config.model)
    _check_window(config)
    _check_parallel(config, world_size)
    _check_batch(config, world_size)
    # Imported here: data.py imports ConfigError from this module.
    from spindle.runtime.data import check_document_support, validate_data

    validate_data(config.data, config.model.vocab_size)
    check_document_support(config)


def check_world_size(config: Config, world_size: int) -> None:
    """Only the rules that need the number of processes, for a config that ``validate`` (without a
    world size) already passed: checked once, where the world size becomes known (the `spindle train`
    driver once it knows its worker count). Same messages as ``validate(config, world_size)``."""
    _check_degrees_match(config.parallel, world_size)
    _check_min_workers(config, world_size)
    _check_dp_engine(config, world_size)
    _check_batch(config, world_size)


def _resolved_degrees(parallel: ParallelConfig, world_size: int) -> ParallelDegrees:
    """parallel.dp = -1 resolved by the degrees object (runtime/degrees.py), as a ConfigError if impossible."""
    try:
        return ParallelDegrees.resolve(parallel.dp, parallel.cp, parallel.tp, world_size)
    except LayoutError as error:
        raise ConfigError(str(error)) from None


def resolve(config: Config, world_size: int = 1) -> Config:
    """A copy with the derived values filled in: parallel.dp (when -1) and train.micro_batch (when 0)."""
    resolved = copy.deepcopy(config)
    if resolved.parallel.dp == -1:
        resolved.parallel.dp = _resolved_degrees(resolved.parallel, world_size).dp
    if resolved.train.micro_batch == 0:
        resolved.train.micro_batch = resolved.train.global_batch // resolved.parallel.dp
    return resolved
