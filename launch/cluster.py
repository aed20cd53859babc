"""The Ray cluster a job runs on: the address to join, or an embedded cluster on this machine.

The embedded cluster is private to this machine and this user: every Ray service (GCS, raylet,
workers, object manager, dashboard and its agents, metrics export, runtime-env agent) listens on
127.0.0.1 only, and its authentication token lives in a file only this user can read (0600), which
is deleted when the session ends. Messages name this cluster's own session directory, not
/tmp/ray/session_latest (which may belong to another Ray instance on the same host).

After a failure the driver asks which hosts of the job are gone: every rank records its Ray node under
RUN_DIR/.spindle/nodes/ when it starts, and the driver probes those nodes' raylets (a lost host stops
answering seconds before Ray's own health checks declare it dead).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

from spindle.launch.errors import LaunchError, last_line
from spindle.launch.placement import NodeResources, PlacementPlan, format_resources
from spindle.runtime.heartbeat import LAUNCHER_DIR

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0
LOOPBACK = "127.0.0.1"
EMBEDDED_OBJECT_STORE_BYTES = 256 * 1024**2
TOKEN_FILE = "auth_token"


# ---------------------------------------------------------------------------------------------
# Cluster address
# ---------------------------------------------------------------------------------------------
def resolve_address(address: str | None) -> str | None:
    """The cluster to join: ``--address``, else RAY_ADDRESS, else None (start an embedded cluster)."""
    source = "--address"
    if not address and os.environ.get("RAY_ADDRESS"):
        address, source = os.environ["RAY_ADDRESS"], "RAY_ADDRESS"
    if not address or address == "local":
        return None
    if address == "auto":
        return address
    parsed = urlparse(address if "://" in address else f"gcs://{address}")
    if parsed.scheme in ("http", "https"):
        raise LaunchError(
            f"{source}={address} is a dashboard (Jobs API) address: `spindle train` joins a cluster through "
            f"its GCS address HOST:PORT (default port 6379), e.g. --address {parsed.hostname}:6379; to run the "
            f"job on the cluster from here use `spindle submit CONFIG --address {address}`.")
    if parsed.scheme != "gcs":
        raise LaunchError(f"{source}={address}: Ray Train jobs join through the cluster's GCS address HOST:PORT "
                          f"(e.g. 10.0.0.1:6379), not a {parsed.scheme}:// address; from a machine outside the "
                          f"cluster use `spindle submit CONFIG --address http://HEAD:8265`.")
    if not parsed.hostname or parsed.port is None:
        raise LaunchError(f"{source}={address} is not HOST:PORT: pass the Ray cluster's GCS address, "
                          f"e.g. 10.0.0.1:6379.")
    check_reachable(parsed.hostname, parsed.port, address,
                    advice="or leave out --address and RAY_ADDRESS to train on an embedded local cluster")
    return address


def check_reachable(host: str, port: int, shown: str, timeout_s: float = CONNECT_TIMEOUT_S, *,
                    advice: str = "") -> None:
    """Fail within ``timeout_s`` when nothing listens at host:port (Ray itself retries for minutes).
    ``advice`` ends the message with what else the caller's user can do."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as error:
        raise LaunchError(
            f"cannot reach a Ray cluster at {shown}: {error.strerror or error}. Check that the head node is "
            f"running (`ray start --head` or docker/compose.yaml) and that the address and port are right"
            + (f", {advice}" if advice else "") + ".") from None


# ---------------------------------------------------------------------------------------------
# Ray session
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def ray_session(address: str | None, num_cpus: int, workers: int | None = None) -> Iterator[None]:
    """Join the cluster at ``address`` or start an embedded loopback one; disconnect (and stop it)
    afterwards. ``workers``: shown in the startup line of an embedded cluster."""
    import ray

    with _ray_environment(embedded=address is None) as token_dir:
        if address is None:
            _start_embedded(num_cpus, workers, token_dir)
        else:
            log.info("joining the Ray cluster at %s", address)
            _join(address)
        try:
            yield
        finally:
            ray.shutdown()


@contextlib.contextmanager
def _ray_environment(embedded: bool) -> Iterator[Path | None]:
    """Environment variables of this Ray session (inherited by the GCS, raylet and workers an embedded
    cluster starts), restored afterwards; for an embedded cluster, a private directory for its token."""
    saved = dict(os.environ)
    token_dir = Path(tempfile.mkdtemp(prefix="spindle-ray-")) if embedded else None  # mode 0700
    try:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no phone-home
        # Workers print plain lines (Ray Train would otherwise also route print() through its logger).
        os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
        if embedded:
            # A single machine is never preempted by a cloud provider: skip Ray Train's watcher actor.
            os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        yield token_dir
    finally:
        os.environ.clear()
        os.environ.update(saved)
        if token_dir is not None:
            shutil.rmtree(token_dir, ignore_errors=True)
        _set_cluster_mode(enabled=None)
        if embedded:
            _refresh_ray_config()


