"""GET /api/queue: pending by priority, processing, done, failed with reasons.

Read only: the daemon is the one process that moves queue files
(`daemon/jobqueue.py`); retry/remove are control requests (see control.py).
Named queue_view, not queue, so it can never shadow the standard library.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from daemon.jobqueue import JobQueue, QueueEntry
from daemon.states import PRIORITY_ORDER
from monitor.deps import ReadAuth, StateDep
from monitor.models import QueueItem, QueueView

router = APIRouter(tags=["queue"], dependencies=[ReadAuth])


def _item(e: QueueEntry) -> QueueItem:
    return QueueItem(**e.to_dict())


def _failed_item(q: JobQueue, e: QueueEntry) -> QueueItem:
    err = q.read_error(e.job_id) or {}
    errors = err.get("errors")
    return QueueItem(**e.to_dict(), reason=err.get("reason"), message=err.get("message"),
                     errors=errors[:20] if isinstance(errors, list) else None,  # the first lines tell the story
                     failed_at=err.get("failed_at"))


def queue_view(q: JobQueue, done_limit: int = 50, failed_limit: int = 100) -> QueueView:
    pending = q.pending()
    by_prio = {p.value: [_item(e) for e in pending if e.priority is p] for p in PRIORITY_ORDER}
    done, failed = q.done(), q.failed()
    counts = {f"pending_{k}": len(v) for k, v in by_prio.items()}
    counts.update(pending=len(pending), processing=len(q.processing()), done=len(done), failed=len(failed))
    # job ids start with a UTC stamp, so reverse name order is most recent first
    return QueueView(
        pending=by_prio,
        processing=[_item(e) for e in q.processing()],
        done=[_item(e) for e in reversed(done[-done_limit:])],
        failed=[_failed_item(q, e) for e in reversed(failed[-failed_limit:])],
        counts=counts,
    )


@router.get("/api/queue", response_model=QueueView, summary="Pending by priority, processing, done, failed with reasons")
def get_queue(state: StateDep,
              done_limit: Annotated[int, Query(ge=0, le=1000)] = 50,
              failed_limit: Annotated[int, Query(ge=0, le=1000)] = 100) -> QueueView:
    return queue_view(state.queue, done_limit, failed_limit)
