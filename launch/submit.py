"""`spindle submit`: run `spindle train` on a remote Ray cluster through the Ray Jobs API.

    submit_job(config, address, ...)
      1. the address is checked (an http(s) dashboard address that answers within seconds)
      2. the validated config (with every --set applied) is written to a fresh directory, which is the
         job's runtime_env working_dir: the cluster trains exactly what was validated here
      3. the job runs `spindle train config.yaml` on the head node, which joins the cluster through the
         RAY_ADDRESS the Jobs API sets, so it goes through the same Ray Train launcher: that process is the
         job's entry point, so it reads the file (a YAML file is all the Jobs API carries), checks the
         world-size rules once it knows its workers and hands the typed config to them
      4. the job id is printed; the job's logs stream here until it ends (or not, with wait=False)

The exit code is the job's: 0 when it succeeded, 1 when it failed or was stopped.
"""
from __future__ import annotations

import argparse
import asyncio
import re
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import TextIO
from urllib.parse import urlparse

from spindle.launch.cluster import check_reachable
from spindle.launch.errors import LaunchError
from spindle.runtime.config import Config, save_config

CONFIG_NAME = "config.yaml"
DEFAULT_DASHBOARD_PORT = 8265
GCS_PORT = 6379


def dashboard_address(address: str) -> str:
    """Normalize the Jobs API address to http(s)://HOST:PORT and check that something answers there."""
    parsed = urlparse(address if "://" in address else f"http://{address}")
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise LaunchError(f"--address {address} is not a Ray dashboard address: expected http://HEAD:8265 (the "
                          f"head node's dashboard / Jobs API port).")
    port = parsed.port or DEFAULT_DASHBOARD_PORT
    if port == GCS_PORT:
        raise LaunchError(f"--address {address} points at port {GCS_PORT}, the cluster's GCS port: `spindle submit` "
                          f"talks to the dashboard's Jobs API, usually http://{parsed.hostname}:{DEFAULT_DASHBOARD_PORT} "
                          f"(`spindle train --address {parsed.hostname}:{GCS_PORT}` joins through the GCS port).")
    check_reachable(parsed.hostname, port, address)
    return f"{parsed.scheme}://{parsed.hostname}:{port}"


def entrypoint(run_dir: str | None, resume: str | None, *, overwrite: bool = False,
               trust_checkpoint: bool = False) -> str:
    """The shell command the job runs on the head node, in the uploaded working directory."""
    words = ["spindle", "train", CONFIG_NAME]
    if run_dir:
        words += ["--run-dir", run_dir]
    if resume:
        words += ["--resume", resume]
    words += ["--overwrite"] * overwrite + ["--trust-checkpoint"] * trust_checkpoint
    return shlex.join(words)


