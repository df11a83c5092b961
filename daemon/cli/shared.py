"""What more than one trainctl command group uses: output, formatting, the daemon's pid, waiting, the history."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from daemon.config import Config, PathsConfig, load_config
from daemon.errors import ConfigError
from daemon.lock import holder_pid
from daemon.history_db import HISTORY_FILE, HistoryDB
from daemon.status import read_status

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


def with_running_config(command: Callable[[Config, argparse.Namespace], int]) -> Handler:
    """A handler for a command that only reads or stops a running instance: where --config does not load
    but a daemon runs for its instance, it goes on with the config that daemon runs with (saying so)."""
    def handler(args: argparse.Namespace) -> int:
        try:
            cfg = load_config(args.config)
        except ConfigError as e:
            cfg = running_config(args.config, e)
            args.config_problem = e
        return command(cfg, args)
    return handler


def running_config(path: str | Path, problem: ConfigError) -> Config:
    """The config the daemon of `path`'s instance runs with, for a config file that does not load (`problem`),
    after saying so on stderr; `problem` itself where no daemon runs there or its copy does not load.

    An edit that broke config.json must not cut the user off from a daemon that runs fine: it
    validated its config at start and keeps a copy (status/running_config.json). Commands that would
    act on the file's meaning (config approve, queue add) never come here: they refuse."""
    from daemon.service import RUNNING_CONFIG  # the service's own name for it, imported on this rare path only

    path = Path(path).expanduser().resolve()
    status = status_folder(path)
    pid = holder_pid(status / "daemon.lock")
    if pid is None:
        raise problem
    try:
        cfg = load_config(status / RUNNING_CONFIG)
    except ConfigError:
        raise problem from None
    who = f"pid {pid}" if pid > 0 else "its pid unknown"
    sys.stderr.write(f"trainctl: {problem}\ntrainctl: using the config the running daemon ({who}) started with "
                     f"({status / RUNNING_CONFIG}); fix {path} before it starts again\n")
    # Its paths are absolute; the root is still the instance's folder (the `.stop` file lives there).
    return dataclasses.replace(cfg, root=path.parent)


def status_folder(path: str | Path) -> Path:
    """The status folder of the instance `path` describes, also where that config does not load: then from
    the file's `paths.status` if it parses as JSON, else the default, from the config's folder."""
    path = Path(path).expanduser().resolve()
    try:
        return load_config(path).path("status")
    except ConfigError:
        return _status_folder_as_written(path)


def _status_folder_as_written(path: Path) -> Path:
    """A broken config still says where its instance keeps its status (or the default does)."""
    name = PathsConfig.status
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raw = None
    paths = raw.get("paths") if isinstance(raw, dict) else None
    if isinstance(paths, dict) and isinstance(paths.get("status"), str) and paths["status"]:
        name = paths["status"]
    folder = Path(name).expanduser()
    return folder if folder.is_absolute() else path.parent / folder


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


def preference_lines(before: dict | None, after: dict | None, indent: str = "  ") -> list[str]:
    """A preference file's held-out pairs before and after (daemon/train/preference.py), one figure a line."""
    b, a = before or {}, after or {}
    pairs = a.get("pairs") or b.get("pairs")

    def row(label: str, key: str, fmt: str, what: str) -> str:
        return f"{indent}{label:<9} {number(b.get(key), fmt)} -> {number(a.get(key), fmt)}   {what}"

    return [f"{indent}held out  {pairs} pair(s), before the file -> after it",
            row("accuracy", "accuracy", ".3f", "(chosen scored above rejected)"),
            row("margin", "margin", ".3f", "(mean score gap, nats)"),
            row("reward", "reward_accuracy", ".3f", "(reward accuracy against the file's start)"),
            row("", "reward_margin", ".3f", "(reward margin)"),
            row("loss", "loss", ".4f", "(preference loss)")]


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
