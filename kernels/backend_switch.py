"""A process-wide backend choice for one op family: `force_backend` blocks first, then an environment variable.

Tests drive every path of an op with it; "auto" inside a block (or an unset variable) leaves the choice to
the op. An explicit backend= argument to the op always wins over both.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


class BackendSwitch:
    """The forced backend of one op family. `label` names the backends in messages ("linear-attention backend")."""

    def __init__(self, backends: tuple[str, ...], variable: str, label: str) -> None:
        self.backends, self.variable, self.label = backends, variable, label
        self._forced: str | None = None

    @contextlib.contextmanager
    def force(self, name: str) -> Iterator[None]:
        """Within the block, backend="auto" resolves to `name` ("auto": the op's own choice)."""
        if name not in self.backends:
            raise ValueError(f"force_backend: unknown {self.label} {name!r}; choose one of {', '.join(self.backends)}")
        previous, self._forced = self._forced, (None if name == "auto" else name)
        try:
            yield
        finally:
            self._forced = previous

    def forced(self, caller: str) -> str | None:
        """The backend forced by a block, else by the environment variable; None when neither forces one."""
        if self._forced is not None:
            return self._forced
        value = os.environ.get(self.variable, "").strip()
        if not value or value == "auto":
            return None
        if value not in self.backends:
            raise ValueError(f"{caller}: {self.variable}={value!r} is not a {self.label}; choose one of "
                             f"{', '.join(self.backends)} or unset it")
        return value
