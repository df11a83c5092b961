"""Is the daemon alive? "Not responding" must never look like "training".

A status is stale when there is no status file, when `updated_at` is older than
3 x `write_interval_seconds` (the service rewrites it at least that often, so
three missed writes is a hung or dead daemon, not a slow disk), or when the
process named by `pid` is gone. A daemon that runs but cannot write its status
(its disk filled to the last byte, its folder made read-only) cannot say so
itself: where the status folder shows why, `cause` names it (full or
unwritable) and the reason says it instead of "not responding".
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Callable

import psutil

STALE_INTERVALS = 3
DEFAULT_WRITE_INTERVAL = 2.0  # service.status_interval_seconds' default
# A pid whose process began this long after the daemon's `started_at` was reused by another program.
PID_REUSE_SLACK_SECONDS = 5.0


@dataclass(frozen=True)
class Liveness:
    stale: bool
    reason: str | None
    age_seconds: float | None
    daemon_alive: bool
    cause: str | None = None  # "full" or "unwritable": why a running daemon's status is stale, when known


def parse_iso(value: Any) -> float | None:
    """Unix seconds from the status' ISO 8601 UTC strings ("2026-11-22T02:03:01.123Z")."""
    if isinstance(value, (int, float)):
        return float(value)
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def pid_alive(pid: Any, started_at: float | None = None) -> bool:
    """The process exists, is not a zombie, and (when known) is not a later process that got the same pid."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        if started_at is not None and proc.create_time() > started_at + PID_REUSE_SLACK_SECONDS:
            return False
        return True
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        # AccessDenied cannot happen for a pid that exists on Linux' /proc stat; treat as gone.
        return False


def assess(raw: dict[str, Any] | None, now: float,
           alive: Callable[[Any, float | None], bool] = pid_alive,
           trouble: Callable[[], tuple[str, str] | None] = lambda: None) -> Liveness:
    """`trouble()`: why the status folder cannot be written now (daemon.diskspace.write_trouble), if it says."""
    if raw is None:
        return Liveness(True, "no status file: the daemon has not started, or its status folder differs", None, False)
    updated = parse_iso(raw.get("updated_at"))
    age = None if updated is None else max(0.0, now - updated)
    daemon_alive = alive(raw.get("pid"), parse_iso(raw.get("started_at")))
    interval = raw.get("write_interval_seconds") or DEFAULT_WRITE_INTERVAL
    limit = STALE_INTERVALS * float(interval)
    if not daemon_alive:
        if raw.get("status") == "stopped":
            return Liveness(True, "daemon stopped", age, False)
        return Liveness(True, f"daemon process {raw.get('pid')} is gone", age, False)
    if age is None:
        return Liveness(True, "status has no updated_at", None, True)
    if age > limit:
        why = trouble()
        if why is not None:
            return Liveness(True, f"the daemon (pid {raw.get('pid')}) cannot write its status: {why[1]}; training is "
                                  f"held until it can (last update {age:.0f} s ago)", age, True, why[0])
        return Liveness(True, f"no status update for {age:.0f} s (expected every {float(interval):g} s)", age, True)
    return Liveness(False, None, age, True)
