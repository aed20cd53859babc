"""Run the per-process trainer on Ray Train workers.

    run_training(config, run_dir, resume, address)
      1. the job's shape: dp * cp * tp workers, checked against the config before Ray starts
      2. Ray: an embedded local cluster sized to the job (no address), or an existing one (--address /
         RAY_ADDRESS), reachability checked first so a wrong address fails in seconds
      3. placement: the cluster's nodes are checked against the layout (enough CPUs/GPUs, tp and cp
         groups inside a node) before any worker starts
      4. TorchTrainer: one worker per rank, gloo on CPUs or NCCL on GPUs, collectives time out after
         launch.collective_timeout_s, a failed worker group restarts launch.max_failures times
      5. every worker calls ``spindle.runtime.main.train_entry`` -- the same entry torchrun uses

Restarts resume: a worker group that starts after a checkpoint was committed during this launch
resumes from RUN_DIR/checkpoints/latest (``resume="auto"``); otherwise it starts the way the user
asked. A rank that stops answering is named: every worker writes a small heartbeat file with the
last collective it entered (torch's flight recorder), and a failed collective is reported with the
ranks that never entered it.

This module is the only place (with ``submit.py``) that imports ray.
"""
from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

from spindle.runtime.config import Config, ConfigError, to_dict, validate

log = logging.getLogger(__name__)

LAUNCHER_DIR = Path(".spindle")
"""The launcher's files inside the run directory: heartbeats and Ray Train's state."""
HEARTBEAT_DIR = LAUNCHER_DIR / "heartbeat"
"""Per-rank heartbeat files, relative to the run directory."""
HEARTBEAT_INTERVAL_S = 5.0
FLIGHT_RECORDER_ENTRIES = "64"
"""TORCH_FR_BUFFER_SIZE of the workers: the last collectives each rank entered, for hang reports."""
CONNECT_TIMEOUT_S = 5.0


class LaunchError(RuntimeError):
    """A job that cannot start or did not finish: one message saying what happened and what to do."""


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
    check_reachable(parsed.hostname, parsed.port, address)
    return address


def check_reachable(host: str, port: int, shown: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Fail within ``timeout_s`` when nothing listens at host:port (Ray itself retries for minutes)."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as error:
        raise LaunchError(
            f"cannot reach a Ray cluster at {shown}: {error.strerror or error}. Check that the head node is "
            f"running (`ray start --head` or docker/compose.yaml) and that the address and port are right, "
            f"or leave out --address and RAY_ADDRESS to train on an embedded local cluster.") from None


# ---------------------------------------------------------------------------------------------
# Placement: the layout against the cluster's nodes (pure functions, no Ray calls)
# ---------------------------------------------------------------------------------------------
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
                f"each reserving {_format_resources(self.resources_per_worker)}")


def _format_resources(resources: dict[str, float]) -> str:
    return ", ".join(f"{value:g} {name}" for name, value in resources.items())


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
    return (f"the cluster cannot host {workers} worker(s) (dp*cp*tp) of {_format_resources(per_worker)} each: "
            f"needs {_format_resources(needed)}, has {_format_resources({k: available[k] for k in needed})} "
            f"in total ({len(nodes)} node(s): {per_node or 'none alive'}). To fix: {advice}.")


