"""Layers of the hybrid decoder: norms, SwiGLU MLP, RoPE, and the token mixers (L, A, R, S).

No distributed code lives here (docs/design.md, conventions). Parallelism is applied from outside:
- the token-mixer kernels are reached through instance attributes (``LinearAttention.sequence_op``,
  ``SoftmaxAttention.attention_op``) that context parallelism swaps for its sharded ops;
- RoPE angles come from the ``positions`` the caller passes (global positions of the local tokens);
- head counts are read from tensor sizes at run time (``view(B, T, -1, head_dim)``), so a tensor-
  parallel step can shard q/k/v/gate/decay projections column-wise and output projections row-wise,
  and slice the per-head ``log_decay_slopes`` buffer, without touching this file.

Tensors are BSHD: [batch, seq, heads, head_dim].
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Callable

import torch
import torch.utils.checkpoint
import torch.nn.functional as F
from torch import nn

from spindle import kernels
from spindle.runtime.config import DECAY_KINDS, FEATURE_MAPS, OUTPUT_GATES  # noqa: F401  (re-exported)

# Per-token (cos, sin) tables of RoPE, each [B or 1, T, 1, head_dim // 2].
Rotary = tuple[torch.Tensor, torch.Tensor]


class RMSNorm(nn.Module):
    """x / rms(x) * weight over the last dimension, computed in at least fp32."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        compute = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        normed = compute * torch.rsqrt(compute.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight.to(x.dtype)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); gate/up are column-shardable, down row-shardable."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)

    def reset_parameters(self, init_std: float, output_std: float) -> None:
        nn.init.normal_(self.gate_proj.weight, std=init_std)
        nn.init.normal_(self.up_proj.weight, std=init_std)
        nn.init.normal_(self.down_proj.weight, std=output_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# ---------------------------------------------------------------------------------------------
# RoPE
# ---------------------------------------------------------------------------------------------


class RotaryEmbedding(nn.Module):
    """Turns explicit token positions into RoPE (cos, sin) tables.

    Positions are never generated here: under context parallelism each rank passes the global
    positions of its local tokens (in zigzag order), and RoPE must follow them.
    """

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {head_dim}; pick model.dim and "
                             f"model.heads so that dim // heads is even")
        self.head_dim = head_dim
        self.theta = theta
        # Derived constant, not state: kept out of checkpoints (persistent=False).
        self.register_buffer("inv_freq", self._inverse_frequencies(), persistent=False)

    def _inverse_frequencies(self) -> torch.Tensor:
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float64) / self.head_dim
        return self.theta ** -exponents  # [head_dim // 2], float64

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> Rotary:
        """positions: [T] or [B, T] integers -> (cos, sin), each [B or 1, T, 1, head_dim // 2]."""
        # The angle product is formed in float64: at a million tokens an fp32 product
        # position * inv_freq is off by ~0.06 rad, which would blur long-range positions.
        angles = positions.to(torch.float64)[..., None] * self.inv_freq.to(
            device=positions.device, dtype=torch.float64)  # [..., T, head_dim // 2]
        if angles.dim() == 2:
            angles = angles[None]  # [1, T, head_dim // 2]
        angles = angles[:, :, None, :]  # [B or 1, T, 1, head_dim // 2]
        table_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        return angles.cos().to(table_dtype), angles.sin().to(table_dtype)


def apply_rotary(x: torch.Tensor, rotary: Rotary) -> torch.Tensor:
    """Rotate pairs (i, i + head_dim/2) of x [B, T, H, head_dim] by the per-token angles."""
    cos, sin = rotary
    compute = x.to(cos.dtype)
    first, second = compute.chunk(2, dim=-1)  # each [B, T, H, head_dim // 2]
    rotated = torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)
    return rotated.to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Token mixers
# ---------------------------------------------------------------------------------------------


def single_device_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                                   log_decay: torch.Tensor | None = None,
                                   scale: float | None = None,
                                   cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """The default ``sequence_op``: spindle.kernels.linear_attention without states, returning o.

    Same call signature and return as ``spindle.parallel.cp.lasp2`` with its group bound, so context
    parallelism swaps one for the other. ``cu_seqlens`` (packed documents) restarts the state at
    every document start.
    """
    if cu_seqlens is None:
        return kernels.linear_attention(q, k, v, log_decay=log_decay, scale=scale)[0]
    require_cu_seqlens(kernels.linear_attention, "spindle.kernels.linear_attention")
    return kernels.linear_attention(q, k, v, log_decay=log_decay, scale=scale, cu_seqlens=cu_seqlens)[0]


