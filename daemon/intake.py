"""Intake: validate a complete inbox file, then queue it or refuse it with its reasons.

    take_file(path, priority, now, cfg, queue, db)   # validate; pending/ or failed/ with reasons
    retry_file(entry, priority, now, cfg, queue, db)  # failed/ -> pending/, validated again
    remove_file(entry, now, queue, db)                # pending/ -> failed/ (reason removed)

Which inbox files are complete is the service's InboxScanner (daemon/service/inbox.py);
the CLI uses retry and remove here when no daemon runs.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from daemon import atomic
from daemon.config import Config
from daemon.errors import QueueError
from daemon.jobqueue import JobQueue, QueueEntry
from daemon.dataset_ledger import DatasetLedger, duplicate_message
from daemon.states import FailReason, JobState, Priority
from daemon.history_db import HistoryDB
from daemon.validate import ValidationReport, validate_file

log = logging.getLogger(__name__)


def plural(n: int, word: str) -> str:
    """'1 record', '3 records'."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def force_marker(path: Path) -> Path:
    """`inbox/.NAME.force`, written by `trainctl queue add --force` before NAME appears: train NAME even if
    its content was learnt before. A dot name, so the intake never takes it as data."""
    return path.with_name(f".{path.name}.force")


def take_file(path: Path, prio: Priority, now: float, cfg: Config, queue: JobQueue, db: HistoryDB,
              ledger: DatasetLedger | None = None) -> QueueEntry:
    """Validate one complete inbox file, then queue it or refuse it with its reasons; a file whose content
    the adapter has learnt already goes to done/ as a duplicate (unless forced)."""
    report = validate_file(path, cfg.data, cfg.intake.max_file_bytes)
    if not report.accepted:
        error = {"reason": FailReason.INVALID_DATA.value, "message": report.reason,
                 "errors": [e.to_dict() for e in report.errors], "validation": report.to_dict()}
        entry = queue.reject(path, error, now)
        record_job(db, entry, prio, report, now, JobState.FAILED, reason=f"invalid_data: {report.reason}")
        db.event("job_rejected", f"{path.name}: {report.reason}", entry.job_id, t=now)
        log.warning("%s refused: %s", path.name, report.reason)
        return entry
    marker = force_marker(path)
    forced = marker.exists()
    entry = queue.admit(path, prio, now)
    record_job(db, entry, prio, report, now, JobState.PENDING)
    if forced:
        db.upsert_job(entry.job_id, forced=1)
        atomic.remove_file(marker)
    earlier = ledger.earlier(report.sha256) if ledger is not None and not forced else None
    if earlier is not None:
        return finish_duplicate(entry, earlier, now, queue, db)
    bad = f", {report.n_bad} bad line(s) skipped" if report.n_bad else ""
    db.event("job_queued", f"{path.name} queued ({prio.value}, {plural(report.n_valid, 'record')}{bad})", entry.job_id, t=now)
    log.info("%s queued as %s (%s, %s, %s%s)", path.name, entry.job_id, prio.value,
             report.format.value if report.format else "?", plural(report.n_valid, "record"), bad)
    return entry


def finish_duplicate(entry: QueueEntry, earlier: dict[str, Any], now: float, queue: JobQueue, db: HistoryDB) -> QueueEntry:
    """pending/processing -> done, not trained: the adapter has learnt these bytes already (the ledger)."""
    message = duplicate_message(entry.original_name, earlier)
    moved = queue.finish_duplicate(entry.job_id, earlier, message, now)
    db.upsert_job(entry.job_id, state=JobState.DONE.value, finished_at=now, duplicate_of=earlier["job_id"], steps=0)
    db.event("job_duplicate", message, entry.job_id, t=now)
    log.info("%s -> done/ as a duplicate of %s", entry.job_id, earlier["job_id"])
    return moved


def retry_file(entry: QueueEntry, prio: Priority, now: float, cfg: Config, queue: JobQueue, db: HistoryDB) -> QueueEntry:
    """failed -> pending, but only if the file passes validation under the current config,
    as at intake: a file refused then (bad encoding, too many bad lines) must not train
    now without its checks. Refused: it stays failed with the fresh reason (QueueError)."""
    report = validate_file(entry.path, cfg.data, cfg.intake.max_file_bytes)
    if not report.accepted:
        error = {"reason": FailReason.INVALID_DATA.value, "message": report.reason,
                 "errors": [e.to_dict() for e in report.errors], "validation": report.to_dict()}
        queue.refail(entry.job_id, error, now)
        record_job(db, entry, prio, report, now, JobState.FAILED, reason=f"invalid_data: {report.reason}")
        raise QueueError(f"{entry.original_name} still fails validation: {report.reason}")
    moved = queue.retry(entry.job_id, prio, now)
    record_job(db, moved, prio, report, now, JobState.PENDING)
    db.upsert_job(moved.job_id, crashes=0)
    db.event("job_queued", f"{entry.original_name} queued again ({prio.value}, {plural(report.n_valid, 'record')})", moved.job_id, t=now)
    return moved


def remove_file(entry: QueueEntry, now: float, queue: JobQueue, db: HistoryDB) -> QueueEntry:
    """pending -> failed (reason `removed`), with its record; nothing is deleted."""
    if entry.state is not JobState.PENDING:
        raise QueueError(f"{entry.job_id} is {entry.state.value}; only pending files can be removed")
    moved = queue.remove(entry.job_id, now)
    db.upsert_job(entry.job_id, state=JobState.FAILED.value, reason="removed")
    return moved


def record_job(db: HistoryDB, entry: QueueEntry, prio: Priority, report: ValidationReport, now: float,
               state: JobState, reason: str | None = None) -> None:
    """The job's record in the history: identity, format, counts and the first bad lines."""
    fields: dict[str, Any] = dict(
        original_name=entry.original_name, priority=prio.value, state=state.value, sha256=report.sha256,
        size=report.size, format=report.format.value if report.format else None, n_records=report.n_valid,
        n_bad=report.n_bad, bad_lines=[e.to_dict() for e in report.errors], queued_at=now, reason=reason)
    db.upsert_job(entry.job_id, **fields)
