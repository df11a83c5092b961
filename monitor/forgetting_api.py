"""GET /api/forgetting and /api/forgetting/jobs/{job_id}: what each file made the model forget, from `history.db`.

After every file the trainer scores the probe files and the keep-sets of the files learnt before it; the service
records each report. The matrix is one generation's (`?generation=`, default the current one): its last `files`
files as rows, in learning order, and as columns the probes (at most daemon.forgetting_view.MAX_PROBES) then the
keep-sets of those files; `omitted_sets` counts the other sets scored. `trainctl forgetting --json` prints the
same document (daemon/forgetting_view.py builds both).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query
from pydantic import BaseModel, Field

from daemon import adapters, forgetting_view
from daemon.history_db import HISTORY_FILE, HistoryDB
from monitor.deps import ReadAuth, StateDep

router = APIRouter(tags=["forgetting"], dependencies=[ReadAuth])


class Score(BaseModel):
    loss: float | None
    accuracy: float | None


class BackwardTransfer(Score):
    sets: int | None = Field(description="the earlier keep-sets it is the mean over")


class Worst(BaseModel):
    id: str
    name: str | None
    change: float | None


class Gate(BaseModel):
    action: str | None = Field(description="warn, hold or rollback (forgetting.action)")
    tripped: bool
    over: list[str] = Field(description="the sets over their limit")
    message: str | None


class ForgettingFile(BaseModel):
    index: int = Field(description="the file's place in the generation (0: the first learnt)")
    job_id: str
    name: str | None
    version: int | None = Field(description="the adapter version it published (null: none, e.g. rolled back)")
    t: float = Field(description="when the service recorded its report (Unix seconds)")
    outcome: str = Field(description="done, held (the gate kept its version aside) or failed")
    sampled: bool = Field(description="only the first examples_per_set examples of each set were scored (budget)")
    examples_per_set: int | None
    seconds: float | None = Field(description="scoring time")
    train_seconds: float | None = Field(description="the file's training time")
    budget_seconds: float | None
    backward_transfer: BackwardTransfer | None = Field(description="mean over earlier files' keep-sets of (now - right after "
                                                         "learnt): GEM's BWT, here on loss and token accuracy")
    worst: Worst | None
    gate: Gate


class ForgettingSet(BaseModel):
    id: str = Field(description="probe:<file name> or keep:<job_id>")
    kind: str = Field(description="probe or keep")
    name: str | None
    job_id: str | None = Field(description="keep: the file it stands for")
    learnt_at: int | None = Field(description="keep: the index of that file")


class ForgettingCell(BaseModel):
    loss: float | None
    accuracy: float | None
    change: float | None = Field(description="relative change in loss: keep since learnt, probe since the version "
                                             "before the file")
    drift: float | None = Field(description="probe: relative change in loss since the generation began")
    over: bool
    limit: float | None
    examples: int | None
    tokens: int | None
    reference: Score | None
    baseline: Score | None


class ProbeSeries(BaseModel):
    id: str
    name: str | None
    baseline: Score | None = Field(description="at the generation's start")
    loss: list[float | None] = Field(description="one per file (row)")
    accuracy: list[float | None]
    drift: list[float | None]
    change: list[float | None]


class ForgettingMarker(BaseModel):
    kind: str = Field(description="consolidation or rollback")
    t: float
    after: int | None = Field(description="the index of the last file before it (null: before the shown files)")
    message: str | None


class ForgettingMatrix(BaseModel):
    generation: int
    generations: list[int] = Field(description="every generation with a file scored")
    total_files: int = Field(description="files scored in this generation")
    first_index: int = Field(description="index of the first file shown (the last `files_limit` are shown)")
    files_limit: int
    files: list[ForgettingFile] = Field(description="rows, in the order the files were learnt")
    sets: list[ForgettingSet] = Field(description="columns: probes, then keep-sets in learning order")
    cells: list[list[ForgettingCell | None]] = Field(description="cells[file][set]; null: not scored after that file")
    omitted_sets: int = Field(description="sets scored but not shown (keep-sets of earlier files, probes past the cap)")
    probes: list[ProbeSeries]
    markers: list[ForgettingMarker]


def read_matrix(db_path: Path, adapters_dir: Path, generation: int | None, files: int) -> dict[str, Any]:
    current = adapters.peek_current(adapters_dir)
    here = current.manifest.generation if current is not None else None
    if not db_path.exists():
        return forgetting_view.empty(generation if generation is not None else here or 0, files)
    db = HistoryDB.open_readonly(db_path)
    try:
        return forgetting_view.matrix(db.conn, generation, files, here)
    finally:
        db.close()


@router.get("/api/forgetting", response_model=ForgettingMatrix,
            summary="The forgetting matrix of a generation: files × probes and keep-sets, with backward transfer")
def get_forgetting(
    state: StateDep,
    generation: Annotated[int | None, Query(ge=0, description="default: the current generation")] = None,
    files: Annotated[int, Query(ge=1, le=forgetting_view.MAX_FILES, description="the last N files of it")]
    = forgetting_view.DEFAULT_FILES,
) -> dict[str, Any]:
    return read_matrix(state.cfg.path("status") / HISTORY_FILE, state.cfg.path("adapters"), generation, files)


@router.get("/api/forgetting/jobs/{job_id}", summary="One file's forgetting report, every set scored after it")
def get_file_forgetting(state: StateDep, job_id: str) -> dict[str, Any]:
    path = state.cfg.path("status") / HISTORY_FILE
    report = None
    if path.exists():
        db = HistoryDB.open_readonly(path)
        try:
            report = forgetting_view.report_of(db.conn, job_id)
        except sqlite3.OperationalError:
            report = None
        finally:
            db.close()
    if report is None:
        raise HTTPException(404, f"no forgetting report for {job_id!r}: not trained yet, forgetting.enabled off, "
                                 "or trained before traind scored forgetting")
    return report
