"""The parallel layout: degrees -> DeviceMesh -> named process groups (``ParallelDims``), and the
trainer's batch services on top of it (``ParallelContext``).

Mesh order, outer to inner, is dp, cp, tp (docs/design.md): tp is innermost so that its ranks are
adjacent (the fastest links, same node), a context-parallel group is the set of ranks with equal dp and
tp coordinates, and weights are replicated over cp, so data-parallel sharding (FSDP2 / ZeRO) runs over
the flattened dp x cp sub-mesh. Everything else receives the groups from here explicitly.
"""
from __future__ import annotations

import functools
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor

from spindle.runtime.degrees import LayoutError, ParallelDegrees  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)

MESH_DIMS = ("dp", "cp", "tp")


@dataclass
class ParallelDims:
    """Where this process sits in the job: degrees, the dp x cp x tp DeviceMesh, coordinates, device.

    Only identity and groups; the trainer's batch services are ``ParallelContext`` below. ``mesh`` is
    None in a single-process run.
    """

    degrees: ParallelDegrees
    mesh: DeviceMesh | None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dp_rank: int = 0
    cp_rank: int = 0
    tp_rank: int = 0

    # ------------------------------------------------------------------ construction
    @classmethod
    def single_process(cls, device: torch.device | None = None, **extra: object):
        return cls(degrees=ParallelDegrees(1, 1, 1), mesh=None, device=device or torch.device("cpu"), **extra)

    @classmethod
    def build(cls, degrees: ParallelDegrees, device: torch.device, **extra: object):
        """Build the dp x cp x tp DeviceMesh over the initialized default process group."""
        if not dist.is_initialized():
            if degrees.world_size == 1:
                return cls.single_process(device, **extra)
            raise LayoutError("torch.distributed is not initialized: start the job with torchrun or `spindle train`.")
        if dist.get_world_size() != degrees.world_size:
            raise LayoutError(
                f"the process group has {dist.get_world_size()} ranks but dp * cp * tp = {degrees.world_size}.")
        mesh = init_device_mesh(device.type, (degrees.dp, degrees.cp, degrees.tp), mesh_dim_names=MESH_DIMS)
        dims = cls(degrees=degrees, mesh=mesh, device=device, dp_rank=mesh.get_local_rank("dp"),
                   cp_rank=mesh.get_local_rank("cp"), tp_rank=mesh.get_local_rank("tp"), **extra)
        if dims.is_main:
            log.info("parallel layout dp=%d cp=%d tp=%d", degrees.dp, degrees.cp, degrees.tp)
        return dims

    # ------------------------------------------------------------------ identity
    @property
    def rank(self) -> int:
        return dist.get_rank() if self.mesh is not None else 0

    @property
    def world_size(self) -> int:
        return self.degrees.world_size

    @property
    def dp_size(self) -> int:
        return self.degrees.dp

    @property
    def is_main(self) -> bool:
        """The rank that writes metrics, wandb and the progress bar."""
        return self.rank == 0

    def group(self, name: str) -> dist.ProcessGroup | None:
        """The process group of mesh dimension ``name`` ("dp", "cp" or "tp"); None without a mesh."""
        if self.mesh is None:
            return None
        return self.mesh.get_group(name)

    @functools.cached_property
    def data_parallel_mesh(self) -> DeviceMesh | None:
        """The flattened dp x cp sub-mesh that gradient reduction and FSDP2 sharding run over."""
        if self.mesh is None:
            return None
        return self.mesh["dp", "cp"]._flatten("dp_cp")


