"""Numerical checks shared by the tests (docs/algorithms.md §7).

- `relative_error`: ‖actual − expected‖₂ / ‖expected‖₂ in float64, one tensor at a time.
- `assert_tensors_close`: every named tensor (outputs, each input gradient, states) against its float64
  reference; a failure names each tensor over the tolerance and lists the errors of all of them.
- `outputs_and_gradients`: runs a function on leaves cast to a dtype and returns its outputs and the
  gradient of every input, so a candidate and a reference are compared tensor by tensor.
- `nan_poisoned_allocations`: torch.empty and friends return NaN-filled floating tensors, so an element a
  kernel or a collective leaves unwritten shows up as NaN instead of as whatever the memory held.

Tolerances: `TOLERANCE[dtype]` is the default for a candidate computed in `dtype` (fp32 within 1e-5 of
float64, as docs/algorithms.md §7 states; float64 paths within 1e-10, rounding of a different summation
order only).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping

import pytest
import torch

TOLERANCE: dict[torch.dtype, float] = {torch.float64: 1e-10, torch.float32: 1e-5}
HALF_PRECISION_TOLERANCE = 5e-3  # kernels in bf16 / fp16, docs/algorithms.md §7


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual − expected‖₂ / ‖expected‖₂ in float64; inf when actual has a non-finite entry the reference
    does not have (entries where both hold the same infinity, e.g. the lse of a row with no key, count as
    equal)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    if actual.shape != expected.shape:
        raise AssertionError(f"shape {tuple(actual.shape)} != reference {tuple(expected.shape)}")
    same_infinity = torch.isinf(expected) & (actual == expected)
    actual = torch.where(same_infinity, 0.0, actual)
    expected = torch.where(same_infinity, 0.0, expected)
    if not torch.isfinite(actual).all():
        return math.inf
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-300))


def tensor_errors(
    actual: Mapping[str, torch.Tensor | None], expected: Mapping[str, torch.Tensor | None]
) -> dict[str, float]:
    """relative_error per name of `expected`; a tensor missing from `actual` (or None there) counts as inf."""
    errors = {}
    for name, reference in expected.items():
        value = actual.get(name)
        if reference is None:
            errors[name] = 0.0 if value is None else math.inf
        elif value is None:
            errors[name] = math.inf
        else:
            errors[name] = relative_error(value, reference)
    return errors


def check_tensors(
    actual: Mapping[str, torch.Tensor | None],
    expected: Mapping[str, torch.Tensor | None],
    tolerance: float | Mapping[str, float],
    label: str = "",
) -> str | None:
    """None when every tensor of `expected` is within its tolerance, else a message naming the failures.

    The non-raising form, for checks that must run to the end on every rank before anyone raises (a
    rank that stops early would leave the others waiting in a collective)."""
    try:
        errors = tensor_errors(actual, expected)
    except AssertionError as error:  # a shape mismatch
        return f"{label}: {error}"
    limits = {name: tolerance[name] if isinstance(tolerance, Mapping) else tolerance for name in errors}
    failed = [name for name, error in errors.items() if not error <= limits[name]]
    extra = sorted(set(actual) - set(expected))
    if not failed and not extra:
        return None
    summary = ", ".join(f"{name} {error:.2e}" for name, error in errors.items())
    parts = [f"{name} relative error {errors[name]:.2e} > {limits[name]:.0e}" for name in failed]
    if extra:
        parts.append(f"unexpected tensors {extra}")
    return f"{label + ': ' if label else ''}{'; '.join(parts)} (all: {summary})"


def assert_tensors_close(
    actual: Mapping[str, torch.Tensor | None],
    expected: Mapping[str, torch.Tensor | None],
    tolerance: float | Mapping[str, float],
    label: str = "",
) -> None:
    """Every tensor of `expected` within its relative tolerance; the failure names each tensor that is not."""
    message = check_tensors(actual, expected, tolerance, label)
    assert message is None, message


def assert_close(name: str, actual: torch.Tensor, expected: torch.Tensor, tolerance: float) -> None:
    """One tensor within a relative tolerance of its reference."""
    assert_tensors_close({name: actual}, {name: expected}, tolerance)


def outputs_and_gradients(
    function: Callable[..., Mapping[str, torch.Tensor]],
    inputs: Mapping[str, torch.Tensor | None],
    output_gradients: Mapping[str, torch.Tensor],
    dtype: torch.dtype,
    kept_dtypes: Mapping[str, torch.dtype] | None = None,
) -> dict[str, torch.Tensor]:
    """function(**leaves) on copies of `inputs` cast to `dtype` (or to `kept_dtypes[name]`); returns its
    outputs plus "grad_<input>" for every input, after backpropagating Σ ⟨output, output_gradients[name]⟩
    in float64. `function` returns a mapping of named outputs, or a tuple of them in the order of
    `output_gradients`. Infinite output entries (e.g. the lse of a row that sees no key) take no gradient."""
    kept_dtypes = kept_dtypes or {}
    leaves = {
        name: None if value is None else value.to(kept_dtypes.get(name, dtype)).detach().requires_grad_()
        for name, value in inputs.items()
    }
    result = function(**leaves)
    outputs = dict(result) if isinstance(result, Mapping) else dict(zip(output_gradients, result, strict=True))
    loss = sum(
        (torch.where(torch.isinf(outputs[name]), 0.0, outputs[name].double()) * weight).sum()
        for name, weight in output_gradients.items()
    )
    loss.backward()
    results = {name: value.detach() for name, value in outputs.items()}
    results.update({"grad_" + name: leaf.grad for name, leaf in leaves.items() if leaf is not None})
    return results


_EMPTY_FACTORIES = ("empty", "empty_like", "empty_strided")


def _poisoned(factory: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    def allocate(*args, **kwargs) -> torch.Tensor:
        tensor = factory(*args, **kwargs)
        if tensor.is_floating_point() or tensor.is_complex():
            with torch.no_grad():
                tensor.fill_(math.nan)
        return tensor

    return allocate


@contextlib.contextmanager
def nan_poisoned_allocations() -> Iterator[None]:
    """While active, torch.empty / empty_like / empty_strided and Tensor.new_empty return floating tensors
    filled with NaN. Correct code never reads what it did not write, so this changes no result of correct
    code; an output element a kernel or a collective fails to write then fails the test as NaN. Usable in
    spawned ranks (no pytest needed); tests use the `nan_poisoned` fixture form of it."""
    saved = {name: getattr(torch, name) for name in _EMPTY_FACTORIES}
    saved_new_empty = torch.Tensor.new_empty
    own_new_empty = "new_empty" in vars(torch.Tensor)  # normally inherited from the C base class
    try:
        for name, factory in saved.items():
            setattr(torch, name, _poisoned(factory))
        torch.Tensor.new_empty = _poisoned(saved_new_empty)
        yield
    finally:
        for name, factory in saved.items():
            setattr(torch, name, factory)
        if own_new_empty:
            torch.Tensor.new_empty = saved_new_empty
        else:
            del torch.Tensor.new_empty


@pytest.fixture
def nan_poisoned() -> Iterator[None]:
    """nan_poisoned_allocations for one test (import it into a test module to use it)."""
    with nan_poisoned_allocations():
        yield
