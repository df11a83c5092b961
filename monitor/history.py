"""GET /api/history: step metrics and eval losses from `history.db`, downsampled on the server.

A month of training is millions of rows; the page needs a few thousand points.
Rows are cut into equal global-step buckets and each bucket keeps four real
rows: its first, its last, and the ones with the lowest and highest value (loss
for metrics, eval_loss for evals). So spikes and dips survive however far the
chart is zoomed out, and every point drawn is a step that really happened.

Ranges of up to SQL_MAX_ROWS rows are bucketed in SQLite (one GROUP BY per
kind of representative, using SQLite's documented "bare column" rule: with a
single min() or max() aggregate, the other columns come from the row that holds
it). Larger ranges are answered from the monitor's in-memory summary
(history_index.py), so the whole history of a month loads in milliseconds.
Either way only the kept rows are fetched in full.

Only one series of steps is read at a time (daemon.status: one adapter's history
from global step 0): the current one from `metrics`, an earlier one (`?series=N`,
after a `config approve` started a new adapter) from `metrics_archive`, in SQLite.
"""

from __future__ import annotations

import math
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Iterable

from fastapi import APIRouter, HTTPException, Query

from daemon.history_db import HISTORY_FILE, HistoryDB
from monitor.deps import ReadAuth, StateDep
from monitor.history_index import FINE, HistoryIndex
from monitor.models import EvalPoint, EvalSetPoint, History, HistoryPoint, Marker, SeriesInfo

router = APIRouter(tags=["history"], dependencies=[ReadAuth])

METRIC_COLS = ("global_step", "job_id", "step", "epoch", "loss", "lr", "grad_norm", "tokens_per_sec", "t")
EVAL_COLS = ("global_step", "job_id", "step", "eval_loss", "t")
KEEP_PER_BUCKET = 4  # first, min, max, last
SQL_MAX_ROWS = 20_000  # ~40 ms in SQLite; beyond this the in-memory summary answers
_IN_CHUNK = 900  # stays under SQLite's default limit of host parameters


@dataclass(frozen=True)
class Series:
    rows: list[dict[str, Any]]
    total: int
    bucket_width: int
    first: int | None
    last: int | None


def _where(since: int, until: int | None, series: int | None = None) -> tuple[str, list[int]]:
    """The range's condition; `series` for an *_archive table (the current series' tables hold it alone)."""
    head, args = ("series = ? AND ", [series]) if series is not None else ("", [])
    if until is None:
        return head + "global_step > ?", [*args, since]
    return head + "global_step > ? AND global_step <= ?", [*args, since, until]


def _fetch(conn: sqlite3.Connection, table: str, cols: tuple[str, ...], steps: Iterable[int],
           series: int | None = None) -> list[dict[str, Any]]:
    """Full rows for these global steps, in order (one row per step)."""
    steps = sorted(set(steps))
    by_step: dict[int, dict[str, Any]] = {}
    head, args = ("series = ? AND ", [series]) if series is not None else ("", [])
    for i in range(0, len(steps), _IN_CHUNK):
        chunk = steps[i:i + _IN_CHUNK]
        sql = f"SELECT {', '.join(cols)} FROM {table} WHERE {head}global_step IN ({','.join('?' * len(chunk))})"
        for r in conn.execute(sql, [*args, *chunk]):
            by_step.setdefault(r[0], dict(zip(cols, r)))
    return [by_step[g] for g in steps if g in by_step]


