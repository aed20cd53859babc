"""Calling a torch operator by the argument names of its registered schema.

flash-attn (>= 2.7) and FlashAttention-3 register their private forward/backward as torch custom ops
whose Python wrappers read `(*args, **kwargs)`; the argument list of those ops has changed between
releases (a `window_size` tuple became `window_size_left` / `window_size_right`, `softcap` and
`zero_tensors` were added). Positional calls break silently on such changes. Instead we give every value
a name, read the installed op's schema, pass exactly the arguments it declares, and fail with one clear
message if it needs an argument we do not know.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Parameter:
    name: str
    has_default: bool


def schema_parameters(op: Any) -> list[Parameter]:
    """Parameters of a torch op (an OpOverloadPacket or OpOverload) from its registered schema."""
    overload = op.default if hasattr(op, "default") else op
    return [Parameter(argument.name, argument.has_default_value()) for argument in overload._schema.arguments]


def schema_text(op: Any) -> str:
    overload = op.default if hasattr(op, "default") else op
    return str(overload._schema)


def bind_arguments(
    parameters: Sequence[Parameter], values: Mapping[str, Any], *, where: str, required: Sequence[str] = ()
) -> dict[str, Any]:
    """Keyword arguments for a callable with `parameters`, taken from `values` by name.

    A parameter without a default that `values` lacks is an error (the installed version wants something
    we do not know how to give); so is a name in `required` that the callable does not declare (we would
    silently drop a setting that changes the result, such as a sliding window).
    """
    names = {parameter.name for parameter in parameters}
    unknown = [p.name for p in parameters if p.name not in values and not p.has_default]
    if unknown:
        raise RuntimeError(
            f"{where}: the installed version needs argument(s) {', '.join(unknown)} that spindle does not know "
            "how to fill; use a supported release (flash-attn 2.6-2.8, FlashAttention-3 with torch ops) or "
            "pick another backend (backend='sdpa' / 'math' or SPINDLE_ATTN_BACKEND)"
        )
    dropped = [name for name in required if name not in names]
    if dropped:
        raise RuntimeError(f"{where}: the installed version has no argument(s) {', '.join(dropped)}; "
                           "pick another backend (backend='sdpa' / 'math' or SPINDLE_ATTN_BACKEND)")
    return {p.name: values[p.name] for p in parameters if p.name in values}


def call_op(op: Callable, values: Mapping[str, Any], *, where: str, required: Sequence[str] = ()) -> Any:
    """Call a registered torch op with the named `values` its schema declares."""
    return op(**bind_arguments(schema_parameters(op), values, where=where, required=required))


def has_parameter(op: Any, name: str) -> bool:
    return any(parameter.name == name for parameter in schema_parameters(op))


def registered_op(namespace: str, name: str) -> Any | None:
    """torch.ops.<namespace>.<name> if some imported package registered it, else None."""
    try:
        return getattr(getattr(torch.ops, namespace), name)
    except (AttributeError, RuntimeError):
        return None