@functools.lru_cache(maxsize=None)
def accepts_cu_seqlens(operation: Callable[..., object]) -> bool:
    """Whether a token-mixer op (a kernel, a context-parallel scheme with its group bound, a mixer's
    forward) takes the ``cu_seqlens`` keyword of packed documents."""
    try:
        parameters = inspect.signature(operation).parameters
    except (TypeError, ValueError):  # no introspectable signature: let the call decide
        return True
    return "cu_seqlens" in parameters or any(
        parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters.values())


def require_cu_seqlens(operation: Callable[..., object], name: str) -> None:
    """Refuse packed documents, with a way out, where an op cannot keep documents apart yet."""
    if not accepts_cu_seqlens(operation):
        raise NotImplementedError(
            f"packed documents (cu_seqlens) are not supported by {name} in this build: it would mix tokens "
            f"across document boundaries. Set data.packing = 'concat' to train on the plain token stream, or "
            f"choose a layer kind / context-parallel scheme that supports documents.")


def _operation_name(operation: Callable[..., object]) -> str:
    target = operation.func if isinstance(operation, functools.partial) else operation
    return f"{getattr(target, '__module__', '')}.{getattr(target, '__qualname__', repr(target))}"


def _feature_map(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    maps: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "identity": lambda x: x,
        "silu": F.silu,
        "relu": F.relu,
        "elu1": lambda x: F.elu(x) + 1.0,
    }
    return maps[name]


def constant_log_decay(heads: int, layer_index: int, n_layers: int) -> torch.Tensor:
    """Per-head log-decay -s_h of layer l (MiniMax-01, docs/algorithms.md §1), float32 [heads].

    s_h = 2^(-8 (h+1) / H) · (1 - l / (L - 1) + 1e-5): ALiBi-style geometric slopes, strongest in
    the first layer and fading to almost no decay in the last, so deep layers keep long memory.
    """
    head_index = torch.arange(heads, dtype=torch.float64)
    slopes = 2.0 ** (-8.0 * (head_index + 1) / heads)
    depth = 1.0 - layer_index / (n_layers - 1) + 1e-5 if n_layers > 1 else 1.0
    return (-slopes * depth).to(torch.float32)


def data_decay_bias(heads: int) -> torch.Tensor:
    """Bias of the data-dependent decay gate: logsigmoid(bias_h) = -s_h with the geometric slopes.

    A zero bias would start every head at log-decay log(1/2) (forgetting half the state per token);
    this start gives half-lives from a few tokens to a few hundred, and the gate learns from there.
    Inverting logsigmoid: -softplus(-b) = -s  =>  b = -log(expm1(s)).
    """
    head_index = torch.arange(heads, dtype=torch.float64)
    slopes = 2.0 ** (-8.0 * (head_index + 1) / heads)
    return (-torch.log(torch.expm1(slopes))).to(torch.float32)


