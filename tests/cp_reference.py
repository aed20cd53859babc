"""Dense float64 references and helpers shared by the context-parallel tests (tests/test_cp_*.py).

The references are the parallel forms of docs/algorithms.md §1 and §3, written directly (no chunking, no
communication), so they are independent of every path under test.
"""

from __future__ import annotations

import torch


def relative_rmse(value: torch.Tensor, reference: torch.Tensor) -> float:
    """‖value − reference‖₂ / ‖reference‖₂ in float64 (docs/algorithms.md §7)."""
    value, reference = value.detach().double(), reference.detach().double()
    assert value.shape == reference.shape, f"shape {tuple(value.shape)} != reference {tuple(reference.shape)}"
    assert torch.isfinite(value).all(), "non-finite values"
    return float((value - reference).norm() / reference.norm().clamp_min(1e-300))


def assert_close(name: str, value: torch.Tensor, reference: torch.Tensor, tolerance: float) -> None:
    error = relative_rmse(value, reference)
    assert error <= tolerance, f"{name}: relative RMSE {error:.3e} > {tolerance:.0e}"


def dense_linear_attention(q, k, v, log_decay, scale):
    """O = scale · ((Q Kᵀ) ⊙ D) V with D_ij = exp(G_i − G_j) for j <= i; q, k, v: [B, T, H, d]."""
    batch, length, heads, _ = q.shape
    if log_decay is None:
        cumulative = q.new_zeros(batch, length, heads)
    elif log_decay.dim() == 1:
        steps = torch.arange(1, length + 1, dtype=q.dtype)
        cumulative = (steps[:, None] * log_decay[None, :]).expand(batch, length, heads)
    else:
        cumulative = log_decay.cumsum(dim=1)
    difference = cumulative[:, :, None, :] - cumulative[:, None, :, :]  # [B, Ti, Tj, H]
    causal = torch.ones(length, length, dtype=torch.bool).tril()[None, :, :, None]
    decay = torch.exp(difference.masked_fill(~causal, float("-inf")))
    scores = torch.einsum("bihd,bjhd->bijh", q, k) * decay
    return scale * torch.einsum("bijh,bjhv->bihv", scores, v)


def dense_attention(q, k, v, causal, scale):
    """Softmax attention with GQA and bottom-right causal alignment; q: [B, Tq, H, D], k, v: [B, Tk, H_kv, D]."""
    groups = q.shape[2] // k.shape[2]
    k = k.repeat_interleave(groups, dim=2)
    v = v.repeat_interleave(groups, dim=2)
    scores = scale * torch.einsum("bihd,bjhd->bhij", q, k)
    if causal:
        query_length, key_length = q.shape[1], k.shape[1]
        mask = torch.ones(query_length, key_length, dtype=torch.bool).tril(key_length - query_length)
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("bhij,bjhd->bihd", torch.softmax(scores, dim=-1), v)


def random_inputs(seed: int, shapes: dict[str, tuple], dtype=torch.float64) -> dict[str, torch.Tensor]:
    """The same random tensors on every rank (seeded generator)."""
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(*shape, generator=generator, dtype=dtype) for name, shape in shapes.items()}


def data_calls(stats) -> dict[str, int]:
    """Collective calls except the bookkeeping shape check ("validate"), whose count depends on the cache."""
    return {kind: count for kind, count in stats.calls.items() if kind != "validate"}
