"""The `spindle` command line.

    spindle train CONFIG [--set key=value ...] [--run-dir DIR] [--address ADDR] [--resume auto|never|PATH]
                         [--overwrite] [--trust-checkpoint]
    spindle submit CONFIG --address http://HEAD:8265 [--set key=value ...]
    spindle plan CONFIG [--set key=value ...]
    spindle bench {kernels,cp,e2e} [...]
    spindle report RUN_DIR
    spindle ckpt ...
    spindle data prepare INPUT... --tokenizer TOKENIZER --out DIR [--text-field text] [--workers N]

A config error, and anything wrong with the run directory or --resume, prints one message on stderr
and exits with code 2 before anything is created on disk or any process starts. `spindle plan` exits
1 when the config does not fit.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
from pathlib import Path
from typing import Callable

from spindle.launch.errors import LaunchError
from spindle.runtime.config import Config, ConfigError, load_config
from spindle.runtime.main import add_train_arguments, default_run_dir

USAGE_ERROR = 2
DOES_NOT_FIT = 1
INTERRUPTED = 130
BENCHMARKS = ("kernels", "cp", "e2e")


def _error(message: str) -> int:
    print(f"spindle: error: {message}", file=sys.stderr)
    return USAGE_ERROR


# ---------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------
def launch_training(config: Config, run_dir: Path, resume: str, address: str | None, *,
                    trust_checkpoint: bool = False, start_step: int = 0) -> dict:
    """Run the job on Ray Train workers (an embedded local cluster, or the one at ``address`` /
    RAY_ADDRESS) and return rank 0's final metrics."""
    from spindle.launch.ray_launcher import run_training

    return run_training(config, run_dir, resume, address, trust_checkpoint=trust_checkpoint, start_step=start_step)


def _without_ray(command: str) -> int | None:
    """Exit code 1 with what to do instead when Ray is not installed (only train and submit need it)."""
    if importlib.util.find_spec("ray") is not None:
        return None
    print(f"spindle: error: {command} runs on Ray, which is not installed here. Install it with "
          f"pip install 'ray[default,train]>=2.40', or train without Ray: python -m spindle.runtime.main CONFIG "
          f"(one process) or torchrun --nproc-per-node N -m spindle.runtime.main CONFIG (several).", file=sys.stderr)
    return 1


def _train(arguments: argparse.Namespace) -> int:
    from spindle.runtime.preemption import preempted_message, resume_command
    from spindle.runtime.run_dir import interrupted_message, prepare_run

    run_dir = Path(arguments.run_dir) if arguments.run_dir else default_run_dir(arguments.config)
    try:
        config = load_config(arguments.config, arguments.overrides)
        if (code := _without_ray("spindle train")) is not None:  # before anything is written
            return code
        decision = prepare_run(config, run_dir, arguments.resume, overwrite=arguments.overwrite,
                               trust_checkpoint=arguments.trust_checkpoint)
        if decision.finished:
            print(f"spindle: {run_dir} already finished at step {decision.start_step}; nothing to do (raise "
                  f"train.steps to train further)", flush=True)
            return 0
        if decision.moved_aside is not None:
            print(f"spindle: moved the previous run aside to {decision.moved_aside}", file=sys.stderr, flush=True)
        final = launch_training(config, run_dir, decision.resume, arguments.address,
                                trust_checkpoint=arguments.trust_checkpoint, start_step=decision.start_step)
    except ConfigError as error:
        return _error(str(error))
    except LaunchError as error:  # the cluster cannot host the job, or the job failed
        print(f"spindle: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\nspindle: {interrupted_message(run_dir, arguments.config)}", file=sys.stderr, flush=True)
        return INTERRUPTED
    if final and final.get("preempted"):
        command = resume_command(["spindle", *sys.argv[1:]])
        print(f"spindle: {preempted_message(final, command)}", flush=True)
        return 0
    if final:
        print(f"spindle: finished step {final['step']}, loss {final['loss']:.4f} in {final['elapsed_s']:.1f} s; "
              f"metrics in {run_dir / 'metrics.jsonl'} (plots: spindle report {run_dir})", flush=True)
    return 0