# ---------------------------------------------------------------------------------------------
# The job's shape, known before Ray starts
# ---------------------------------------------------------------------------------------------
def _local_worker_capacity(config: Config) -> int:
    """Workers an embedded cluster on this machine can host (for parallel.dp = -1)."""
    import torch

    if config.launch.use_gpu != "false" and torch.cuda.is_available():
        return torch.cuda.device_count()
    return max(1, (os.cpu_count() or 1) // config.launch.cpus_per_worker)


def _with_data_parallel(config: Config, capacity: int) -> Config:
    """The config with parallel.dp = -1 replaced by what ``capacity`` workers allow."""
    parallel = config.parallel
    if parallel.dp != -1:
        return config
    group = parallel.cp * parallel.tp
    if capacity < group:
        raise LaunchError(f"parallel.dp = -1 infers dp from the cluster, but it has room for {capacity} worker(s) "
                          f"and one cp*tp group needs {group}: set parallel.dp explicitly or add resources.")
    return replace(config, parallel=replace(parallel, dp=capacity // group))


def _absolute_paths(config: Config) -> Config:
    """Workers may start in another directory: make a data file path absolute."""
    source = config.data.source
    if source.startswith("synthetic:") or os.path.isabs(source):
        return config
    return replace(config, data=replace(config.data, source=os.path.abspath(source)))


# ---------------------------------------------------------------------------------------------
# Ray session
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def ray_session(address: str | None, num_cpus: int) -> Iterator[None]:
    """Join the cluster at ``address`` or start an embedded one; disconnect (and stop it) afterwards."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no phone-home from an embedded cluster
    # Workers print plain lines (Ray Train would otherwise also route print() through its logger, so
    # every line of the progress reporter reached the console twice).
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    if address is None:
        # A single machine is never preempted by a cloud provider: skip Ray Train's watcher actor.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        # Ray announces that it enabled token authentication (its secure default) on every start.
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        log.info("starting an embedded local Ray cluster with %d CPU(s)", num_cpus)
        # One machine: everything listens on loopback only. The dashboard hosts Ray's state API, which
        # Ray Train's controller queries.
        try:
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                     _node_ip_address="127.0.0.1", logging_level=logging.WARNING, log_to_driver=True,
                     object_store_memory=256 * 1024**2)
        except (ConnectionError, RuntimeError, OSError) as error:
            raise LaunchError(f"could not start an embedded Ray cluster: {_last_line(error)} (Ray's logs: "
                              f"/tmp/ray/session_latest/logs). Free memory or /dev/shm space, or join a running "
                              f"cluster with --address.") from None
    else:
        log.info("joining the Ray cluster at %s", address)
        _join(address)
    try:
        yield
    finally:
        ray.shutdown()


def _join(address: str) -> None:
    import ray
    from ray.exceptions import AuthenticationError

    try:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
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
        raise LaunchError(f"could not join the Ray cluster at {address}: {_last_line(error)}. Check that the address "
                          f"is the head node's GCS address (HOST:6379 by default) and that its Ray version matches "
                          f"this one.") from None


def cluster_nodes() -> list[NodeResources]:
    """The alive nodes of the connected cluster and their total CPUs/GPUs."""
    import ray

    return [NodeResources(node_id=node["NodeID"], address=node.get("NodeManagerAddress", "?"),
                          cpus=float(node["Resources"].get("CPU", 0)), gpus=float(node["Resources"].get("GPU", 0)))
            for node in ray.nodes() if node.get("Alive")]


def _warn_if_busy(plan: PlacementPlan) -> None:
    """Other jobs may hold resources now; the workers then wait for them, which deserves a word."""
    import ray

    available = ray.available_resources()
    short = {name: amount * plan.workers for name, amount in plan.resources_per_worker.items()
             if available.get(name, 0) < amount * plan.workers}
    if short:
        print(f"spindle: waiting for resources held by other jobs: needs {_format_resources(short)}, free now "
              f"{_format_resources({name: available.get(name, 0) for name in short})}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------
def run_training(config: Config, run_dir: str | os.PathLike, resume: str = "auto",
                 address: str | None = None) -> dict:
    """Train ``config`` on Ray Train workers; returns rank 0's final metrics record.

    Raises ConfigError for a config that cannot run (before Ray starts when the worker count is known)
    and LaunchError for a cluster that cannot host the job or a job that failed.
    """
    run_dir = Path(run_dir).resolve()
    resume = _checked_resume(resume)
    address = resolve_address(address)
    config = _absolute_paths(config)
    if address is None:
        config = _with_data_parallel(config, _local_worker_capacity(config))
    workers = _worker_count(config)
    if workers is not None:
        validate(config, world_size=workers)
    embedded_cpus = max((workers or 1) * config.launch.cpus_per_worker, os.cpu_count() or 1)
    with ray_session(address, embedded_cpus):
        nodes = cluster_nodes()
        use_gpu = decide_gpu(config.launch.use_gpu, nodes)
        if workers is None:  # dp = -1 on a joined cluster: as many dp groups as the cluster holds
            probe = plan_slots(nodes, use_gpu, config.launch.cpus_per_worker)
            config = _with_data_parallel(config, probe)
            workers = _worker_count(config)
            validate(config, world_size=workers)
        plan = plan_placement(workers, config.parallel.tp, config.parallel.cp, nodes, use_gpu=use_gpu,
                              cpus_per_worker=config.launch.cpus_per_worker)
        print(f"spindle: Ray {'embedded cluster' if address is None else 'cluster ' + address}: {plan.describe()}",
              file=sys.stderr, flush=True)
        for note in plan.notes:
            print(f"spindle: note: {note}", file=sys.stderr, flush=True)
        _warn_if_busy(plan)
        trainer = build_trainer(config, run_dir, resume, plan, watch_preemption=address is not None)
        return _fit(trainer, run_dir)


def _checked_resume(resume: str) -> str:
    """--resume auto|never as given; a checkpoint PATH must exist and becomes absolute (workers may
    start in another directory)."""
    if resume in ("auto", "never"):
        return resume
    path = Path(resume).resolve()
    if not path.exists():
        raise ConfigError(f"--resume = {resume!r}: no such checkpoint; expected 'auto', 'never' or the path of a "
                          f"checkpoint directory (RUN_DIR/checkpoints/step_<8 digits>).")
    return str(path)


def _worker_count(config: Config) -> int | None:
    parallel = config.parallel
    return None if parallel.dp == -1 else parallel.dp * parallel.cp * parallel.tp


def plan_slots(nodes: list[NodeResources], use_gpu: bool, cpus_per_worker: int) -> int:
    """Total workers the cluster holds."""
    per_worker = {"CPU": float(cpus_per_worker), **({"GPU": 1.0} if use_gpu else {})}
    return sum(node.worker_slots(per_worker) for node in nodes)


def build_trainer(config: Config, run_dir: Path, resume: str, plan: PlacementPlan, *,
                  watch_preemption: bool) -> object:
    """The TorchTrainer of one spindle job. ``watch_preemption``: ask Ray Train every step whether a
    node is about to be preempted (a barrier of a few ms; pointless on an embedded cluster)."""
    from ray.train import FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    job = {
        "config": to_dict(config),
        "run_dir": str(run_dir),
        "resume": resume,
        "latest_at_launch": latest_checkpoint_marker(run_dir),
        "watch_preemption": watch_preemption and config.checkpoint.every > 0,
    }
    return TorchTrainer(
        _train_worker,
        train_loop_config=job,
        scaling_config=ScalingConfig(num_workers=plan.workers, use_gpu=plan.use_gpu,
                                     resources_per_worker=plan.resources_per_worker,
                                     placement_strategy=plan.strategy),
        torch_config=TorchConfig(backend="nccl" if plan.use_gpu else "gloo",
                                 timeout_s=int(max(1, round(config.launch.collective_timeout_s)))),
        run_config=RunConfig(
            # Ray Train's own state (a storage marker, its checkpoint index) lives in RUN_DIR/.spindle/ray.
            name="ray", storage_path=str(run_dir / LAUNCHER_DIR),
            failure_config=FailureConfig(max_failures=config.launch.max_failures),
            worker_runtime_env={"env_vars": {"TORCH_FR_BUFFER_SIZE": FLIGHT_RECORDER_ENTRIES}},
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )


def _fit(trainer: object, run_dir: Path) -> dict:
    from ray.train import TrainingFailedError

    try:
        result = trainer.fit()
    except TrainingFailedError as error:
        raise LaunchError(explain_failure(error, run_dir)) from None
    return dict(result.return_value or {})


def explain_failure(error: Exception, run_dir: Path) -> str:
    """One readable message from Ray's failure: each failed rank's last error line, plus the stall report."""
    failures = getattr(error, "worker_failures", None)
    if failures:
        ranks_by_error: dict[str, list[int]] = {}  # identical errors on many ranks are said once
        for rank, failure in sorted(failures.items()):
            ranks_by_error.setdefault(_last_line(failure).rstrip("."), []).append(rank)
        summary = "; ".join(f"{'rank' if len(ranks) == 1 else 'ranks'} {', '.join(map(str, ranks))}: {text}"
                            for text, ranks in ranks_by_error.items())
    else:
        summary = _last_line(error).rstrip(".")
    message = f"training failed: {summary}"
    stall = diagnose_stall(read_heartbeats(run_dir))
    if stall and STALL_MARKER not in message:  # a worker may already have said it
        message += f". {stall}"
    return message + f" (run directory {run_dir}; Ray's logs: /tmp/ray/session_latest/logs on each node)"


def _last_line(error: BaseException) -> str:
    text = str(error).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


# ---------------------------------------------------------------------------------------------
# Resume across restarts
# ---------------------------------------------------------------------------------------------
def latest_checkpoint_marker(run_dir: str | os.PathLike) -> str | None:
    """What RUN_DIR/checkpoints/latest names now (None when there is none yet)."""
    latest = Path(run_dir) / "checkpoints" / "latest"
    try:
        if latest.is_symlink():
            return os.readlink(latest)
        return latest.read_text(encoding="utf-8").strip() if latest.is_file() else None
    except OSError:
        return None


def resume_for_attempt(job: dict) -> str:
    """The user's --resume for the first worker group; "auto" once this launch has committed a
    checkpoint, so a restarted group continues from it rather than starting over."""
    marker = latest_checkpoint_marker(job["run_dir"])
    if marker is not None and marker != job["latest_at_launch"]:
        return "auto"
    return job["resume"]


# ---------------------------------------------------------------------------------------------
# Hang reports: heartbeats with the last collective each rank entered
# ---------------------------------------------------------------------------------------------
def last_collectives() -> dict[str, dict]:
    """Per process group: the sequence number, name and ranks of the last collective this process
    entered, from torch's flight recorder (empty when it is unavailable)."""
    try:
        from torch._C._distributed_c10d import _dump_fr_trace_json

        trace = json.loads(_dump_fr_trace_json(True, False))
    except Exception:  # the recorder is a private torch API: a hang report is best effort
        return {}
    members = _group_members()
    groups: dict[str, dict] = {}
    for entry in trace.get("entries", []):
        if entry.get("is_p2p"):
            continue
        name, description = (list(entry.get("process_group", [])) + ["?", ""])[:2]
        groups[name] = {"seq": entry.get("collective_seq_id", 0), "op": entry.get("profiling_name", "?"),
                        "ranks": members.get(name, "?"), "description": description}
    return groups


def _group_members() -> dict[str, list[int]]:
    """Global ranks of every process group this process belongs to, by group name."""
    try:
        import torch.distributed as dist
        from torch.distributed.distributed_c10d import _world

        return {name: dist.get_process_group_ranks(group) for group, name in _world.pg_names.items()}
    except Exception:  # names are bookkeeping inside torch: without them the report omits the ranks
        return {}


class Heartbeat:
    """Writes RUN_DIR/.spindle/heartbeat/rank_<r>.json every few seconds from a daemon thread."""

    def __init__(self, run_dir: str | os.PathLike, rank: int, group_id: str,
                 interval_s: float = HEARTBEAT_INTERVAL_S) -> None:
        self.path = Path(run_dir) / HEARTBEAT_DIR / f"rank_{rank:05d}.json"
        self.rank, self.group_id, self.interval_s = rank, group_id, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="spindle-heartbeat", daemon=True)

    def __enter__(self) -> "Heartbeat":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.beat()
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval_s)

    def beat(self) -> None:
        record = {"rank": self.rank, "group": self.group_id, "host": socket.gethostname(), "pid": os.getpid(),
                  "time": time.time(), "collectives": last_collectives()}
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text(json.dumps(record), encoding="utf-8")
        os.replace(temporary, self.path)  # readers never see a half-written file

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            with contextlib.suppress(OSError):
                self.beat()


def read_heartbeats(run_dir: str | os.PathLike) -> list[dict]:
    """The heartbeat records of the most recent worker group in ``run_dir``."""
    records = []
    for path in sorted((Path(run_dir) / HEARTBEAT_DIR).glob("rank_*.json")):
        with contextlib.suppress(OSError, ValueError):
            records.append(json.loads(path.read_text(encoding="utf-8")))
    if not records:
        return []
    newest_group = max(records, key=lambda record: record["time"])["group"]
    return [record for record in records if record["group"] == newest_group]


STALL_MARKER = "was never entered by"


def diagnose_stall(records: list[dict], now: float | None = None,
                   stale_after_s: float = 3 * HEARTBEAT_INTERVAL_S) -> str | None:
    """Name the ranks that fell behind: for the collective the furthest rank waits in, the ranks of
    that group that never entered it, and ranks whose heartbeat stopped while others still beat.
    None when all look alike."""
    if not records:
        return None
    now = time.time() if now is None else now
    newest = max(record["time"] for record in records)  # when the group was last alive as a whole
    findings = []
    frontier: dict[str, tuple[int, str, str]] = {}  # group -> (furthest seq, op, what the group is)
    for record in records:
        for group, last in record.get("collectives", {}).items():
            if group not in frontier or last["seq"] > frontier[group][0]:
                described = ", ".join(part for part in (last.get("description", ""), f"ranks {last['ranks']}")
                                      if part and part not in ("undefined", "default_pg"))
                frontier[group] = (last["seq"], last["op"], described)
    for group, (seq, op, described) in sorted(frontier.items()):
        behind = sorted((record["rank"], record.get("collectives", {}).get(group)) for record in records
                        if group in record.get("collectives", {})
                        and record["collectives"][group]["seq"] < seq)
        if behind:
            by_rank = {record["rank"]: record for record in records}
            detail = ", ".join(f"rank {rank} (last entered #{last['seq']} {last['op']}{_liveness(by_rank[rank], now)})"
                               for rank, last in behind)
            findings.append(f"collective #{seq} {op} on process group {group} ({described}) {STALL_MARKER} "
                            f"{detail}")
    silent = sorted(record["rank"] for record in records if newest - record["time"] > stale_after_s)
    if silent:
        findings.append(f"rank(s) {', '.join(map(str, silent))} stopped answering (no heartbeat for more than "
                        f"{stale_after_s:.0f} s while the others went on: the process died, was stopped, or its "
                        f"host is unreachable)")
    return "; ".join(findings) if findings else None


def _liveness(record: dict, now: float) -> str:
    """"; its process ... has exited" when it ran on this host and is gone, else the heartbeat's age."""
    if record.get("host") == socket.gethostname() and record.get("pid"):
        try:
            os.kill(record["pid"], 0)
        except ProcessLookupError:
            return f"; its process {record['pid']} on {record['host']} has exited"
        except OSError:
            pass
    return f"; last heartbeat {max(0.0, now - record['time']):.0f} s ago"


# ---------------------------------------------------------------------------------------------
# Worker side
# ---------------------------------------------------------------------------------------------
class CollectiveStallError(RuntimeError):
    """A collective failed because some rank did not take part; the message names it."""


class PreemptionWatch:
    """``should_checkpoint(step)`` for the trainer: True once when Ray Train reports that a node of this
    job is about to be preempted. Every rank must call it at the same steps (Ray makes it a barrier)."""

    def __init__(self) -> None:
        self.notified = False

    def __call__(self, step: int) -> bool:
        import ray.train

        info = ray.train.get_preemption_info()
        if info is None or self.notified:
            return False
        self.notified = True
        print(f"spindle: preemption notice for node(s) {', '.join(info.preempted_node_ids)} (ranks "
              f"{info.preempted_ranks}); saving a checkpoint at step {step}", flush=True)
        return True


def _train_worker(job: dict) -> dict:
    """One Ray Train worker: the per-process trainer, with heartbeats and a readable hang report."""
    import torch.distributed as dist

    from spindle.runtime.main import train_entry

    rank = dist.get_rank() if dist.is_initialized() else 0
    resume = _agreed_resume(job)
    options = {}
    # The trainer's hook for a just-in-time checkpoint (called by every rank after every step), once
    # train_entry offers it.
    if job["watch_preemption"] and "should_checkpoint" in inspect.signature(train_entry).parameters:
        options["should_checkpoint"] = PreemptionWatch()
    group_id = f"{os.environ.get('MASTER_ADDR', 'local')}:{os.environ.get('MASTER_PORT', '0')}"
    with Heartbeat(job["run_dir"], rank, group_id) as heartbeat:
        try:
            final = train_entry(job["config"], job["run_dir"], resume, **options)
        except Exception as error:
            heartbeat.beat()  # record where this rank stopped before peers read the files
            stall = diagnose_stall(read_heartbeats(job["run_dir"]))
            if stall:
                raise CollectiveStallError(f"rank {rank}: {type(error).__name__}: {_last_line(error)}; {stall}") \
                    from error
            raise
    return dict(final or {})  # Ray Train hands rank 0's return value to the driver


def _agreed_resume(job: dict) -> str:
    """Rank 0 decides how this worker group resumes and tells the others (one view of the files)."""
    import torch.distributed as dist

    choice = [resume_for_attempt(job)]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(choice, src=0)
    return choice[0]


__all__ = [
    "LaunchError", "CollectiveStallError", "NodeResources", "PlacementPlan", "PreemptionWatch", "Heartbeat",
    "run_training", "resolve_address", "check_reachable", "plan_placement", "plan_slots", "decide_gpu",
    "cluster_nodes", "build_trainer", "explain_failure", "latest_checkpoint_marker", "resume_for_attempt",
    "read_heartbeats", "diagnose_stall", "last_collectives",
]
