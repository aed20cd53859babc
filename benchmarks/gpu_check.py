"""The GPU check: one command that installs spindle onto a machine's own torch and runs every GPU test and
benchmark, each part in its own time box, and writes one report.

    make gpu-check                      # python3 benchmarks/gpu_check.py (a GPU machine, about 7 minutes)
    make gpu-check DRY_RUN=1            # the same parts on a CPU with tiny shapes (about a minute)
    python3 benchmarks/gpu_check.py [--dry-run] [--out DIR] [--budget-s SECONDS] [--python PYTHON]

The parts, in order (a part that overruns its budget is stopped and recorded as "over budget"; the rest
still run; the whole check stops starting parts when the total budget is spent):
  install      pip install --no-deps --no-index --no-build-isolation -e . (plus the pinned wheels in .whl/
               from `make gpu-wheels`) into the machine's Python; nothing is downloaded. The dry run
               installs into a throwaway virtualenv that sees the current environment's packages except
               ray, wandb, deepspeed, megatron-core, fla and spindle itself, like the GPU machine.
  environment  Python, torch, triton, CUDA, GPU name and driver, git commit, optional packages present.
  cli          `spindle plan` on the 1M-token preset; `spindle train` without Ray says what to do instead.
  pytest-gpu   pytest -m gpu (bf16 kernels against references, softmax backends, Triton at real sizes).
  cp-2rank     two ranks on the one GPU (NCCL where it allows two ranks per device, else gloo on CUDA
               tensors): collectives, LASP-2 / all-gather / ring attention against a float64 reference
               and the single-device op, then a short cp=2 training run through the trainer.
  bench-kernels  `spindle bench kernels` at the kernel issue's shapes (B=4 H=32 d=128 T=32K; B=1 H=10
               d=64 T=1M linear only), against fla / flash-attn when importable.
  preset-1m    configs/hybrid-1m-1gpu.yaml for a few steps through the trainer (python -m
               spindle.runtime.main), measured peak memory next to `spindle plan`'s.
  bench-e2e    `spindle bench e2e`: tokens/s, MFU, peak memory against the planner for linear-only,
               hybrid 1:7 and softmax-only models, 8K -> 1M tokens as far as the time box allows.

Output, in GPU_CHECK_OUT (default docs/benchmarks/gpu/; the dry run defaults to runs/gpu-check-dry-run/):
gpu-check.md (the report), gpu-check.json (everything, machine-readable), gpu-check.log (each command's
output), gpu-check-parts.png, e2e.png and kernels-*.png: at most 8 files, so the folder can come back
from a remote machine and be committed as it is. The report is rewritten after every part.

This file imports nothing outside the standard library at module level: it runs before spindle is installed.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = "docs/benchmarks/gpu"
DRY_RUN_OUT = "runs/gpu-check-dry-run"
GPU_BUDGET_S = 420.0  # leaves room for a rerun inside a 15-minute GPU lease (start-up included)
DRY_RUN_BUDGET_S = 170.0
REPORT_RESERVE_S = 8.0  # kept back from every part for writing the report
MINIMUM_PART_S = 10.0  # a part granted less than this is skipped
# Distributions the GPU machine does not have; the dry run hides them (and spindle, which it installs).
ABSENT_ON_GPU_MACHINE = ("ray", "wandb", "deepspeed", "megatron-core", "flash-attn", "fla-core",
                         "flash-linear-attention", "lightning-attn")
OPTIONAL_MODULES = ("ray", "wandb", "deepspeed", "megatron.core", "flash_attn", "flash_attn_interface", "fla",
                    "lightning_attn", "transformers", "einops", "matplotlib", "pytest", "torchtitan")
OUTPUT_FILES = ("gpu-check.md", "gpu-check.json", "gpu-check.log", "gpu-check-parts.png", "e2e.png")
MAX_KERNEL_PLOTS = 3


@dataclasses.dataclass(frozen=True)
class PartSpec:
    name: str
    title: str
    gpu_budget_s: float
    dry_budget_s: float
    function: Callable[["Check", "PartResult"], None]


@dataclasses.dataclass
class PartResult:
    name: str
    title: str
    budget_s: float
    status: str = "pending"
    """"ran", "skipped" or "over budget"."""
    outcome: str = ""
    """For a part that ran: "ok" or "failed"."""
    reason: str = ""
    seconds: float = 0.0
    summary: str = ""
    commands: list[str] = dataclasses.field(default_factory=list)
    details: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class CommandResult:
    returncode: int | None
    seconds: float
    timed_out: bool
    output: str


class OverBudget(Exception):
    """A part's command ran out of the part's time."""


class Stopped(BaseException):
    """The check itself got SIGTERM (an outer time limit): stop the running command, write the report."""


def _raise_stopped(signum: int, frame: object) -> None:
    raise Stopped(f"signal {signum}")


# ---------------------------------------------------------------------------------------------------------
# Running commands with a time box
# ---------------------------------------------------------------------------------------------------------
class Check:
    """State shared by the parts: options, the Python that runs spindle, environment, time, log."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.dry_run: bool = args.dry_run
        self.out = Path(args.out).resolve()
        self.scratch = Path(tempfile.mkdtemp(prefix="spindle-gpu-check-"))
        self.keep_scratch: bool = args.keep_scratch
        self.python: str = args.python or sys.executable
        self.python_given = args.python is not None
        self.env = dict(os.environ)
        self.env["PYTHONUNBUFFERED"] = "1"
        self.env.setdefault("MPLBACKEND", "Agg")
        if self.dry_run:
            self.env.setdefault("OMP_NUM_THREADS", "1")
            for name in ("PYTHONPATH", "PYTHONHOME"):  # the throwaway environment must see only what it holds
                self.env.pop(name, None)
        self.started = time.monotonic()
        self.deadline = self.started + args.budget_s
        self.budget_s: float = args.budget_s
        self.budget_scale: float = args.budget_scale
        self.log_path = self.out / "gpu-check.log"
        self.part_deadline = self.deadline
        self.argv: list[str] = args.argv
        self.header: dict = {}
        self.installed = False

    def left(self) -> float:
        return self.deadline - time.monotonic() - REPORT_RESERVE_S

    def log(self, text: str) -> None:
        with self.log_path.open("a", encoding="utf-8") as handle:
            handle.write(text if text.endswith("\n") else text + "\n")

    def run(self, part: PartResult, command: Sequence[str], *, timeout: float | None = None, display: str | None = None,
            env: dict | None = None, cwd: Path | None = None) -> CommandResult:
        """Run one command inside the part's time box (its process group is killed when time runs out)."""
        left = self.part_deadline - time.monotonic()
        limit = left if timeout is None else min(timeout, left)
        shown = display or shlex.join(str(item) for item in command)
        part.commands.append(shown)
        if limit < 1:
            raise OverBudget(f"no time left for `{shown}`")
        self.log(f"\n===== [{part.name}] $ {shown}   (time box {limit:.0f} s)")
        started = time.monotonic()
        process = subprocess.Popen([str(c) for c in command], cwd=cwd or REPO, env=env or self.env, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                                   errors="replace")
        timed_out = False
        try:
            output, _ = process.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            timed_out = True
            output = _stop_process_group(process)
        except BaseException:  # stopped from outside: its own session would outlive us
            _stop_process_group(process)
            raise
        seconds = time.monotonic() - started
        self.log(output)
        self.log(f"===== [{part.name}] exit {process.returncode}{' (killed: time box)' if timed_out else ''} "
                 f"after {seconds:.1f} s")
        if timed_out or process.returncode != 0:  # shown in the report when the part fails
            tail = "\n".join(output.strip().splitlines()[-20:])
            part.details.setdefault("nonzero_exits", []).append({"command": shown, "exit_code": process.returncode,
                                                                  "timed_out": timed_out, "output_tail": tail})
        return CommandResult(None if timed_out else process.returncode, seconds, timed_out, output)

    def spindle(self, *arguments: str) -> list[str]:
        """`spindle ARGS` through the installed package (no reliance on the console script being on PATH)."""
        return [self.python, "-m", "spindle.launch.cli", *arguments]


