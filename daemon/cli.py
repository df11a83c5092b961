"""trainctl: control and inspect a traind instance.

    trainctl status [--watch [SECONDS]] [--json]
    trainctl pause | resume | skip | stop [--no-wait]
    trainctl queue add FILE [--priority high|normal|low]
    trainctl queue list [--json] | queue status | queue retry NAME [--priority P] | queue remove NAME
    trainctl config validate | config explain | config approve

Every command takes `--config PATH` (default: $TRAIND_CONFIG or ./config.json).
Requests are files the daemon consumes, so they work while the monitor is down
and wait in line while the daemon is down. Exit codes: 0 done, 1 refused or
failed, 2 timed out waiting for the daemon to act.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from daemon import control, lockedkeys
from daemon.config import Config, explain, load_config
from daemon.errors import ConfigError, QueueError, TraindError
from daemon.intake import plural, remove_file, retry_file
from daemon.jobqueue import JobQueue, QueueEntry
from daemon.lock import acquire, holder_pid
from daemon.states import ControlAction, DesiredState, JobState, Priority
from daemon.status import HISTORY_FILE, HistoryDB, read_status
from daemon.validate import validate_file

WAIT_SECONDS = 60.0


def out(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def daemon_pid(cfg: Config) -> int | None:
    return holder_pid(cfg.path("status") / "daemon.lock")


# -- status ---------------------------------------------------------------------------
def _age(updated_at: str | None) -> float | None:
    if not updated_at:
        return None
    t = datetime.strptime(updated_at, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)
    return time.time() - t.timestamp()


def _dur(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(seconds)
    if s >= 86400:
        return f"{s // 86400}d {s % 86400 // 3600}h"
    if s >= 3600:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 60}m {s % 60:02d}s" if s >= 60 else f"{s}s"


def _bar(done: int, total: int, width: int = 30) -> str:
    frac = min(max(done / total, 0.0), 1.0) if total else 0.0
    full = int(frac * width)
    return "[" + "#" * full + "-" * (width - full) + f"] {frac * 100:5.1f}%"


def _num(v: Any, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def render_status(st: dict | None, running_pid: int | None) -> str:
    """The one-screen summary a person reads at a glance."""
    if st is None:
        return "traind: no status yet (the daemon has never run for this config)"
    age = _age(st.get("updated_at"))
    alive = running_pid is not None
    state = st["status"] if alive else f"not running (last said: {st['status']})"
    if alive and age is not None and age > 3 * st.get("write_interval_seconds", 2.0):
        state += f"  !! no status update for {_dur(age)}: daemon not responding"
    lines = [f"traind  {state}" + (f"   pid {running_pid}" if alive else "")]
    lines.append(f"  detail   {st.get('detail') or '-'}")
    dev = " / ".join(str(x) for x in (st.get("device"), st.get("compute_dtype"), st.get("quantization")) if x)
    lines.append(f"  model    {st.get('base_model')}   {dev}   adapter v{st.get('adapter_version') or 0}")
    if st.get("current_file"):
        lines.append(f"  file     {st['current_file']}   ({st.get('job_id')})")
        total, step = st.get("total_steps") or 0, st.get("current_step") or 0
        lines.append(f"  progress {_bar(step, total)}  step {step}/{total}  epoch {st.get('epoch', 0):.2f}  ETA {_dur(st.get('eta_seconds'))}")
        lines.append(f"  loss     {_num(st.get('loss'), '.4f')}   eval {_num(st.get('eval_loss'), '.4f')}   "
                     f"lr {_num(st.get('lr'), '.2e')}   {_num(st.get('tokens_per_sec'), ',.0f')} tok/s")
    q = st.get("queue") or {}
    lines.append(f"  queue    pending {q.get('pending', 0)} (high {q.get('pending_high', 0)}, normal {q.get('pending_normal', 0)}, "
                 f"low {q.get('pending_low', 0)})  processing {q.get('processing', 0)}  done {q.get('done', 0)}  failed {q.get('failed', 0)}")
    if st.get("desired_state") == DesiredState.PAUSED.value and st["status"] != "paused":
        lines.append("  note     pause requested; it takes effect at the next step")
    if st.get("last_error"):
        lines.append(f"  error    {st['last_error']}")
    lines.append(f"  updated  {_dur(age)} ago" if age is not None else "  updated  never")
    return "\n".join(lines)


def cmd_status(cfg: Config, args: argparse.Namespace) -> int:
    try:
        while True:
            st = read_status(cfg.path("status"))
            if args.json:
                out(json.dumps(st, indent=2))
            else:
                if args.watch and sys.stdout.isatty():
                    sys.stdout.write("\x1b[2J\x1b[H")  # redraw in place; piped, each screen follows the last
                elif args.watch:
                    out(f"--- {time.strftime('%H:%M:%S')}")
                out(render_status(st, daemon_pid(cfg)))
            if not args.watch:
                return 0
            time.sleep(args.watch)
    except KeyboardInterrupt:  # Ctrl-C ends --watch, wherever in the loop it lands
        return 0


# -- control ---------------------------------------------------------------------------
def _wait_for(cfg: Config, want: set[str], timeout: float) -> str | None:
    """Wait until the status is one of `want`; the status reached, or None on time-out."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        st = read_status(cfg.path("status")) or {}
        if st.get("status") in want:
            return st["status"]
        if daemon_pid(cfg) is None:
            return None
        time.sleep(0.2)
    return None


