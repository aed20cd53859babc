"""The one object that owns the parallel layout: degrees -> DeviceMesh -> named process groups.

Mesh order, outer to inner, is dp, cp, tp (ALGORITHMS.md §4): tp is innermost so that its ranks are
adjacent (the fastest links, same node), a context-parallel group is the set of ranks with equal dp and
tp coordinates, and weights are replicated over cp, so data-parallel sharding (FSDP2 / ZeRO) runs over
the flattened dp x cp sub-mesh. Everything else receives the groups from here explicitly.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

log = logging.getLogger(__name__)

MESH_DIMS = ("dp", "cp", "tp")


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


@dataclass
class ParallelContext:
    """Degrees, this rank's coordinates, and the named groups. Groups are None when a degree is 1 and
    there is no process group at all (single-process runs)."""

    degrees: ParallelDegrees
    mesh: DeviceMesh | None
    dp_rank: int = 0
    cp_rank: int = 0
    tp_rank: int = 0

    def group(self, name: str) -> dist.ProcessGroup | None:
        """The process group of mesh dimension ``name`` ("dp", "cp" or "tp")."""
        if self.mesh is None:
            return None
        return self.mesh.get_group(name)

    @functools.cached_property
    def data_parallel_mesh(self) -> DeviceMesh | None:
        """The flattened dp x cp sub-mesh that gradient reduction and FSDP2 sharding run over."""
        if self.mesh is None:
            return None
        return self.mesh["dp", "cp"]._flatten("dp_cp")

    @property
    def is_logging_rank(self) -> bool:
        return self.dp_rank == 0 and self.cp_rank == 0 and self.tp_rank == 0

    @classmethod
    def single_process(cls) -> "ParallelContext":
        return cls(degrees=ParallelDegrees(1, 1, 1), mesh=None)

    @classmethod
    def build(cls, degrees: ParallelDegrees, device_type: str) -> "ParallelContext":
        """Build the dp x cp x tp DeviceMesh over the initialized default process group."""
        if not dist.is_initialized():
            if degrees.world_size == 1:
                return cls.single_process()
            raise LayoutError("torch.distributed is not initialized: start the job with torchrun or `spindle train`.")
        if dist.get_world_size() != degrees.world_size:
            raise LayoutError(
                f"the process group has {dist.get_world_size()} ranks but dp * cp * tp = {degrees.world_size}.")
        mesh = init_device_mesh(device_type, (degrees.dp, degrees.cp, degrees.tp), mesh_dim_names=MESH_DIMS)
        context = cls(degrees=degrees, mesh=mesh, dp_rank=mesh.get_local_rank("dp"),
                      cp_rank=mesh.get_local_rank("cp"), tp_rank=mesh.get_local_rank("tp"))
        log.info("parallel layout dp=%d cp=%d tp=%d; this rank: dp %d, cp %d, tp %d", degrees.dp, degrees.cp,
                 degrees.tp, context.dp_rank, context.cp_rank, context.tp_rank)
        return context