def _set_cluster_mode(enabled: bool | None) -> None:
    """Ray resolves a local node's address to the host's outward IP (and binds its servers there and on
    all interfaces) unless multi-host clusters are off; off, everything is 127.0.0.1. The flag is read
    from the environment at import, so an already imported Ray gets it set too. None: back to Ray's default."""
    variable = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
    from ray._private import ray_constants

    if enabled is None:
        default = not ray_constants.IS_WINDOWS_OR_OSX
        ray_constants.ENABLE_RAY_CLUSTER = (os.environ.get(variable, str(int(default))).lower()
                                            in ("1", "true", "yes"))
        return
    os.environ[variable] = "1" if enabled else "0"
    ray_constants.ENABLE_RAY_CLUSTER = enabled


def _refresh_ray_config() -> None:
    """Ray caches RAY_AUTH_MODE when it is imported; re-read it (as Ray does when it turns token
    authentication on itself), so this process speaks to the cluster it starts with the token."""
    from ray._raylet import Config

    Config.initialize("")


def free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


def _private_token(token_dir: Path) -> Path:
    """A fresh random token in a file only this user can read (Ray would otherwise write a world-readable
    ~/.ray/auth_token shared by every cluster of the user)."""
    path = token_dir / TOKEN_FILE
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(secrets.token_hex(32))
    return path


def _start_embedded(num_cpus: int, workers: int | None, token_dir: Path) -> None:
    import ray

    dashboard_port = free_loopback_port()
    _set_cluster_mode(enabled=False)  # every service on 127.0.0.1 (see _set_cluster_mode)
    os.environ.pop("RAY_AUTH_TOKEN", None)  # a user's token for another cluster is not this one's
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(_private_token(token_dir)),
                      # Ray's state API (queried by Ray Train's controller and placement-group cleaner) is
                      # this cluster's dashboard: without this it scans the host for GCS processes and
                      # fails when another Ray instance runs on it.
                      RAY_API_SERVER_ADDRESS=f"http://{LOOPBACK}:{dashboard_port}")
    _refresh_ray_config()
    what = f"{workers} worker(s)" if workers else f"{num_cpus} CPU(s)"
    print(f"spindle: starting a local Ray cluster with {what} ...", file=sys.stderr, flush=True)
    started = time.perf_counter()
    try:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host=LOOPBACK,
                 dashboard_port=dashboard_port, logging_level=logging.WARNING, log_to_driver=True,
                 object_store_memory=EMBEDDED_OBJECT_STORE_BYTES)
    except (ConnectionError, RuntimeError, OSError) as error:
        raise LaunchError(f"could not start an embedded Ray cluster: {last_line(error)} (Ray's logs: "
                          f"{logs_hint()}). Free memory or /dev/shm space, or join a running cluster with "
                          f"--address.") from None
    print(f"spindle: local Ray cluster up in {time.perf_counter() - started:.1f} s (session "
          f"{session_dir() or '?'})", file=sys.stderr, flush=True)


def _join(address: str) -> None:
    import ray
    from ray.exceptions import AuthenticationError

    # A Ray driver attaches to a node on its own machine (that node's raylet and object store): connect
    # to that one by its address (Ray's own guess scans the process table for any raylet).
    node = _node_on_this_machine(address) if address != "auto" else None
    try:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True,
                 **({"_node_ip_address": node} if node else {}))
    except (ConnectionError, RuntimeError) as error:
        causes, cause = [], error
        while cause is not None:
            causes.append(cause)
            cause = cause.__cause__ or cause.__context__
        if any(isinstance(cause, AuthenticationError) for cause in causes):
            raise LaunchError(
                f"the Ray cluster at {address} requires token authentication: set RAY_AUTH_MODE=token and make the "
                f"cluster's token available here (~/.ray/auth_token, RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN; "
                f"`ray get-auth-token` on the head node prints it).") from None
        raise LaunchError(f"could not join the Ray cluster at {address}: {last_line(error)}. Check that the address "
                          f"is the head node's GCS address (HOST:6379 by default) and that its Ray version matches "
                          f"this one.") from None


def _node_on_this_machine(address: str) -> str | None:
    """The address of the cluster's alive node that runs on this machine; None when the cluster's nodes
    cannot be listed before joining (ray.init then says what is wrong). Raises LaunchError when none of
    the nodes is on this machine: a Ray driver cannot run there."""
    import psutil
    from ray._raylet import GcsClient
    from ray.core.generated.gcs_pb2 import GcsNodeInfo

    try:
        nodes = GcsClient(address=address).get_all_node_info(
            timeout=CONNECT_TIMEOUT_S, state_filter=GcsNodeInfo.GcsNodeState.ALIVE).values()
        node_addresses = sorted({node.node_manager_address for node in nodes})
    except Exception:  # a private Ray API, a token refused, an old GCS: leave the diagnosis to ray.init
        return None
    local = {entry.address for entries in psutil.net_if_addrs().values() for entry in entries}
    here = [node_address for node_address in node_addresses if node_address in local]
    if here:
        return here[0]
    if not node_addresses:
        return None
    host = urlparse(f"gcs://{address}").hostname
    raise LaunchError(
        f"this machine is not a node of the Ray cluster at {address} (its nodes: {', '.join(node_addresses)}; "
        f"this machine: {', '.join(sorted(local - {'127.0.0.1', '::1'})) or 'loopback only'}). `spindle train "
        f"--address` runs the job's driver here, and a Ray driver runs on a node of its cluster. To fix: make "
        f"this machine a node without CPUs (`ray start --address {address} --num-cpus 0`) and run again, or "
        f"submit the job from anywhere with `spindle submit CONFIG --address http://{host}:8265`.")


