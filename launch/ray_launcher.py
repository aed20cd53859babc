"""Run the per-process trainer on Ray Train workers: the driver.

    run_training(config, run_dir, resume, address)
      1. the job's shape: dp * cp * tp workers, checked against the config and this machine's cores and
         GPUs before Ray starts (placement.py)
      2. Ray: an embedded loopback cluster sized to the job (no address), or an existing one (--address /
         RAY_ADDRESS), reachability checked first so a wrong address fails in seconds (cluster.py)
      3. placement: the cluster's nodes are checked against the layout (enough CPUs/GPUs, tp and cp
         groups inside a node) before any worker starts (placement.py)
      4. TorchTrainer: one worker per rank, gloo on CPUs or NCCL on GPUs, collectives time out after
         launch.collective_timeout_s, a failed worker group restarts launch.max_failures times
      5. every worker calls ``spindle.runtime.main.train_entry`` inside a heartbeat (worker.py,
         spindle.runtime.heartbeat); the driver follows rank 0's metrics.jsonl and shows progress
         (spindle.runtime.progress)

The run directory and --resume are checked before this runs (spindle.runtime.run_dir). This package's
cluster.py, rendezvous.py, worker.py and submit.py are the only modules that import ray.
"""
from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path

from spindle.launch.cluster import (
    check_reachable,
    cluster_nodes,
    logs_hint,
    ray_session,
    resolve_address,
    warn_if_busy,
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
    with_data_parallel,
    worker_count,
)
from spindle.launch.worker import latest_checkpoint_marker, resume_for_attempt, train_worker
from spindle.runtime.config import Config, ConfigError, to_dict, validate
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
from spindle.runtime.preemption import stopping_workers_on_sigterm
from spindle.runtime.progress import MetricsFollower, ProgressDisplay


def run_training(config: Config, run_dir: str | os.PathLike, resume: str = "auto", address: str | None = None, *,
                 trust_checkpoint: bool = False, start_step: int = 0) -> dict:
    """Train ``config`` on Ray Train workers; returns rank 0's final metrics record.

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
    if workers is not None:
        validate(config, world_size=workers)
    if address is None:
        _check_this_machine(config, workers)
    embedded_cpus = max((workers or 1) * config.launch.cpus_per_worker, local_cores())
    with ray_session(address, embedded_cpus, workers):
        nodes = cluster_nodes()
        use_gpu = decide_gpu(config.launch.use_gpu, nodes)
        if workers is None:  # dp = -1 on a joined cluster: as many dp groups as the cluster holds
            config = with_data_parallel(config, plan_slots(nodes, use_gpu, config.launch.cpus_per_worker))
            workers = worker_count(config)
            validate(config, world_size=workers)
        plan = plan_placement(workers, config.parallel.tp, config.parallel.cp, nodes, use_gpu=use_gpu,
                              cpus_per_worker=config.launch.cpus_per_worker)
        print(f"spindle: Ray {'embedded cluster' if address is None else 'cluster ' + address}: {plan.describe()}",
              file=sys.stderr, flush=True)
        for note in plan.notes:
            print(f"spindle: note: {note}", file=sys.stderr, flush=True)
        warn_if_busy(plan)
        trainer = build_trainer(config, run_dir, resume, plan,
                                trust_checkpoint=trust_checkpoint, loopback=address is None)
        display = ProgressDisplay(config.train.steps, start_step, enabled=config.logging.progress)
        # SIGTERM (Slurm, Kubernetes): the workers finish the step, commit a checkpoint and return.
        with MetricsFollower(run_dir, display), stopping_workers_on_sigterm(run_dir):
            return _fit(trainer, run_dir)


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
                  trust_checkpoint: bool = False, loopback: bool = False) -> object:
    """The TorchTrainer of one spindle job.
    ``loopback``: an embedded cluster, whose ranks rendezvous on 127.0.0.1 (rendezvous.py)."""
    from ray.train import FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from spindle.launch.rendezvous import LoopbackTorchConfig

    # The driver shows progress from metrics.jsonl; workers have no terminal.
    worker_config = replace(config, logging=replace(config.logging, progress=False))
    job = {
        "config": to_dict(worker_config),
        "run_dir": str(run_dir),
        "resume": resume,
        "latest_at_launch": latest_checkpoint_marker(run_dir),
        "trust_checkpoint": trust_checkpoint,
    }
    return TorchTrainer(
        train_worker,
        train_loop_config=job,
        scaling_config=ScalingConfig(num_workers=plan.workers, use_gpu=plan.use_gpu,
                                     resources_per_worker=plan.resources_per_worker,
                                     placement_strategy=plan.strategy),
        torch_config=(LoopbackTorchConfig if loopback else TorchConfig)(
            backend="nccl" if plan.use_gpu else "gloo", timeout_s=int(max(1, round(config.launch.collective_timeout_s)))),
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
