"""Run the per-process trainer on Ray Train workers: the driver.

    run_training(config, run_dir, resume, address)
      1. the job's shape: dp * cp * tp workers, checked against the config and this machine's cores and
         GPUs before Ray starts (placement.py)
      2. Ray: an embedded loopback cluster sized to the job (no address), or an existing one (--address /
         RAY_ADDRESS), reachability checked first so a wrong address fails in seconds (cluster.py)
      3. placement: the cluster's nodes are checked against the layout (enough CPUs/GPUs, tp and cp
         groups inside a node) before any worker starts (placement.py)
      4. TorchTrainer: one worker per rank, gloo on CPUs or NCCL on GPUs, collectives time out after
         launch.collective_timeout_s
      5. every worker calls ``spindle.runtime.main.train_entry`` inside a heartbeat (worker.py,
         spindle.runtime.heartbeat); the driver follows rank 0's metrics.jsonl and shows progress
         (spindle.runtime.progress)
      6. a failed worker group (a worker died, a host was lost) restarts from the last committed
         checkpoint, launch.max_failures times: this driver owns the loop, not Ray Train, because after
         a lost host it may continue on fewer workers (a smaller dp, down to launch.min_workers; the
         checkpoint reshards) or wait up to launch.capacity_timeout_s for room, where Ray Train would
         wait forever for the same worker count. Without restarts the error names the lost host, its
         ranks and the command that resumes.

The run directory and --resume are checked before this runs (spindle.runtime.run_dir). This package's
cluster.py, rendezvous.py, worker.py and submit.py are the only modules that import ray.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from spindle.launch.cluster import (
    WorkerHost,
    check_reachable,
    clear_worker_nodes,
    cluster_nodes,
    logs_hint,
    ray_session,
    node_states,
    record_worker_node,
    resolve_address,
    warn_if_busy,
    worker_hosts,
)
from spindle.launch.errors import LaunchError, last_line
from spindle.launch.placement import (
    NodeResources,
    PlacementPlan,
    check_oversubscription,
    decide_gpu,
    local_cores,
    local_gpus,
    local_worker_capacity,
    plan_placement,
    plan_slots,
    restart_data_parallel,
    with_data_parallel,
    worker_count,
)
from spindle.launch.worker import latest_checkpoint_marker, resume_for_attempt, train_worker
from spindle.runtime.config import Config, ConfigError, check_world_size
from spindle.runtime.heartbeat import (
    FLIGHT_RECORDER_ENTRIES,
    LAUNCHER_DIR,
    STALL_MARKER,
    CollectiveStallError,
    Heartbeat,
    diagnose_stall,
    last_collectives,
    read_heartbeats,
)
from spindle.runtime.checkpoint import read_latest
from spindle.runtime.preemption import resume_command, stopping_workers_on_sigterm
from spindle.runtime.progress import MetricsFollower, ProgressDisplay


def run_training(config: Config, run_dir: str | os.PathLike, resume: str = "auto", address: str | None = None, *,
                 trust_checkpoint: bool = False, start_step: int = 0) -> dict:
    """Train ``config`` (as ``load_config`` returns it: validated except for the world-size rules, which
    are checked here once the worker count is known) on Ray Train workers; returns rank 0's final metrics record.

    ``start_step``: where the run resumes (for the progress bar). Raises ConfigError for a config that
    cannot run (before Ray starts when the worker count is known) and LaunchError for a cluster that
    cannot host the job or a job that failed.
    """
    run_dir = Path(run_dir).resolve()
    resume = _checked_resume(resume)
    address = resolve_address(address)
    config = _absolute_paths(config)
    if address is None:
        config = with_data_parallel(config, local_worker_capacity(config))
    workers = worker_count(config)
    if workers is not None:  # the rest was validated when the config was read
        check_world_size(config, workers)
    if address is None:
        _check_this_machine(config, workers)
    embedded_cpus = max((workers or 1) * config.launch.cpus_per_worker, local_cores())
    with ray_session(address, embedded_cpus, workers):
        nodes = cluster_nodes()
        use_gpu = decide_gpu(config.launch.use_gpu, nodes)
        if workers is None:  # dp = -1 on a joined cluster: as many dp groups as the cluster holds
            config = with_data_parallel(config, plan_slots(nodes, use_gpu, config.launch.cpus_per_worker))
            workers = worker_count(config)
            check_world_size(config, workers)
        plan = _placed(config, nodes, use_gpu)
        print(f"spindle: Ray {'embedded cluster' if address is None else 'cluster ' + address}: {plan.describe()}",
              file=sys.stderr, flush=True)
        for note in plan.notes:
            print(f"spindle: note: {note}", file=sys.stderr, flush=True)
        warn_if_busy(plan)
        launch = Launch(config, run_dir, resume, trust_checkpoint, loopback=address is None,
                        latest_at_launch=latest_checkpoint_marker(run_dir))
        display = ProgressDisplay(config.train.steps, start_step, enabled=config.logging.progress)
        # SIGTERM (Slurm, Kubernetes): the workers finish the step, commit a checkpoint and return.
        with MetricsFollower(run_dir, display), stopping_workers_on_sigterm(run_dir):
            return _train_with_restarts(launch, plan, use_gpu)


def _placed(config: Config, nodes: list[NodeResources], use_gpu: bool) -> PlacementPlan:
    return plan_placement(worker_count(config), config.parallel.tp, config.parallel.cp, nodes, use_gpu=use_gpu,
                          cpus_per_worker=config.launch.cpus_per_worker)


@dataclass(frozen=True)
class Launch:
    """What stays the same across the worker groups of one `spindle train`."""

    config: Config
    """The job as launched (the full dp; a restart may run a smaller one)."""
    run_dir: Path
    resume: str
    trust_checkpoint: bool
    loopback: bool
    latest_at_launch: str | None


def _train_with_restarts(launch: Launch, plan: PlacementPlan, use_gpu: bool) -> dict:
    """Run worker groups until one finishes: after a failure, up to launch.max_failures more, each from
    the last committed checkpoint, on the full layout or (after a lost host) a smaller dp."""
    config, failures = launch.config, 0
    while True:
        clear_worker_nodes(launch.run_dir)
        trainer = build_trainer(config, launch.run_dir, launch.resume, plan, trust_checkpoint=launch.trust_checkpoint,
                                loopback=launch.loopback, latest_at_launch=launch.latest_at_launch)
        try:
            return _fit(trainer, launch.run_dir)
        except WorkerGroupFailed as failure:
            hosts = worker_hosts(launch.run_dir)
            states = node_states([host.node_id for host in hosts])
            lost = [host for host in hosts if states.get(host.node_id) != "alive"]
            if failures >= launch.config.launch.max_failures:
                gone = {host.node_id for host in lost}  # Ray may still count them until its health checks fail
                capacity = plan_slots([node for node in cluster_nodes() if node.node_id not in gone], use_gpu,
                                      launch.config.launch.cpus_per_worker)
                raise LaunchError(final_failure(str(failure), lost, launch.config, launch.run_dir, capacity)) from None
            failures += 1
            print(f"spindle: {_what_failed(failure, lost)}; restart {failures} of "
                  f"{launch.config.launch.max_failures} from {_last_commit(launch.run_dir)}", file=sys.stderr,
                  flush=True)
            config, plan = restart_layout(launch.config, use_gpu, lost)


def _what_failed(failure: WorkerGroupFailed, lost: list[WorkerHost]) -> str:
    if not lost:
        return str(failure)
    return "lost " + "; ".join(f"host {host.describe()} with {host.ranks_text()}" for host in lost)


def _last_commit(run_dir: Path) -> str:
    latest = read_latest(run_dir)
    return f"the last committed checkpoint ({latest})" if latest else "the start (no checkpoint committed yet)"


LOSS_REGISTRATION_TIMEOUT_S = 300.0
"""How long a restart waits for Ray to declare a lost host dead (its health checks take about 15 s by
default, longer behind a cut link) before giving up."""


def restart_layout(config: Config, use_gpu: bool, lost: list[WorkerHost], *,
                   nodes_now: Callable[[], list[NodeResources]] = cluster_nodes,
                   states_now: Callable[[list[str]], dict[str, str]] = node_states) -> tuple[Config, PlacementPlan]:
    """The layout of the next worker group: the job's when the cluster still has room for it, else the
    largest smaller dp launch.min_workers allows. Waits first for Ray to register the lost hosts' deaths,
    then up to launch.capacity_timeout_s for room.
    ``nodes_now`` / ``states_now``: the cluster's alive nodes and the lost hosts' states (cluster.py)."""
    _await_registration(lost, states_now)
    timeout_s = config.launch.capacity_timeout_s
    deadline, announced, said_at = time.monotonic() + timeout_s, "", 0.0
    while True:
        nodes = nodes_now()
        capacity = plan_slots(nodes, use_gpu, config.launch.cpus_per_worker)
        dp = restart_data_parallel(config, capacity)
        if dp is not None:
            restarted = replace(config, parallel=replace(config.parallel, dp=dp))
            plan = _placed(restarted, nodes, use_gpu)
            if dp != config.parallel.dp:
                print(f"spindle: continuing on {plan.workers} of {worker_count(config)} worker(s): parallel.dp "
                      f"{config.parallel.dp} -> {dp} (cp {config.parallel.cp}, tp {config.parallel.tp} kept; "
                      f"launch.min_workers = {config.launch.min_workers}); the checkpoint reshards onto it",
                      file=sys.stderr, flush=True)
            return restarted, plan
        waiting_for, remaining = _room_needed(config, capacity), deadline - time.monotonic()
        if remaining <= 0:
            raise LaunchError(f"no capacity to restart after {timeout_s:g} s (launch.capacity_timeout_s): "
                              f"waited for {waiting_for}. To fix: bring the lost host back or add nodes, allow "
                              f"fewer workers with launch.min_workers, or wait longer with "
                              f"launch.capacity_timeout_s; then resume with {_resume_hint()}.")
        if waiting_for != announced or time.monotonic() - said_at >= 30:
            print(f"spindle: waiting up to {remaining:.0f} s more (launch.capacity_timeout_s = {timeout_s:g}) for "
                  f"{waiting_for}", file=sys.stderr, flush=True)
            announced, said_at = waiting_for, time.monotonic()
        time.sleep(min(1.0, remaining))


def _await_registration(lost: list[WorkerHost], states_now: Callable[[list[str]], dict[str, str]]) -> None:
    """Until Ray declares the lost hosts dead it would still place workers on them (a host that answers
    again is back and counts as alive)."""
    deadline, said = time.monotonic() + LOSS_REGISTRATION_TIMEOUT_S, False
    pending = list(lost)
    while pending:
        states = states_now([host.node_id for host in pending])
        pending = [host for host in pending if states[host.node_id] == "unreachable"]
        if not pending:
            return
        addresses = ", ".join(host.address for host in pending)
        if time.monotonic() > deadline:
            raise LaunchError(f"Ray still counts {addresses} as alive {LOSS_REGISTRATION_TIMEOUT_S:g} s after its "
                              f"raylet stopped answering, so no restart can be placed safely. Check that host "
                              f"(or stop Ray on it: `ray stop`), then resume with {_resume_hint()}.")
        if not said:
            print(f"spindle: waiting for Ray to register the loss of {addresses} (its health checks)",
                  file=sys.stderr, flush=True)
            said = True
        time.sleep(1.0)


def _room_needed(config: Config, capacity: int) -> str:
    minimum, cpus = config.launch.min_workers, config.launch.cpus_per_worker
    if minimum:
        needed = (f"room for at least {minimum} worker(s) of {cpus} CPU each (launch.min_workers = {minimum}, "
                  f"whole cp*tp groups of {config.parallel.cp * config.parallel.tp})")
    else:
        needed = (f"room for the job's {worker_count(config)} worker(s) of {cpus} CPU each (launch.min_workers = 0 "
                  f"allows no fewer)")
    return f"{needed}; the cluster now has room for {capacity}"


def final_failure(failure: str, lost: list[WorkerHost], config: Config, run_dir: Path, capacity: int) -> str:
    """The error of a job that will not restart: a lost host is named with its ranks, and how to resume
    (on fewer workers when the cluster, now with room for ``capacity``, no longer holds the job)."""
    if not lost:
        return failure
    max_failures = config.launch.max_failures
    hosts = "; ".join(f"host {host.describe()} with {host.ranks_text()}" for host in lost)
    why = ("without restarts (launch.max_failures = 0)" if max_failures == 0
           else f"after {max_failures} restart(s) (launch.max_failures = {max_failures})")
    smaller = ""
    group = config.parallel.cp * config.parallel.tp
    dp = restart_data_parallel(replace(config, launch=replace(config.launch, min_workers=group)), capacity)
    if dp is not None and dp < config.parallel.dp:
        smaller = (f" (the cluster now has room for {capacity} worker(s): add --set parallel.dp={dp} to resume on "
                   f"fewer)")
    return (f"lost {hosts}: the job stopped {why}. Nothing committed is lost: resume from "
            f"{_last_commit(run_dir)} with {_resume_hint()}{smaller}; or set launch.max_failures > 0 (and "
            f"launch.min_workers) to restart automatically (Ray's logs: {logs_hint()})")


def _resume_hint() -> str:
    """The command that continues this run: the one that started it (less --resume and --overwrite)."""
    if Path(sys.argv[0]).name == "spindle":
        return f"`{resume_command(['spindle', *sys.argv[1:]])}`"
    return "the same `spindle train` command (--resume auto, the default, picks up the last commit)"


def _check_this_machine(config: Config, workers: int) -> None:
    """An embedded cluster runs every worker here: GPU workers need a GPU each, CPU workers warn when
    they outnumber the cores (Ray would otherwise be told there are as many CPUs as workers)."""
    gpus = local_gpus() if config.launch.use_gpu != "false" else 0
    use_gpu = config.launch.use_gpu == "true" or (config.launch.use_gpu == "auto" and gpus > 0)
    warning = check_oversubscription(workers, config.launch.cpus_per_worker, use_gpu=use_gpu, cores=local_cores(),
                                     gpus=gpus)
    if warning:
        print(f"spindle: warning: {warning}", file=sys.stderr, flush=True)


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


def _absolute_paths(config: Config) -> Config:
    """Workers may start in another directory: make a data file path absolute."""
    source = config.data.source
    if source.startswith("synthetic:") or os.path.isabs(source):
        return config
    return replace(config, data=replace(config.data, source=os.path.abspath(source)))


def build_trainer(config: Config, run_dir: Path, resume: str, plan: PlacementPlan, *,
                  trust_checkpoint: bool = False, loopback: bool = False,
                  latest_at_launch: str | None = None) -> object:
    """The TorchTrainer of one spindle job (one worker group; the driver restarts by building another).
    ``loopback``: an embedded cluster, whose ranks rendezvous on 127.0.0.1 (rendezvous.py).
    ``latest_at_launch``: RUN_DIR/checkpoints/latest when this launch started (a later group resumes
    from a checkpoint committed since; worker.py)."""
    from ray.train import FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from spindle.launch.rendezvous import LoopbackTorchConfig, NodeAddressTorchConfig

    # The driver shows progress from metrics.jsonl; workers have no terminal.
    worker_config = replace(config, logging=replace(config.logging, progress=False))
    job = {
        "config": worker_config,  # typed and validated: it travels pickled, no worker parses it again
        "run_dir": str(run_dir),
        "resume": resume,
        "latest_at_launch": latest_at_launch,
        "trust_checkpoint": trust_checkpoint,
    }
    return TorchTrainer(
        ray_train_worker,
        train_loop_config=job,
        scaling_config=ScalingConfig(num_workers=plan.workers, use_gpu=plan.use_gpu,
                                     resources_per_worker=plan.resources_per_worker,
                                     placement_strategy=plan.strategy),
        torch_config=(LoopbackTorchConfig if loopback else NodeAddressTorchConfig)(
            backend="nccl" if plan.use_gpu else "gloo", timeout_s=int(max(1, round(config.launch.collective_timeout_s)))),
        run_config=RunConfig(
            # Ray Train's own state (a storage marker, its checkpoint index) lives in RUN_DIR/.spindle/ray.
            name="ray", storage_path=str(run_dir / LAUNCHER_DIR),
            # No restarts by Ray Train: the driver restarts (_train_with_restarts), possibly on fewer workers.
            failure_config=FailureConfig(max_failures=0),
            worker_runtime_env={"env_vars": {"TORCH_FR_BUFFER_SIZE": FLIGHT_RECORDER_ENTRIES}},
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )


def ray_train_worker(job: dict) -> dict:
    """Ray Train's function on every worker: note which node this rank runs on (the driver names a lost
    host by it), then train (worker.py)."""
    import torch.distributed as dist

    record_worker_node(job["run_dir"], dist.get_rank() if dist.is_initialized() else 0)
    return train_worker(job)


class WorkerGroupFailed(LaunchError):
    """A worker group failed; ``error`` is Ray Train's TrainingFailedError."""

    def __init__(self, message: str, error: Exception) -> None:
        super().__init__(message)
        self.error = error


