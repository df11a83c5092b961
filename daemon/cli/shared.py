"""What more than one trainctl command group uses: output, formatting, the daemon's pid, waiting, the history."""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from daemon.config import Config, load_config
from daemon.lock import holder_pid
from daemon.status import HISTORY_FILE, HistoryDB, read_status

if TYPE_CHECKING:
    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]

Handler = Callable[[argparse.Namespace], int]
T = TypeVar("T")
WAIT_SECONDS = 60.0


def out(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def with_config(command: Callable[[Config, argparse.Namespace], int]) -> Handler:
    """A handler that loads the config named by --config before running `command`."""
    def handler(args: argparse.Namespace) -> int:
        return command(load_config(args.config), args)
    return handler


def lock_path(cfg: Config) -> Path:
    """The daemon's single-instance lock: held while it runs, taken here to change things while it does not."""
    return cfg.path("status") / "daemon.lock"


def daemon_pid(cfg: Config) -> int | None:
    return holder_pid(lock_path(cfg))


# -- formatting ----------------------------------------------------------------------
def duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(seconds)
    if s >= 86400:
        return f"{s // 86400}d {s % 86400 // 3600}h"
    if s >= 3600:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 60}m {s % 60:02d}s" if s >= 60 else f"{s}s"


def progress_bar(done: int, total: int, width: int = 30) -> str:
    frac = min(max(done / total, 0.0), 1.0) if total else 0.0
    full = int(frac * width)
    return "[" + "#" * full + "-" * (width - full) + f"] {frac * 100:5.1f}%"


def number(v: Any, fmt: str) -> str:
    """`v` formatted, or "-" when there is none."""
    return "-" if v is None else format(v, fmt)


def line_error(e: dict) -> str:
    return f"line {e.get('line')}" + (f", field {e['field']}" if e.get("field") else "") + f": {e.get('reason')}"


def print_line_errors(errors: list[dict], n_bad: int, already_said: str = "", limit: int = 10) -> None:
    """The first bad lines, then how many more; a line the reason already quotes is not repeated."""
    fresh = [e for e in errors if line_error(e) not in already_said]
    for e in fresh[:limit]:
        out(f"  {line_error(e)}")
    told = (len(errors) - len(fresh)) + min(len(fresh), limit)
    if n_bad > told:
        out(f"  ... and {n_bad - told} more")


# -- waiting for the daemon --------------------------------------------------------------
def wait_for_status(cfg: Config, want: set[str], timeout: float, desired: Any = None) -> str | None:
    """Wait until the status is one of `want`; the status reached, or None on time-out.

    "paused (disk full)" in `want` matches a disk pause once the daemon has seen `desired`
    (a resume while the disk is full is taken, and acts when space is back)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        st = read_status(cfg.path("status")) or {}
        if st.get("status") in want:
            return st["status"]
        if ("paused (disk full)" in want and st.get("pause_reason") in ("disk_full", "unwritable")
                and (desired is None or st.get("desired_state") == getattr(desired, "value", desired))):
            return "paused (disk full)"
        if daemon_pid(cfg) is None:
            return None
        time.sleep(0.2)
    return None


def wait_consumed(path: Path, timeout: float) -> bool:
    """Wait until the daemon has taken the request file at `path`; False on time-out."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not path.exists():
            return True
        time.sleep(0.2)
    return False


# -- history and charts ------------------------------------------------------------------
def from_history(cfg: Config, read: Callable[[HistoryDB], T]) -> T | None:
    """`read` applied to history.db opened read-only; None where the daemon has not made one yet."""
    path = cfg.path("status") / HISTORY_FILE
    if not path.exists():
        return None
    db = HistoryDB.open_readonly(path)
    try:
        return read(db)
    finally:
        db.close()


def scaled_chars(values: list[float | None], top: float | None, chars: str) -> list[str]:
    """One of `chars` per value by its share of `top` (the last from 1 - 1/len(chars) up);
    a space where there is no value, "?" where it is not finite."""
    def one(v: float | None) -> str:
        if v is None:
            return " "
        if not math.isfinite(v):
            return "?"
        return chars[min(len(chars) - 1, max(0, int(v / top * len(chars))))] if top else chars[0]
    return [one(v) for v in values]
