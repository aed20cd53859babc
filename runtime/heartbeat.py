"""Hang reports: every rank writes a small heartbeat file with the last collective it entered (torch's
flight recorder), and a failed collective is explained by the ranks that never entered it.

Not tied to a launcher: Ray Train workers and torchrun processes use the same files under
``RUN_DIR/.spindle/heartbeat/`` (a run directory every rank sees).
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from pathlib import Path

LAUNCHER_DIR = Path(".spindle")
"""The launcher's files inside the run directory: heartbeats and Ray Train's state."""
HEARTBEAT_DIR = LAUNCHER_DIR / "heartbeat"
"""Per-rank heartbeat files, relative to the run directory."""
HEARTBEAT_INTERVAL_S = 5.0
FLIGHT_RECORDER_ENTRIES = "64"
"""TORCH_FR_BUFFER_SIZE of the workers: the last collectives each rank entered, for hang reports."""
STALL_MARKER = "was never entered by"


class CollectiveStallError(RuntimeError):
    """A collective failed because some rank did not take part; the message names it."""


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


def diagnose_stall(records: list[dict], now: float | None = None,
                   stale_after_s: float = 3 * HEARTBEAT_INTERVAL_S) -> str | None:
    """Name the ranks that fell behind: for the collective the furthest rank waits in, the ranks of
    that group that never entered it, and ranks whose heartbeat stopped while others still beat.
    None when all look alike."""
    if not records:
        return None
    now = time.time() if now is None else now
    newest = max(record["time"] for record in records)  # when the group was last alive as a whole
    findings = [_behind_in(group, frontier, records, now) for group, frontier in sorted(_frontiers(records).items())]
    findings = [finding for finding in findings if finding]
    silent = sorted(record["rank"] for record in records if newest - record["time"] > stale_after_s)
    if silent:
        findings.append(f"rank(s) {', '.join(map(str, silent))} stopped answering (no heartbeat for more than "
                        f"{stale_after_s:.0f} s while the others went on: the process died, was stopped, or its "
                        f"host is unreachable)")
    return "; ".join(findings) if findings else None


def _frontiers(records: list[dict]) -> dict[str, tuple[int, str, str]]:
    """Per process group: (furthest sequence number any rank entered, its op, what the group is)."""
    frontier: dict[str, tuple[int, str, str]] = {}
    for record in records:
        for group, last in record.get("collectives", {}).items():
            if group not in frontier or last["seq"] > frontier[group][0]:
                described = ", ".join(part for part in (last.get("description", ""), f"ranks {last['ranks']}")
                                      if part and part not in ("undefined", "default_pg"))
                frontier[group] = (last["seq"], last["op"], described)
    return frontier


def _behind_in(group: str, frontier: tuple[int, str, str], records: list[dict], now: float) -> str | None:
    seq, op, described = frontier
    behind = sorted((record["rank"], record["collectives"][group]) for record in records
                    if group in record.get("collectives", {}) and record["collectives"][group]["seq"] < seq)
    if not behind:
        return None
    by_rank = {record["rank"]: record for record in records}
    detail = ", ".join(f"rank {rank} (last entered #{last['seq']} {last['op']}{_liveness(by_rank[rank], now)})"
                       for rank, last in behind)
    return f"collective #{seq} {op} on process group {group} ({described}) {STALL_MARKER} {detail}"


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


@contextlib.contextmanager
def reporting_stalls(run_dir: str | os.PathLike, rank: int, group_id: str):
    """Beat while the body runs; an exception in it is re-raised as CollectiveStallError naming the
    ranks that fell behind, when the heartbeats show any."""
    with Heartbeat(run_dir, rank, group_id) as heartbeat:
        try:
            yield heartbeat
        except Exception as error:
            heartbeat.beat()  # record where this rank stopped before peers read the files
            stall = diagnose_stall(read_heartbeats(run_dir))
            if stall:
                text = str(error).strip().splitlines()
                raise CollectiveStallError(f"rank {rank}: {type(error).__name__}: "
                                           f"{text[-1] if text else ''}; {stall}") from error
            raise