def submission_id(config_name: str) -> str:
    """A readable, unique job id: spindle-<config name>-<UTC time>."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "-", Path(config_name).stem).strip("-") or "job"
    return f"spindle-{stem}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{time.time_ns() % 10**6:06d}"


def submit_job(config: Config, config_name: str, address: str, *, run_dir: str | None = None,
               resume: str | None = None, wait: bool = True, output: TextIO | None = None,
               overwrite: bool = False, trust_checkpoint: bool = False) -> int:
    """Submit a validated config as a Ray job; return 0 when it succeeded (or was submitted, with
    ``wait=False``) and 1 when it failed or was stopped. Raises LaunchError for a bad or dead address.

    ``run_dir`` is a path on the cluster (a filesystem every node sees for multi-node jobs); without
    it the job's run directory is runs/<config name> inside the job's working directory on the head.
    """
    output = output or sys.stdout
    address = dashboard_address(address)
    client = _connect(address)
    with tempfile.TemporaryDirectory(prefix="spindle-submit-") as working_dir:
        save_config(config, Path(working_dir) / CONFIG_NAME)
        command = entrypoint(run_dir, resume, overwrite=overwrite, trust_checkpoint=trust_checkpoint)
        job_id = client.submit_job(entrypoint=command, submission_id=submission_id(config_name),
                                   runtime_env={"working_dir": working_dir},
                                   metadata={"spindle_config": Path(config_name).name})
    print(f"spindle: submitted job {job_id} to {address}", file=output, flush=True)
    if not wait:
        print(f"spindle: follow it with `ray job logs --follow {job_id} --address {address}`; stop it with "
              f"`ray job stop {job_id} --address {address}`", file=output, flush=True)
        return 0
    try:
        asyncio.run(_stream_logs(client, job_id, output))
        return _final_status(client, job_id, output)
    except KeyboardInterrupt:
        print(f"\nspindle: stopped following; job {job_id} keeps running (stop it with "
              f"`ray job stop {job_id} --address {address}`)", file=output, flush=True)
        return 130


def _connect(address: str) -> object:
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except AuthenticationError:
        raise LaunchError(
            f"the Ray cluster at {address} requires token authentication: set RAY_AUTH_MODE=token and make the "
            f"cluster's token available here (~/.ray/auth_token, RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN; "
            f"`ray get-auth-token` on the head node prints it).") from None
    except (ConnectionError, RuntimeError) as error:
        raise LaunchError(f"the Ray Jobs API at {address} did not answer: {_first_line(error)}. Check that the head "
                          f"node runs a dashboard (`ray start --head --dashboard-host 0.0.0.0`) and that the port "
                          f"is the dashboard's (8265 by default).") from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


async def _stream_logs(client: object, job_id: str, output: TextIO) -> None:
    async for chunk in client.tail_job_logs(job_id):
        output.write(chunk)
        output.flush()


def _final_status(client: object, job_id: str, output: TextIO, poll_s: float = 1.0) -> int:
    """Wait for the job to reach a terminal state (the log stream closes when it ends, or earlier if the
    connection drops) and print it; 0 when it succeeded, else 1."""
    from ray.job_submission import JobStatus

    info = client.get_job_info(job_id)
    if not info.status.is_terminal():
        print(f"spindle: the log stream closed; waiting for job {job_id} to end", file=output, flush=True)
    while not info.status.is_terminal():
        time.sleep(poll_s)
        info = client.get_job_info(job_id)
    if info.status == JobStatus.SUCCEEDED:
        print(f"spindle: job {job_id} succeeded", file=output, flush=True)
        return 0
    # Ray's message repeats the tail of the logs that were just streamed: its first line is enough.
    reason = f": {info.message.strip().splitlines()[0]}" if info.message and info.message.strip() else ""
    print(f"spindle: job {job_id} {str(info.status.value).lower()}{reason}", file=output, flush=True)
    return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spindle submit",
                                     description="Run `spindle train CONFIG` on a Ray cluster through the Jobs API.")
    parser.add_argument("config", metavar="CONFIG", help="YAML config file, e.g. configs/demo.yaml")
    parser.add_argument("--address", required=True, metavar="http://HEAD:8265",
                        help="the head node's dashboard (Jobs API) address")
    parser.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[],
                        help="override one config key, e.g. --set train.steps=200 (repeatable)")
    parser.add_argument("--run-dir", metavar="DIR", default=None,
                        help="run directory on the cluster: an absolute path on storage every node sees "
                             "(default: runs/<config name> in the job's working directory on the head)")
    parser.add_argument("--resume", metavar="auto|never|PATH", default=None,
                        help="passed to `spindle train` on the cluster (default: auto)")
    parser.add_argument("--overwrite", action="store_true",
                        help="passed to `spindle train`: with --resume never, move an existing run aside")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="passed to `spindle train`: load a checkpoint this user's key did not sign")
    parser.add_argument("--no-wait", action="store_true",
                        help="print the job id and return at once instead of streaming the logs")
    return parser


def main(argv: list[str] | None = None) -> int:
    """`spindle submit`: exit 0 when the job succeeded, 1 when it failed, 2 for a bad config."""
    from spindle.runtime.config import ConfigError, load_config

    arguments = build_parser().parse_args(argv)
    try:
        config = load_config(arguments.config, arguments.overrides)
        return submit_job(config, arguments.config, arguments.address, run_dir=arguments.run_dir,
                          resume=arguments.resume, wait=not arguments.no_wait, overwrite=arguments.overwrite,
                          trust_checkpoint=arguments.trust_checkpoint)
    except ConfigError as error:
        print(f"spindle: error: {error}", file=sys.stderr)
        return 2
    except LaunchError as error:
        print(f"spindle: error: {error}", file=sys.stderr)
        return 1
