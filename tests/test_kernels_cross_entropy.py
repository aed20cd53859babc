"""spindle.kernels.chunked_cross_entropy against float64 dense cross-entropy (loss sum and both gradients)."""

import pytest
import torch
import torch.nn.functional as F
from numerics import TOLERANCE, assert_tensors_close, nan_poisoned_allocations

from spindle.kernels import chunked_cross_entropy

FP32_TOLERANCE = TOLERANCE[torch.float32]


@pytest.fixture(autouse=True)
def nan_poisoned():
    """The hidden-state gradient is allocated with torch.empty and filled chunk by chunk: it starts NaN, so a
    chunk the kernel skips fails the test."""
    with nan_poisoned_allocations():
        yield


def make_inputs(tokens, dim, vocab, ignored_every=0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, dim, generator=generator, dtype=torch.float64)
    weight = torch.randn(vocab, dim, generator=generator, dtype=torch.float64) / dim**0.5
    labels = torch.randint(0, vocab, (tokens,), generator=generator)
    if ignored_every:
        labels[::ignored_every] = -100
    return hidden, weight, labels


@pytest.mark.parametrize(
    "tokens, chunk_size, ignored_every",
    [(37, 8, 5), (64, 64, 0), (5, 4096, 2), (100, 33, 3)],
    ids=["ragged-last-chunk", "one-full-chunk", "chunk-beyond-tokens", "many-chunks"],
)
def test_matches_dense_float64(tokens, chunk_size, ignored_every):
    hidden, weight, labels = make_inputs(tokens, 24, 97, ignored_every)
    reference_leaves = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
    expected = F.cross_entropy(reference_leaves[0] @ reference_leaves[1].t(), labels, reduction="sum")
    expected.backward()
    leaves = [hidden.float().requires_grad_(), weight.float().requires_grad_()]
    loss = chunked_cross_entropy(*leaves, labels, chunk_size=chunk_size)
    (loss * 0.5).backward()  # a non-unit incoming gradient must scale the stashed gradients
    assert loss.dtype == torch.float32 and loss.dim() == 0
    actual = {"loss": loss, "grad_hidden": leaves[0].grad, "grad_weight": leaves[1].grad}
    wanted = {"loss": expected, "grad_hidden": reference_leaves[0].grad * 0.5, "grad_weight": reference_leaves[1].grad * 0.5}
    assert_tensors_close(actual, wanted, FP32_TOLERANCE)


def test_all_ignored_gives_zero_loss_and_gradients():
    hidden, weight, labels = make_inputs(6, 8, 11)
    labels[:] = -1
    hidden.requires_grad_()
    loss = chunked_cross_entropy(hidden, weight, labels, ignore_index=-1, chunk_size=4)
    loss.backward()
    assert loss.item() == 0.0 and torch.all(hidden.grad == 0)


def test_bfloat16_inputs_give_fp32_loss_and_input_dtype_gradients():
    hidden, weight, labels = make_inputs(40, 32, 50)
    leaves = [hidden.bfloat16().requires_grad_(), weight.bfloat16().requires_grad_()]
    loss = chunked_cross_entropy(*leaves, labels, chunk_size=16)
    loss.backward()
    reference_leaves = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
    expected = F.cross_entropy(reference_leaves[0] @ reference_leaves[1].t(), labels, reduction="sum")
    expected.backward()
    assert loss.dtype == torch.float32 and leaves[0].grad.dtype == leaves[1].grad.dtype == torch.bfloat16
    actual = {"loss": loss, "grad_hidden": leaves[0].grad, "grad_weight": leaves[1].grad}
    wanted = {"loss": expected, "grad_hidden": reference_leaves[0].grad, "grad_weight": reference_leaves[1].grad}
    assert_tensors_close(actual, wanted, 1e-2, "bf16 inputs")  # bf16 keeps 8 bits of mantissa


def test_only_weight_requires_grad():
    hidden, weight, labels = make_inputs(12, 8, 20)
    weight = weight.float().requires_grad_()
    chunked_cross_entropy(hidden.float(), weight, labels, chunk_size=5).backward()
    assert weight.grad is not None and torch.isfinite(weight.grad).all()


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(hidden=torch.randn(4, 3, 8)), "hidden must be a 2-D"),
        (dict(weight=torch.randn(10, 7)), "weight must be"),
        (dict(labels=torch.zeros(3, dtype=torch.long)), "labels must be"),
        (dict(labels=torch.zeros(4)), "labels must be int64"),
        (dict(labels=torch.tensor([0, 1, 10, 2])), r"labels must lie in \[0, 10\)"),
        (dict(chunk_size=0), "chunk_size"),
    ],
)
def test_bad_inputs_raise(change, message):
    arguments = dict(hidden=torch.randn(4, 8), weight=torch.randn(10, 8), labels=torch.tensor([0, 1, 2, -100]))
    arguments.update(change)
    chunk_size = arguments.pop("chunk_size", 4096)
    with pytest.raises((ValueError, TypeError), match=message):
        chunked_cross_entropy(arguments["hidden"], arguments["weight"], arguments["labels"], chunk_size=chunk_size)
