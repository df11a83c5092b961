"""trainctl queue add, list, status, retry, remove: the queue as files, and changes to it."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

from daemon import atomic, control, forgetting_view
from daemon.cli import forgetting_cmds
from daemon.cli.shared import (WAIT_SECONDS, daemon_pid, from_history, line_error, lock_path, out, preference_lines,
                               print_line_errors, wait_consumed, with_config)
from daemon.config import Config
from daemon.errors import QueueError
from daemon.intake import force_marker, plural, remove_file, retry_file
from daemon.jobqueue import JobQueue, QueueEntry
from daemon.lock import acquire
from daemon.states import ControlAction, JobState, Priority
from daemon.history_db import HISTORY_FILE, HistoryDB
from daemon.validate import validate_file

if TYPE_CHECKING:
    from daemon.cli.shared import Subparsers

PRIORITIES = [p.value for p in Priority]
# What `queue status NAME` shows from the job's history record, in this order.
RECORD_KEYS = ("format", "n_records", "n_bad", "steps", "total_steps", "final_loss", "eval_loss", "eval_set_before",
               "eval_set_after", "adapter_version", "crashes", "replay")


def register(subparsers: Subparsers, common: argparse.ArgumentParser) -> None:
    q = subparsers.add_parser("queue", parents=[common], help="manage the queue")
    qs = q.add_subparsers(dest="qcmd", required=True)
    a = qs.add_parser("add", parents=[common], help="validate FILE and hand it to the intake")
    a.add_argument("file")
    a.add_argument("--priority", choices=PRIORITIES, default="normal")
    a.add_argument("--force", action="store_true",
                   help="train it even if the adapter has learnt a file with the same content before")
    a.set_defaults(handler=with_config(cmd_queue_add))
    ql = qs.add_parser("list", parents=[common], help="every queued file, by folder")
    ql.add_argument("--json", action="store_true")
    ql.set_defaults(handler=with_config(cmd_queue_list))
    qst = qs.add_parser("status", parents=[common], help="counts per folder, or one file's record")
    qst.add_argument("name", nargs="?", help="a job id or original name: show its state, format, bad lines, losses")
    qst.set_defaults(handler=with_config(cmd_queue_status))
    r = qs.add_parser("retry", parents=[common], help="failed/NAME -> pending")
    r.add_argument("name")
    r.add_argument("--priority", choices=PRIORITIES, default="normal")
    r.set_defaults(handler=with_config(cmd_queue_retry))
    rm = qs.add_parser("remove", parents=[common], help="pending/NAME -> failed/ (reason removed)")
    rm.add_argument("name")
    rm.set_defaults(handler=with_config(cmd_queue_remove))


# -- add -------------------------------------------------------------------------------
def cmd_queue_add(cfg: Config, args: argparse.Namespace) -> int:
    src = Path(args.file)
    if not src.is_file():
        out(f"queue add: {src} is not a file")
        return 1
    report = validate_file(src, cfg.data, cfg.intake.max_file_bytes)
    if not report.accepted:
        out(f"queue add: {src} refused: {report.reason}")
        print_line_errors([e.to_dict() for e in report.errors], report.n_bad, already_said=report.reason or "")
        return 1
    prio = Priority(args.priority)
    folder = cfg.path("inbox") if prio is Priority.NORMAL else cfg.path("inbox") / prio.value
    dst = _free_name(folder, src.name if src.suffix == ".jsonl" else src.name + ".jsonl")
    if args.force:  # before the file appears: the intake reads the marker when it takes the file
        atomic.write_text(force_marker(dst), "trainctl queue add --force\n")
    _copy_complete(src, dst)
    note = "" if daemon_pid(cfg) else " (the daemon is not running; it is taken at the next start)"
    forced = ", forced: trained even if learnt before" if args.force else ""
    out(f"queue add: {src.name} -> {dst} ({prio.value}, {plural(report.n_valid, 'record')}, format {report.format.value}{forced}){note}")
    if report.n_bad:
        out(f"queue add: {report.n_bad} bad line(s) will be skipped (data.bad_line_policy = skip):")
        print_line_errors([e.to_dict() for e in report.errors], report.n_bad)
    return 0


def _copy_complete(src: Path, dst: Path) -> None:
    """Copy to `dst` so that the intake only ever sees the whole file."""
    part = dst.with_name(dst.name + ".part")  # the intake ignores .part until the rename
    shutil.copyfile(src, part)
    with open(part, "rb") as f:
        os.fsync(f.fileno())
    os.replace(part, dst)


def _free_name(folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    stem, suffix = name[: -len(".jsonl")], ".jsonl"
    cand, n = folder / name, 1
    while cand.exists() or cand.with_name(cand.name + ".part").exists():
        n += 1
        cand = folder / f"{stem}-{n}{suffix}"
    return cand


# -- list, status ----------------------------------------------------------------------
def cmd_queue_list(cfg: Config, args: argparse.Namespace) -> int:
    q = JobQueue(cfg.path("queue"))
    groups = [("pending", q.pending()), ("processing", q.processing()), ("done", q.done()), ("failed", q.failed())]
    if args.json:
        body = {name: [dict(e.to_dict(), error=q.read_error(e.job_id) if name == "failed" else None,
                            duplicate_of=(q.read_duplicate(e.job_id) or {}).get("duplicate_of") if name == "done" else None)
                       for e in entries]
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
            elif name == "done" and (dup := q.read_duplicate(e.job_id)):
                of = dup.get("duplicate_of") or {}
                why = f"  <- duplicate of {of.get('original_name') or of.get('job_id')} (not trained again)"
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
    dup = q.read_duplicate(entry.job_id) if entry.state is JobState.DONE else None
    if dup:
        out(f"  duplicate {dup.get('message')}")
    record = _job_record(cfg, entry.job_id)
    if record:
        _print_record(record)
        if record.get("changed"):  # written to in place after it was queued: what was learnt is not the file
            out(f"  CHANGED   {record['changed']}")
    report = from_history(cfg, lambda db: forgetting_view.report_of(db.conn, entry.job_id))
    for line in forgetting_cmds.report_lines(report) if report else []:
        out(line)
    return 0


def _print_record(record: dict) -> None:
    for key in RECORD_KEYS:
        if record.get(key) is not None:
            out(f"  {key:<9} {record[key]}")
    pref = json.loads(record.get("preference") or "null")
    if pref:
        sft = f", sft_weight {pref['sft_weight']}" if pref.get("sft_weight") else ""
        out(f"  preference {pref.get('loss_type')} (beta {pref.get('beta')}{sft})")
        if pref.get("before") is None and pref.get("after") is None:
            out("  held out  none (data.eval_fraction 0, or too few pairs): no figures before and after")
        for line in preference_lines(pref.get("before"), pref["after"]) if pref.get("after") is not None else []:
            out(line)
    bad = json.loads(record.get("bad_lines") or "[]")
    for e in bad[:10]:
        out(f"  bad line  {line_error(e)}")
    if len(bad) > 10:
        out(f"  ... and {len(bad) - 10} more")


def _job_record(cfg: Config, job_id: str) -> dict | None:
    return from_history(cfg, lambda db: db.job(job_id))


# -- retry, remove ---------------------------------------------------------------------
def cmd_queue_retry(cfg: Config, args: argparse.Namespace) -> int:
    return _queue_change(cfg, ControlAction.RETRY, args.name, args.priority)


def cmd_queue_remove(cfg: Config, args: argparse.Namespace) -> int:
    return _queue_change(cfg, ControlAction.REMOVE, args.name, None)


def _queue_change(cfg: Config, action: ControlAction, name: str, priority: str | None) -> int:
    """Retry/remove: done by the daemon when it runs (it alone moves queue files), else here under its lock."""
    q = JobQueue(cfg.path("queue"))
    entry = q.find(name)
    _check_change(entry, action)
    if daemon_pid(cfg) is not None:
        req = control.request(cfg, action, by="cli", job_id=entry.job_id, priority=priority)
        if not wait_consumed(req, WAIT_SECONDS):
            out(f"queue {action.value}: requested, but the daemon has not acted yet")
            return 2
        return _report_change(q, entry, _moved_from(q, entry), action)
    fd = acquire(lock_path(cfg))  # keeps a daemon from starting mid-move
    try:
        now = _change_without_daemon(cfg, q, entry, action, priority)
    except QueueError as e:
        out(f"queue {action.value}: refused: {e}")
        return 1
    finally:
        os.close(fd)
    return _report_change(q, entry, now, action)


def _moved_from(q: JobQueue, entry: QueueEntry, timeout: float = 5.0) -> QueueEntry:
    """Where the file is once the daemon has acted: it takes a request (deletes its file) before carrying
    it out, so right after that the file may still be where it was for a moment (longer on a busy machine)."""
    deadline = time.time() + timeout
    now = q.find(entry.job_id)
    while now.state is entry.state and time.time() < deadline:
        time.sleep(0.05)
        now = q.find(entry.job_id)
    return now


def _check_change(entry: QueueEntry, action: ControlAction) -> None:
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


def _report_change(q: JobQueue, entry: QueueEntry, now: QueueEntry, action: ControlAction) -> int:
    """Say where the file is now; 1 when the change did not take."""
    if action is ControlAction.RETRY:  # the daemon may have started (or even finished) it already
        ok = now.state is not JobState.FAILED
        if not ok:
            err = q.read_error(entry.job_id) or {}
            out(f"queue retry: refused: {entry.original_name} still fails validation: {err.get('message')}")
            print_line_errors(err.get("errors") or [], len(err.get("errors") or []), already_said=err.get("message") or "")
            return 1
    else:
        ok = now.state is JobState.FAILED and (q.read_error(entry.job_id) or {}).get("reason") == "removed"
    out(f"queue {action.value}: {entry.job_id} is now {now.state.value}")
    return 0 if ok else 1
