"""Cross-entropy over a large vocabulary without materializing the [N, V] logits.

Forward walks the tokens in chunks of `chunk_size`: logits = h_c Wᵀ (fp32), loss += lse − logit[label],
and, when gradients are wanted, dlogits = softmax − onehot(label) right away, so that
dh_c = dlogits W and dW += dlogitsᵀ h_c are stashed and the backward only scales them by the
incoming scalar gradient. Peak extra memory is one [chunk_size, V] fp32 block plus dh [N, D] and an
fp32 dW [V, D] — never [N, V].
"""

from __future__ import annotations

import torch


def _chunk_loss_and_gradient(hidden_chunk, weight, labels_chunk, ignore_index, want_gradient, accumulate_dtype):
    logits = (hidden_chunk @ weight.t()).to(accumulate_dtype)  # [chunk, V]
    valid = labels_chunk != ignore_index
    safe_labels = torch.where(valid, labels_chunk, torch.zeros_like(labels_chunk))
    lse = torch.logsumexp(logits, dim=-1)
    target = logits.gather(1, safe_labels[:, None])[:, 0]
    loss = ((lse - target) * valid).sum()
    if not want_gradient:
        return loss, None
    # dloss/dlogits = softmax − onehot(label), zero on ignored rows; computed in place on the logits
    d_logits = torch.exp(logits.sub_(lse[:, None]))
    d_logits[torch.arange(len(safe_labels), device=d_logits.device), safe_labels] -= 1.0
    d_logits *= valid[:, None]
    return loss, d_logits


class ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, chunk_size):
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        want_gradient = need_hidden or need_weight
        # fp32 accumulation (float64 for float64 inputs, so the reference tests can be tight)
        accumulate = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        total = torch.zeros((), dtype=accumulate, device=hidden.device)
        d_hidden = torch.empty(hidden.shape, dtype=accumulate, device=hidden.device) if need_hidden else None
        d_weight = torch.zeros(weight.shape, dtype=accumulate, device=weight.device) if need_weight else None
        for start in range(0, hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            loss, d_logits = _chunk_loss_and_gradient(
                hidden[rows], weight, labels[rows], ignore_index, want_gradient, accumulate
            )
            total += loss
            if want_gradient:
                # matmuls in the input dtype (tensor cores for bf16), results accumulated in fp32
                d_logits = d_logits.to(weight.dtype)
            if need_hidden:
                d_hidden[rows] = d_logits @ weight
            if need_weight:
                d_weight += d_logits.t() @ hidden[rows]
        ctx.save_for_backward(d_hidden, d_weight)
        ctx.hidden_dtype, ctx.weight_dtype = hidden.dtype, weight.dtype
        return total

    @staticmethod
    def backward(ctx, d_loss):
        d_hidden, d_weight = ctx.saved_tensors
        grad_hidden = (d_hidden * d_loss).to(ctx.hidden_dtype) if d_hidden is not None else None
        grad_weight = (d_weight * d_loss).to(ctx.weight_dtype) if d_weight is not None else None
        return grad_hidden, grad_weight, None, None, None


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    chunk_size: int = 4096,
) -> torch.Tensor:
    """Sum of token cross-entropies of the logits hidden @ weightᵀ, never holding all [N, V] logits.

    Args:
        hidden: [N, D] final hidden states (any float dtype; logits are accumulated in fp32).
        weight: [V, D] output embedding.
        labels: [N] integer targets; tokens equal to ignore_index contribute nothing.
        chunk_size: tokens per chunk (memory is chunk_size × V fp32 at a time).

    Returns:
        fp32 scalar (float64 for float64 inputs): the SUM of the losses over non-ignored tokens (divide by the token count yourself,
        e.g. the global count under context parallelism). Differentiable in hidden and weight.
    """
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 2:
        raise ValueError(f"chunked_cross_entropy: hidden must be a 2-D tensor [N, D], got {getattr(hidden, 'shape', hidden)!r}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"chunked_cross_entropy: weight must be [V, D] with D = {hidden.shape[1]}, got {getattr(weight, 'shape', weight)!r}"
        )
    if not isinstance(labels, torch.Tensor) or labels.shape != hidden.shape[:1]:
        raise ValueError(
            f"chunked_cross_entropy: labels must be [N] = [{hidden.shape[0]}], got {getattr(labels, 'shape', labels)!r}"
        )
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"chunked_cross_entropy: labels must be int64 or int32, got {labels.dtype}")
    if not hidden.is_floating_point() or not weight.is_floating_point():
        raise TypeError(f"chunked_cross_entropy: hidden and weight must be floating, got {hidden.dtype}, {weight.dtype}")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"chunked_cross_entropy: hidden ({hidden.dtype}) and weight ({weight.dtype}) must share a dtype")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunked_cross_entropy: chunk_size must be a positive int, got {chunk_size!r}")
    if labels.device.type == "cpu":  # a value check would sync a GPU; only CPU labels are checked
        valid = labels[labels != ignore_index]
        if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= weight.shape[0]):
            raise ValueError(
                f"chunked_cross_entropy: labels must lie in [0, {weight.shape[0]}) or equal ignore_index "
                f"({ignore_index}); got values in [{int(valid.min())}, {int(valid.max())}]"
            )
    return ChunkedCrossEntropy.apply(hidden, weight, labels.long(), ignore_index, chunk_size)