def _fit(trainer: object, run_dir: Path) -> dict:
    from ray.train import TrainingFailedError

    try:
        result = trainer.fit()
    except TrainingFailedError as error:
        raise WorkerGroupFailed(explain_failure(error, run_dir), error) from None
    except SystemExit:  # Ray Train's own Ctrl-C handler aborts the run and exits this way
        raise KeyboardInterrupt from None
    if not result.return_value:  # aborted by Ctrl-C: the workers were stopped before rank 0 returned
        raise KeyboardInterrupt
    return dict(result.return_value)


def explain_failure(error: Exception, run_dir: Path) -> str:
    """One readable message from Ray's failure: each failed rank's last error line, plus the stall report."""
    failures = getattr(error, "worker_failures", None)
    if failures:
        ranks_by_error: dict[str, list[int]] = {}  # identical errors on many ranks are said once
        for rank, failure in sorted(failures.items()):
            ranks_by_error.setdefault(last_line(failure).rstrip("."), []).append(rank)
        summary = "; ".join(f"{'rank' if len(ranks) == 1 else 'ranks'} {', '.join(map(str, ranks))}: {text}"
                            for text, ranks in ranks_by_error.items())
    else:
        summary = last_line(error).rstrip(".")
    message = f"training failed: {summary}"
    stall = diagnose_stall(read_heartbeats(run_dir))
    if stall and STALL_MARKER not in message:  # a worker may already have said it
        message += f". {stall}"
    return message + f" (run directory {run_dir}; Ray's logs: {logs_hint()})"


__all__ = [
    "LaunchError", "CollectiveStallError", "NodeResources", "PlacementPlan", "Heartbeat",
    "run_training", "resolve_address", "check_reachable", "plan_placement", "plan_slots", "decide_gpu",
    "cluster_nodes", "build_trainer", "explain_failure", "latest_checkpoint_marker", "resume_for_attempt",
    "read_heartbeats", "diagnose_stall", "last_collectives",
]
