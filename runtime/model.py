"""The hybrid decoder: linear-attention (L) and softmax-attention (A) layers in one pattern.

    tokens [B, T] -> embedding -> n_layers × DecoderBlock (L or A mixer, SwiGLU MLP)
                  -> final RMSNorm -> hidden [B, T, dim]

The model has no distributed code (docs/design.md, conventions): context parallelism replaces each mixer's
``sequence_op`` / ``attention_op`` and passes global ``positions``; tensor parallelism shards the
projections and the per-head decay buffers; see runtime/layers.py for what each layer promises.
The output projection is applied inside ``loss`` by a chunked cross-entropy kernel, so full logits
[B·T, vocab] are never materialized.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from spindle import kernels
from spindle.runtime.config import LAYER_LETTERS, ModelConfig
from spindle.runtime.data import IGNORE_INDEX, document_positions  # noqa: F401  (IGNORE_INDEX re-exported)
from spindle.runtime.layers import (
    DECAY_KINDS,
    FEATURE_MAPS,
    OUTPUT_GATES,
    DecoderBlock,
    LinearAttention,
    RAttention,
    RMSNorm,
    RotaryEmbedding,
    SlidingWindowAttention,
    SoftmaxAttention,
    default_ffn_dim,
)

LAYER_KINDS = LAYER_LETTERS
ROPE_KINDS = "ARS"  # layers that rotate q and k


def resolve_pattern(pattern: str, n_layers: int, *, settings: tuple[str, str] = ("model.layers", "model.n_layers")
                    ) -> str:
    """Repeat (and truncate) a layer pattern such as "LLLA" to exactly ``n_layers`` letters.

    Errors name where the pattern and the count came from (`settings`: the config keys by default; the
    Megatron integration names its own arguments)."""
    pattern_setting, count_setting = settings
    allowed = ", ".join(f"'{letter}' ({kind})" for letter, kind in LAYER_KINDS.items())
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"{pattern_setting} must be a non-empty pattern of layer letters ({allowed}), e.g. 'LLLA'; "
                         f"got {pattern!r}")
    for position, letter in enumerate(pattern):
        if letter not in LAYER_KINDS:
            raise ValueError(f"{pattern_setting}={pattern!r} has {letter!r} at position {position}; "
                             f"allowed letters are {allowed}, in upper case, e.g. 'LLLA'")
    if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 1:
        raise ValueError(f"{count_setting} must be a positive integer, got {n_layers!r}")
    repeats = -(-n_layers // len(pattern))  # ceil division
    return (pattern * repeats)[:n_layers]


def _check_model_config(config: ModelConfig) -> None:
    """The invariants the layers rely on; config loading validates the same keys earlier."""
    def fail(key: str, message: str) -> None:
        raise ValueError(f"model.{key}={getattr(config, key)!r}: {message}")

    if config.dim < 1 or config.heads < 1 or config.dim % config.heads:
        fail("dim", f"must be a positive multiple of model.heads={config.heads}")
    if (config.dim // config.heads) % 2:
        fail("heads", f"head_dim = dim // heads = {config.dim // config.heads} must be even for RoPE")
    if config.kv_heads < 1 or config.heads % config.kv_heads:
        fail("kv_heads", f"must divide model.heads={config.heads} (grouped-query attention)")
    if config.vocab_size < 1:
        fail("vocab_size", "must be positive")
    if config.ffn_dim < 0:
        fail("ffn_dim", "must be positive, or 0 for 8/3 * dim rounded up to a multiple of 64")
    if config.decay not in DECAY_KINDS:
        fail("decay", f"allowed values are {', '.join(DECAY_KINDS)}")
    if config.feature_map not in FEATURE_MAPS:
        fail("feature_map", f"allowed values are {', '.join(FEATURE_MAPS)}")
    if getattr(config, "output_gate", "sigmoid") not in OUTPUT_GATES:
        fail("output_gate", f"allowed values are {', '.join(OUTPUT_GATES)}")


class HybridModel(nn.Module):
    """Decoder-only language model over a validated L/A layer pattern (``layer_kinds``)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        _check_model_config(config)
        self.config = config
        self._layer_kinds = resolve_pattern(config.layers, config.n_layers)
        self.embedding = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(
            self._build_block(kind, index) for index, kind in enumerate(self._layer_kinds))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.embedding.weight
        self.rotary = RotaryEmbedding(config.dim // config.heads, config.rope_theta)
        self.init_weights()

    def _build_block(self, kind: str, index: int) -> DecoderBlock:
        config = self.config
        if kind == "L":
            mixer: nn.Module = LinearAttention(
                config.dim, config.heads, decay=config.decay, feature_map=config.feature_map,
                output_gate=getattr(config, "output_gate", "sigmoid"), layer_index=index,
                n_layers=config.n_layers, norm_eps=config.norm_eps)
        elif kind == "R":
            mixer = RAttention(config.dim, config.heads, config.kv_heads, window=config.window,
                               norm_eps=config.norm_eps)
        elif kind == "S":
            mixer = SlidingWindowAttention(config.dim, config.heads, config.kv_heads, window=config.window)
        else:
            mixer = SoftmaxAttention(config.dim, config.heads, config.kv_heads)
        ffn_dim = config.ffn_dim or default_ffn_dim(config.dim)
        return DecoderBlock(kind, mixer, config.dim, ffn_dim, config.norm_eps)

    def init_weights(self) -> None:
        """Normal(init_std) weights; residual-output projections scaled by 1/sqrt(2·n_layers)
        (each block adds two residual branches, keeping the stream's variance flat with depth);
        norms at 1; decay-gate biases at slow decay."""
        init_std = self.config.init_std
        output_std = init_std / math.sqrt(2 * self.config.n_layers)
        nn.init.normal_(self.embedding.weight, std=init_std)
        for block in self.layers:
            block.reset_parameters(init_std, output_std)
        self.norm.reset_parameters()
        if not self.config.tie_embeddings:
            nn.init.normal_(self.output.weight, std=init_std)

    @property
    def layer_kinds(self) -> str:
        """The resolved pattern, one letter per layer, e.g. "LLLALLLA"."""
        return self._layer_kinds

    @property
    def output_weight(self) -> torch.Tensor:
        """[vocab, dim] weight of the output projection (the embedding table when tied)."""
        return self.output.weight

    def num_parameters(self) -> int:
        """Distinct parameters (a tied embedding counts once; sharded tensors count globally)."""
        return sum(parameter.numel() for parameter in self.parameters())

    def default_positions(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.arange(tokens.shape[1], device=tokens.device)  # [T]

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B, T] long, positions [T] or [B, T] (default arange(T)) -> hidden [B, T, dim].

        ``positions`` are the tokens' positions in the full sequence; RoPE uses them as given
        (under context parallelism: the global positions of this rank's local tokens).
        ``cu_seqlens`` (packed documents): int [N + 1] document offsets into the B·T tokens of the
        GLOBAL batch (docs/design.md); every mixer keeps documents apart. Without ``positions`` they
        restart at each document (one process only: under context parallelism the caller passes the
        sharded document positions, as ``ParallelContext.prepare`` does).
        """
        _check_inputs(tokens, positions)
        if positions is None:
            positions = (self.default_positions(tokens) if cu_seqlens is None
                         else document_positions(cu_seqlens, *tokens.shape))
        hidden = self.embedding(tokens)  # [B, T, dim]
        rotary = self.rotary(positions, hidden.dtype) if set(ROPE_KINDS) & set(self._layer_kinds) else None
        for block in self.layers:
            hidden = block(hidden, rotary) if cu_seqlens is None else block(hidden, rotary, cu_seqlens)
        return self.norm(hidden)

    def loss(self, tokens: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor | None = None,
             cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of token cross-entropies as an fp32 scalar, count of labels != -100 as int64).

        A sum, not a mean: the trainer adds sums over micro-batches and cp ranks and divides by
        the global token count (docs/algorithms.md), so every layout gives the same loss. With packed
        documents the data already labels -100 every position whose next token starts another
        document (spindle.runtime.data), so no prediction crosses a boundary.
        """
        if labels.shape != tokens.shape:
            raise ValueError(f"labels must have the shape of tokens {tuple(tokens.shape)}, "
                             f"got {tuple(labels.shape)}")
        hidden = self(tokens, positions, cu_seqlens)  # [B, T, dim]
        flat_labels = labels.reshape(-1)  # [B·T]
        # Under mixed precision the hidden states may be lower precision than the stored weight;
        # the kernel wants one dtype (and accumulates logits in fp32 itself).
        weight = self.output_weight.to(hidden.dtype)  # [vocab, dim]
        loss_sum = kernels.chunked_cross_entropy(
            hidden.reshape(-1, hidden.shape[-1]),  # [B·T, dim]
            weight, flat_labels, ignore_index=IGNORE_INDEX)
        token_count = (flat_labels != IGNORE_INDEX).sum(dtype=torch.int64)
        return loss_sum.float(), token_count

    def flops_per_token(self, seq_len: int) -> float:
        """Approximate training FLOPs per token (forward + backward) at sequence length seq_len.

            6 · N_matmul                                   weights (2 forward + 4 backward per MAC)
          + Σ_linear layers  12 · head_dim · dim           state update k_tᵀv_t and readout q_t S_t,
                                                           2·hd² multiply-adds per head each, ×3
          + Σ_softmax layers  6 · seq_len · dim            QKᵀ and PV over on average seq_len/2
                                                           causal keys, ×3 (PaLM's 12·T·dim, halved)
          + Σ_window layers (S, R)  12 · K_w · dim         the same over K_w = mean visible keys of a
                                                           window w: w − w(w − 1)/(2T) for w < T, T/2 else
          + Σ_R layers  24 · head_dim · dim                the residual linear branch, state 2·hd × hd

        N_matmul is every parameter except the input embedding table (a lookup, not a matmul);
        a tied table still counts once, for the output projection. Recomputation (activation
        checkpointing, kernels' backward recompute) is not counted, as MFU conventions require.
        """
        config = self.config
        matmul_parameters = self.num_parameters()
        if not config.tie_embeddings:
            matmul_parameters -= config.vocab_size * config.dim
        head_dim = config.dim // config.heads
        linear_layers = self._layer_kinds.count("L")
        softmax_layers = self._layer_kinds.count("A")
        window_layers = self._layer_kinds.count("S") + self._layer_kinds.count("R")
        return float(6 * matmul_parameters
                     + linear_layers * 12 * head_dim * config.dim
                     + softmax_layers * 6 * seq_len * config.dim
                     + window_layers * 12 * mean_window_keys(config.window, seq_len) * config.dim
                     + self._layer_kinds.count("R") * 24 * head_dim * config.dim)


def mean_window_keys(window: int, seq_len: int) -> float:
    """Mean number of keys a query sees under a causal window w over T tokens: (1/T) Σ_i min(i + 1, w)."""
    if window >= seq_len:
        return seq_len / 2  # as A layers count it
    return window - window * (window - 1) / (2 * seq_len)


def _check_inputs(tokens: torch.Tensor, positions: torch.Tensor | None) -> None:
    if tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"tokens must be an integer tensor [batch, seq], got {tokens.dtype} "
                         f"of shape {tuple(tokens.shape)}")
    if positions is None:
        return
    batch, length = tokens.shape
    if positions.shape not in ((length,), (batch, length)) or positions.is_floating_point():
        raise ValueError(f"positions must be integers of shape [{length}] or [{batch}, {length}] "
                         f"(the tokens' positions in the full sequence), got {positions.dtype} "
                         f"of shape {tuple(positions.shape)}")
