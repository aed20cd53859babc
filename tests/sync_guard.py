"""Count host syncs made by spindle's own code: a guard around the Tensor methods that read values on the host.

On a GPU, `.item()`, `.cpu()`, `.tolist()`, `.numpy()` and `bool()` / `float()` / `int()` of a tensor
wait for the device. On CPU nothing waits, but the calls are the same, so counting them during a CP op or
a training step on CPU finds the syncs a GPU run would make. Only calls made directly from the
repository's source files count (torch's own internals, e.g. the optimizer's CPU step counters, are not
device syncs), and not those under an `if ....device.type == "cpu":` guard up to three lines above them
(value checks that a GPU run does with torch._assert_async instead); each is reported as "file:line method".
"""

from __future__ import annotations

import contextlib
import linecache
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import torch

REPOSITORY = Path(__file__).resolve().parents[1]
SOURCE_DIRECTORIES = tuple(str(REPOSITORY / name) + "/" for name in ("runtime", "parallel", "kernels", "launch"))
CPU_ONLY_GUARD = '.device.type == "cpu"'
GUARDED = ("item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")


def _cpu_only(filename: str, line: int) -> bool:
    return any(CPU_ONLY_GUARD in linecache.getline(filename, number) for number in range(max(1, line - 3), line + 1))


@contextlib.contextmanager
def count_host_syncs() -> Iterator[Counter]:
    """Within the block, count host-reading Tensor calls made from the repository's source files."""
    counts: Counter = Counter()
    originals = {name: getattr(torch.Tensor, name) for name in GUARDED}

    def guarded(name: str, original):
        def wrapper(self, *args, **kwargs):
            caller = sys._getframe(1)
            filename = caller.f_code.co_filename
            if filename.startswith(SOURCE_DIRECTORIES) and not _cpu_only(filename, caller.f_lineno):
                counts[f"{Path(filename).relative_to(REPOSITORY)}:{caller.f_lineno} {name}"] += 1
            return original(self, *args, **kwargs)

        return wrapper

    for name, original in originals.items():
        setattr(torch.Tensor, name, guarded(name, original))
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
