"""Placement: the job's workers against the cluster's nodes, and against this machine's cores/GPUs.

Pure functions (no Ray calls): the driver feeds them ``ray.nodes()`` as ``NodeResources``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace

from spindle.launch.errors import LaunchError
from spindle.runtime.config import Config, ConfigError, validate


@dataclass(frozen=True)
class NodeResources:
    """Total logical resources of one alive node."""

    node_id: str
    address: str
    cpus: float
    gpus: float

    def worker_slots(self, per_worker: dict[str, float]) -> int:
        """How many workers needing ``per_worker`` fit on this node."""
        slots = [int(self.cpus // per_worker["CPU"])]
        if per_worker.get("GPU"):
            slots.append(int(self.gpus // per_worker["GPU"]))
        return max(0, min(slots))


@dataclass(frozen=True)
class PlacementPlan:
    """Where the workers go and what each one reserves."""

    workers: int
    use_gpu: bool
    resources_per_worker: dict[str, float]
    strategy: str
    workers_per_node: tuple[int, ...]
    """Expected worker count on each node used, in rank order (world ranks are grouped by node)."""
    notes: tuple[str, ...] = ()
    """Warnings about the layout (a tp or cp group split across nodes, an uneven spread)."""

    def describe(self) -> str:
        device = "GPU" if self.use_gpu else "CPU"
        nodes = " + ".join(str(count) for count in self.workers_per_node)
        return (f"{self.workers} {device} worker(s) on {len(self.workers_per_node)} node(s) ({nodes}), "
                f"each reserving {format_resources(self.resources_per_worker)}")


def format_resources(resources: dict[str, float]) -> str:
    return ", ".join(f"{value:g} {name}" for name, value in resources.items())


def describe_rank_hosts(hosts: list[str]) -> str:
    """Where the ranks went, ``hosts[rank]`` being each rank's node address: "placement: 4 rank(s) on 2
    host(s): 10.0.0.1 ranks 0-1, 10.0.0.2 ranks 2-3" (hosts in order of their first rank)."""
    ranks_by_host: dict[str, list[int]] = {}
    for rank, host in enumerate(hosts):
        ranks_by_host.setdefault(host, []).append(rank)
    spread = ", ".join(f"{host} {'rank' if len(ranks) == 1 else 'ranks'} {_ranges(ranks)}"
                       for host, ranks in ranks_by_host.items())
    return f"placement: {len(hosts)} rank(s) on {len(ranks_by_host)} host(s): {spread}"


