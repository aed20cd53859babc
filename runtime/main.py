"""Per-process entry point of training.

    python -m spindle.runtime.main CONFIG [--set key=value ...] [--run-dir DIR] [--resume auto|never|PATH]
                                   [--overwrite] [--trust-checkpoint]
    torchrun --nproc-per-node N -m spindle.runtime.main CONFIG ...

The config is parsed and validated once, where the command starts: ``main`` reads it with this
process's world size (torchrun's environment), `spindle train` reads it before Ray starts and checks
the world-size rules once it knows its workers. Both hand the typed ``Config`` to ``train_entry``
(Ray workers receive it pickled), which parses nothing and picks the device before it creates the
run directory, so a bad config leaves nothing on disk. Before that, ``main`` checks the run directory
and ``--resume`` (``spindle.runtime.run_dir``), as `spindle train` does before Ray starts.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from spindle.runtime.config import (
    Config,
    ConfigError,
    LaunchConfig,
    layer_pattern,
    load_config,
    resolve,
    to_dict,
)
from spindle.runtime.data import build_dataset
from spindle.runtime.heartbeat import FLIGHT_RECORDER_ENTRIES, CollectiveStallError, reporting_stalls
from spindle.runtime.metrics import MetricsWriter
from spindle.runtime.optim import build_optimizer
from spindle.runtime.preemption import clear_stop, launching_command, preempted_message, resume_command
from spindle.runtime.run_dir import record_config
from spindle.runtime.tracking import start_tracking
from spindle.parallel.layout import LayoutError, ParallelContext, ParallelDegrees
from spindle.runtime.trainer import BatchProvider, OptimizerEngine, TorchEngine, Trainer

def default_run_dir(config_path: str | os.PathLike) -> Path:
    """runs/<config file stem>, relative to the working directory."""
    return Path("runs") / Path(config_path).stem


def process_world() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from an initialized process group or the torchrun environment."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def select_device(launch: LaunchConfig, local_rank: int = 0) -> torch.device:
    """The GPU of this local rank when allowed and present, else the CPU."""
    has_gpu = torch.cuda.is_available()
    if launch.use_gpu == "true" and not has_gpu:
        raise ConfigError("launch.use_gpu = 'true' but this process sees no CUDA GPU: use 'auto' or 'false' "
                          "to train on the CPU, or run on a machine with a GPU.")
    if launch.use_gpu == "false" or not has_gpu:
        return torch.device("cpu")
    device = torch.device("cuda", local_rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device


def init_process_group(world_size: int, device: torch.device, timeout_s: float) -> None:
    """Join the job's process group (torchrun's environment) unless a launcher (Ray Train) already did:
    NCCL on GPUs, gloo on CPUs, with the configured collective timeout."""
    if world_size == 1 or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))


def build_model(config: Config, context: ParallelContext) -> torch.nn.Module:
    """The hybrid model on this rank's device, with tp, cp, activation checkpointing and FSDP2 applied."""
    from spindle.parallel.parallelize import parallelize  # heavy imports (kernels, DTensor), only to train
    from spindle.runtime.model import HybridModel

    torch.manual_seed(config.train.seed)  # the same initial weights on every rank and every layout
    model = HybridModel(config.model).to(context.device)
    return parallelize(model, context, config, context.device.type)


def build_engine(config: Config, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 context: ParallelContext) -> OptimizerEngine:
    """What the trainer steps through: AdamW on the (FSDP2 / TP / plain) model, or a DeepSpeed ZeRO
    engine over dp x cp wrapping the same AdamW when ``parallel.dp_engine`` is "deepspeed"."""
    if config.parallel.dp_engine == "deepspeed":
        from spindle.parallel.zero import initialize_zero

        return initialize_zero(model, optimizer, context, config)
    return TorchEngine(model, optimizer, context)


def warn_if_plan_does_not_fit(config: Config, world_size: int, gpu: str | None = None) -> bool:
    """Preflight: print a warning (with the planner's numbers and a layout that fits) when the plan of
    ``config`` needs more memory per GPU than ``gpu`` has (None: cuda:0; nothing without a GPU).

    A warning, not a refusal: the plan is an estimate, and a run near the limit may still fit.
    Returns whether it warned."""
    from spindle.runtime.plan import PlanDoesNotFit, check_fits

    try:
        check_fits(config, gpu, world_size=world_size)
    except PlanDoesNotFit as error:
        print(f"spindle: warning: {error} Training anyway: the plan is an estimate, an out-of-memory error "
              "would confirm it.", file=sys.stderr, flush=True)
        return True
    return False