def _stop_process_group(process: subprocess.Popen) -> str:
    """SIGTERM the whole process group (torchrun children too), then SIGKILL; return what it printed."""
    for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            output, _ = process.communicate(timeout=grace)
            return output or ""
        except subprocess.TimeoutExpired:
            continue
    return ""


def _last_error_line(text: str) -> str:
    """The most telling line of a failed command's output (the exception or error message)."""
    candidates = [line.strip() for line in text.strip().splitlines() if line.strip()]
    for line in reversed(candidates):
        if re.search(r"(error|exception|failed|refused|not supported|killed)", line, re.I):
            return line[:300]
    return candidates[-1][:300] if candidates else "no output"


# ---------------------------------------------------------------------------------------------------------
# Part: install
# ---------------------------------------------------------------------------------------------------------
def _wheels() -> list[Path]:
    return sorted((REPO / ".whl").glob("*.whl"))


def _shadow_environment(check: Check, part: PartResult) -> str:
    """A throwaway virtualenv whose site-packages links every package of the current environment except
    the ones the GPU machine lacks and spindle itself; returns its python. Nothing is copied or installed
    into the current environment."""
    import importlib.metadata
    import site
    import sysconfig

    venv = check.scratch / "venv"
    result = check.run(part, [sys.executable, "-m", "venv", "--without-pip", venv])
    if result.returncode != 0:
        raise RuntimeError(f"python -m venv failed: {_last_error_line(result.output)}")
    target = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
    target.mkdir(parents=True, exist_ok=True)
    hidden: set[str] = set()
    for name in (*ABSENT_ON_GPU_MACHINE, "spindle"):
        try:
            files = importlib.metadata.distribution(name).files or []
        except importlib.metadata.PackageNotFoundError:
            continue
        hidden |= {Path(str(f)).parts[0] for f in files if not str(f).startswith("..")}
    linked = 0
    for source in dict.fromkeys(site.getsitepackages()):
        for entry in sorted(Path(source).iterdir()):
            if entry.name in hidden or entry.name == "__pycache__" or (target / entry.name).exists():
                continue
            (target / entry.name).symlink_to(entry)
            linked += 1
    part.details["throwaway_env"] = {"python": str(venv / "bin" / "python"), "linked_entries": linked,
                                     "hidden": sorted(hidden)}
    return str(venv / "bin" / "python")


def _symlink_tree(check: Check) -> Path:
    """Fallback when pip cannot install: a folder with the `spindle` package assembled from the checkout by
    symbolic links, following pyproject's package-dir map, for PYTHONPATH."""
    mapping = dict(re.findall(r'"(spindle(?:\.[a-z_]+)*)"\s*=\s*"([^"]+)"', (REPO / "pyproject.toml").read_text()))
    root = check.scratch / "pythonpath"
    package = root / "spindle"
    package.mkdir(parents=True, exist_ok=True)
    for entry in (REPO / mapping.get("spindle", "spindle")).iterdir():
        (package / entry.name).symlink_to(entry)
    for name, folder in mapping.items():
        parts = name.split(".")[1:]
        if len(parts) == 1 and not (package / parts[0]).exists():
            (package / parts[0]).symlink_to(REPO / folder)
    return root


def part_install(check: Check, part: PartResult) -> None:
    if check.dry_run and not check.python_given:  # --python names an environment that is already separate
        check.python = _shadow_environment(check, part)
    wheels = _wheels()
    command = [check.python, "-m", "pip", "install", "--no-deps", "--no-index", "--no-build-isolation",
               "--disable-pip-version-check", "--no-input", *(["--find-links", ".whl", *wheels] if wheels else []),
               "-e", "."]
    display = shlex.join([*command[:-2 - len(wheels)], *(str(w.relative_to(REPO)) for w in wheels), "-e", "."]) \
        if wheels else None
    result = check.run(part, command, display=display)
    part.details["wheels"] = [w.name for w in wheels]
    failure = "" if result.returncode == 0 else f"pip install failed: {_last_error_line(result.output)}"
    if failure:  # keep going on a PYTHONPATH assembled from the checkout
        root = _symlink_tree(check)
        check.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), check.env.get("PYTHONPATH", "")]))
        part.details["fallback_pythonpath"] = str(root)
    # one process checks the install (from outside the checkout) and reads the versions for the report
    check.header = _probe_environment(check, part)
    check.installed = "spindle" in check.header
    part.details["spindle_imported_from"] = check.header.get("spindle", "")
    part.status = "ran"
    part.outcome = "ok" if check.installed and not failure else "failed"
    part.summary = (f"spindle installed into {check.python} without dependencies or an index"
                    + (f", with {len(wheels)} wheel(s) from .whl/" if wheels else ", no wheels in .whl/")
                    if not failure else failure + ("; running from a PYTHONPATH symlink tree" if check.installed
                                                   else "; spindle does not import"))
    if not check.installed:
        part.summary += f"; import failed: {check.header.get('spindle_error', 'no output')}"


# ---------------------------------------------------------------------------------------------------------
# Part: environment
# ---------------------------------------------------------------------------------------------------------
ENVIRONMENT_PROBE = r"""
import importlib.util, json, platform, sys
info = {"python": sys.version.split()[0], "python_executable": sys.executable, "platform": platform.platform()}
try:
    import torch
    info.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available(),
                cpu_threads=torch.get_num_threads())
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        info.update(gpu=properties.name, gpu_count=torch.cuda.device_count(),
                    gpu_memory_gib=round(properties.total_memory / 2**30, 1),
                    capability=f"{properties.major}.{properties.minor}", sms=properties.multi_processor_count,
                    nccl=".".join(map(str, torch.cuda.nccl.version())))
except Exception as error:
    info["torch_error"] = repr(error)
try:
    import triton
    info["triton"] = triton.__version__
except Exception as error:
    info["triton"] = f"not importable ({type(error).__name__})"
present = {}
for name in MODULES:
    try:
        present[name] = importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        present[name] = False
info["optional_modules"] = present
try:
    import spindle, spindle.launch.cli, spindle.runtime.main
    info["spindle"] = spindle.__file__
except Exception as error:
    info["spindle_error"] = f"{type(error).__name__}: {error}"
print("ENVIRONMENT " + json.dumps(info))
"""