class LinearAttention(nn.Module):
    """Linear attention with decay (TransNormerLLM / Lightning Attention style).

    x -> q, k, v (feature map on q, k) -> sequence_op with per-head decay -> RMSNorm per head
      -> * gate(x) -> out_proj.
    Decay: "none"; "constant" (buffer ``log_decay_slopes`` [H], ≤ 0, indexable by head for TP);
    "data" (``decay_proj`` Linear(dim, H) -> logsigmoid, [B, T, H], ≤ 0).
    """

    def __init__(self, dim: int, heads: int, *, decay: str, feature_map: str, output_gate: str,
                 layer_index: int, n_layers: int, norm_eps: float) -> None:
        super().__init__()
        self.head_dim = dim // heads
        self.decay = decay
        self.output_gate = output_gate
        self.feature_map = _feature_map(feature_map)
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.gate_proj = nn.Linear(dim, dim, bias=False)
        self.decay_proj = nn.Linear(dim, heads, bias=True) if decay == "data" else None
        self.output_norm = RMSNorm(self.head_dim, norm_eps)
        self.out_proj = nn.Linear(dim, dim, bias=False)
        if decay == "constant":
            # A derived constant (persistent=False): a TP step slices it per rank, which must not
            # turn it into differently shaped state-dict entries.
            self.register_buffer("log_decay_slopes", constant_log_decay(heads, layer_index, n_layers),
                                 persistent=False)
        else:
            self.log_decay_slopes = None
        self.sequence_op: Callable[..., torch.Tensor] = single_device_linear_attention

    def reset_parameters(self, init_std: float, output_std: float) -> None:
        for projection in (self.q_proj, self.k_proj, self.v_proj, self.gate_proj):
            nn.init.normal_(projection.weight, std=init_std)
        nn.init.normal_(self.out_proj.weight, std=output_std)
        self.output_norm.reset_parameters()
        if self.decay_proj is not None:
            nn.init.normal_(self.decay_proj.weight, std=init_std)
            with torch.no_grad():
                heads = self.decay_proj.bias.shape[0]
                self.decay_proj.bias.copy_(data_decay_bias(heads))

    def log_decay(self, x: torch.Tensor) -> torch.Tensor | None:
        """None, the constant [H_local] slopes, or the data-dependent [B, T, H_local] gate, all ≤ 0."""
        if self.decay == "constant":
            return self.log_decay_slopes
        if self.decay == "data":
            # The gate runs in fp32 outside autocast: its logits sit near the bias (~5), where bf16
            # spacing is ~0.03, and the kernel sums these log-decays over the whole sequence.
            with torch.autocast(device_type=x.device.type, enabled=False):
                # Called as a module (not F.linear on its weight) so tensor parallelism's hooks apply.
                compute_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
                logits = self.decay_proj(x.to(self.decay_proj.weight.dtype)).to(compute_dtype)
                return F.logsigmoid(logits)  # [B, T, H_local]
        return None

    def forward(self, x: torch.Tensor, rotary: Rotary | None = None,
                cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, T, dim] -> [B, T, dim]. ``rotary`` is unused (linear layers carry no RoPE);
        ``cu_seqlens`` (packed documents, over the global batch) restarts the state per document."""
        batch, length, _ = x.shape
        q = self.feature_map(self.q_proj(x).view(batch, length, -1, self.head_dim))  # [B, T, H, hd]
        k = self.feature_map(self.k_proj(x).view(batch, length, -1, self.head_dim))  # [B, T, H, hd]
        v = self.v_proj(x).view(batch, length, -1, self.head_dim)  # [B, T, H, hd]
        documents = _documents(self.sequence_op, cu_seqlens)
        o = self.sequence_op(q, k, v, log_decay=self.log_decay(x), scale=self.head_dim ** -0.5, **documents)
        o = self.output_norm(o).reshape(batch, length, -1)  # [B, T, H * hd]
        gate = self.gate_proj(x)  # [B, T, H * hd]
        gate = torch.sigmoid(gate) if self.output_gate == "sigmoid" else F.silu(gate)
        return self.out_proj(o * gate)


class GroupedQueryProjections(nn.Module):
    """What the A, S and R mixers share: the q/k/v/out projections (grouped-query: kv_heads divides heads;
    head counts are read from tensor sizes at run time, so tensor parallelism can shard them) around
    RoPE-positioned tokens. A subclass computes its heads from q, k, v in ``mix``."""

    def __init__(self, dim: int, heads: int, kv_heads: int) -> None:
        super().__init__()
        self.head_dim = dim // heads
        self.q_proj = nn.Linear(dim, heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.out_proj = nn.Linear(heads * self.head_dim, dim, bias=False)

    def reset_parameters(self, init_std: float, output_std: float) -> None:
        for projection in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.normal_(projection.weight, std=init_std)
        nn.init.normal_(self.out_proj.weight, std=output_std)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: [B, T, dim] -> q [B, T, H, hd], k and v [B, T, H_kv, hd]."""
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, -1, self.head_dim)  # [B, T, H, hd]
        k = self.k_proj(x).view(batch, length, -1, self.head_dim)  # [B, T, H_kv, hd]
        v = self.v_proj(x).view(batch, length, -1, self.head_dim)  # [B, T, H_kv, hd]
        return q, k, v

    def forward(self, x: torch.Tensor, rotary: Rotary | None = None,
                cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, T, dim], rotary: (cos, sin) of the tokens' positions -> [B, T, dim]; ``cu_seqlens``
        (packed documents, over the global batch) keeps the mixing inside each document."""
        if rotary is None:
            raise ValueError(f"{type(self).__name__} needs the RoPE tables of the tokens' positions")
        o = self.mix(*self.project(x), rotary, cu_seqlens)  # [B, T, H, hd]
        return self.out_proj(o.reshape(*x.shape[:2], -1))  # [B, T, H * hd] -> [B, T, dim]

    def mix(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rotary: Rotary,
            cu_seqlens: torch.Tensor | None) -> torch.Tensor:
        """q [B, T, H, hd], k and v [B, T, H_kv, hd] (not rotated yet) -> the heads [B, T, H, hd]."""
        raise NotImplementedError


class SoftmaxAttention(GroupedQueryProjections):
    """Causal grouped-query softmax attention with RoPE, through ``attention_op``."""

    def __init__(self, dim: int, heads: int, kv_heads: int) -> None:
        super().__init__(dim, heads, kv_heads)
        self.attention_op: Callable[..., torch.Tensor] = kernels.attention

    def mix(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rotary: Rotary,
            cu_seqlens: torch.Tensor | None) -> torch.Tensor:
        q, k = apply_rotary(q, rotary), apply_rotary(k, rotary)
        documents = _documents(self.attention_op, cu_seqlens)
        return self.attention_op(q, k, v, causal=True, scale=self.head_dim ** -0.5, **documents)


def plus_minus_softmax(x: torch.Tensor) -> torch.Tensor:
    """RAttention's feature map φ(x) = [softmax(x), softmax(−x)] over the head dimension: [..., D] -> [..., 2D].

    Both halves are positive and sum to one, so φ(q)·φ(k) ∈ (0, 2] and the un-normalized linear
    branch stays bounded per key; computed in at least fp32.
    """
    compute = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    return torch.cat((torch.softmax(compute, dim=-1), torch.softmax(-compute, dim=-1)), dim=-1).to(x.dtype)


def single_device_rattention(local_q: torch.Tensor, local_k: torch.Tensor, residual_q: torch.Tensor,
                             residual_k: torch.Tensor, v: torch.Tensor, *, window: int,
                             log_decay: torch.Tensor | None = None, local_scale: float | None = None,
                             residual_scale: float = 1.0,
                             cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The default ``branch_op`` of RAttention: (window attention, linear attention delayed by the window).

    Same call signature and return as ``spindle.parallel.cp.rattention_branches`` with its group
    bound. The residual branch repeats the k/v heads to the query heads (GQA as in the window branch).
    With ``cu_seqlens`` (packed documents) both branches stay inside each document: the window and
    the delay count positions within the document.
    """
    documents = {} if cu_seqlens is None else {"cu_seqlens": cu_seqlens}
    local = kernels.attention(local_q, local_k, v, causal=True, window=window, scale=local_scale, **documents)
    groups = residual_q.shape[2] // residual_k.shape[2]
    # recompute_states (Triton): the backward recomputes the fp32 chunk states, B·H·⌈T/C⌉·2hd·hd, instead
    # of keeping them; at long T they are the largest thing the residual branch saves (5 GiB per layer at
    # 1M tokens, head_dim 64), for one more state pass (2·2hd·hd FLOPs per token and head)
    residual, _ = kernels.linear_attention(
        residual_q, residual_k.repeat_interleave(groups, dim=2), v.repeat_interleave(groups, dim=2),
        log_decay=log_decay, scale=residual_scale, delay=window, recompute_states=True, **documents)
    return local, residual


