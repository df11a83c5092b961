"""trainctl pause, resume, skip, stop: requests to the daemon, and waiting until it has acted."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import TYPE_CHECKING

from daemon import control
from daemon.cli.shared import WAIT_SECONDS, daemon_pid, out, wait_for_status, with_running_config
from daemon.config import Config
from daemon.errors import QueueError
from daemon.jobqueue import JobQueue
from daemon.states import ControlAction, DesiredState
from daemon.status import read_status

if TYPE_CHECKING:
    from daemon.cli.shared import Handler, Subparsers


def register(subparsers: Subparsers, common: argparse.ArgumentParser) -> None:
    # These only ask a running daemon to act: a config.json broken since it started must not stop them.
    commands: tuple[tuple[str, str, Handler], ...] = (
        ("pause", "pause at the next step; the model stays loaded", with_running_config(cmd_pause_resume)),
        ("resume", "carry on", with_running_config(cmd_pause_resume)),
        ("skip", "abandon the file in training (-> failed/, reason skipped)", with_running_config(cmd_skip)),
        ("stop", "checkpoint and stop the daemon", with_running_config(cmd_stop)),
    )
    for name, help_text, handler in commands:
        c = subparsers.add_parser(name, parents=[common], help=help_text)
        c.add_argument("--no-wait", action="store_true", help="return once the request is written")
        c.set_defaults(handler=handler)


def cmd_pause_resume(cfg: Config, args: argparse.Namespace) -> int:
    desired = DesiredState.PAUSED if args.cmd == "pause" else DesiredState.RUNNING
    control.set_desired_state(cfg, desired, by="cli")
    if daemon_pid(cfg) is None:
        out(f"{args.cmd}: recorded; the daemon is not running and will start {desired.value}")
        return 0
    if args.no_wait:
        out(f"{args.cmd}: requested")
        return 0
    want = {"paused"} if desired is DesiredState.PAUSED else {"training", "idle", "paused (disk full)"}
    reached = wait_for_status(cfg, want, WAIT_SECONDS, desired)
    if reached is None:
        out(f"{args.cmd}: requested, but the daemon has not acted within {WAIT_SECONDS:.0f} s")
        return 2
    if reached == "paused (disk full)":
        d = (read_status(cfg.path("status")) or {}).get("disk_full") or {}
        out(f"{args.cmd}: recorded; training is held while the disk is full ({d.get('folder')}: "
            f"{d.get('free_bytes')} bytes free) and resumes by itself once space is back")
        return 0
    out(f"{args.cmd}: daemon is {reached}")
    return 0


def cmd_skip(cfg: Config, args: argparse.Namespace) -> int:
    st = read_status(cfg.path("status")) or {}
    if daemon_pid(cfg) is None:
        out("skip: the daemon is not running; nothing is training")
        return 1
    q = JobQueue(cfg.path("queue"))
    if not st.get("job_id"):  # between files, or its trainer is restarting after a crash
        left = q.processing()
        if not left:
            out("skip: no file is training")
            return 1
        st = dict(st, job_id=left[0].job_id, current_file=left[0].original_name)
    req = control.request(cfg, ControlAction.SKIP, by="cli", job_id=st["job_id"])
    if args.no_wait:
        out(f"skip: requested for {st['current_file']}")
        return 0
    return _await_skip(cfg, q, req, st["job_id"], st["current_file"])


def _await_skip(cfg: Config, q: JobQueue, req: Path, job_id: str, name: str) -> int:
    """Wait until the skipped file is in failed/, or has ended some other way."""
    deadline = time.time() + WAIT_SECONDS
    while time.time() < deadline:
        err = q.read_error(job_id)
        if err is not None:
            out(f"skip: {name} -> queue/failed/ ({err.get('reason')})")
            return 0 if err.get("reason") == "skipped" else 1
        if not req.exists() and (read_status(cfg.path("status")) or {}).get("job_id") != job_id:
            try:
                where = q.find(job_id).state.value
            except QueueError:
                where = "gone"
            out(f"skip: {name} was not skipped: it is {where} (it ended before the skip took effect)")
            return 1
        time.sleep(0.2)
    out("skip: requested, but the daemon has not acted yet")
    return 2


def cmd_stop(cfg: Config, args: argparse.Namespace) -> int:
    pid = daemon_pid(cfg)
    if pid is None:
        out("stop: the daemon is not running")
        return 0
    control.request(cfg, ControlAction.STOP, by="cli")
    if args.no_wait:
        out(f"stop: requested (pid {pid})")
        return 0
    deadline = time.time() + cfg.service.stop_timeout_seconds + 30
    while time.time() < deadline:
        if daemon_pid(cfg) is None:
            left = JobQueue(cfg.path("queue")).processing()
            note = f"; {left[0].original_name} resumes from its checkpoint at the next start" if left else ""
            out(f"stop: daemon stopped{note}")
            return 0
        time.sleep(0.2)
    out("stop: requested, but the daemon is still running")
    return 2
