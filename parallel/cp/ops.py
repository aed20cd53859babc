"""What every context-parallel op shares at its entry: its published identity and the checks of its shards.

The CP ops come in families whose members take the same arguments: the softmax schemes (all-gather,
ring, Ulysses) and the linear schemes (LASP-2, LASP-1). Each family writes its signature, its
argument documentation and its validation once (softmax.py, linear.py) and makes one op per scheme
from them; `publish` gives that op the scheme's name, docstring and signature, so messages, help()
and pickling see an ordinary function of the scheme's module.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping

import torch
import torch.distributed as dist

from .comm import check_ranks_agree, group_rank_and_size
from .layout import check_layout

REQUIRED = inspect.Parameter.empty  # a scheme option without a default


def publish(op: Callable[..., torch.Tensor], name: str, module: str, doc: str,
            options: Mapping[str, object] | None = None) -> Callable[..., torch.Tensor]:
    """`op` (a family's function made for one scheme) as the scheme's public op `module.name`.

    options: the scheme's own keyword arguments (name -> default or REQUIRED), which `op` receives
    through its ``**options``; they join its signature after the family's parameters.
    """
    signature = inspect.signature(op)
    parameters = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    parameters += [inspect.Parameter(key, inspect.Parameter.KEYWORD_ONLY, default=default,
                                     annotation=REQUIRED if default is REQUIRED else type(default).__name__)
                   for key, default in (options or {}).items()]
    op.__signature__ = signature.replace(parameters=parameters)
    op.__name__ = op.__qualname__ = name
    op.__module__, op.__doc__ = module, doc
    return op


def scheme_options(caller: str, given: Mapping[str, object], options: Mapping[str, object]) -> dict[str, object]:
    """The scheme's keyword options: `given` over the defaults; unknown or missing ones are a TypeError
    naming the op (as Python's own message would for a written-out signature)."""
    unknown = sorted(set(given) - set(options))
    if unknown:
        raise TypeError(f"{caller}() got unexpected keyword argument(s) {', '.join(unknown)}; "
                        f"its own options are: {', '.join(options) or 'none'}")
    chosen = {**options, **given}
    missing = [key for key, value in chosen.items() if value is REQUIRED]
    if missing:
        raise TypeError(f"{caller}() missing required keyword argument(s): {', '.join(missing)}")
    return chosen


def check_shards(caller: str, group: dist.ProcessGroup, arguments: Mapping[str, object],
                 any_rank_flags: Mapping[str, bool] | None = None) -> tuple[int, int]:
    """(rank, world size) of `group` once the ranks agree on `arguments` (q, k, v, layout and the
    op's options) and q, k, v are this rank's 4-D shards of one dtype in that layout.

    Cross-rank agreement comes first, so that a bad shape on one rank cannot leave the others waiting
    in a collective; then the local checks every family shares.
    """
    rank, world_size = group_rank_and_size(group, caller)
    layout, q, k, v = (arguments[name] for name in ("layout", "q", "k", "v"))
    check_layout(layout, caller)
    check_ranks_agree(group, caller, arguments, any_rank_flags)
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 4:
            raise ValueError(f"{caller}: {name} must be a 4-D tensor [batch, local_seq, heads, head_dim]")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{caller}: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if layout == "zigzag" and q.shape[1] % 2 != 0:
        raise ValueError(
            f"{caller}: local length {q.shape[1]} is odd, but layout 'zigzag' holds two equal chunks per rank; "
            f"the global length must be divisible by 2 x {world_size} ranks"
        )
    return rank, world_size
