"""Per-process entry point of training.

    python -m spindle.runtime.main CONFIG [--set key=value ...] [--run-dir DIR] [--resume auto|never|PATH]
    torchrun --nproc-per-node N -m spindle.runtime.main CONFIG ...

Ray workers (and ``spindle train``) call ``train_entry`` directly. The order is always: validate the
config against the world size, pick the device, and only then create the run directory, so a bad
config leaves nothing on disk.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from spindle.runtime.config import (
    Config,
    ConfigError,
    LaunchConfig,
    config_from_dict,
    layer_pattern,
    load_config,
    resolve,
    save_config,
    to_dict,
    validate,
)
from spindle.runtime.data import build_dataset
from spindle.runtime.metrics import MetricsWriter
from spindle.runtime.optim import build_optimizer
from spindle.runtime.tracking import start_tracking
from spindle.runtime.trainer import BatchProvider, ParallelContext, Trainer

RESUME_MODES = ("auto", "never")


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


def resolve_resume(resume: str, run_dir: Path) -> Path | None:
    """The checkpoint to resume from: None to start fresh.

    "never" starts fresh; "auto" resumes from RUN_DIR/checkpoints/latest when one exists; a PATH
    names a checkpoint directory.
    """
    if resume == "never":
        return None
    if resume == "auto":
        latest = run_dir / "checkpoints" / "latest"
        if not latest.exists():
            return None
        checkpoint = latest
    else:
        checkpoint = Path(resume)
        if not checkpoint.exists():
            raise ConfigError(f"--resume = {resume!r}: no such checkpoint; expected {_choices()} or the path "
                              f"of a checkpoint directory (RUN_DIR/checkpoints/step_<8 digits>).")
    raise NotImplementedError(f"resuming from {str(checkpoint)!r} needs checkpoint loading, which is not "
                              f"implemented yet; pass --resume never to start afresh.")


def _choices() -> str:
    return " or ".join(repr(mode) for mode in RESUME_MODES)


def run_training(config: Config, run_dir: Path, context: ParallelContext) -> dict:
    """Build data, model and optimizer from a resolved config and train; returns the last metrics."""
    from spindle.runtime.model import HybridModel  # heavy import (kernels), only once we train

    torch.manual_seed(config.train.seed)
    dataset = build_dataset(config.data, config.model.vocab_size, config.train.seed)
    model = HybridModel(config.model).to(context.device)
    optimizer = build_optimizer(model, config.train)
    batches = BatchProvider(dataset, config.train.global_batch, config.train.micro_batch,
                            context.dp_rank, context.dp_size)
    if context.is_main:
        print(f"spindle: {layer_pattern(config.model)} model, {model.num_parameters() / 1e6:.2f}M parameters, "
              f"{config.train.steps} steps of {config.train.global_batch} x {config.data.seq_len} tokens "
              f"on {context.device}; run directory {run_dir}", flush=True)
    tracker = start_tracking(config.logging, run_dir, to_dict(config), is_main=context.is_main)
    metrics = MetricsWriter(run_dir) if context.is_main else None
    try:
        trainer = Trainer(config, model, optimizer, batches, context, run_dir, tracker=tracker, metrics=metrics)
        final = trainer.fit(start_step=0)
    finally:
        tracker.finish()
        if metrics is not None:
            metrics.close()
    return final


def train_entry(config_dict: dict, run_dir: str, resume: str = "auto") -> dict:
    """Train one process of a job from a plain config dict; returns the final metrics record.

    Raises ConfigError for a config that cannot run here (before anything is written to disk).
    """
    config = config_from_dict(config_dict)
    rank, world_size, local_rank = process_world()
    validate(config, world_size=world_size)
    if world_size > 1:
        raise NotImplementedError(
            f"this process is one of {world_size} (WORLD_SIZE={world_size}), but composing data, context and "
            f"tensor parallelism across processes is not implemented yet; run a single process "
            f"(parallel.dp = parallel.cp = parallel.tp = 1).")
    config = resolve(config, world_size)
    device = select_device(config.launch, local_rank)
    run_path = Path(run_dir)
    resolve_resume(resume, run_path)  # fresh start: checkpoint loading arrives with checkpointing
    context = ParallelContext(device=device, rank=rank, world_size=world_size)
    if context.is_main:
        run_path.mkdir(parents=True, exist_ok=True)
        save_config(config, run_path / "config.yaml")
    return run_training(config, run_path, context)


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


def main(argv: list[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    run_dir = arguments.run_dir or str(default_run_dir(arguments.config))
    try:
        config = load_config(arguments.config, arguments.overrides)
        final = train_entry(to_dict(config), run_dir, arguments.resume)
    except (ConfigError, NotImplementedError) as error:
        print(f"spindle: error: {error}", file=sys.stderr)
        return 2
    if final:
        print(f"spindle: finished step {final['step']}, loss {final['loss']:.4f}, {final['elapsed_s']:.1f} s; "
              f"metrics in {Path(run_dir) / 'metrics.jsonl'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
