"""A multi-host Ray cluster on one machine, for tests: every host in its own Linux network namespace.

    from netns import multihost_bed            # a module-scoped pytest fixture: one bed per test module

    def test_something(multihost_bed):
        bed = multihost_bed
        bed.run("drv", ["spindle", "submit", CONFIG, "--address", bed.dashboard_url], env=bed.environment())

Layout (namespaces are named ``<prefix>-<host>``, prefix ``spn<pid><letter>``; all of them are deleted
in ``close()``; nothing is added to the machine's own network namespace):

    <prefix>-sw     the "switch": a bridge with one veth port per host
    <prefix>-head   10.213.X.1    Ray head: GCS :6379, dashboard / Jobs API :8265;
                                  0 CPUs by default (ranks run on worker hosts, as on a real cluster)
    <prefix>-w1     10.213.X.11   Ray worker host, ``worker_cpus`` CPUs, custom resource host_w1 = 1
    <prefix>-w2     10.213.X.12   ... (``workers`` of them)
    <prefix>-drv    10.213.X.100  no Ray at first: the machine a user drives the cluster from;
                                  ``join_driver_node()`` makes it a Ray node with 0 CPUs

Each host has its own address (the only one besides loopback in its namespace, and a default route
through its link so Ray's own address detection finds it), its own Ray temp dir, and its own
processes: a host's processes are exactly those living in its namespace, so

    bed.pids(host)           every process of the host (``ip netns pids``)
    bed.host_of_pid(pid)     which host a process runs on (None: not on the bed)
    bed.kill_host(host)      SIGKILL every process of the host (a machine that loses power)
    bed.link_down(host)      take the host's link down (its processes keep running, unreachable)
    bed.link_up(host)        ... and back up
    bed.restart_host(host)   bring a killed / cut host back: link up, `ray start` again, wait until
                             the head sees it alive
    bed.alive_nodes()        {node ip: resources} of the nodes the head reports alive
    bed.wait_nodes(ips)      wait until exactly those nodes (by ip) are alive

Running things on a host: ``bed.command(host, argv)`` is argv prefixed to run in the host's namespace
(nsenter, else ``ip netns exec``); ``bed.popen(host, argv, **kw)`` / ``bed.run(host, argv, timeout, **kw)``
run it; ``bed.environment(**extra)`` is the environment a client of this cluster needs (the venv's
bin on PATH, one OMP thread, the cluster's auth token, no RAY_ADDRESS). ``bed.http_get(host, url)``
fetches a URL from inside a host's namespace (the test process itself lives outside every bed
namespace and cannot reach 10.213.X.* directly; a helper thread enters the namespace for one request).

The cluster uses Ray's token authentication with a token file private to the bed (0600). The module
fixture's head declares a silent node dead within about 5-10 s (``FAST_NODE_DEATH``).
``SPINDLE_NETNS_KEEP_LOGS=1`` keeps the bed's directory (every host's Ray logs) after ``close()``.

What is shared, unlike separate machines: the filesystem (a run directory under ``bed.root`` plays the
shared storage), the hostname, and the process table (Ray finds "local" raylets and GCS servers by
scanning it, so it sees every host's; spindle's driver therefore picks its node by address).
``netns_unavailable_reason()`` says why a bed cannot be built here (not root, no ``ip``, the kernel
refuses namespaces or veth pairs), and the fixture skips with that reason.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import pytest

NETNS_DIR = Path("/run/netns")
VENV_BIN = Path(sys.executable).parent
GCS_PORT, DASHBOARD_PORT = 6379, 8265
OBJECT_STORE_BYTES = 128 * 1024**2
"""Per node; Ray's minimum is about 75 MiB, and the tests move kilobytes."""
START_TIMEOUT_S = 120.0
NODE_SETTINGS = {
    # A loaded CI machine can take longer than Ray's default 30 s for a raylet to register.
    "RAY_raylet_start_wait_time_s": "120",
    # No idle Python workers started ahead of time: spindle's workers need their own runtime environment
    # and never reuse them, and each costs seconds of CPU on a two-core machine.
    "RAY_enable_worker_prestart": "0", "RAY_prestart_worker_first_driver": "0", "RAY_num_prestart_python_workers": "0",
}
"""Ray settings (environment) of every node's `ray start`."""
_PREFIX_PATTERN = re.compile(r"^spn(\d+)([a-z])-")
_CLONE_NEWNET = 0x40000000
T = TypeVar("T")


