"""GET /api/history: step metrics and eval losses from `history.db`, downsampled in SQLite.

A month of training is millions of rows; the page needs a few thousand points.
Rows are cut into equal global-step buckets and each bucket keeps four real
rows: its first, its last, and the ones with the lowest and highest value (loss
for metrics, eval_loss for evals). So spikes and dips survive however far the
chart is zoomed out, and every point drawn is a step that really happened.
Each kind of representative is one GROUP BY query using SQLite's documented
"bare column" rule (with a single min() or max() aggregate the other columns
come from the row that holds it), so no row ever reaches Python unless kept.
"""

from __future__ import annotations

import math
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query

from daemon.status import HISTORY_FILE, HistoryDB
from monitor.deps import ReadAuth, StateDep
from monitor.models import EvalPoint, History, HistoryPoint

router = APIRouter(tags=["history"], dependencies=[ReadAuth])

METRIC_COLS = ("global_step", "job_id", "step", "epoch", "loss", "lr", "grad_norm", "tokens_per_sec", "t")
EVAL_COLS = ("global_step", "job_id", "step", "eval_loss", "t")
KEEP_PER_BUCKET = 4  # first, min, max, last


@dataclass(frozen=True)
class Series:
    rows: list[dict[str, Any]]
    total: int
    bucket_width: int
    first: int | None
    last: int | None


def downsample(conn: sqlite3.Connection, table: str, cols: tuple[str, ...], value: str,
               since: int, until: int | None, max_points: int) -> Series:
    """Rows of `table` with since < global_step <= until, at most `max_points` of them, ordered by global_step."""
    where, args = "global_step > ?", [since]
    if until is not None:
        where += " AND global_step <= ?"
        args.append(until)
    total, lo, hi = conn.execute(f"SELECT COUNT(*), MIN(global_step), MAX(global_step) FROM {table} WHERE {where}", args).fetchone()
    select = ", ".join(cols)
    if total <= max_points:
        rows = conn.execute(f"SELECT {select} FROM {table} WHERE {where} ORDER BY global_step", args).fetchall()
        return Series([dict(zip(cols, r)) for r in rows], total, 1, lo, hi)
    buckets = max(1, max_points // KEEP_PER_BUCKET)
    width = max(1, math.ceil((hi - lo + 1) / buckets))
    others = ", ".join(c for c in cols if c != "global_step")
    kept: dict[int, tuple] = {}
    for agg in (f"MIN(global_step)", f"MAX(global_step)", f"MIN({value})", f"MAX({value})"):
        # global_step is always selected bare: for MIN/MAX(global_step) it is the aggregate's own row anyway.
        sql = (f"SELECT {agg}, global_step, {others} FROM {table} WHERE {where} "
               f"GROUP BY (global_step - ?) / ?")
        for r in conn.execute(sql, [*args, lo, width]):
            if r[1] is not None:
                kept[r[1]] = r[1:]
    rows = [dict(zip(cols, kept[g])) for g in sorted(kept)]
    return Series(rows, total, width, lo, hi)


def read_history(db_path: Path, since: int, until: int | None, max_points: int) -> History:
    if not db_path.exists():
        return History(points=[], evals=[], total_rows=0, downsampled=False, bucket_width=1,
                       first_global_step=None, last_global_step=None)
    db = HistoryDB.open_readonly(db_path)
    try:
        m = downsample(db.conn, "metrics", METRIC_COLS, "loss", since, until, max_points)
        e = downsample(db.conn, "evals", EVAL_COLS, "eval_loss", since, until, max_points)
    finally:
        db.close()
    return History(
        points=[HistoryPoint(**r) for r in m.rows], evals=[EvalPoint(**r) for r in e.rows],
        total_rows=m.total, downsampled=m.bucket_width > 1, bucket_width=m.bucket_width,
        first_global_step=m.first, last_global_step=m.last,
    )


@router.get("/api/history", response_model=History,
            summary="Step metrics and evals, min/max-preserving downsampled on the server")
def get_history(
    state: StateDep,
    since: Annotated[int, Query(description="only global steps after this one (for incremental updates)")] = -1,
    until: Annotated[int | None, Query(description="only global steps up to this one (zoomed views)")] = None,
    max_points: Annotated[int, Query(ge=16, le=20000, description="upper bound on points returned")] = 2000,
) -> History:
    return read_history(state.cfg.path("status") / HISTORY_FILE, since, until, max_points)