def session_dir() -> str | None:
    """The session directory of the cluster this process is connected to (its logs are under logs/)."""
    try:
        from ray._private import worker

        node = worker._global_node
        return node.get_session_dir_path() if node is not None else None
    except Exception:  # a private Ray attribute: messages fall back to a generic hint
        return None


def logs_hint() -> str:
    """Where this cluster's logs are, for error messages."""
    directory = session_dir()
    return f"{directory}/logs" if directory else "the Ray session directory's logs/ on each node"


def cluster_nodes() -> list[NodeResources]:
    """The alive nodes of the connected cluster and their total CPUs/GPUs."""
    import ray

    return [NodeResources(node_id=node["NodeID"], address=node.get("NodeManagerAddress", "?"),
                          cpus=float(node["Resources"].get("CPU", 0)), gpus=float(node["Resources"].get("GPU", 0)))
            for node in ray.nodes() if node.get("Alive")]


def warn_if_busy(plan: PlacementPlan) -> None:
    """Other jobs may hold resources now; the workers then wait for them, which deserves a word."""
    import ray

    available = ray.available_resources()
    short = {name: amount * plan.workers for name, amount in plan.resources_per_worker.items()
             if available.get(name, 0) < amount * plan.workers}
    if short:
        print(f"spindle: waiting for resources held by other jobs: needs {format_resources(short)}, free now "
              f"{format_resources({name: available.get(name, 0) for name in short})}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Where the ranks run, and which of those hosts are gone (a lost node)
# ---------------------------------------------------------------------------------------------
WORKER_NODES_DIR = LAUNCHER_DIR / "nodes"
"""Relative to the run directory: one record per rank of the current worker group, naming its Ray node."""
RAYLET_PROBE_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class WorkerHost:
    """A Ray node that ran ranks of the job."""

    node_id: str
    address: str
    hostname: str
    ranks: tuple[int, ...]

    def describe(self) -> str:
        return f"{self.address} (Ray node {self.node_id[:12]}, hostname {self.hostname})"

    def ranks_text(self) -> str:
        return f"{'rank' if len(self.ranks) == 1 else 'ranks'} {', '.join(map(str, self.ranks))}"


def record_worker_node(run_dir: str | os.PathLike, rank: int) -> None:
    """On a worker: write which Ray node this rank runs on (the driver reads it after a failure)."""
    import ray

    path = Path(run_dir) / WORKER_NODES_DIR / f"rank_{rank:05d}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"rank": rank, "node_id": ray.get_runtime_context().get_node_id(),
              "address": ray.util.get_node_ip_address(), "hostname": socket.gethostname(), "pid": os.getpid()}
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(record), encoding="utf-8")
    os.replace(temporary, path)  # the driver never reads half a record


def clear_worker_nodes(run_dir: str | os.PathLike) -> None:
    """Forget the records of an earlier worker group (a smaller group leaves no stale ranks behind)."""
    shutil.rmtree(Path(run_dir) / WORKER_NODES_DIR, ignore_errors=True)


def worker_hosts(run_dir: str | os.PathLike) -> list[WorkerHost]:
    """The hosts of the current worker group, from the records its ranks wrote, in rank order."""
    by_node: dict[str, list[dict]] = {}
    for path in sorted((Path(run_dir) / WORKER_NODES_DIR).glob("rank_*.json")):
        with contextlib.suppress(OSError, ValueError):
            record = json.loads(path.read_text(encoding="utf-8"))
            by_node.setdefault(record["node_id"], []).append(record)
    return [WorkerHost(node_id, records[0]["address"], records[0]["hostname"],
                       tuple(sorted(record["rank"] for record in records)))
            for node_id, records in sorted(by_node.items(), key=lambda item: min(r["rank"] for r in item[1]))]


def node_states(node_ids: list[str]) -> dict[str, str]:
    """Per node: "alive" (the GCS lists it and its raylet answers), "unreachable" (the GCS still lists it,
    its raylet does not answer: Ray has not noticed the loss yet) or "dead" (the GCS says so)."""
    import ray

    nodes = {node["NodeID"]: node for node in ray.nodes()}
    states = {}
    for node_id in node_ids:
        node = nodes.get(node_id)
        if node is None or not node.get("Alive"):
            states[node_id] = "dead"
        else:
            answers = _answers(node.get("NodeManagerAddress", ""), int(node.get("NodeManagerPort") or 0))
            states[node_id] = "alive" if answers else "unreachable"
    return states


def _answers(host: str, port: int) -> bool:
    """A raylet whose host lost power refuses the connection, one behind a cut link lets it time out."""
    try:
        with socket.create_connection((host, port), timeout=RAYLET_PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False
