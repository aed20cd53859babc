"""Package boundaries: parallel/ builds on runtime/, never the other way round at import time.

The dependency runs kernels <- parallel <- runtime's composition root (runtime/main.py). Any other
runtime module imports parallel/ only inside a function (where it is needed) or for type checking, so
importing the trainer, the config, the planner or the checkpoints never loads the parallel package.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]
COMPOSITION_ROOTS = {"main.py"}  # wires parallel/ into the trainer


def module_level_imports(path: Path) -> set[str]:
    """Modules imported at load time (top level, not under `if TYPE_CHECKING:`)."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("path", sorted((REPOSITORY / "runtime").glob("*.py")), ids=lambda path: path.name)
def test_runtime_does_not_import_parallel_at_load_time(path: Path) -> None:
    if path.name in COMPOSITION_ROOTS:
        return
    offending = {name for name in module_level_imports(path) if name.startswith("spindle.parallel")}
    assert offending == set(), f"runtime/{path.name} imports {offending} at load time"


@pytest.mark.parametrize("path", sorted((REPOSITORY / "kernels").rglob("*.py")) + sorted(
    (REPOSITORY / "parallel" / "cp").glob("*.py")), ids=lambda path: str(path.relative_to(REPOSITORY)))
def test_kernels_and_cp_ops_stand_alone(path: Path) -> None:
    offending = {name for name in module_level_imports(path)
                 if name.startswith(("spindle.runtime", "spindle.launch"))}
    assert offending == set(), f"{path.relative_to(REPOSITORY)} imports {offending}"