def _ranges(numbers: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> "0-2, 5, 7-8"."""
    runs: list[list[int]] = []
    for number in numbers:
        if runs and number == runs[-1][1] + 1:
            runs[-1][1] = number
        else:
            runs.append([number, number])
    return ", ".join(str(first) if first == last else f"{first}-{last}" for first, last in runs)


def decide_gpu(use_gpu: str, nodes: list[NodeResources]) -> bool:
    """launch.use_gpu: "true"/"false" as given, "auto" = GPUs when the cluster has any."""
    if use_gpu == "auto":
        return sum(node.gpus for node in nodes) > 0
    return use_gpu == "true"


def plan_placement(workers: int, tp: int, cp: int, nodes: list[NodeResources], *, use_gpu: bool,
                   cpus_per_worker: int) -> PlacementPlan:
    """Check that the cluster can host ``workers`` ranks and say how they will be spread.

    Ray's PACK strategy fills as few nodes as possible, and Ray Train numbers world ranks node by node;
    with the mesh order dp, cp, tp (tp innermost), a tp group (cp*tp block) stays inside a node when
    every node's share is a multiple of tp (cp*tp). Raises LaunchError when the resources are short.
    """
    per_worker = {"CPU": float(cpus_per_worker)}
    if use_gpu:
        per_worker["GPU"] = 1.0
    slots = sorted((node.worker_slots(per_worker) for node in nodes), reverse=True)
    if sum(slots) < workers:
        raise LaunchError(_shortage_message(workers, per_worker, nodes, use_gpu))
    # PACK's fill: the largest nodes first, as full as they go.
    shares, remaining = [], workers
    for capacity in slots:
        if remaining == 0:
            break
        shares.append(min(capacity, remaining))
        remaining -= shares[-1]
    notes = []
    for name, size in (("tensor-parallel", tp), ("context-parallel", cp * tp)):
        if size > 1 and any(share % size for share in shares):
            notes.append(f"a {name} group of {size} ranks will span nodes (workers per node: "
                         f"{' + '.join(map(str, shares))}); choose a worker count whose per-node share is a "
                         f"multiple of {size} for intra-node {name} traffic.")
    if len(set(shares)) > 1:
        notes.append(f"workers are spread unevenly ({' + '.join(map(str, shares))} per node): the slowest node "
                     f"sets the pace; a worker count that fills whole nodes spreads evenly.")
    return PlacementPlan(workers=workers, use_gpu=use_gpu, resources_per_worker=per_worker, strategy="PACK",
                         workers_per_node=tuple(shares), notes=tuple(notes))


def _shortage_message(workers: int, per_worker: dict[str, float], nodes: list[NodeResources],
                      use_gpu: bool) -> str:
    needed = {name: workers * amount for name, amount in per_worker.items()}
    available = {"CPU": sum(node.cpus for node in nodes), "GPU": sum(node.gpus for node in nodes)}
    per_node = "; ".join(f"{node.address}: {node.cpus:g} CPU, {node.gpus:g} GPU" for node in nodes)
    advice = ("set launch.use_gpu=false to train on CPU workers, " if use_gpu else "") + \
             "lower parallel.dp / cp / tp, lower launch.cpus_per_worker, or add nodes"
    return (f"the cluster cannot host {workers} worker(s) (dp*cp*tp) of {format_resources(per_worker)} each: "
            f"needs {format_resources(needed)}, has {format_resources({k: available[k] for k in needed})} "
            f"in total ({len(nodes)} node(s): {per_node or 'none alive'}). To fix: {advice}.")


def plan_slots(nodes: list[NodeResources], use_gpu: bool, cpus_per_worker: int) -> int:
    """Total workers the cluster holds."""
    per_worker = {"CPU": float(cpus_per_worker), **({"GPU": 1.0} if use_gpu else {})}
    return sum(node.worker_slots(per_worker) for node in nodes)


# ---------------------------------------------------------------------------------------------
# This machine: the embedded cluster's size, and oversubscription
# ---------------------------------------------------------------------------------------------
def local_cores() -> int:
    """CPU cores this process may run on (the affinity mask, e.g. a container's or taskset's share)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def local_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def local_worker_capacity(config: Config) -> int:
    """Workers an embedded cluster on this machine can host (for parallel.dp = -1)."""
    gpus = local_gpus() if config.launch.use_gpu != "false" else 0
    if gpus:
        return gpus
    return max(1, local_cores() // config.launch.cpus_per_worker)


def check_oversubscription(workers: int, cpus_per_worker: int, *, use_gpu: bool, cores: int,
                           gpus: int) -> str | None:
    """The planned workers against this machine's cores and GPUs: ConfigError when GPU workers outnumber
    the GPUs (two ranks cannot share one GPU's memory and NCCL), a warning (returned) when CPU workers
    need more cores than there are (they run, time-sliced, several times slower)."""
    if use_gpu and workers > gpus:
        raise ConfigError(
            f"the job needs {workers} GPU worker(s) (dp*cp*tp) but this machine has {gpus} GPU(s): lower "
            f"parallel.dp / cp / tp to fit {gpus}, train on CPU workers with launch.use_gpu=false, or join a "
            f"larger cluster with --address.")
    needed = workers * cpus_per_worker
    if needed > cores:
        return (f"the job starts {workers} worker process(es) x {cpus_per_worker} CPU = {needed} CPU(s) on a "
                f"machine with {cores} core(s): they share the cores and each step runs about "
                f"{needed / cores:.1f}x slower than with enough cores. Lower parallel.dp / cp / tp or "
                f"launch.cpus_per_worker, or join a larger cluster with --address.")
    return None


def with_data_parallel(config: Config, capacity: int) -> Config:
    """The config with parallel.dp = -1 replaced by what ``capacity`` workers allow."""
    parallel = config.parallel
    if parallel.dp != -1:
        return config
    group = parallel.cp * parallel.tp
    if capacity < group:
        raise LaunchError(f"parallel.dp = -1 infers dp from the cluster, but it has room for {capacity} worker(s) "
                          f"and one cp*tp group needs {group}: set parallel.dp explicitly or add resources.")
    return replace(config, parallel=replace(parallel, dp=capacity // group))


def worker_count(config: Config) -> int | None:
    """dp*cp*tp, or None while parallel.dp = -1 is not resolved."""
    parallel = config.parallel
    return None if parallel.dp == -1 else parallel.dp * parallel.cp * parallel.tp


def restart_data_parallel(config: Config, capacity: int) -> int | None:
    """The dp a restart after a lost node runs with on ``capacity`` worker slots: the job's own dp when
    it fits, else the largest smaller dp that ``launch.min_workers`` allows (cp and tp stay) and the
    batch settings accept; None when nothing fits (the restart waits for capacity)."""
    parallel, minimum = config.parallel, config.launch.min_workers
    group = parallel.cp * parallel.tp
    smallest = minimum // group if minimum else parallel.dp
    for dp in range(min(parallel.dp, capacity // group), max(smallest, 1) - 1, -1):
        try:
            validate(replace(config, parallel=replace(parallel, dp=dp)), world_size=dp * group)
        except ConfigError:  # e.g. train.global_batch not divisible by this dp
            continue
        return dp
    return None