def cmd_pause_resume(cfg: Config, args: argparse.Namespace) -> int:
    desired = DesiredState.PAUSED if args.cmd == "pause" else DesiredState.RUNNING
    control.set_desired_state(cfg, desired, by="cli")
    if daemon_pid(cfg) is None:
        out(f"{args.cmd}: recorded; the daemon is not running and will start {desired.value}")
        return 0
    if args.no_wait:
        out(f"{args.cmd}: requested")
        return 0
    want = {"paused"} if desired is DesiredState.PAUSED else {"training", "idle"}
    reached = _wait_for(cfg, want, WAIT_SECONDS)
    if reached is None:
        out(f"{args.cmd}: requested, but the daemon has not acted within {WAIT_SECONDS:.0f} s")
        return 2
    out(f"{args.cmd}: daemon is {reached}")
    return 0


def _wait_consumed(path: Path, timeout: float) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not path.exists():
            return True
        time.sleep(0.2)
    return False


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
    deadline = time.time() + WAIT_SECONDS
    while time.time() < deadline:
        err = q.read_error(st["job_id"])
        if err is not None:
            out(f"skip: {st['current_file']} -> queue/failed/ ({err.get('reason')})")
            return 0 if err.get("reason") == "skipped" else 1
        if not req.exists() and (read_status(cfg.path("status")) or {}).get("job_id") != st["job_id"]:
            try:
                where = q.find(st["job_id"]).state.value
            except QueueError:
                where = "gone"
            out(f"skip: {st['current_file']} was not skipped: it is {where} (it ended before the skip took effect)")
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


# -- queue -------------------------------------------------------------------------------
def cmd_queue_add(cfg: Config, args: argparse.Namespace) -> int:
    src = Path(args.file)
    if not src.is_file():
        out(f"queue add: {src} is not a file")
        return 1
    report = validate_file(src, cfg.data, cfg.intake.max_file_bytes)
    if not report.accepted:
        out(f"queue add: {src} refused: {report.reason}")
        _print_line_errors([e.to_dict() for e in report.errors], report.n_bad, already_said=report.reason or "")
        return 1
    prio = Priority(args.priority)
    folder = cfg.path("inbox") if prio is Priority.NORMAL else cfg.path("inbox") / prio.value
    dst = _free_name(folder, src.name if src.suffix == ".jsonl" else src.name + ".jsonl")
    part = dst.with_name(dst.name + ".part")  # the intake ignores .part until the rename
    shutil.copyfile(src, part)
    with open(part, "rb") as f:
        os.fsync(f.fileno())
    os.replace(part, dst)
    note = "" if daemon_pid(cfg) else " (the daemon is not running; it is taken at the next start)"
    out(f"queue add: {src.name} -> {dst} ({prio.value}, {plural(report.n_valid, 'record')}, format {report.format.value}){note}")
    if report.n_bad:
        out(f"queue add: {report.n_bad} bad line(s) will be skipped (data.bad_line_policy = skip):")
        _print_line_errors([e.to_dict() for e in report.errors], report.n_bad)
    return 0


def _print_line_errors(errors: list[dict], n_bad: int, already_said: str = "", limit: int = 10) -> None:
    """The first bad lines, then how many more; a line the reason already quotes is not repeated."""
    fresh = [e for e in errors if _line_error(e) not in already_said]
    for e in fresh[:limit]:
        out(f"  {_line_error(e)}")
    told = (len(errors) - len(fresh)) + min(len(fresh), limit)
    if n_bad > told:
        out(f"  ... and {n_bad - told} more")