@dataclass
class ParallelContext(ParallelDims):
    """``ParallelDims`` plus the services the trainer needs from the layout.

    ``prepare`` shards a micro-batch over the cp group, ``sum_over_batch_ranks`` sums over the ranks
    that hold different parts of the global batch (dp x cp), ``clip_grad_norm`` measures and clips the
    global gradient norm over any mix of plain, FSDP-sharded and tensor-parallel parameters.
    """

    cp_layout: str = "zigzag"

    @classmethod
    def single_process(cls, device: torch.device | None = None, cp_layout: str = "zigzag") -> "ParallelContext":
        return super().single_process(device, cp_layout=cp_layout)

    @classmethod
    def build(cls, degrees: ParallelDegrees, device: torch.device, cp_layout: str = "zigzag") -> "ParallelContext":
        return super().build(degrees, device, cp_layout=cp_layout)

    @property
    def gradient_scale(self) -> float:
        """Factor on each rank's loss before backward. The data-parallel engines (FSDP2, ZeRO) average
        gradients over the dp x cp ranks, and the loss is already divided by the global token count,
        so multiplying by dp·cp turns their average into the sum the global-token mean needs."""
        return float(self.degrees.dp * self.degrees.cp)

    # ------------------------------------------------------------------ what the trainer calls
    def prepare(self, tokens: torch.Tensor, labels: torch.Tensor, cu_seqlens: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(tokens, labels, positions, cu_seqlens) of this rank's part of a micro-batch, on the device.

        Every rank of a cp group receives the same full sequences; each keeps its shard in the cp
        layout, and the RoPE positions and labels follow the same permutation (docs/algorithms.md).
        Packed documents: ``cu_seqlens`` describes the whole (unsharded) micro-batch and stays so on
        every rank, as the mixers' ops expect; positions restart at each document before sharding.
        """
        tokens, labels = tokens.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
        positions = None
        if cu_seqlens is not None:
            from spindle.runtime.data import document_positions

            cu_seqlens = cu_seqlens.to(self.device, non_blocking=True)
            positions = document_positions(cu_seqlens, *tokens.shape)  # [B, T]
        if self.degrees.cp == 1:
            return tokens, labels, positions, cu_seqlens
        from spindle.parallel import cp as context_parallel

        group = self.group("cp")
        if positions is None:
            positions = context_parallel.local_positions(tokens.shape[1], group, layout=self.cp_layout,
                                                         device=self.device)
        else:
            positions = context_parallel.shard(positions, group, layout=self.cp_layout)
        return (context_parallel.shard(tokens, group, layout=self.cp_layout),
                context_parallel.shard(labels, group, layout=self.cp_layout), positions, cu_seqlens)

    def sum_over_batch_ranks(self, value: torch.Tensor) -> torch.Tensor:
        """Sum over every rank that holds a different part of the global batch (dp x cp)."""
        if self.mesh is None or self.degrees.dp * self.degrees.cp == 1:
            return value
        value = value.clone()
        dist.all_reduce(value, group=self.data_parallel_mesh.get_group())
        return value

    def clip_grad_norm(self, parameters: Iterable[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
        """The global L2 norm of all gradients (before clipping); scales them to ``max_norm`` when above.

        Works on any mix of plain tensors and DTensors on different sub-meshes (FSDP2 over dp x cp,
        TP over tp): each rank sums the squares of its local pieces, divided by how many ranks hold a
        replica of that piece, and one all-reduce over the world adds them up.
        """
        grads = [p.grad for p in parameters if p.grad is not None]
        total = torch.zeros((), device=self.device, dtype=torch.float64)
        for grad in grads:
            local, replicas = _local_piece(grad)
            total += local.detach().double().pow(2).sum() / replicas
        if self.mesh is not None:
            dist.all_reduce(total)
        norm = total.sqrt().float()
        if max_norm > 0 and math.isfinite(max_norm) and grads:
            # scale on the device (by 1 when below max_norm): reading the norm on the host would sync
            coefficient = (max_norm / (norm + 1e-6)).clamp(max=1.0)
            for grad in grads:
                grad.mul_(coefficient.to(grad.dtype))
        return norm


def _local_piece(grad: torch.Tensor) -> tuple[torch.Tensor, int]:
    """This rank's piece of a gradient and the number of ranks holding the same piece."""
    if isinstance(grad, DTensor):
        replicas = 1
        for size, placement in zip(grad.device_mesh.shape, grad.placements):
            if placement.is_replicate():
                replicas *= size
        # Ranks outside the DTensor's mesh (the other coordinates of the world) hold their own copy.
        replicas *= dist.get_world_size() // grad.device_mesh.size()
        return grad.to_local(), replicas
    world = dist.get_world_size() if dist.is_initialized() else 1
    return grad, world