def run_training(config: Config, run_dir: Path, context: ParallelContext, resume: str, *,
                 trust_checkpoint: bool = False) -> dict:
    """Build data, model, optimizer and checkpointer from a resolved config, resume, and train."""
    from spindle.runtime.checkpoint import Checkpointer
    from spindle.runtime.preemption import SignalCatcher, StopAgreement

    if context.is_main and context.device.type == "cuda":
        warn_if_plan_does_not_fit(config, context.world_size)
    dataset = build_dataset(config.data, config.model.vocab_size, config.train.seed)
    model = build_model(config, context)
    optimizer = build_optimizer(model, config.train)
    # Parameters are counted before DeepSpeed may partition them (ZeRO-3); DTensor numel is global.
    parameters = sum(p.numel() for p in model.parameters())
    engine = build_engine(config, model, optimizer, context)
    # DeepSpeed keeps the weights and optimizer state in its own partitions: the engine hands them over.
    state = engine if config.parallel.dp_engine == "deepspeed" else optimizer
    checkpointer = Checkpointer(run_dir, to_dict(config), model, state, degrees=context.degrees,
                                trust_checkpoint=trust_checkpoint)
    resumed = checkpointer.restore(resume)
    start_step = resumed.step if resumed is not None else 0
    batches = BatchProvider(dataset, config.train.global_batch, config.train.micro_batch,
                            context.dp_rank, context.dp_size)
    if context.is_main:
        print(f"spindle: {layer_pattern(config.model)} model, {parameters / 1e6:.2f}M parameters, "
              f"{config.train.steps} steps of {config.train.global_batch} x {config.data.seq_len} tokens on "
              f"{context.world_size} x {context.device.type} (dp {context.degrees.dp}, cp {context.degrees.cp}, "
              f"tp {context.degrees.tp}, {config.parallel.dp_engine}); run directory {run_dir}"
              + (f"; resumed at step {start_step} from {resumed.path}" if resumed else "")
              + (f" (written on dp {resumed.saved_layout['dp']}, cp {resumed.saved_layout['cp']}, "
                 f"tp {resumed.saved_layout['tp']}: resharded)" if resumed and resumed.layout_changed else ""),
              flush=True)
        if resumed is not None:
            truncate_metrics(run_dir, start_step)
            warn_if_data_moved(resumed.data_cursor, start_step, config.train.global_batch)
    tracker = start_tracking(config.logging, run_dir, to_dict(config), is_main=context.is_main,
                             resuming=resumed is not None)
    metrics = MetricsWriter(run_dir, append=resumed is not None) if context.is_main else None
    with SignalCatcher() as catcher:  # SIGTERM: finish the step, checkpoint, exit 0
        try:
            trainer = Trainer(config, model, engine, batches, context, run_dir, tracker=tracker, metrics=metrics,
                              checkpointer=checkpointer, stop=StopAgreement(run_dir, catcher))
            final = trainer.fit(start_step=start_step)
            checkpointer.close()
        finally:
            tracker.finish()
            if metrics is not None:
                metrics.close()
    return final


def warn_if_data_moved(data_cursor: int, step: int, global_batch: int) -> bool:
    """Batches are read by step (samples [step·global_batch, ...)): a checkpoint whose data cursor is not
    step·global_batch was written with another train.global_batch, so samples get repeated or skipped.
    Warn (the run is still valid training) and return whether it warned."""
    continuing = step * global_batch
    if data_cursor == continuing:
        return False
    if continuing > data_cursor:
        effect = f"samples {data_cursor}..{continuing - 1} are skipped"
    else:
        effect = f"samples {continuing}..{data_cursor - 1} are seen twice"
    print(f"spindle: warning: the checkpoint's next sample is {data_cursor} (step {step}), but with "
          f"train.global_batch={global_batch} this run continues at sample {continuing}: {effect}. Resume with "
          "the checkpoint's train.global_batch to keep the data order exact.", file=sys.stderr, flush=True)
    return True


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop metrics lines past ``step`` (written by an attempt that died after its last checkpoint),
    so the resumed run continues the file without gaps or repeated steps."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # the half-written last line of a killed attempt
            continue
        if record.get("step", 0) <= step:
            kept.append(line + "\n")
    path.write_text("".join(kept), encoding="utf-8")


