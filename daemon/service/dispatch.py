"""What the service hands the trainer next, and what it refuses to hand it.

    entry = next_entry(queue, tracker)                      # a crashed or stopped file first, then pending/
    job = job_for(entry, now, cfg, queue, db, ledger, tracker)   # protocol.Job, or None (failed or done here)
    hand_next(now, sup, tracker, cfg, queue, db, ledger)    # both, and the job to the trainer

A file is handed over only as it was checked at intake: one whose record is
missing (a crash between its move and its record) is validated again; one that
changed after it was queued is failed before the trainer sees it; one whose
content the adapter learnt while it waited (its twin) goes to done/ as a
duplicate. Standard library only.
"""

from __future__ import annotations

import logging
from typing import Any

from daemon import protocol
from daemon.config import Config
from daemon.dataset_ledger import DatasetLedger
from daemon.intake import finish_duplicate, record_job
from daemon.jobqueue import JobQueue, QueueEntry
from daemon.protocol import Job
from daemon.service.tracker import JobTracker
from daemon.states import FailReason, JobState, Priority, TrainerState
from daemon.history_db import HistoryDB
from daemon.validate import validate_file

log = logging.getLogger(__name__)


def hand_next(now: float, sup: Any, tracker: JobTracker, cfg: Config, queue: JobQueue, db: HistoryDB,
              ledger: DatasetLedger) -> str | None:
    """Hand the next file to the (ready) trainer: "sent", "refused" (failed or done on the spot: look again at
    once), or None (nothing to train, or the trainer is going: not a crash of the file)."""
    entry = next_entry(queue, tracker)
    if entry is None:
        return None
    job = job_for(entry, now, cfg, queue, db, ledger, tracker)
    if job is None:
        return "refused"
    tracker.begin(job)
    if not sup.send(protocol.Train(job=job)):
        tracker.end()
        return None
    sup.state = TrainerState.BUSY
    log.info("training %s", entry.job_id)
    return "sent"


def next_entry(queue: JobQueue, tracker: JobTracker) -> QueueEntry | None:
    """The file to train next: one a crash or a stop left in processing/ (not one whose move to done/ or failed/
    waits for space), else the first pending one, moved to processing/."""
    leftovers = [e for e in queue.processing() if not tracker.pending_outcome(e.job_id)]
    if leftovers:
        return leftovers[0]
    nxt = queue.next_pending()
    return queue.start(nxt) if nxt is not None else None


def job_for(entry: QueueEntry, now: float, cfg: Config, queue: JobQueue, db: HistoryDB, ledger: DatasetLedger,
            tracker: JobTracker) -> Job | None:
    """The job to send, or None when the file cannot be trained as it was queued (then it is failed here, with
    its reason, or done as a duplicate, before the trainer sees it)."""
    record = db.job(entry.job_id) or {}
    if not record.get("format") or not record.get("sha256"):  # a crash between admit and its record
        report = validate_file(entry.path, cfg.data, 0)
        if not report.accepted:
            tracker.fail(entry.job_id, FailReason.INVALID_DATA, report.reason or "invalid data", now,
                         errors=[e.to_dict() for e in report.errors])
            return None
        record_job(db, entry, Priority.NORMAL, report, now, JobState.PROCESSING)
        record = db.job(entry.job_id) or {}
    elif record.get("size") is not None and entry.size != record["size"]:
        # Written to after the settle window let it in: what would train is not what was checked.
        tracker.fail(entry.job_id, FailReason.INVALID_DATA,
                     f"the file changed after it was queued ({record['size']} -> {entry.size} bytes); write it under "
                     "a .part or .tmp name and rename it when complete, then `trainctl queue retry`", now)
        return None
    earlier = None if record.get("forced") else ledger.earlier(record["sha256"])
    if earlier is not None and earlier["job_id"] != entry.job_id:  # its twin trained while it waited
        finish_duplicate(entry, earlier, now, queue, db)
        return None
    return Job(entry.job_id, str(entry.path), entry.original_name, record["sha256"], record["format"],
               record["n_records"], db.steps_recorded_through(entry.job_id))