def _free_name(folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    stem, suffix = name[: -len(".jsonl")], ".jsonl"
    cand, n = folder / name, 1
    while cand.exists() or cand.with_name(cand.name + ".part").exists():
        n += 1
        cand = folder / f"{stem}-{n}{suffix}"
    return cand


def cmd_queue_list(cfg: Config, args: argparse.Namespace) -> int:
    q = JobQueue(cfg.path("queue"))
    groups = [("pending", q.pending()), ("processing", q.processing()), ("done", q.done()), ("failed", q.failed())]
    if args.json:
        body = {name: [dict(e.to_dict(), error=q.read_error(e.job_id) if name == "failed" else None) for e in entries]
                for name, entries in groups}
        out(json.dumps(body, indent=2))
        return 0
    for name, entries in groups:
        out(f"{name} ({len(entries)})")
        for e in entries:
            prio = f"[{e.priority.value}] " if e.priority else ""
            why = ""
            if name == "failed":
                err = q.read_error(e.job_id) or {}
                why = f"  <- {err.get('reason')}: {err.get('message')}"
            out(f"  {prio}{e.job_id}  {e.size:,} B{why}")
    return 0


def cmd_queue_status(cfg: Config, args: argparse.Namespace) -> int:
    q = JobQueue(cfg.path("queue"))
    if not args.name:
        out("  ".join(f"{k} {v}" for k, v in q.counts().items()))
        return 0
    entry = q.find(args.name)
    out(f"{entry.job_id}\n  state     {entry.state.value}" + (f" ({entry.priority.value})" if entry.priority else ""))
    out(f"  size      {entry.size:,} B")
    err = q.read_error(entry.job_id) if entry.state is JobState.FAILED else None
    if err:
        out(f"  failed    {err.get('reason')}: {err.get('message')}")
    record = _job_record(cfg, entry.job_id)
    if record:
        for key in ("format", "n_records", "n_bad", "steps", "total_steps", "final_loss", "eval_loss",
                    "adapter_version", "crashes"):
            if record.get(key) is not None:
                out(f"  {key:<9} {record[key]}")
        bad = json.loads(record.get("bad_lines") or "[]")
        for e in bad[:10]:
            out(f"  bad line  {_line_error(e)}")
        if len(bad) > 10:
            out(f"  ... and {len(bad) - 10} more")
    return 0


def _job_record(cfg: Config, job_id: str) -> dict | None:
    path = cfg.path("status") / "history.db"
    if not path.exists():
        return None
    db = HistoryDB.open_readonly(path)
    try:
        return db.job(job_id)
    finally:
        db.close()


def _line_error(e: dict) -> str:
    return f"line {e.get('line')}" + (f", field {e['field']}" if e.get("field") else "") + f": {e.get('reason')}"


def _check_change(entry, action: ControlAction) -> None:
    """The same rule the daemon applies, said before anything is asked of it."""
    need = JobState.FAILED if action is ControlAction.RETRY else JobState.PENDING
    if entry.state is not need:
        verb = "retried" if action is ControlAction.RETRY else "removed"
        raise QueueError(f"{entry.job_id} is {entry.state.value}; only {need.value} files can be {verb}")


def _change_without_daemon(cfg: Config, q: JobQueue, entry: QueueEntry, action: ControlAction,
                           priority: str | None) -> QueueEntry:
    """What the daemon does for a retry/remove request, done here while it is down (under its lock)."""
    db = HistoryDB(cfg.path("status") / HISTORY_FILE)
    try:
        if action is ControlAction.RETRY:
            return retry_file(entry, Priority(priority or "normal"), time.time(), cfg, q, db)
        return remove_file(entry, time.time(), q, db)
    finally:
        db.close()


def _queue_change(cfg: Config, action: ControlAction, name: str, priority: str | None) -> int:
    """Retry/remove: done by the daemon when it runs (it alone moves queue files), else here under its lock."""
    q = JobQueue(cfg.path("queue"))
    entry = q.find(name)
    _check_change(entry, action)
    if daemon_pid(cfg) is not None:
        req = control.request(cfg, action, by="cli", job_id=entry.job_id, priority=priority)
        if not _wait_consumed(req, WAIT_SECONDS):
            out(f"queue {action.value}: requested, but the daemon has not acted yet")
            return 2
        now = q.find(entry.job_id)
    else:
        fd = acquire(cfg.path("status") / "daemon.lock")  # keeps a daemon from starting mid-move
        try:
            now = _change_without_daemon(cfg, q, entry, action, priority)
        except QueueError as e:
            out(f"queue {action.value}: refused: {e}")
            return 1
        finally:
            os.close(fd)
    if action is ControlAction.RETRY:  # the daemon may have started (or even finished) it already
        ok = now.state is not JobState.FAILED
        if not ok:
            err = q.read_error(entry.job_id) or {}
            out(f"queue retry: refused: {entry.original_name} still fails validation: {err.get('message')}")
            _print_line_errors(err.get("errors") or [], len(err.get("errors") or []), already_said=err.get("message") or "")
            return 1
    else:
        ok = now.state is JobState.FAILED and (q.read_error(entry.job_id) or {}).get("reason") == "removed"
    out(f"queue {action.value}: {entry.job_id} is now {now.state.value}")
    return 0 if ok else 1


# -- config ------------------------------------------------------------------------------
def cmd_config_validate(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        out(str(e))
        return 1
    changes = lockedkeys.check(cfg)
    if changes:
        out(f"{args.config}: valid, but {len(changes)} locked key(s) differ from the adapter's:")
        for k, old, new in changes:
            out(f"  - {k}: adapter was trained with {old!r}, config says {new!r}")
        out("the daemon will refuse to start until you restore them or run `trainctl config approve`")
        return 1
    out(f"{args.config}: valid")
    return 0


def cmd_config_explain(args: argparse.Namespace) -> int:
    for key, default, help_text in explain():
        out(f"{key} = {json.dumps(default)}\n    {help_text}")
    return 0


def cmd_config_approve(cfg: Config, args: argparse.Namespace) -> int:
    changes = lockedkeys.check(cfg)
    if not changes:
        out("config approve: no locked key differs; nothing to approve")
        return 0
    try:
        fd = acquire(cfg.path("status") / "daemon.lock")
    except TraindError as e:
        out(f"config approve: stop the daemon first ({e})")
        return 1
    try:
        moved = lockedkeys.approve(cfg)
    finally:
        os.close(fd)
    for k, old, new in changes:
        out(f"approved {k}: {old!r} -> {new!r}")
    for m in moved:
        out(f"archived {m}")
    return 0


# -- parser ------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=argparse.SUPPRESS, help="config file (default: $TRAIND_CONFIG or ./config.json)")
    p = argparse.ArgumentParser(prog="trainctl", parents=[common], description="Control and inspect a traind daemon.")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("status", parents=[common], help="one-screen summary")
    s.add_argument("--json", action="store_true", help="print the raw status JSON")
    s.add_argument("--watch", nargs="?", const=2.0, type=float, default=None, metavar="SECONDS", help="refresh until Ctrl-C")
    for name, help_text in (("pause", "pause at the next step; the model stays loaded"), ("resume", "carry on"),
                            ("skip", "abandon the file in training (-> failed/, reason skipped)"),
                            ("stop", "checkpoint and stop the daemon")):
        c = sub.add_parser(name, parents=[common], help=help_text)
        c.add_argument("--no-wait", action="store_true", help="return once the request is written")
    q = sub.add_parser("queue", parents=[common], help="manage the queue")
    qs = q.add_subparsers(dest="qcmd", required=True)
    a = qs.add_parser("add", parents=[common], help="validate FILE and hand it to the intake")
    a.add_argument("file")
    a.add_argument("--priority", choices=[p.value for p in Priority], default="normal")
    ql = qs.add_parser("list", parents=[common], help="every queued file, by folder")
    ql.add_argument("--json", action="store_true")
    qst = qs.add_parser("status", parents=[common], help="counts per folder, or one file's record")
    qst.add_argument("name", nargs="?", help="a job id or original name: show its state, format, bad lines, losses")
    r = qs.add_parser("retry", parents=[common], help="failed/NAME -> pending")
    r.add_argument("name")
    r.add_argument("--priority", choices=[p.value for p in Priority], default="normal")
    rm = qs.add_parser("remove", parents=[common], help="pending/NAME -> failed/ (reason removed)")
    rm.add_argument("name")
    c = sub.add_parser("config", parents=[common], help="check, explain, approve the config")
    cs = c.add_subparsers(dest="ccmd", required=True)
    cs.add_parser("validate", parents=[common], help="list every problem at once")
    cs.add_parser("explain", parents=[common], help="every key with its default and meaning")
    cs.add_parser("approve", parents=[common], help="accept changed locked keys (daemon stopped)")
    return p


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `trainctl queue list | head` ends quietly
    args = build_parser().parse_args(argv)
    args.config = getattr(args, "config", None) or os.environ.get("TRAIND_CONFIG", "config.json")
    try:
        if args.cmd == "config" and args.ccmd in ("validate", "explain"):
            return cmd_config_validate(args) if args.ccmd == "validate" else cmd_config_explain(args)
        cfg = load_config(args.config)
        if args.cmd == "status":
            return cmd_status(cfg, args)
        if args.cmd in ("pause", "resume"):
            return cmd_pause_resume(cfg, args)
        if args.cmd == "skip":
            return cmd_skip(cfg, args)
        if args.cmd == "stop":
            return cmd_stop(cfg, args)
        if args.cmd == "config":
            return cmd_config_approve(cfg, args)
        if args.qcmd == "add":
            return cmd_queue_add(cfg, args)
        if args.qcmd == "list":
            return cmd_queue_list(cfg, args)
        if args.qcmd == "status":
            return cmd_queue_status(cfg, args)
        action = ControlAction.RETRY if args.qcmd == "retry" else ControlAction.REMOVE
        return _queue_change(cfg, action, args.name, getattr(args, "priority", None))
    except TraindError as e:
        out(f"trainctl: {e}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