def train_entry(config: Config, run_dir: str, resume: str = "auto", *, trust_checkpoint: bool = False,
                clear_stale_stop: bool = True) -> dict:
    """Train one process of a job; returns the final metrics record.

    ``config``: the typed config, already validated for this world size (``load_config(path, overrides,
    world_size=...)``, or ``validate`` then ``check_world_size`` as `spindle train` does); it is not
    parsed or validated again here. Runs alone, under torchrun (rank and world size from the
    environment) or in a Ray Train worker (process group already initialized). Raises ConfigError for a
    layout or device this process cannot provide, before anything is written to disk.
    ``trust_checkpoint``: load a checkpoint whose origin tag does not verify (``--trust-checkpoint``).
    ``clear_stale_stop``: rank 0 removes a stop request left by an earlier, preempted attempt. False on
    Ray workers: their driver removed it before any worker started, and one written since is a SIGTERM
    of this job (to a worker still starting up) that must not be lost.
    """
    if not isinstance(config, Config):
        raise TypeError(f"train_entry takes a validated Config (spindle.runtime.config.load_config), "
                        f"got a {type(config).__name__}")
    rank, world_size, local_rank = process_world()
    try:
        degrees = ParallelDegrees.resolve(config.parallel.dp, config.parallel.cp, config.parallel.tp, world_size)
    except LayoutError as error:  # a config validated for another world size
        raise ConfigError(str(error)) from None
    config = resolve(config, world_size)
    device = select_device(config.launch, local_rank)
    # The flight recorder keeps the last collectives each rank entered, for hang reports.
    os.environ.setdefault("TORCH_FR_BUFFER_SIZE", FLIGHT_RECORDER_ENTRIES)
    init_process_group(world_size, device, config.launch.collective_timeout_s)
    context = ParallelContext.build(degrees, device, cp_layout=config.parallel.cp_layout)
    run_path = Path(run_dir)
    if context.is_main:
        run_path.mkdir(parents=True, exist_ok=True)
        record_config(config, run_path)  # an existing run's config.yaml is never rewritten
        if clear_stale_stop:
            clear_stop(run_path)
    if not dist.is_initialized():
        return run_training(config, run_path, context, resume, trust_checkpoint=trust_checkpoint)
    dist.barrier()  # the run directory exists before any rank writes into it
    # Under torchrun as under Ray: a collective that times out is reported with the ranks that never
    # entered it (heartbeat files in the run directory, which every rank sees).
    group_id = f"{os.environ.get('MASTER_ADDR', 'local')}:{os.environ.get('MASTER_PORT', '0')}"
    with reporting_stalls(run_path, rank, group_id):
        return run_training(config, run_path, context, resume, trust_checkpoint=trust_checkpoint)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m spindle.runtime.main",
                                     description="Train one process of a spindle job (also under torchrun).")
    add_train_arguments(parser)
    return parser


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """CONFIG, --set, --run-dir and --resume, shared with `spindle train`."""
    parser.add_argument("config", metavar="CONFIG", help="YAML config file, e.g. configs/demo.yaml")
    parser.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[],
                        help="override one config key, e.g. --set train.steps=200 (repeatable)")
    parser.add_argument("--run-dir", metavar="DIR", default=None,
                        help="run directory (default: runs/<config file stem>)")
    parser.add_argument("--resume", metavar="auto|never|PATH", default="auto",
                        help="resume from RUN_DIR's latest checkpoint (auto), start afresh (never), "
                             "or from a checkpoint directory (default: auto)")
    parser.add_argument("--overwrite", action="store_true",
                        help="with --resume never: move the run already in RUN_DIR aside to RUN_DIR.old-<time> "
                             "(nothing is deleted) and start afresh")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="load a checkpoint that this installation did not sign (another user's or machine's, "
                             "or an older spindle's); loading unpickles files, which can run code: only for "
                             "checkpoints from someone you trust")


def main(argv: list[str] | None = None) -> int:
    from spindle.runtime.checkpoint import CheckpointError
    from spindle.runtime.run_dir import interrupted_message, prepare_run

    arguments = build_parser().parse_args(argv)
    run_dir = arguments.run_dir or str(default_run_dir(arguments.config))
    rank, world_size, _ = process_world()
    is_main = rank == 0
    try:
        config = load_config(arguments.config, arguments.overrides, world_size=world_size)  # the only parse
        # Every rank checks (the same files, the same answer); only rank 0 moves an old run aside.
        decision = prepare_run(config, Path(run_dir), arguments.resume, overwrite=arguments.overwrite,
                               trust_checkpoint=arguments.trust_checkpoint, apply=is_main)
        if decision.finished:
            if is_main:
                print(f"spindle: {run_dir} already finished at step {decision.start_step}; nothing to do (raise "
                      f"train.steps to train further)", flush=True)
            return 0
        if decision.moved_aside is not None and is_main:
            print(f"spindle: moved the previous run aside to {decision.moved_aside}", flush=True)
        final = train_entry(config, run_dir, decision.resume, trust_checkpoint=arguments.trust_checkpoint)
    except (ConfigError, LayoutError, CheckpointError) as error:
        print(f"spindle: error: {error}", file=sys.stderr)
        return 2
    except CollectiveStallError as error:  # a hang: which collective, which ranks never entered it
        print(f"spindle: error: {error}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        if is_main:
            print(f"\nspindle: {interrupted_message(Path(run_dir), arguments.config)}", file=sys.stderr, flush=True)
        return 130
    if final and final.get("preempted"):
        if is_main:
            print(f"spindle: {preempted_message(final, resume_command(launching_command()))}", flush=True)
        return 0
    if final and is_main:
        print(f"spindle: finished step {final['step']}, loss {final['loss']:.4f}, {final['elapsed_s']:.1f} s; "
              f"metrics in {Path(run_dir) / 'metrics.jsonl'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
