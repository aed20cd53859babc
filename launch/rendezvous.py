"""How the workers of a job find each other: loopback on an embedded cluster, node addresses on a joined one.

torch's rendezvous store (a TCPStore on rank 0, where ranks exchange addresses before the first
collective) listens on every interface when torch creates it from MASTER_ADDR/MASTER_PORT, whatever
the address. On an embedded cluster every rank is on this machine, so rank 0 binds the store's socket
to 127.0.0.1 itself and hands it to TCPStore (``master_listen_fd``); the other ranks connect there,
and the process group is built on that store. Ray Train runs this through a TorchConfig whose backend
replaces its default process-group setup.

On a joined cluster Ray Train's own setup builds the process group (the store on rank 0's node
address), after two steps of ours: gloo is bound to the interface that carries each worker's Ray node
address (gloo otherwise binds to whatever the hostname resolves to, which is a loopback address on
many hosts, e.g. Debian's 127.0.1.1 entry, and ranks on other hosts then cannot connect), and the
ranks' hosts are printed (``describe_rank_hosts``).
"""
from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

from ray.train.torch import TorchConfig
from ray.train.torch.config import _TorchBackend

LOOPBACK = "127.0.0.1"
_listener: socket.socket | None = None
"""Rank 0's bound socket, alive in the worker process until the store takes it over."""


def bind_loopback() -> int:
    """On rank 0: a listening socket on 127.0.0.1; returns its port."""
    global _listener
    _listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    _listener.bind((LOOPBACK, 0))
    _listener.listen(128)
    return _listener.getsockname()[1]


def set_master(port: int) -> None:
    """MASTER_ADDR/MASTER_PORT as torchrun would set them (heartbeats name the worker group by them)."""
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = LOOPBACK, str(port)


def join_process_group(backend: str, world_rank: int, world_size: int, port: int, timeout_s: int) -> None:
    """Create (rank 0) or connect to the loopback store, then initialize the default process group."""
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=timeout_s)
    if backend == "nccl" and "TORCH_NCCL_BLOCKING_WAIT" not in os.environ:
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # time out instead of hanging
    if world_rank == 0:
        store = dist.TCPStore(LOOPBACK, port, world_size, True, timeout, wait_for_workers=False,
                              master_listen_fd=_listener.fileno())
    else:
        store = dist.TCPStore(LOOPBACK, port, world_size, False, timeout)
    dist.init_process_group(backend, store=store, rank=world_rank, world_size=world_size, timeout=timeout)


class _LoopbackTorchBackend(_TorchBackend):
    """Ray Train's torch backend with the process group built on a loopback store."""

    def on_start(self, worker_group: object, backend_config: TorchConfig) -> None:
        import ray
        from ray.train._internal.worker_group import WorkerGroup as V1WorkerGroup
        from ray.train.torch.config import _set_torch_distributed_env_vars

        backend = backend_config.backend or "gloo"
        port = worker_group.execute_single(0, bind_loopback)
        worker_group.execute(set_master, port=port)
        if not isinstance(worker_group, V1WorkerGroup):  # LOCAL_RANK and friends, as Ray Train sets them
            worker_group.execute(_set_torch_distributed_env_vars)
        ray.get([worker_group.execute_single_async(rank, join_process_group, backend=backend, world_rank=rank,
                                                   world_size=len(worker_group), port=port,
                                                   timeout_s=backend_config.timeout_s)
                 for rank in range(len(worker_group))])


@dataclass
class LoopbackTorchConfig(TorchConfig):
    """TorchConfig for an embedded cluster: every rendezvous socket on 127.0.0.1."""

    @property
    def backend_cls(self) -> type:
        return _LoopbackTorchBackend


def bind_gloo_to_node_address() -> tuple[str, str | None]:
    """On a worker: point gloo at the interface holding this worker's Ray node address (unless the user
    chose one with GLOO_SOCKET_IFNAME); returns (node address, interface or None when none holds it)."""
    import psutil
    import ray

    address = node_address()
    interface = next((name for name, entries in psutil.net_if_addrs().items()
                      if any(entry.address == address for entry in entries)), None)
    if interface is not None:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", interface)
    return address, interface


def node_address() -> str:
    """The address this worker's Ray node registered with (``ray start --node-ip-address``); a worker's own
    guess (``ray.util.get_node_ip_address``) is the address that routes outward, another one on a
    multi-homed host."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    registered = [node["NodeManagerAddress"] for node in ray.nodes() if node["NodeID"] == node_id]
    return registered[0] if registered else ray.util.get_node_ip_address()


class _NodeAddressTorchBackend(_TorchBackend):
    """Ray Train's torch backend, with gloo bound to each worker's node address and the ranks' hosts shown."""

    def on_start(self, worker_group: object, backend_config: TorchConfig) -> None:
        from spindle.launch.placement import describe_rank_hosts

        bound = worker_group.execute(bind_gloo_to_node_address)  # in world-rank order
        print(f"spindle: {describe_rank_hosts([address for address, _ in bound])}", flush=True)
        super().on_start(worker_group, backend_config)


@dataclass
class NodeAddressTorchConfig(TorchConfig):
    """TorchConfig for a joined cluster: ranks on several hosts."""

    @property
    def backend_cls(self) -> type:
        return _NodeAddressTorchBackend
