"""GET /api/activity and /api/activity/jobs/{job_id}: per-layer LoRA activity from `history.db`.

The latest sample comes with its full grid (every LoRA module: layer × kind),
the history as per-layer totals over global steps, every k-th sample so that
at most `max_points` come back (the history keeps its own bound: see
daemon/history_db.py, ACTIVITY_MAX_ROWS). A finished file's record says what that
file moved. Measures: docs/internals.md, "Layer activity".
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Query

from daemon import activity_summary
from daemon.history_db import HISTORY_FILE, HistoryDB
from monitor.deps import ReadAuth, StateDep
from monitor.models import ActivitySample, ActivitySeries, ActivityView, FileActivity, MoverModel

router = APIRouter(tags=["activity"], dependencies=[ReadAuth])

GRID_MEASURES = ("update", "relative", "change", "relative_change", "grad_a", "grad_b",
                 "frozen", "intruders")  # the last two where lora.freeze_stalled / activity.intruders are on


def _rounded(lists: list) -> list:
    """Nested lists of numbers to 4 significant digits: for drawing (the history keeps full precision)."""
    return [_rounded(x) if isinstance(x, list) else activity_summary.rounded(x) for x in lists]


def sample_view(row: dict[str, Any]) -> ActivitySample:
    """A history row with its grid, the derived relative change and its totals."""
    grid = {"layers": row["layers"], "kinds": row["kinds"], "values": row["grid"]}
    measures = activity_summary.present(grid, GRID_MEASURES)
    return ActivitySample(
        job_id=row["job_id"], step=row["step"], global_step=row["global_step"], t=row["t"], final=row["final"],
        layers=row["layers"], kinds=row["kinds"],
        values={m: _rounded(activity_summary.cell_values(grid, m)) for m in measures},
        per_layer={m: _rounded(v) for m, v in activity_summary.per_layer(grid, measures).items()},
        per_kind={m: _rounded(v) for m, v in activity_summary.per_kind(grid, measures).items()},
        top_movers=[MoverModel(**dataclasses.asdict(m)) for m in activity_summary.top_movers(grid, 10)],
    )


def series_view(rows: list[dict[str, Any]], latest: ActivitySample | None, measure: str, top: int | None) -> ActivitySeries:
    """Per-layer totals of `measure` over time (4 significant digits), for every layer or the `top`
    layers of the latest sample; samples of another layer layout (an earlier base) are left out."""
    if latest is None:
        return ActivitySeries(layers=[], measure=measure, global_steps=[], t=[], job_ids=[], values=[])
    keep = list(range(len(latest.layers)))
    now = latest.per_layer.get(measure) or []
    if top is not None and now:
        keep = sorted(sorted(keep, key=lambda i: -(now[i] or 0))[:top])
    same = [r for r in rows if r["layers"] == latest.layers and measure in r["per_layer"]]
    return ActivitySeries(
        layers=[latest.layers[i] for i in keep], measure=measure, global_steps=[r["global_step"] for r in same],
        t=[r["t"] for r in same], job_ids=[r["job_id"] for r in same],
        values=[[activity_summary.rounded(r["per_layer"][measure][i]) for i in keep] for r in same],
    )


def read_activity(db_path: Path, since: int, until: int | None, max_points: int, measure: str = "relative",
                  top: int | None = None) -> ActivityView:
    empty = ActivityView(latest=None, series=series_view([], None, measure, top), total_rows=0, downsampled=False)
    if not db_path.exists():
        return empty
    db = HistoryDB.open_readonly(db_path)
    try:
        latest = db.latest_activity()
        rows, total = db.activity_series(since, until, max_points)
    except sqlite3.OperationalError:  # a history.db from before layer activity: nothing sampled yet
        return empty
    finally:
        db.close()
    sample = sample_view(latest) if latest else None
    return ActivityView(latest=sample, series=series_view(rows, sample, measure, top),
                        total_rows=total, downsampled=len(rows) < total)


@router.get("/api/activity", response_model=ActivityView,
            summary="Per-layer LoRA activity: the latest full grid and per-layer totals over time")
def get_activity(
    state: StateDep,
    since: Annotated[int, Query(description="only samples after this global step")] = -1,
    until: Annotated[int | None, Query(description="only samples up to this global step")] = None,
    max_points: Annotated[int, Query(ge=2, le=5000, description="upper bound on samples in the series")] = 200,
    measure: Annotated[Literal["update", "relative", "change", "relative_change", "grad_a", "grad_b"],
                       Query(description="the per-layer total the series holds")] = "relative",
    top: Annotated[int | None, Query(ge=1, le=1000, description="only the layers with the largest value at "
                                                                  "the latest sample (default: every layer)")] = None,
) -> ActivityView:
    return read_activity(state.cfg.path("status") / HISTORY_FILE, since, until, max_points, measure, top)


def _not_trained(state: Any, job_id: str, earlier_id: str) -> str:
    """Why a duplicate has no record of what it moved, naming the earlier file (from its note in done/)."""
    earlier = state.queue.read_duplicate(job_id) or {}
    earlier = earlier.get("duplicate_of") or {}
    name = earlier.get("original_name") or earlier_id
    where = f", already in adapter v{earlier['version']}" if earlier.get("version") is not None else ""
    return f"{job_id} was not trained: its content repeats {name} ({earlier_id}){where}; nothing moved"


@router.get("/api/activity/jobs/{job_id}", response_model=FileActivity,
            summary="What one finished file moved: per module ‖ΔW after − ΔW before‖, per layer and kind")
def get_file_activity(state: StateDep, job_id: str) -> FileActivity:
    path = state.cfg.path("status") / HISTORY_FILE
    record = None
    if path.exists():
        db = HistoryDB.open_readonly(path)
        try:
            record = db.job(job_id)
        except sqlite3.OperationalError:
            record = None
        finally:
            db.close()
    if record is None:
        raise HTTPException(404, f"no job {job_id!r} in the history")
    if record.get("duplicate_of"):  # done without training: its content was learnt from an earlier file
        raise HTTPException(404, _not_trained(state, job_id, record["duplicate_of"]))
    if not record.get("activity"):
        raise HTTPException(404, f"{job_id} has no activity record: it has not finished, failed, "
                                 "or was trained before traind measured layer activity")
    moved = json.loads(record["activity"])
    return FileActivity(job_id=job_id, original_name=record.get("original_name"), steps=record.get("steps"),
                        adapter_version=record.get("adapter_version"), layers=moved["layers"], kinds=moved["kinds"],
                        values=moved["values"], per_layer=moved["per_layer"], per_kind=moved["per_kind"],
                        top=[MoverModel(**m) for m in moved["top"]])
