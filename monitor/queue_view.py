"""GET /api/queue: pending by priority, processing, done, failed with reasons.

Read only: the daemon is the one process that moves queue files
(`daemon/jobqueue.py`); retry/remove are control requests (see control.py).
Named queue_view, not queue, so it can never shadow the standard library.

Each listed file is completed from the daemon's job record in history.db:
its priority once it has left pending/ (the folder no longer says), and the bad
lines a done file was trained without under bad_line_policy=skip, which its
folder says nothing about either.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from pathlib import Path
from typing import Annotated, Any, Iterable

from fastapi import APIRouter, Query

from daemon import forgetting_view
from daemon.jobqueue import JobQueue, QueueEntry
from daemon.states import PRIORITY_ORDER
from daemon.history_db import HISTORY_FILE, HistoryDB
from monitor.deps import ReadAuth, StateDep
from monitor.models import QueueItem, QueueView

router = APIRouter(tags=["queue"], dependencies=[ReadAuth])
log = logging.getLogger(__name__)

MAX_LINES = 20  # the first bad lines tell the story
_JOB_FIELDS = ("format", "n_records", "n_bad", "steps", "total_steps", "final_loss", "eval_loss",
               "crashes", "adapter_version", "started_at", "finished_at", "eval_set_before", "eval_set_after", "changed")
_IN_CHUNK = 900  # under SQLite's default limit of host parameters


def _json(text: str | None) -> Any:
    try:
        return json.loads(text) if text else None
    except ValueError:  # a record torn by hand: the row shows without it
        return None


def job_records(db_path: Path, job_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
    """The daemon's job records for these ids; {} when there is no database or it cannot be read now."""
    ids = list(dict.fromkeys(job_ids))
    if not ids or not db_path.exists():
        return {}
    try:
        db = HistoryDB.open_readonly(db_path)
    except sqlite3.Error as e:
        log.warning("job records unavailable: %s", e)
        return {}
    out: dict[str, dict[str, Any]] = {}
    try:
        for i in range(0, len(ids), _IN_CHUNK):
            chunk = ids[i:i + _IN_CHUNK]
            for r in db.conn.execute(f"SELECT * FROM jobs WHERE job_id IN ({','.join('?' * len(chunk))})", chunk):
                out[r["job_id"]] = dict(r)
        for job_id, summary in forgetting_view.file_summaries(db.conn, ids).items():  # the figures of its scoring
            out.setdefault(job_id, {"job_id": job_id})["forgetting"] = summary
    except sqlite3.Error as e:  # an older database without the table, or locked past the timeout
        log.warning("job records unavailable: %s", e)
    finally:
        db.close()
    return out


def _bad_lines(raw: Any) -> list[dict] | None:
    try:
        lines = json.loads(raw) if isinstance(raw, str) else raw
    except ValueError:
        return None
    return lines[:MAX_LINES] if isinstance(lines, list) and lines else None


def _item(e: QueueEntry, job: dict[str, Any] | None = None, **extra: Any) -> QueueItem:
    d = e.to_dict()
    if job:
        d.update({k: job.get(k) for k in _JOB_FIELDS})
        d["bad_lines"] = _bad_lines(job.get("bad_lines"))
        d["has_activity"] = bool(job.get("activity"))
        d["forced"] = bool(job.get("forced"))
        d["forgetting"] = job.get("forgetting")
        d["preference"] = _json(job.get("preference"))
        if d.get("priority") is None:
            d["priority"] = job.get("priority")  # the folder says it only while pending
    return QueueItem(**d, **extra)


def _failed_item(q: JobQueue, e: QueueEntry, job: dict[str, Any] | None) -> QueueItem:
    err = q.read_error(e.job_id) or {}
    errors = err.get("errors")
    return _item(e, job, reason=err.get("reason"), message=err.get("message"),
                 errors=errors[:MAX_LINES] if isinstance(errors, list) else None,
                 failed_at=err.get("failed_at"))


def queue_view(q: JobQueue, done_limit: int = 50, failed_limit: int = 100, db_path: Path | None = None,
               done_offset: int = 0) -> QueueView:
    pending, processing = q.pending(), q.processing()
    done, failed = q.done(), q.failed()
    # job ids start with a UTC stamp, so reverse name order is most recent first; done pages from the newest
    done_shown = done[::-1][done_offset:done_offset + done_limit]
    failed_shown = list(reversed(failed[-failed_limit:]))
    jobs = job_records(db_path, (e.job_id for e in (*pending, *processing, *done_shown, *failed_shown))) if db_path else {}
    by_prio = {p.value: [_item(e, jobs.get(e.job_id)) for e in pending if e.priority is p] for p in PRIORITY_ORDER}
    counts = {f"pending_{k}": len(v) for k, v in by_prio.items()}
    counts.update(pending=len(pending), processing=len(processing), done=len(done), failed=len(failed))
    return QueueView(
        pending=by_prio,
        processing=[_item(e, jobs.get(e.job_id)) for e in processing],
        done=[_item(e, jobs.get(e.job_id), duplicate_of=(q.read_duplicate(e.job_id) or {}).get("duplicate_of"))
              for e in done_shown],
        failed=[_failed_item(q, e, jobs.get(e.job_id)) for e in failed_shown],
        counts=counts,
        done_offset=done_offset,
    )


@router.get("/api/queue", response_model=QueueView, summary="Pending by priority, processing, done, failed with reasons")
def get_queue(state: StateDep,
              done_limit: Annotated[int, Query(ge=0, le=1000, description="done files listed")] = 50,
              failed_limit: Annotated[int, Query(ge=0, le=1000)] = 100,
              done_offset: Annotated[int, Query(ge=0, description="done files skipped, most recent first: "
                                                                  "pages through them with done_limit")] = 0) -> QueueView:
    return queue_view(state.queue, done_limit, failed_limit, state.cfg.path("status") / HISTORY_FILE, done_offset)
