"""The parallel degrees (dp, cp, tp) of a job: the one place where parallel.dp = -1 is resolved.

Pure Python (no torch), so the config, the planner, checkpoints and the launcher can all use it;
parallel/layout.py builds the DeviceMesh from it.
"""
from __future__ import annotations

from dataclasses import dataclass


class LayoutError(ValueError):
    """A parallel layout that cannot be built on the given world size."""


@dataclass(frozen=True)
class ParallelDegrees:
    """Validated degrees of data, context and tensor parallelism; dp * cp * tp == world_size."""

    dp: int
    cp: int
    tp: int

    @property
    def world_size(self) -> int:
        return self.dp * self.cp * self.tp

    @classmethod
    def resolve(cls, dp: int, cp: int, tp: int, world_size: int) -> "ParallelDegrees":
        """Check the degrees against ``world_size``; one degree may be -1 and is then inferred."""
        degrees = {"parallel.dp": dp, "parallel.cp": cp, "parallel.tp": tp}
        unknown = [name for name, value in degrees.items() if value == -1]
        for name, value in degrees.items():
            if value == 0 or value < -1:
                raise LayoutError(f"{name}={value} is not a valid degree: use a positive integer (or -1 to infer it).")
        if len(unknown) > 1:
            raise LayoutError(f"{' and '.join(unknown)} are both -1: at most one degree can be inferred from the world size.")
        known = 1
        for value in degrees.values():
            known *= value if value != -1 else 1
        if unknown:
            if world_size % known != 0:
                raise LayoutError(
                    f"cannot infer {unknown[0]}: the other degrees multiply to {known}, which does not divide the "
                    f"world size {world_size}. Choose degrees whose product divides {world_size}.")
            degrees[unknown[0]] = world_size // known
        resolved = cls(degrees["parallel.dp"], degrees["parallel.cp"], degrees["parallel.tp"])
        if resolved.world_size != world_size:
            raise LayoutError(
                f"parallel.dp * parallel.cp * parallel.tp = {resolved.dp} * {resolved.cp} * {resolved.tp} = "
                f"{resolved.world_size}, but the job has {world_size} workers. Make the product equal the worker count "
                f"(or set one degree to -1 to infer it).")
        return resolved