def _probe_environment(check: Check, part: PartResult) -> dict:
    result = check.run(part, [check.python, "-c", ENVIRONMENT_PROBE.replace("MODULES", repr(OPTIONAL_MODULES))],
                       display=f"{check.python} -c <environment probe: versions, GPU, optional modules, import spindle>",
                       cwd=check.scratch)
    for line in result.output.splitlines():
        if line.startswith("ENVIRONMENT "):
            return json.loads(line[len("ENVIRONMENT "):])
    return {"spindle_error": _last_error_line(result.output)}


def _git(*arguments: str) -> str:
    try:
        result = subprocess.run(["git", *arguments], cwd=REPO, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return result.stdout.strip() if result.returncode == 0 else ""


def part_environment(check: Check, part: PartResult) -> None:
    info = dict(check.header) if "python" in check.header else _probe_environment(check, part)
    smi = shutil.which("nvidia-smi")
    if smi:
        query = check.run(part, [smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                          timeout=20)
        if query.returncode == 0 and query.output.strip():
            name, driver, memory = (field.strip() for field in query.output.strip().splitlines()[0].split(",")[:3])
            info.update(nvidia_smi_gpu=name, driver=driver, nvidia_smi_memory=memory)
    commit = _git("rev-parse", "HEAD") or os.environ.get("GIT_COMMIT", "") or "unknown (no git here; set GIT_COMMIT)"
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    info.update(git_commit=commit, git_dirty=bool(dirty), date_utc=datetime.datetime.now(datetime.timezone.utc)
                .strftime("%Y-%m-%d %H:%M UTC"), host_cpus=os.cpu_count(), dry_run=check.dry_run)
    check.header = info
    part.details = info
    part.status = "ran"
    part.outcome = "ok" if "torch" in info else "failed"
    absent = [name for name, present in info.get("optional_modules", {}).items() if not present]
    part.summary = (f"{info.get('gpu', 'no CUDA GPU')}; torch {info.get('torch', '?')}, triton {info.get('triton', '?')}, "
                    f"Python {info.get('python', '?')}; not installed: {', '.join(absent) or 'none'}")


# ---------------------------------------------------------------------------------------------------------
# Part: cli
# ---------------------------------------------------------------------------------------------------------
PRESET = "configs/hybrid-1m-1gpu.yaml"


def _plan(check: Check, part: PartResult, overrides: Sequence[str]) -> dict | None:
    sets = [item for override in overrides for item in ("--set", override)]
    result = check.run(part, check.spindle("plan", PRESET, *sets, "--json"))
    if result.returncode not in (0, 1):  # 1: the config does not fit, the plan is still printed
        return None
    try:
        data = json.loads(result.output[result.output.index("{"):])
    except ValueError:
        return None
    return {"total_gib": data["memory"]["total"] / 2**30, "usable_gib": data["memory"]["usable"] / 2**30,
            "fits": data.get("fits"), "step_s": data["time"]["step_s"], "tokens_per_s": data["time"]["tokens_per_s"],
            "mfu": data["time"].get("mfu")}


def part_cli(check: Check, part: PartResult) -> None:
    plan = _plan(check, part, [])
    part.details["plan_1m"] = plan
    problems = [] if plan else ["`spindle plan` failed"]
    ray_present = check.header.get("optional_modules", {}).get("ray", False)
    if ray_present:
        part.details["train_without_ray"] = "not checked: ray is installed here"
    else:
        result = check.run(part, check.spindle("train", "configs/tiny.yaml", "--run-dir", str(check.scratch / "no-ray")))
        message = _last_error_line(result.output)
        part.details["train_without_ray"] = {"exit_code": result.returncode, "message": message}
        if result.returncode == 0 or "ray" not in message.lower() or "Traceback" in result.output:
            problems.append(f"`spindle train` without Ray: exit {result.returncode}, {message!r}")
    part.status = "ran"
    part.outcome = "failed" if problems else "ok"
    plan_text = (f"plan of {PRESET}: peak {plan['total_gib']:.1f} of {plan['usable_gib']:.1f} GiB usable, "
                 f"{plan['step_s']:.1f} s per step predicted") if plan else ""
    ray_text = "" if ray_present or problems else "`spindle train` without Ray exits 1 naming the Ray-free entry points"
    part.summary = "; ".join(filter(None, [plan_text, *problems, ray_text]))


# ---------------------------------------------------------------------------------------------------------
# Part: pytest -m gpu
# ---------------------------------------------------------------------------------------------------------
def part_pytest(check: Check, part: PartResult) -> None:
    command = [check.python, "-m", "pytest", "-m", "gpu", "tests", "-v", "-rfE", "-p", "no:cacheprovider",
               "--continue-on-collection-errors", "-o", "timeout=120", "-W", "ignore::pytest.PytestConfigWarning"]
    result = check.run(part, command)
    counts: dict[str, int] = {}
    failures = []
    for line in result.output.splitlines():
        match = re.match(r"^(tests/\S+::\S+)\s+(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)", line)
        if match:
            counts[match.group(2).lower()] = counts.get(match.group(2).lower(), 0) + 1
        if re.match(r"^(FAILED|ERROR) ", line):
            failures.append(line[:300])
    summary_line = next((line.strip("= ") for line in reversed(result.output.splitlines())
                         if re.search(r"\d+ (passed|failed|skipped|deselected|error)", line)), "")
    part.details.update(counts=counts, failures=failures, pytest_summary=summary_line,
                        skip_reasons=sorted({m.group(1) for m in re.finditer(r"SKIPPED \[\d+\] [^:]+:\d+: (.*)",
                                                                            result.output)}))
    if result.timed_out:
        raise OverBudget(f"stopped after {result.seconds:.0f} s; so far {counts}")
    part.status = "ran"
    part.outcome = "ok" if result.returncode in (0, 5) and not failures else "failed"
    part.summary = summary_line or _last_error_line(result.output)


# ---------------------------------------------------------------------------------------------------------
# Part: two context-parallel ranks on one device
# ---------------------------------------------------------------------------------------------------------
def part_cp(check: Check, part: PartResult) -> None:
    on_gpu = bool(check.header.get("cuda_available"))
    attempts = [("nccl", 45.0), ("gloo", None)] if on_gpu else [("gloo", None)]
    device = "cuda" if on_gpu else "cpu"
    tried = []
    for backend, timeout in attempts:
        result_path = check.scratch / f"cp-{backend}.json"
        command = [check.python, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                   "-m", "spindle.benchmarks.gpu_check", "cp-worker", "--backend", backend, "--device", device,
                   "--result", result_path, "--run-dir", check.scratch / f"cp-run-{backend}",
                   *(["--tiny"] if check.dry_run else [])]
        result = check.run(part, command, timeout=timeout)
        record = json.loads(result_path.read_text()) if result_path.is_file() else {}
        usable = bool(record.get("backend_usable"))
        tried.append({"backend": backend, "exit_code": result.returncode, "timed_out": result.timed_out,
                      "backend_usable": usable, "error": record.get("backend_error") or
                      ("" if result.returncode == 0 else _last_error_line(result.output))})
        if usable:
            part.details.update(record)
            break
        if result.timed_out and timeout is None:
            raise OverBudget(f"the {backend} run was stopped after {result.seconds:.0f} s")
    part.details["backends_tried"] = tried
    part.status = "ran"
    if not part.details.get("backend_usable"):
        part.outcome = "failed"
        part.summary = "no backend ran two ranks on this device: " + "; ".join(
            f"{t['backend']}: {t['error']}" for t in tried)
        return
    checks = part.details.get("checks", [])
    bad = [c["name"] for c in checks if c.get("status") not in ("ok", "skipped")]
    skipped = [f"{c['name']} ({c['reason']})" for c in checks if c.get("status") == "skipped"]
    expected = len(_CP_CHECK_NAMES)
    part.outcome = "failed" if bad or len(checks) < expected else "ok"
    part.summary = (f"backend {part.details['backend']} on {device}: "
                    f"{sum(c.get('status') == 'ok' for c in checks)}/{expected} checks ok"
                    + (f"; failing: {', '.join(bad)}" if bad else "")
                    + (f"; skipped: {', '.join(skipped)}" if skipped else "")
                    + (f"; {expected - len(checks)} did not report (a rank died?)" if len(checks) < expected else ""))


def cp_worker(argv: Sequence[str]) -> int:
    """One rank of the two-rank check (under torchrun): collectives, CP ops against references, a cp=2 run."""
    parser = argparse.ArgumentParser(prog="gpu_check.py cp-worker")
    parser.add_argument("--backend", required=True)
    parser.add_argument("--device", required=True)
    parser.add_argument("--result", required=True)
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args(argv)

    import torch
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)
    record: dict = {"backend": args.backend, "device": str(device), "world_size": int(os.environ["WORLD_SIZE"]),
                    "backend_usable": False, "checks": []}

    def save() -> None:
        if rank == 0:
            Path(args.result).write_text(json.dumps(record, indent=1, default=str) + "\n")

    dist.init_process_group(args.backend, timeout=datetime.timedelta(seconds=60))
    try:
        probe = torch.full((4,), float(rank + 1), device=device)
        dist.all_reduce(probe)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        record["backend_usable"] = bool(probe[0].item() == 3.0)
    except Exception as error:  # e.g. NCCL refusing two ranks on one GPU
        record["backend_error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
        save()
        return 3
    save()
    for name, function in _cp_checks(args, device):
        started = time.perf_counter()
        try:
            outcome = function()
        except Exception as error:
            outcome = {"status": "error", "error": f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"}
        outcome.update(name=name, seconds=round(time.perf_counter() - started, 3))
        record["checks"].append(outcome)
        save()
    dist.barrier()
    dist.destroy_process_group()
    return 0


def _relative_error(value, reference) -> float:
    value, reference = value.detach().double(), reference.detach().double()
    return float((value - reference).norm() / reference.norm().clamp_min(1e-300))


def _cp_checks(args: argparse.Namespace, device) -> list[tuple[str, Callable[[], dict]]]:
    import torch
    import torch.distributed as dist

    group = dist.group.WORLD
    batch, heads, kv_heads, head_dim = (1, 4, 2, 16) if args.tiny else (1, 8, 2, 64)
    length = 128 if args.tiny else 2048
    # gloo copies CUDA tensors through the host for collectives, but its send/recv hand the device pointer to
    # the TCP transport: point-to-point (ring attention) only runs on CUDA tensors under NCCL.
    no_p2p = device.type == "cuda" and args.backend == "gloo"
    no_p2p_reason = "gloo has no send/recv for CUDA tensors (NCCL refused two ranks on one GPU)"

    def collectives() -> dict:
        from spindle.parallel.cp import shard, unshard

        rank, size = dist.get_rank(group), dist.get_world_size(group)
        gathered = torch.empty(size * 3, device=device)
        dist.all_gather_into_tensor(gathered, torch.full((3,), float(rank), device=device), group=group)
        scattered = torch.empty(2, device=device)
        dist.reduce_scatter_tensor(scattered, torch.arange(2.0 * size, device=device), group=group)
        ok = gathered.view(size, 3)[:, 0].tolist() == [float(r) for r in range(size)]
        ok = ok and scattered.tolist() == [size * (2.0 * rank), size * (2.0 * rank + 1)]
        ops = ["all_gather_into_tensor", "reduce_scatter_tensor"]
        if not no_p2p:
            outgoing, incoming = torch.full((5,), float(rank), device=device), torch.empty(5, device=device)
            requests = dist.batch_isend_irecv([dist.P2POp(dist.isend, outgoing, (rank + 1) % size, group),
                                               dist.P2POp(dist.irecv, incoming, (rank - 1) % size, group)])
            for request in requests:
                request.wait()
            ok = ok and incoming[0].item() == float((rank - 1) % size)
            ops.append("batch_isend_irecv")
        full = torch.arange(2 * size * 4, dtype=torch.float32, device=device).view(1, -1)
        roundtrip = unshard(shard(full, group, layout="zigzag"), group, layout="zigzag")
        ok = ok and torch.equal(roundtrip, full)
        return {"status": "ok" if ok else "mismatch", "ops": ", ".join([*ops, "shard/unshard"])
                + (f" (no send/recv: {no_p2p_reason})" if no_p2p else "")}

    def inputs(seed: int, value_heads: int) -> dict:
        generator = torch.Generator().manual_seed(seed)
        shapes = {"q": (batch, length, heads, head_dim), "k": (batch, length, value_heads, head_dim),
                  "v": (batch, length, value_heads, head_dim), "do": (batch, length, heads, head_dim),
                  "g": (batch, length, heads)}
        tensors = {name: torch.randn(*shape, generator=generator, dtype=torch.float64) for name, shape in shapes.items()}
        tensors["g"] = torch.nn.functional.logsigmoid(tensors["g"] + 3.0)  # per-token decay in (-inf, 0)
        return {name: tensor.to(device) for name, tensor in tensors.items()}

    def compare(run_cp, run_single, reference, full, names) -> dict:
        """Errors of the CP op and of the single-device op against the float64 reference (relative RMSE)."""
        from spindle.parallel.cp import shard

        ref_out, ref_grads = reference(full)
        local = {name: shard(full[name].float(), group, layout="zigzag").clone().requires_grad_() for name in names}
        output = run_cp(local)
        output.backward(shard(full["do"].float(), group, layout="zigzag"))
        errors = {"out": _relative_error(output, shard(ref_out, group, layout="zigzag"))}
        errors.update({f"d{n}": _relative_error(local[n].grad, shard(ref_grads[n], group, layout="zigzag")) for n in names})
        single = {name: full[name].float().clone().requires_grad_() for name in names}
        single_out = run_single(single)
        single_out.backward(full["do"].float())
        single_errors = {"out": _relative_error(single_out, ref_out)}
        single_errors.update({f"d{n}": _relative_error(single[n].grad, ref_grads[n]) for n in names})
        worst = max(errors[key] / max(single_errors[key], 1e-7) for key in errors)
        # fp32 inputs (TF32 matmuls on a GPU): the CP op may not be much worse than the single-device op
        ok = all(value < 2e-2 for value in errors.values()) and (worst < 8.0 or max(errors.values()) < 1e-5)
        return {"status": "ok" if ok else "mismatch", "shape": f"B={batch} T={length} H={heads} d={head_dim} fp32",
                "relative_error": {k: float(f"{v:.3g}") for k, v in errors.items()},
                "single_device_error": {k: float(f"{v:.3g}") for k, v in single_errors.items()},
                "worst_ratio_to_single_device": round(worst, 2)}

    def linear_reference(full):
        q, k, v, g = (full[n].clone().requires_grad_() for n in ("q", "k", "v", "g"))
        cumulative = g.cumsum(1)
        difference = cumulative[:, :, None, :] - cumulative[:, None, :, :]
        causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()[None, :, :, None]
        scores = torch.einsum("bihd,bjhd->bijh", q, k) * torch.exp(difference.masked_fill(~causal, float("-inf")))
        output = head_dim**-0.5 * torch.einsum("bijh,bjhv->bihv", scores, v)
        output.backward(full["do"])
        return output.detach(), {"q": q.grad, "k": k.grad, "v": v.grad, "g": g.grad}

    def softmax_reference(full):
        q, k, v = (full[n].clone().requires_grad_() for n in ("q", "k", "v"))
        repeat = heads // kv_heads
        scores = head_dim**-0.5 * torch.einsum("bihd,bjhd->bhij", q, k.repeat_interleave(repeat, 2))
        mask = torch.ones(length, length, dtype=torch.bool, device=device).tril()
        probabilities = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
        output = torch.einsum("bhij,bjhd->bihd", probabilities, v.repeat_interleave(repeat, 2))
        output.backward(full["do"])
        return output.detach(), {"q": q.grad, "k": k.grad, "v": v.grad}

    def lasp2_check() -> dict:
        from spindle.kernels import linear_attention
        from spindle.parallel.cp import lasp2

        def single(t):
            result = linear_attention(t["q"], t["k"], t["v"], log_decay=t["g"])
            return result[0] if isinstance(result, tuple) else result

        full = inputs(1, heads)
        return compare(lambda t: lasp2(t["q"], t["k"], t["v"], group, layout="zigzag", log_decay=t["g"]), single,
                       linear_reference, full, ("q", "k", "v", "g"))

    def softmax_check(scheme: str) -> Callable[[], dict]:
        def run() -> dict:
            if scheme == "ring" and no_p2p:
                return {"status": "skipped", "reason": no_p2p_reason}
            from spindle.kernels import attention
            from spindle.parallel.cp import allgather_attention, ring_attention

            op = {"allgather": allgather_attention, "ring": ring_attention}[scheme]
            full = inputs(2, kv_heads)
            return compare(lambda t: op(t["q"], t["k"], t["v"], group, layout="zigzag"),
                           lambda t: attention(t["q"], t["k"], t["v"], causal=True), softmax_reference, full,
                           ("q", "k", "v"))
        return run

    def trainer_run() -> dict:
        from spindle.runtime.config import load_config
        from spindle.runtime.main import train_entry

        seq_len = 256 if args.tiny else 4096
        softmax_scheme = "allgather" if no_p2p else "ring"
        overrides = ["parallel.cp=2", "parallel.dp=1", "parallel.cp_linear=lasp2", f"parallel.cp_softmax={softmax_scheme}",
                     "train.steps=3", "train.global_batch=1", "train.micro_batch=1", "train.warmup_steps=1",
                     f"data.seq_len={seq_len}", "checkpoint.every=0", "logging.wandb=disabled",
                     "logging.progress=false", "launch.use_gpu=auto"]
        config = load_config("configs/tiny.yaml", overrides)
        final = train_entry(config, args.run_dir, "never")
        lines = (Path(args.run_dir) / "metrics.jsonl").read_text().splitlines()
        losses = [round(json.loads(line)["loss"], 4) for line in lines]
        finite = all(loss == loss and abs(loss) != float("inf") for loss in losses)
        return {"status": "ok" if finite and len(losses) == 3 else "mismatch",
                "config": f"configs/tiny.yaml seq_len {seq_len}, cp=2 (lasp2 + {softmax_scheme}), 3 steps",
                "losses": losses, "final_step": final.get("step") if final else None}

    checks = {"collectives": collectives, "lasp2": lasp2_check, "allgather_attention": softmax_check("allgather"),
              "ring_attention": softmax_check("ring"), "trainer cp=2": trainer_run}
    return [(name, checks[name]) for name in _CP_CHECK_NAMES]


_CP_CHECK_NAMES = ("collectives", "lasp2", "allgather_attention", "ring_attention", "trainer cp=2")


# ---------------------------------------------------------------------------------------------------------
# Part: kernel benchmark
# ---------------------------------------------------------------------------------------------------------
def _kernel_runs(dry_run: bool) -> list[tuple[str, dict[str, str], set[str]]]:
    """(label, options, options without which the run is skipped): the kernel issue's two shapes."""
    if dry_run:
        return [("tiny", {"--batch": "1", "--heads": "2", "--dim": "16", "--lengths": "64", "--dtype": "fp32",
                          "--warmup": "1", "--repeats": "2"}, {"--lengths"})]
    # softmax attention at 1M tokens would take minutes: that run needs a way to leave it out
    timing = {"--warmup": "2", "--repeats": "5"}  # medians of 5: both shapes fit the part's time box
    return [("32k", {"--batch": "4", "--heads": "32", "--dim": "128", "--lengths": "32768", "--dtype": "bf16",
                     **timing}, {"--lengths"}),
            ("1m", {"--batch": "1", "--heads": "10", "--dim": "64", "--lengths": "1048576", "--dtype": "bf16",
                    "--decay": "constant", "--softmax": "", **timing}, {"--lengths", "--softmax", "--heads", "--dim"})]


def _run_kernels(check: Check, part: PartResult, options: dict[str, str], required: set[str],
                 folder: Path, timeout: float) -> tuple[CommandResult | None, list[str]]:
    """`spindle bench kernels` with ``options``, writing into ``folder``; options the benchmark rejects as
    unrecognized are dropped and the run repeated (its CLI is free to change). Returns the result (None when
    a required option is not offered) and the dropped options."""
    options = dict(options)
    output_flag, dropped = "--out", []
    for _ in range(3):
        target = str(folder) if output_flag == "--out" else str(folder / "kernels.md")
        arguments = [item for flag, value in options.items() for item in (flag, value)]
        result = check.run(part, check.spindle("bench", "kernels", *arguments, output_flag, target), timeout=timeout)
        unknown = re.search(r"unrecognized arguments: (.*)", result.output)
        if result.returncode != 2 or not unknown:
            return result, dropped
        rejected = set(unknown.group(1).split())
        if output_flag in rejected:
            output_flag = "--output"
        for flag in [flag for flag in options if flag in rejected]:
            dropped.append(flag)
            del options[flag]
        if required & set(dropped):
            return None, dropped
    return result, dropped


def part_kernels(check: Check, part: PartResult) -> None:
    runs, failures = [], []
    planned = _kernel_runs(check.dry_run)
    for index, (label, options, required) in enumerate(planned):
        folder = check.scratch / f"kernels-{label}"
        folder.mkdir(parents=True, exist_ok=True)
        share = (check.part_deadline - time.monotonic()) / (len(planned) - index)  # one shape cannot starve the next
        result, dropped = _run_kernels(check, part, options, required, folder, share)
        if result is None:
            runs.append({"label": label, "skipped": f"`spindle bench kernels` offers no {', '.join(sorted(required & set(dropped)))}"})
            continue
        run = {"label": label, "exit_code": result.returncode, "seconds": round(result.seconds, 1),
               "options_not_offered": dropped, "tables": [], "json": []}
        for markdown in sorted(folder.glob("*.md")):
            run["tables"].append(markdown.read_text())
        for data in sorted(folder.glob("*.json")):
            try:
                run["json"].append(json.loads(data.read_text()))
            except ValueError:
                pass
        plots = sorted(folder.glob("*.png"))
        copied = None
        if plots and len(part.details.get("plots", [])) < MAX_KERNEL_PLOTS:
            copied = f"kernels-{label}.png"
            shutil.copyfile(plots[0], check.out / copied)
            part.details.setdefault("plots", []).append(copied)
        # the tables link their plot by its name in the run's folder: point them at the copy, or drop the link
        for plot in plots:
            link = re.compile(r"!\[[^\]]*\]\(" + re.escape(plot.name) + r"\)")
            run["tables"] = [link.sub(lambda match: match.group(0).replace(plot.name, copied) if copied and plot == plots[0]
                                      else "", table) for table in run["tables"]]
        runs.append(run)
        if result.timed_out:
            failures.append(f"{label}: stopped at its {share:.0f} s share of the time box")
        elif result.returncode != 0:
            failures.append(f"{label}: {_last_error_line(result.output)}")
    part.details["runs"] = runs
    if runs and all(run.get("exit_code") is None and "skipped" not in run for run in runs):
        raise OverBudget("; ".join(failures))
    part.status = "ran"
    part.outcome = "failed" if failures else "ok"
    part.summary = "; ".join(failures) if failures else "runs: " + ", ".join(
        r["label"] + (f" skipped ({r['skipped']})" if "skipped" in r else "") for r in runs)


# ---------------------------------------------------------------------------------------------------------
# Part: the 1M-token preset through the trainer
# ---------------------------------------------------------------------------------------------------------
TINY_MODEL = ["model.dim=64", "model.heads=4", "model.kv_heads=2", "model.n_layers=8", "model.vocab_size=512",
              "data.seq_len=512", "train.precision=fp32", "launch.use_gpu=auto"]


def part_preset(check: Check, part: PartResult) -> None:
    steps = 2  # the first includes Triton compilation; about 30 s each at 1M tokens on an H200 (planner)
    overrides = [*(TINY_MODEL if check.dry_run else []), f"train.steps={steps}", "train.warmup_steps=1",
                 "checkpoint.every=0", "logging.wandb=disabled", "logging.progress=false"]
    plan = _plan(check, part, [o for o in overrides if not o.startswith("launch.")])
    run_dir = check.scratch / "preset-1m"
    sets = [item for override in overrides for item in ("--set", override)]
    result = check.run(part, [check.python, "-m", "spindle.runtime.main", PRESET, *sets, "--run-dir", run_dir,
                              "--resume", "never"])
    metrics_path = run_dir / "metrics.jsonl"
    records = []
    if metrics_path.is_file():
        for line in metrics_path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                pass
    keep = ("step", "loss", "tokens_per_s", "elapsed_s", "peak_mem_gb", "mfu", "grad_norm")
    part.details.update(plan=plan, overrides=overrides, steps=[{k: r.get(k) for k in keep} for r in records])
    if records:
        peak_gib = max(r.get("peak_mem_gb") or 0 for r in records) * 1e9 / 2**30
        part.details["peak_gib"] = peak_gib
        if plan:
            part.details["measured_over_planned"] = peak_gib / plan["total_gib"]
    if result.timed_out:
        raise OverBudget(f"stopped after {result.seconds:.0f} s with {len(records)} of {steps} steps done")
    part.status = "ran"
    part.outcome = "ok" if result.returncode == 0 and len(records) == steps else "failed"
    if part.outcome == "failed":
        part.summary = f"exit {result.returncode}: {_last_error_line(result.output)}"
        return
    last = records[-1]
    part.summary = (f"{steps} steps, last: loss {last['loss']:.3f}, {last['tokens_per_s']:,.0f} tokens/s, "
                    f"peak {part.details['peak_gib']:.2f} GiB" +
                    (f" (planned {plan['total_gib']:.2f} GiB, ratio {part.details['measured_over_planned']:.2f})"
                     if plan else ""))


# ---------------------------------------------------------------------------------------------------------
# Part: end-to-end benchmark
# ---------------------------------------------------------------------------------------------------------
def part_e2e(check: Check, part: PartResult) -> None:
    folder = check.scratch / "e2e"
    budget = max(5.0, check.part_deadline - time.monotonic() - 25.0)  # start-up and the final plot
    if check.dry_run:
        options = ["--device", "cpu", "--seq-lens", "128", "--warmup", "0", "--steps", "1"]
    else:
        # one warm-up and one timed step per case: seconds-long steps at long lengths, more lengths in the box
        options = ["--seq-lens", "8192,32768,131072,524288,1048576", "--warmup", "1", "--steps", "1"]
    command = check.spindle("bench", "e2e", "--models", "linear,hybrid-1:7,softmax,rattention-1:7", *options,
                            "--budget-s", f"{budget:.0f}", "--output", str(folder / "e2e.md"))
    result = check.run(part, command)
    rows = []
    if (folder / "e2e.json").is_file():
        rows = json.loads((folder / "e2e.json").read_text())
    part.details["rows"] = rows
    if (folder / "e2e.png").is_file():
        shutil.copyfile(folder / "e2e.png", check.out / "e2e.png")
        part.details["plots"] = ["e2e.png"]
    if result.timed_out:
        raise OverBudget(f"stopped after {result.seconds:.0f} s with {len(rows)} case(s) recorded")
    part.status = "ran"
    measured = [r for r in rows if r["status"] == "ok"]
    part.outcome = "ok" if result.returncode == 0 and measured else "failed"
    part.summary = (f"{len(measured)} of {len(rows)} cases measured" if part.outcome == "ok"
                    else f"exit {result.returncode}: {_last_error_line(result.output)}")


PARTS = [
    PartSpec("install", "Install spindle onto this machine's torch (no dependencies, no index)", 90, 60, part_install),
    PartSpec("environment", "Machine, versions, commit", 30, 30, part_environment),
    PartSpec("cli", "CLI without Ray: plan works, train explains", 40, 40, part_cli),
    PartSpec("pytest-gpu", "pytest -m gpu", 100, 60, part_pytest),
    PartSpec("cp-2rank", "Context parallelism with two ranks on one device", 60, 60, part_cp),
    PartSpec("bench-kernels", "spindle bench kernels", 75, 40, part_kernels),
    PartSpec("preset-1m", f"{PRESET} through the trainer", 110, 40, part_preset),
    PartSpec("bench-e2e", "spindle bench e2e", 120, 45, part_e2e),
]
NEEDS_SPINDLE = {"cli", "pytest-gpu", "cp-2rank", "bench-kernels", "preset-1m", "bench-e2e"}


# ---------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------
def _status_text(part: PartResult) -> str:
    if part.status == "ran":
        return f"ran: {part.outcome}"
    return f"{part.status}" + (f" ({part.reason})" if part.reason else "")


def _environment_lines(header: dict) -> list[str]:
    modules = header.get("optional_modules", {})
    rows = [("GPU", f"{header.get('gpu', 'none (no CUDA device)')}" + (f", {header['gpu_memory_gib']} GiB, "
                                                                        f"compute capability {header['capability']}, "
                                                                        f"{header['sms']} SMs" if "gpu" in header else "")),
            ("driver", header.get("driver", "unknown (no nvidia-smi)")),
            ("torch", f"{header.get('torch', '?')} (CUDA {header.get('torch_cuda')})"
                      + (f", NCCL {header['nccl']}" if "nccl" in header else "")),
            ("triton", header.get("triton", "?")),
            ("Python", f"{header.get('python', '?')} ({header.get('python_executable', '?')})"),
            ("git commit", f"{header.get('git_commit', '?')}{' (uncommitted changes)' if header.get('git_dirty') else ''}"),
            ("date", header.get("date_utc", "?")),
            ("CPUs", str(header.get("host_cpus", "?"))),
            ("installed", ", ".join(n for n, present in modules.items() if present) or "?"),
            ("not installed", ", ".join(n for n, present in modules.items() if not present) or "none")]
    return ["| | |", "|---|---|", *(f"| {key} | {value} |" for key, value in rows)]


def _number(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _part_section(part: PartResult) -> list[str]:
    lines = [f"## {part.name}: {part.title}", "", f"Status: **{_status_text(part)}** in {part.seconds:.1f} s "
             f"(budget {part.budget_s:.0f} s). {part.summary}", ""]
    if part.commands:
        lines += ["```", *part.commands, "```", ""]
    details = part.details
    if part.outcome == "failed" or part.status == "over budget":
        for failed in details.get("nonzero_exits", [])[-2:]:
            lines += [f"Last lines of `{failed['command'][:160]}` "
                      f"({'stopped at the time box' if failed['timed_out'] else 'exit ' + str(failed['exit_code'])}):",
                      "", "```", failed["output_tail"], "```", ""]
    if part.name == "pytest-gpu" and details.get("failures"):
        lines += ["Failures:", "", *(f"- `{line}`" for line in details["failures"]), ""]
    if part.name == "pytest-gpu" and details.get("skip_reasons"):
        lines += ["Skip reasons: " + "; ".join(details["skip_reasons"]), ""]
    if part.name == "cp-2rank":
        for tried in details.get("backends_tried", []):
            lines.append(f"- backend {tried['backend']}: {'usable' if tried['backend_usable'] else 'not usable'}"
                         + (f" ({tried['error']})" if tried.get("error") else ""))
        if details.get("checks"):
            lines += ["", "| check | status | s | relative error (CP) | single device | detail |", "|---|---|---|---|---|---|"]
            for c in details["checks"]:
                detail = c.get("error") or c.get("reason") or c.get("shape") or c.get("config", "") or c.get("ops", "")
                if c.get("losses"):
                    detail += f"; losses {c['losses']}"
                lines.append(f"| {c['name']} | {c.get('status')} | {c.get('seconds', 0):.2f} | "
                             f"{c.get('relative_error', '')} | {c.get('single_device_error', '')} | {detail} |")
        lines.append("")
    if part.name == "bench-kernels":
        for run in details.get("runs", []):
            if "skipped" in run:
                lines += [f"### kernels, {run['label']}: skipped ({run['skipped']})", ""]
                continue
            ended = "stopped at its time share" if run["exit_code"] is None else f"exit {run['exit_code']}"
            lines.append(f"### kernels, {run['label']} ({ended}, {run['seconds']} s)")
            if run.get("options_not_offered"):
                lines.append(f"Options not offered by this `spindle bench kernels`: {', '.join(run['options_not_offered'])}")
            for table in run.get("tables", []):
                lines += ["", *(("#" * 2 + line) if line.startswith("#") else line for line in table.splitlines())]
            lines.append("")
        lines += [f"![kernel benchmark]({name})" for name in details.get("plots", [])] + [""]
    if part.name == "preset-1m" and details.get("steps"):
        lines += ["| step | loss | tokens/s | MFU % | peak GB (1e9) | elapsed s |", "|---|---|---|---|---|---|"]
        for r in details["steps"]:
            mfu = None if r.get("mfu") is None else 100 * r["mfu"]
            lines.append(f"| {r['step']} | {_number(r.get('loss'), '.4f')} | {_number(r.get('tokens_per_s'), ',.0f')} | "
                         f"{_number(mfu, '.1f')} | {_number(r.get('peak_mem_gb'), '.2f')} | {_number(r.get('elapsed_s'), '.1f')} |")
        plan = details.get("plan")
        if plan:
            lines += ["", f"Planner: peak {plan['total_gib']:.2f} GiB of {plan['usable_gib']:.1f} usable, "
                          f"{plan['step_s']:.2f} s per step, {plan['tokens_per_s']:,.0f} tokens/s predicted; measured "
                          f"peak {_number(details.get('peak_gib'), '.2f')} GiB "
                          f"(torch.cuda.max_memory_allocated on a GPU, max RSS on a CPU)."]
        lines.append("")
    if part.name == "bench-e2e" and details.get("rows"):
        lines += ["| model | seq_len | step s | tokens/s | MFU % | peak GiB | planned GiB | measured/planned | status |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in details["rows"]:
            mfu = None if r.get("mfu") is None else 100 * r["mfu"]
            lines.append(f"| {r['model']} | {r['seq_len']:,} | {_number(r.get('step_s'), '.3f')} | "
                         f"{_number(r.get('tokens_per_s'), ',.0f')} | {_number(mfu, '.1f')} | {_number(r.get('peak_gib'), '.3f')} | "
                         f"{_number(r.get('planned_gib'), '.3f')} | {_number(r.get('ratio'), '.2f')} | {r['status']} |")
        lines += ["", *[f"![end-to-end benchmark]({name})" for name in details.get("plots", [])], ""]
    if part.name == "install" and details.get("throwaway_env"):
        env = details["throwaway_env"]
        lines += [f"Dry run: installed into a throwaway virtualenv ({env['linked_entries']} entries of this environment "
                  f"linked; hidden like on the GPU machine: {', '.join(env['hidden']) or 'nothing'}).", ""]
    return lines


def write_report(check: Check, parts: list[PartResult], finished: bool) -> None:
    total = time.monotonic() - check.started
    title = "GPU check" + (" — DRY RUN on a CPU with tiny shapes (plumbing only; the numbers mean nothing)"
                           if check.dry_run else "")
    lines = [f"# {title}", "",
             f"Command: `{shlex.join(['python3', 'benchmarks/gpu_check.py', *check.argv])}` "
             f"(or `make gpu-check{' DRY_RUN=1' if check.dry_run else ''}`); total {total:.0f} s of a "
             f"{check.budget_s:.0f} s budget{'' if finished else '; still running (partial report)'}.", "",
             *_environment_lines(check.header), "",
             "| part | status | seconds | budget s | summary |", "|---|---|---|---|---|",
             *(f"| {p.name} | {_status_text(p)} | {p.seconds:.1f} | {p.budget_s:.0f} | {p.summary.replace('|', '/')} |"
               for p in parts), ""]
    if (check.out / "gpu-check-parts.png").is_file():
        lines += ["![time per part](gpu-check-parts.png)", ""]
    for part in parts:
        if part.status != "pending":
            lines += _part_section(part)
    lines += ["Every command's full output is in [gpu-check.log](gpu-check.log); all numbers in "
              "[gpu-check.json](gpu-check.json)."]
    (check.out / "gpu-check.md").write_text("\n".join(lines) + "\n")
    document = {"dry_run": check.dry_run, "finished": finished, "total_s": round(total, 1), "budget_s": check.budget_s,
                "command": shlex.join(["python3", "benchmarks/gpu_check.py", *check.argv]),
                "environment": check.header, "parts": [dataclasses.asdict(p) for p in parts]}
    (check.out / "gpu-check.json").write_text(json.dumps(document, indent=1, default=str) + "\n")


def plot_parts(check: Check, parts: list[PartResult]) -> None:
    """Seconds per part against its budget, coloured by status."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    colours = {"ok": "tab:green", "failed": "tab:red", "skipped": "tab:gray", "over budget": "tab:orange"}
    figure, axis = plt.subplots(figsize=(8, 3.2))
    names = [p.name for p in parts][::-1]
    ordered = parts[::-1]
    axis.barh(names, [p.budget_s for p in ordered], color="none", edgecolor="black", label="budget")
    axis.barh(names, [p.seconds for p in ordered],
              color=[colours.get(p.outcome if p.status == "ran" else p.status, "tab:blue") for p in ordered])
    axis.set_xlabel("seconds (bar: used; outline: budget). green ok, red failed, orange over budget, grey skipped")
    axis.xaxis.label.set_size(8)
    figure.tight_layout()
    figure.savefig(check.out / "gpu-check-parts.png", dpi=110)
    plt.close(figure)


# ---------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------
def run_parts(check: Check, only: set[str] | None) -> list[PartResult]:
    parts = [PartResult(spec.name, spec.title,
                        check.budget_scale * (spec.dry_budget_s if check.dry_run else spec.gpu_budget_s)) for spec in PARTS]
    write_report(check, parts, finished=False)
    for spec, part in zip(PARTS, parts):
        if only is not None and spec.name not in only:
            part.status, part.reason = "skipped", "not selected (--only)"
            continue
        if spec.name in NEEDS_SPINDLE and not check.installed:
            part.status, part.reason = "skipped", "spindle is not importable (see install)"
            continue
        granted = min(part.budget_s, check.left())
        if granted < MINIMUM_PART_S:
            part.status, part.reason = "skipped", f"total budget spent ({max(check.left(), 0):.0f} s left)"
            continue
        check.part_deadline = time.monotonic() + granted
        started = time.monotonic()
        print(f"gpu-check: {spec.name} (up to {granted:.0f} s) ...", flush=True)
        try:
            spec.function(check, part)
        except OverBudget as stop:
            part.status, part.reason = "over budget", str(stop)
            part.summary = part.summary or f"stopped at its {granted:.0f} s time box"
        except Stopped:
            part.status, part.reason = "over budget", "the whole check was stopped from outside (SIGTERM)"
            part.seconds = time.monotonic() - started
            for later in parts:
                if later.status == "pending":
                    later.status, later.reason = "skipped", "the whole check was stopped from outside"
            write_report(check, parts, finished=False)
            raise
        except Exception as error:  # a broken part is recorded, the next one still runs
            part.status, part.outcome = "ran", "failed"
            part.summary = f"the check itself failed: {type(error).__name__}: {error}"
        part.seconds = time.monotonic() - started
        print(f"gpu-check: {spec.name}: {_status_text(part)} in {part.seconds:.1f} s — {part.summary}", flush=True)
        write_report(check, parts, finished=False)
    return parts


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", default=os.environ.get("DRY_RUN", "") not in ("", "0"),
                        help="run every part on the CPU with tiny shapes (also DRY_RUN=1)")
    parser.add_argument("--out", default=os.environ.get("GPU_CHECK_OUT") or None,
                        help=f"report folder (GPU_CHECK_OUT; default {DEFAULT_OUT}, dry run {DRY_RUN_OUT})")
    parser.add_argument("--budget-s", type=float, default=None,
                        help=f"total seconds (default {GPU_BUDGET_S:.0f}, dry run {DRY_RUN_BUDGET_S:.0f})")
    parser.add_argument("--python", default=None,
                        help="the Python with torch to install spindle into (default: the one running this script)")
    parser.add_argument("--budget-scale", type=float, default=1.0,
                        help="multiply every part's budget and the total by this (a slow or busy machine)")
    parser.add_argument("--only", default=None, help="comma-separated parts to run (install always runs)")
    parser.add_argument("--keep-scratch", action="store_true", help="keep the temporary folder (runs, throwaway venv)")
    return parser


def preflight(python: str) -> str | None:
    """Why the real (not dry) check cannot run with ``python``: no torch to install onto, or no CUDA GPU."""
    probe = "import torch; print('CUDA', torch.cuda.is_available())"
    try:
        result = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"{python} did not run ({error})"
    if "CUDA" not in result.stdout:
        return (f"{python} cannot import torch: the GPU check installs spindle onto an existing PyTorch; name the "
                f"Python that has it with --python (make gpu-check GPU_PYTHON=...)")
    if "CUDA True" not in result.stdout:
        return (f"{python} sees no CUDA GPU; on a machine without one run the rehearsal instead: "
                f"make gpu-check DRY_RUN=1 (python3 benchmarks/gpu_check.py --dry-run)")
    return None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["cp-worker"]:
        return cp_worker(argv[1:])
    args = build_parser().parse_args(argv)
    args.argv = argv
    args.out = args.out or (DRY_RUN_OUT if args.dry_run else DEFAULT_OUT)
    if args.budget_scale <= 0:
        print(f"gpu_check.py: error: --budget-scale must be positive, got {args.budget_scale}", file=sys.stderr)
        return 2
    args.budget_s = args.budget_s or args.budget_scale * (DRY_RUN_BUDGET_S if args.dry_run else GPU_BUDGET_S)
    only = None if args.only is None else {"install", "environment", *args.only.split(",")}
    if only is not None and (unknown := only - {spec.name for spec in PARTS}):
        print(f"gpu_check.py: error: unknown part(s) {', '.join(sorted(unknown))}: choose from "
              f"{', '.join(spec.name for spec in PARTS)}", file=sys.stderr)
        return 2
    if not args.dry_run and (problem := preflight(args.python or sys.executable)):
        print(f"gpu_check.py: error: {problem}. Nothing was installed.", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*(out / name for name in OUTPUT_FILES), *out.glob("kernels-*.png")]:
        stale.unlink(missing_ok=True)  # only files this check writes
    check = Check(args)
    check.log(f"gpu-check started {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M:%S} UTC in {REPO}")
    signal.signal(signal.SIGTERM, _raise_stopped)
    parts: list[PartResult] = []
    try:
        parts = run_parts(check, only)
        plot_parts(check, parts)
        write_report(check, parts, finished=True)
    except (Stopped, KeyboardInterrupt):
        print("gpu-check: stopped from outside; the report so far is in place", file=sys.stderr, flush=True)
        return 1
    finally:
        if not check.keep_scratch:
            shutil.rmtree(check.scratch, ignore_errors=True)
    print(f"gpu-check: report {out / 'gpu-check.md'} ({time.monotonic() - check.started:.0f} s)", flush=True)
    broken = [p.name for p in parts if p.status == "ran" and p.outcome == "failed" or p.status == "over budget"]
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