class BedError(RuntimeError):
    """The bed could not be built or a host did not come up; the message says what and where its logs are."""


# ---------------------------------------------------------------------------------------------
# Can this machine host a bed?
# ---------------------------------------------------------------------------------------------
def _ip(*arguments: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["ip", *arguments], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise BedError(f"`ip {' '.join(arguments)}` failed: {result.stderr.strip() or result.returncode}")
    return result


def netns_unavailable_reason() -> str | None:
    """None when network namespaces, veth pairs and bridges can be created here, else why not."""
    if sys.platform != "linux":
        return f"network namespaces need Linux (this is {sys.platform})"
    if os.geteuid() != 0:
        return "creating network namespaces needs root (this test runs as uid %d)" % os.geteuid()
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    probe = f"spn{os.getpid()}z-probe"
    try:
        for arguments in (("netns", "add", probe), ("-n", probe, "link", "add", "probe0", "type", "veth", "peer",
                                                     "name", "probe1"),
                          ("-n", probe, "link", "add", "probebr", "type", "bridge")):
            result = _ip(*arguments, check=False)
            if result.returncode != 0:
                return (f"the kernel refused `ip {' '.join(arguments)}`: {result.stderr.strip()} (a container "
                        f"without CAP_SYS_ADMIN / CAP_NET_ADMIN cannot create network namespaces)")
    finally:
        _ip("netns", "delete", probe, check=False)
    if _ray_executable() is None:
        return f"Ray's `ray` command is not installed next to {sys.executable}"
    return None


def _ray_executable() -> str | None:
    candidate = VENV_BIN / "ray"
    return str(candidate) if candidate.exists() else shutil.which("ray")


# ---------------------------------------------------------------------------------------------
# Namespaces
# ---------------------------------------------------------------------------------------------
def _namespace_identity(path: str | os.PathLike) -> tuple[int, int] | None:
    try:
        status = os.stat(path)
    except OSError:
        return None
    return status.st_dev, status.st_ino


def _pids_in(namespace: str) -> list[int]:
    """Every process whose network namespace is ``namespace`` (what `ip netns pids` prints)."""
    identity = _namespace_identity(NETNS_DIR / namespace)
    if identity is None:
        return []
    own = os.getpid()
    return [int(entry) for entry in os.listdir("/proc")
            if entry.isdigit() and int(entry) != own and _namespace_identity(f"/proc/{entry}/ns/net") == identity]


def _kill_namespace_processes(namespace: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while (pids := _pids_in(namespace)) and time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)


def _delete_namespace(namespace: str) -> None:
    _kill_namespace_processes(namespace)
    _ip("netns", "delete", namespace, check=False)


def sweep_stale_beds() -> list[str]:
    """Delete the namespaces (and their processes and temp dirs) of beds whose test process is gone
    (a run killed with SIGKILL cannot clean up after itself); returns what was removed."""
    removed = []
    for path in sorted(NETNS_DIR.glob("spn*")) if NETNS_DIR.is_dir() else []:
        match = _PREFIX_PATTERN.match(path.name)
        if match is None or Path(f"/proc/{match.group(1)}").exists():
            continue
        _delete_namespace(path.name)
        shutil.rmtree(Path(tempfile.gettempdir()) / f"spn{match.group(1)}{match.group(2)}", ignore_errors=True)
        removed.append(path.name)
    return removed


def _new_prefix() -> str:
    """spn<pid><letter>: the pid says whose bed it is (sweep_stale_beds), the letter tells beds of
    one process apart."""
    taken = {path.name.split("-", 1)[0] for path in NETNS_DIR.glob(f"spn{os.getpid()}*")} if NETNS_DIR.is_dir() else set()
    for letter in "abcdefghijklmnopqrstuvwxy":
        prefix = f"spn{os.getpid()}{letter}"
        if prefix not in taken and not (Path(tempfile.gettempdir()) / prefix).exists():
            return prefix
    raise BedError(f"process {os.getpid()} already has 25 beds")


def _in_namespace(namespace: str, function: Callable[[], T]) -> T:
    """Run ``function`` on a helper thread that first enters ``namespace`` (setns on a thread moves
    only that thread; sockets it creates stay in that namespace)."""
    outcome: dict[str, object] = {}

    def target() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        descriptor = os.open(NETNS_DIR / namespace, os.O_RDONLY)
        try:
            if libc.setns(descriptor, _CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns into {namespace}")
            outcome["value"] = function()
        except BaseException as error:  # handed to the caller's thread
            outcome["error"] = error
        finally:
            os.close(descriptor)

    thread = threading.Thread(target=target, name=f"netns-{namespace}", daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# The bed
# ---------------------------------------------------------------------------------------------
@dataclass
class Host:
    name: str
    namespace: str
    ip: str
    temp_dir: Path
    ray_arguments: list[str] = field(default_factory=list)
    """`ray start` arguments of this host (empty: no Ray node, e.g. the driver host)."""
    process: subprocess.Popen | None = None
    log_path: Path | None = None
    log_offset: int = 0
    """Where the log of the latest `ray start` begins (a restarted host appends)."""


class MultiHostBed:
    """A Ray head, ``workers`` worker hosts and a driver host, each in its own network namespace.

    Build it with ``MultiHostBed.start(...)`` (or the ``multihost_bed`` fixture) and always ``close()``
    it (it is a context manager too)."""

    def __init__(self, *, workers: int = 2, worker_cpus: int = 2, head_cpus: int = 0,
                 system_config: dict | None = None) -> None:
        reason = netns_unavailable_reason()
        if reason is not None:
            raise BedError(reason)
        self.prefix = _new_prefix()
        self.root = Path(tempfile.gettempdir()) / self.prefix  # short: Ray keeps unix sockets below it
        self.root.mkdir(mode=0o700)
        self.subnet = f"10.213.{20 + os.getpid() % 200}"
        self.switch = f"{self.prefix}-sw"
        self.system_config = system_config or {}
        self.token_path = self.root / "auth_token"
        descriptor = os.open(self.token_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(secrets.token_hex(32))
        self.hosts: dict[str, Host] = {}
        self._add_host("head", 1, ["--head", f"--port={GCS_PORT}", f"--num-cpus={head_cpus}",
                                   "--dashboard-host=0.0.0.0", f"--dashboard-port={DASHBOARD_PORT}",
                                   '--resources={"host_head": 1}',
                                   *([f"--system-config={json.dumps(self.system_config)}"] if self.system_config else [])])
        for index in range(1, workers + 1):
            self._add_host(f"w{index}", 10 + index,
                           [f"--num-cpus={worker_cpus}", f'--resources={{"host_w{index}": 1}}'])
        self._add_host("drv", 100, [])

    def _add_host(self, name: str, index: int, ray_arguments: list[str]) -> None:
        self.hosts[name] = Host(name, f"{self.prefix}-{name}", f"{self.subnet}.{index}", self.root / name,
                                ray_arguments)

    # -- addresses ------------------------------------------------------------------------------
    @property
    def head_ip(self) -> str:
        return self.hosts["head"].ip

    @property
    def gcs_address(self) -> str:
        """What `spindle train --address` (and `ray start --address`) takes."""
        return f"{self.head_ip}:{GCS_PORT}"

    @property
    def dashboard_url(self) -> str:
        """What `spindle submit --address` takes (the Jobs API)."""
        return f"http://{self.head_ip}:{DASHBOARD_PORT}"

    def ip(self, host: str) -> str:
        return self.hosts[host].ip

    @property
    def worker_hosts(self) -> list[str]:
        return [name for name in self.hosts if name.startswith("w")]

    # -- lifecycle ------------------------------------------------------------------------------
    @classmethod
    def start(cls, **options: object) -> "MultiHostBed":
        """Build the network, start the head and the worker hosts, wait until all are alive."""
        bed = cls(**options)  # type: ignore[arg-type]
        try:
            bed._build_network()
            bed._start_ray("head")
            bed._wait_started("head")  # workers joining before the head node registered would give up
            for name in bed.worker_hosts:  # the workers start together
                bed._start_ray(name)
            bed.wait_ready()
            bed.wait_nodes([bed.head_ip, *(bed.ip(name) for name in bed.worker_hosts)])
        except BaseException:
            bed.close()
            raise
        return bed

    def __enter__(self) -> "MultiHostBed":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _build_network(self) -> None:
        _ip("netns", "add", self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        _ip("-n", self.switch, "link", "set", "lo", "up")
        for number, host in enumerate(self.hosts.values()):
            _ip("netns", "add", host.namespace)
            port = f"p{number}-{host.name}"[:15]
            # Both ends are created directly inside the bed's namespaces.
            _ip("link", "add", "eth0", "netns", host.namespace, "type", "veth", "peer", "name", port,
                "netns", self.switch)
            _ip("-n", self.switch, "link", "set", port, "master", "br0")
            _ip("-n", self.switch, "link", "set", port, "up")
            _ip("-n", host.namespace, "link", "set", "lo", "up")
            _ip("-n", host.namespace, "addr", "add", f"{host.ip}/24", "dev", "eth0")
            _ip("-n", host.namespace, "link", "set", "eth0", "up")
            # A default route through the link (no gateway behind it): Ray finds a node's address by
            # asking the kernel which source address reaches the outside.
            _ip("-n", host.namespace, "route", "add", "default", "dev", "eth0")
            host.temp_dir.mkdir(mode=0o700)

    def close(self) -> None:
        """Stop every process of every host, delete the namespaces and the temp dirs (idempotent)."""
        for host in self.hosts.values():
            _kill_namespace_processes(host.namespace)
            if host.process is not None:
                with contextlib.suppress(Exception):
                    host.process.wait(timeout=5)
        for host in self.hosts.values():
            _delete_namespace(host.namespace)
        _delete_namespace(self.switch)
        if os.environ.get("SPINDLE_NETNS_KEEP_LOGS"):  # debugging a bed: its Ray logs stay
            print(f"netns bed {self.prefix}: Ray logs kept in {self.root}", file=sys.stderr)
        else:
            shutil.rmtree(self.root, ignore_errors=True)

    # -- running things on a host ---------------------------------------------------------------
    def command(self, host: str, argv: list[str]) -> list[str]:
        namespace = self.hosts[host].namespace
        if shutil.which("nsenter"):  # enters only the network namespace
            return ["nsenter", f"--net={NETNS_DIR / namespace}", "--", *argv]
        return ["ip", "netns", "exec", namespace, *argv]

    def environment(self, **extra: str) -> dict[str, str]:
        """What a client or node of this cluster needs: the venv's bin on PATH, one OMP thread, the
        cluster's token, and no RAY_ADDRESS of another cluster."""
        environment = {key: value for key, value in os.environ.items()
                       if key not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_API_SERVER_ADDRESS")}
        environment.update(PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", OMP_NUM_THREADS="1",
                           RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token",
                           RAY_AUTH_TOKEN_PATH=str(self.token_path),
                           # Ray Train gives a worker group 60 s to start; four workers importing torch on a
                           # loaded two-core machine can take longer.
                           RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="300", **extra)
        return environment

    def popen(self, host: str, argv: list[str], **options: object) -> subprocess.Popen:
        options.setdefault("env", self.environment())
        options.setdefault("cwd", tempfile.gettempdir())  # not the checkout: its spindle/ would shadow the package
        return subprocess.Popen(self.command(host, argv), **options)  # type: ignore[call-overload]

    def run(self, host: str, argv: list[str], timeout: float, **options: object) -> subprocess.CompletedProcess:
        options.setdefault("env", self.environment())
        options.setdefault("cwd", tempfile.gettempdir())
        options.setdefault("capture_output", True)
        options.setdefault("text", True)
        return subprocess.run(self.command(host, argv), timeout=timeout, **options)  # type: ignore[call-overload]

    def http_get(self, host: str, url: str, timeout_s: float = 5.0) -> bytes:
        """GET ``url`` from inside ``host``'s namespace, with the cluster's token."""
        token = self.token_path.read_text().strip()
        request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})

        def fetch() -> bytes:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                return response.read()

        return _in_namespace(self.hosts[host].namespace, fetch)

    # -- processes and faults -------------------------------------------------------------------
    def pids(self, host: str) -> list[int]:
        return _pids_in(self.hosts[host].namespace)

    def host_of_pid(self, pid: int) -> str | None:
        identity = _namespace_identity(f"/proc/{pid}/ns/net")
        for host in self.hosts.values():
            if identity is not None and identity == _namespace_identity(NETNS_DIR / host.namespace):
                return host.name
        return None

    def kill_host(self, host: str) -> None:
        """SIGKILL every process of ``host`` (returns when none is left)."""
        _kill_namespace_processes(self.hosts[host].namespace)
        process = self.hosts[host].process
        if process is not None:
            with contextlib.suppress(Exception):
                process.wait(timeout=5)

    def link_down(self, host: str) -> None:
        _ip("-n", self.hosts[host].namespace, "link", "set", "eth0", "down")

    def link_up(self, host: str) -> None:
        namespace = self.hosts[host].namespace
        _ip("-n", namespace, "link", "set", "eth0", "up")
        _ip("-n", namespace, "route", "replace", "default", "dev", "eth0")  # dropped while the link was down

    def restart_host(self, host: str, timeout_s: float = START_TIMEOUT_S) -> None:
        """Bring ``host`` back as a fresh Ray node (whatever ran there is killed first) and wait until
        the head reports it alive."""
        self.kill_host(host)
        self.link_up(host)
        self._start_ray(host)
        if host == "head":
            self.wait_ready(timeout_s)
        deadline = time.monotonic() + timeout_s
        while self.ip(host) not in self.alive_nodes():
            self._check_running(host)
            if time.monotonic() > deadline:
                raise BedError(f"host {host} did not rejoin within {timeout_s:.0f} s; its log: {self._log_tail(host)}")
            time.sleep(0.5)

    def join_driver_node(self, host: str = "drv", timeout_s: float = START_TIMEOUT_S) -> None:
        """Make ``host`` a Ray node without CPUs (a machine that drives jobs but runs no ranks)."""
        self.hosts[host].ray_arguments = ["--num-cpus=0", f'--resources={{"host_{host}": 1}}']
        self.restart_host(host, timeout_s)

    # -- Ray ------------------------------------------------------------------------------------
    def _start_ray(self, name: str) -> None:
        host = self.hosts[name]
        if not host.ray_arguments:
            return
        shutil.rmtree(host.temp_dir, ignore_errors=True)  # a restarted host starts from a clean slate
        host.temp_dir.mkdir(mode=0o700)
        address = [] if "--head" in host.ray_arguments else [f"--address={self.gcs_address}"]
        argv = [_ray_executable(), "start", "--block", *host.ray_arguments, *address,
                f"--node-ip-address={host.ip}", f"--temp-dir={host.temp_dir}", "--disable-usage-stats",
                f"--object-store-memory={OBJECT_STORE_BYTES}"]
        host.log_path = self.root / f"{name}.log"
        host.log_offset = host.log_path.stat().st_size if host.log_path.exists() else 0
        with open(host.log_path, "a") as log:
            host.process = self.popen(name, argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                      env=self.environment(**NODE_SETTINGS))

    def _check_running(self, name: str) -> None:
        process = self.hosts[name].process
        if process is not None and process.poll() is not None:
            raise BedError(f"`ray start` on host {name} exited with {process.returncode}: {self._log_tail(name)}")

    def _log_tail(self, name: str, characters: int = 3000) -> str:
        path = self.hosts[name].log_path
        return path.read_text(errors="replace")[-characters:] if path and path.exists() else "(no log)"

    def _wait_started(self, name: str, timeout_s: float = START_TIMEOUT_S) -> None:
        """Until `ray start` on ``name`` says its node runs (GCS, raylet and the node's registration)."""
        host, deadline = self.hosts[name], time.monotonic() + timeout_s
        while "Ray runtime started" not in host.log_path.read_text(errors="replace")[host.log_offset:]:
            self._check_running(name)
            if time.monotonic() > deadline:
                raise BedError(f"`ray start` on host {name} did not finish within {timeout_s:.0f} s: "
                               f"{self._log_tail(name)}")
            time.sleep(0.2)

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """The head's dashboard (Jobs API) answers from the driver host."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.http_get("drv", f"{self.dashboard_url}/api/version")
                return
            except (OSError, urllib.error.URLError):
                self._check_running("head")
                if time.monotonic() > deadline:
                    raise BedError(f"the dashboard at {self.dashboard_url} did not answer within {timeout_s:.0f} s: "
                                   f"{self._log_tail('head')}") from None
                time.sleep(0.5)

    def alive_nodes(self) -> dict[str, dict[str, float]]:
        """{node ip: total resources} of every node the head reports alive (the dashboard's state API)."""
        body = json.loads(self.http_get("drv", f"{self.dashboard_url}/api/v0/nodes?limit=1000&detail=true"))
        nodes = body.get("data", {}).get("result", {}).get("result", [])
        return {node["node_ip"]: node.get("resources_total", {}) for node in nodes if node.get("state") == "ALIVE"}

    def wait_nodes(self, ips: list[str], timeout_s: float = START_TIMEOUT_S) -> None:
        """Wait until the alive nodes are exactly ``ips``."""
        deadline = time.monotonic() + timeout_s
        alive: dict = {}
        while True:
            with contextlib.suppress(OSError, urllib.error.URLError, ValueError):
                alive = self.alive_nodes()
                if sorted(alive) == sorted(ips):
                    return
            for name, host in self.hosts.items():
                if host.ip in ips:
                    self._check_running(name)
            if time.monotonic() > deadline:
                missing = [name for name, host in self.hosts.items() if host.ip in ips and host.ip not in alive]
                tails = "".join(f"\n--- {name}: {self._log_tail(name, 1500)}" for name in missing)
                raise BedError(f"alive nodes {sorted(alive)} instead of {sorted(ips)} after {timeout_s:.0f} s{tails}")
            time.sleep(0.5)


@contextlib.contextmanager
def multihost_cluster(**options: object) -> Iterator[MultiHostBed]:
    """A started bed, closed on the way out (also when the block raises)."""
    sweep_stale_beds()
    bed = MultiHostBed.start(**options)
    try:
        yield bed
    finally:
        bed.close()


FAST_NODE_DEATH = {"health_check_period_ms": 1000, "health_check_timeout_ms": 2000,
                   "health_check_failure_threshold": 4, "health_check_initial_delay_ms": 1000}
"""The GCS declares a silent node dead after about 5-10 s (Ray's defaults: about 15 s for a killed host,
up to a minute for a cut link), tolerant enough for a loaded machine."""


@pytest.fixture(scope="module")
def multihost_bed() -> Iterator[MultiHostBed]:
    """One bed per test module (head with 0 CPUs, two worker hosts with 2 CPUs each, a driver host, fast
    node-death detection); skipped, with the reason, where network namespaces cannot be created."""
    reason = netns_unavailable_reason()
    if reason is not None:
        pytest.skip(f"no multi-host test bed: {reason}")
    with multihost_cluster(system_config=FAST_NODE_DEATH) as bed:
        yield bed


__all__ = ["FAST_NODE_DEATH", "BedError", "Host", "MultiHostBed", "multihost_bed", "multihost_cluster", "netns_unavailable_reason",
           "sweep_stale_beds"]