def downsample(conn: sqlite3.Connection, table: str, cols: tuple[str, ...], value: str,
               since: int, until: int | None, max_points: int, series: int | None = None) -> Series:
    """Rows of `table` with since < global_step <= until, at most `max_points`, bucketed in SQLite
    (of one `series` in an *_archive table)."""
    where, args = _where(since, until, series)
    total, lo, hi = conn.execute(f"SELECT COUNT(*), MIN(global_step), MAX(global_step) FROM {table} WHERE {where}", args).fetchone()
    if total <= max_points:
        rows = conn.execute(f"SELECT {', '.join(cols)} FROM {table} WHERE {where} ORDER BY global_step", args).fetchall()
        return Series([dict(zip(cols, r)) for r in rows], total, 1, lo, hi)
    width = max(1, math.ceil((hi - lo + 1) / max(1, max_points // KEEP_PER_BUCKET)))
    group = f"FROM {table} WHERE {where} GROUP BY (global_step - ?) / ?"
    keep: set[int] = set()
    for sql in (f"SELECT MIN(global_step) {group}", f"SELECT MAX(global_step) {group}",
                f"SELECT global_step, MIN({value}) {group}", f"SELECT global_step, MAX({value}) {group}"):
        keep.update(r[0] for r in conn.execute(sql, [*args, lo, width]) if r[0] is not None)
    return Series(_fetch(conn, table, cols, keep, series), total, width, lo, hi)


def _edge(conn: sqlite3.Connection, a: int, b: int) -> tuple[int, set[int]]:
    """Row count and the four representatives of a partial bucket [a, b] at a range's edge."""
    if a > b:
        return 0, set()
    rows = conn.execute("SELECT global_step, loss FROM metrics WHERE global_step BETWEEN ? AND ?", (a, b)).fetchall()
    if not rows:
        return 0, set()
    keep = {min(g for g, _ in rows), max(g for g, _ in rows)}
    losses = [(loss, g) for g, loss in rows if loss is not None]
    if losses:
        keep |= {min(losses)[1], max(losses)[1]}
    return len(rows), keep


def metrics_series(conn: sqlite3.Connection, index: HistoryIndex, since: int, until: int | None, max_points: int) -> Series:
    index.refresh(conn)
    lo, hi = since + 1, index.max_g if until is None else min(until, index.max_g)
    first_b, last_b = math.ceil(lo / FINE), (hi + 1) // FINE - 1  # summary buckets wholly inside [lo, hi]
    whole = index.count(first_b, last_b) if first_b <= last_b else 0
    if whole <= SQL_MAX_ROWS:
        return downsample(conn, "metrics", METRIC_COLS, "loss", since, until, max_points)
    n_head, head = _edge(conn, lo, first_b * FINE - 1)
    n_tail, tail = _edge(conn, (last_b + 1) * FINE, hi)
    budget = max(1, (max_points - 2 * KEEP_PER_BUCKET) // KEEP_PER_BUCKET)
    per = math.ceil((last_b - first_b + 1) / budget)
    rows = _fetch(conn, "metrics", METRIC_COLS, index.keep(first_b, last_b, per) | head | tail)
    return Series(rows, whole + n_head + n_tail, per * FINE, rows[0]["global_step"], rows[-1]["global_step"])


MARKED_EVENTS = {"consolidated": "consolidation", "rollback": "rollback"}


def markers(conn: sqlite3.Connection, shown: SeriesInfo, every: list[SeriesInfo], current: bool) -> list[Marker]:
    """Every consolidation and rollback of the series shown (a handful: the whole list each time), at the last
    global step trained before it: the steps the events table does not keep come from the metrics' times."""
    later = [s.started_at for s in every if s.started_at is not None and s.id > shown.id]
    lo, hi = shown.started_at or 0.0, min(later) if later else float("inf")
    table, head, args = ("metrics", "", []) if current else ("metrics_archive", "series = ? AND ", [shown.id])
    rows = conn.execute("SELECT t, kind, message FROM events WHERE kind IN (?, ?) AND t >= ? AND t < ? ORDER BY t",
                        (*MARKED_EVENTS, lo, hi if hi != float("inf") else 1e18))
    out = []
    for t, kind, message in rows.fetchall():
        (step,) = conn.execute(f"SELECT MAX(global_step) FROM {table} WHERE {head}t <= ?", (*args, t)).fetchone()
        out.append(Marker(global_step=step or 0, kind=MARKED_EVENTS[kind], message=message, t=t))
    return out


def read_history(db_path: Path, index: HistoryIndex, since: int, until: int | None, max_points: int,
                 series: int | None = None) -> History:
    """The current series of steps, or `series` (LookupError when there is no such series)."""
    if not db_path.exists():
        if series:
            raise LookupError(f"no series {series} in the history")
        return History(points=[], evals=[], total_rows=0, downsampled=False, bucket_width=1,
                       first_global_step=None, last_global_step=None)
    db = HistoryDB.open_readonly(db_path)
    try:
        every = [SeriesInfo(**s) for s in db.series_list()]
        shown = next((s for s in every if s.id == (db.series if series is None else series)), None)
        if shown is None:
            raise LookupError(f"no series {series} in the history (there are {', '.join(str(s.id) for s in every)})")
        if shown.id == db.series:
            m = metrics_series(db.conn, index, since, until, max_points)
            e = downsample(db.conn, "evals", EVAL_COLS, "eval_loss", since, until, max_points)
        else:  # an earlier adapter's steps (small next to months of the current one's: bucketed in SQLite)
            m = downsample(db.conn, "metrics_archive", METRIC_COLS, "loss", since, until, max_points, shown.id)
            e = downsample(db.conn, "evals_archive", EVAL_COLS, "eval_loss", since, until, max_points, shown.id)
        try:
            eval_set = db.eval_set_points(since, until, shown.id)
        except sqlite3.OperationalError:  # a database from before the eval set
            eval_set = []
        marks = markers(db.conn, shown, every, shown.id == db.series)
    finally:
        db.close()
    return History(
        series=shown, all_series=every,
        points=[HistoryPoint(**r) for r in m.rows], evals=[EvalPoint(**r) for r in e.rows],
        eval_set=[EvalSetPoint(**r) for r in eval_set], markers=marks,
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
    series: Annotated[int | None, Query(ge=0, description="an earlier series of steps (see all_series); "
                                                          "default: the current one")] = None,
) -> History:
    try:
        return read_history(state.cfg.path("status") / HISTORY_FILE, state.history, since, until, max_points, series)
    except LookupError as e:
        raise HTTPException(404, str(e)) from None