# ---------------------------------------------------------------------------------------------
# commands implemented in other modules
# ---------------------------------------------------------------------------------------------
def _dispatch(module_name: str, argv: list[str]) -> int:
    """Hand the remaining arguments to ``module_name.main(argv)``."""
    module = importlib.import_module(module_name)
    try:
        return int(module.main(argv) or 0)
    except SystemExit as exit_request:  # argparse inside the module: --help or a usage error
        return int(exit_request.code or 0) if not isinstance(exit_request.code, str) else _error(exit_request.code)


def _plan(argv: list[str]) -> int:
    """spindle plan's output, and exit 1 when the config does not fit (0 when it fits, 2 on bad input)."""
    from spindle.runtime import plan

    parser = plan.build_parser()
    try:
        arguments = parser.parse_args(argv)
    except SystemExit as exit_request:  # --help (0) or a usage error (2), already printed
        return int(exit_request.code or 0)
    try:
        data, text = plan.run(arguments)
    except (ConfigError, ValueError) as error:
        print(f"spindle plan: error: {error}", file=sys.stderr)
        return USAGE_ERROR
    print(json.dumps(data, indent=2) if arguments.json else text)
    if not data.get("fits", True):
        print("spindle plan: the config does not fit (see the recommendation above)", file=sys.stderr)
        return DOES_NOT_FIT
    return 0


def _bench(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(f"usage: spindle bench {{{','.join(BENCHMARKS)}}} [options]\n\nRun a benchmark: "
              f"{', '.join(BENCHMARKS)}. Each has its own options: spindle bench NAME --help.")
        return 0
    if not argv or argv[0] not in BENCHMARKS:
        given = repr(argv[0]) if argv else "nothing"
        return _error(f"spindle bench needs a benchmark name, got {given}: expected one of "
                      f"{', '.join(BENCHMARKS)} (e.g. spindle bench kernels --help).")
    return _dispatch(f"spindle.benchmarks.{argv[0]}", argv[1:])


def _report(arguments: argparse.Namespace) -> int:
    from spindle.launch.report import main as report_main

    return report_main([arguments.run_dir])


# Commands whose arguments belong to another module's parser: everything after the name goes there.
def _submit(argv: list[str]) -> int:
    if not {"-h", "--help"} & set(argv) and (code := _without_ray("spindle submit")) is not None:
        return code
    return _dispatch("spindle.launch.submit", argv)


def _ckpt(argv: list[str]) -> int:
    return _dispatch("spindle.launch.ckpt", argv)


def _data(argv: list[str]) -> int:
    return _dispatch("spindle.runtime.prepare", argv)


PASS_THROUGH: dict[str, Callable[[list[str]], int]] = {"plan": _plan, "bench": _bench, "submit": _submit,
                                                      "ckpt": _ckpt, "data": _data}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spindle", description="Distributed long-context training runtime.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    train = commands.add_parser("train", help="train a config (run directory: runs/<config name>)")
    add_train_arguments(train)
    train.add_argument("--address", metavar="ADDR", default=None, help="address of an existing Ray cluster")
    train.set_defaults(handler=_train)

    commands.add_parser("submit", help="run a config on a Ray cluster through the Jobs API", add_help=False)

    commands.add_parser("plan", help="print the parallel plan and memory estimate of a config", add_help=False)
    commands.add_parser("bench", help="run a benchmark: kernels, cp or e2e", add_help=False)

    report = commands.add_parser("report", help="plot loss and throughput of a run directory")
    report.add_argument("run_dir", metavar="RUN_DIR")
    report.set_defaults(handler=_report)

    commands.add_parser("ckpt", help="list or verify committed checkpoints: ckpt ls RUN_DIR", add_help=False)
    commands.add_parser("data", help="tokenize text for training: data prepare INPUT... --tokenizer T --out DIR",
                        add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in PASS_THROUGH:
        return PASS_THROUGH[argv[0]](argv[1:])
    try:
        arguments = build_parser().parse_args(argv)
    except SystemExit as exit_request:  # --help (0) or a usage error (2): return the code, don't exit
        return int(exit_request.code or 0)
    return arguments.handler(arguments)


if __name__ == "__main__":
    sys.exit(main())