def _documents(operation: Callable[..., object], cu_seqlens: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """{"cu_seqlens": ...} for an op that keeps documents apart; refused clearly where it cannot."""
    if cu_seqlens is None:
        return {}
    require_cu_seqlens(operation, _operation_name(operation))
    return {"cu_seqlens": cu_seqlens}


class SlidingWindowAttention(GroupedQueryProjections):
    """``S`` layers: causal GQA softmax attention with RoPE over the last ``window`` keys only.

    Query i sees keys i − window < j <= i. ``attention_op`` is kernels.attention (single device) or
    spindle.parallel.cp.window_attention with its group and layout bound (context parallelism).
    """

    def __init__(self, dim: int, heads: int, kv_heads: int, *, window: int) -> None:
        super().__init__(dim, heads, kv_heads)
        self.window = window
        self.attention_op: Callable[..., torch.Tensor] = functools.partial(kernels.attention, causal=True)

    def mix(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rotary: Rotary,
            cu_seqlens: torch.Tensor | None) -> torch.Tensor:
        q, k = apply_rotary(q, rotary), apply_rotary(k, rotary)
        documents = _documents(self.attention_op, cu_seqlens)  # the window stays inside each document
        return self.attention_op(q, k, v, window=self.window, scale=self.head_dim ** -0.5, **documents)


class RAttention(GroupedQueryProjections):
    """``R`` layers (RAttention): sliding-window softmax attention plus linear attention over the
    tokens that have left the window (docs/rattention.md).

        local    = attention(rope(q), rope(k), v, window=w)                     keys i − w < j <= i
        residual = linear_attention(φ(q), φ(k), v, scale=1, delay=w)            keys j <= i − w
        out      = out_proj(local_norm(local) + residual_norm(residual))

    with φ = plus_minus_softmax and one q, k, v projection shared by both branches (GQA: the residual
    branch repeats k/v heads). Each branch has its own per-head RMSNorm. No decay on the residual
    branch (as in the paper). ``branch_op`` computes both branches: single_device_rattention, or
    spindle.parallel.cp.rattention_branches (one halo exchange for both) under context parallelism.
    """

    def __init__(self, dim: int, heads: int, kv_heads: int, *, window: int, norm_eps: float) -> None:
        super().__init__(dim, heads, kv_heads)
        self.window = window
        self.local_norm = RMSNorm(self.head_dim, norm_eps)
        self.residual_norm = RMSNorm(self.head_dim, norm_eps)
        self.branch_op: Callable[..., tuple[torch.Tensor, torch.Tensor]] = single_device_rattention

    def reset_parameters(self, init_std: float, output_std: float) -> None:
        super().reset_parameters(init_std, output_std)
        self.local_norm.reset_parameters()
        self.residual_norm.reset_parameters()

    def mix(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rotary: Rotary,
            cu_seqlens: torch.Tensor | None) -> torch.Tensor:
        """Both branches (inside each document with ``cu_seqlens``), each normed: [B, T, H, hd]."""
        local, residual = self.branch_op(
            apply_rotary(q, rotary), apply_rotary(k, rotary), plus_minus_softmax(q), plus_minus_softmax(k), v,
            window=self.window, local_scale=self.head_dim ** -0.5, residual_scale=1.0,
            **_documents(self.branch_op, cu_seqlens))  # each [B, T, H, hd]
        return self.local_norm(local) + self.residual_norm(residual)


class DecoderBlock(nn.Module):
    """Pre-norm block: x + mixer(norm(x)), then x + mlp(norm(x)). ``kind`` is "L", "A", "R" or "S"."""

    def __init__(self, kind: str, mixer: nn.Module, dim: int,
                 ffn_dim: int, norm_eps: float) -> None:
        super().__init__()
        self.kind = kind
        self.mixer_norm = RMSNorm(dim, norm_eps)
        self.mixer = mixer
        self.mlp_norm = RMSNorm(dim, norm_eps)
        self.mlp = SwiGLU(dim, ffn_dim)

    def reset_parameters(self, init_std: float, output_std: float) -> None:
        self.mixer_norm.reset_parameters()
        self.mlp_norm.reset_parameters()
        self.mixer.reset_parameters(init_std, output_std)
        self.mlp.reset_parameters(init_std, output_std)

    recompute: bool = False
    """Activation checkpointing (set by parallel.parallelize.apply_ac): keep only the block's input and
    recompute the rest in backward, through torch.utils.checkpoint (non-reentrant)."""

    def forward(self, x: torch.Tensor, rotary: Rotary | None,
                cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        if self.recompute and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self._forward, x, rotary, cu_seqlens, use_reentrant=False)
        return self._forward(x, rotary, cu_seqlens)

    def _forward(self, x: torch.Tensor, rotary: Rotary | None, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
        """``cu_seqlens`` (packed documents) goes to the mixer only when given, so mixers without
        document support still run unpacked batches."""
        if cu_seqlens is None:
            mixed = self.mixer(self.mixer_norm(x), rotary)
        else:
            require_cu_seqlens(type(self.mixer).forward, f"{type(self.mixer).__name__} ({self.kind} layers)")
            mixed = self.mixer(self.mixer_norm(x), rotary, cu_seqlens=cu_seqlens)
        x = x + mixed
        return x + self.mlp(self.mlp_norm(x))


def default_ffn_dim(dim: int) -> int:
    """8/3 · dim rounded up to a multiple of 64 (SwiGLU's usual width at ~4·dim MLP cost)."""
    return int(math.ceil(8 * dim / 3 / 64) * 64)
