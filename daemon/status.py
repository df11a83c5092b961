"""Live status (`training_status.json`) and history (`history.db`, SQLite in WAL mode).

    writer = StatusWriter(cfg.path("status"))
    writer.write(TrainingStatus(status=ServiceStatus.TRAINING, ...))   # atomic replace
    read_status(cfg.path("status"))                                    # dict, or None

    db = HistoryDB(cfg.path("status") / "history.db")                 # the service: the one writer
    db.record_step(job_id, step=3, global_step=40, epoch=0.3, loss=2.1, lr=1e-4, grad_norm=0.5, tokens_per_sec=900, t=now)
    HistoryDB.open_readonly(path)                                      # monitor and CLI

The status file is the snapshot a person or script reads at a glance (its
fields: daemon.schema.TrainingStatus); the database holds what grows (per-step
metrics, eval losses, job records, events) so months of training stay cheap to
query. Schema: docs/internals.md.
Standard library only.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

from daemon import atomic
from daemon.schema import TrainingStatus

STATUS_FILE = "training_status.json"
HISTORY_FILE = "history.db"


class StatusWriter:
    """The one writer of `training_status.json`."""

    def __init__(self, status_dir: str | Path) -> None:
        self.path = Path(status_dir) / STATUS_FILE

    def write(self, status: TrainingStatus, now: float | None = None) -> None:
        status.updated_at = time.time() if now is None else now
        atomic.write_json(self.path, status.to_dict())


def read_status(status_dir: str | Path) -> dict[str, Any] | None:
    """The last status written, or None when there is none (or it cannot be read)."""
    try:
        return atomic.read_json(Path(status_dir) / STATUS_FILE)
    except (FileNotFoundError, ValueError):
        return None


_SCHEMA = """
CREATE TABLE IF NOT EXISTS metrics (
    job_id TEXT NOT NULL, step INTEGER NOT NULL, global_step INTEGER NOT NULL, epoch REAL,
    loss REAL, lr REAL, grad_norm REAL, tokens_per_sec REAL, t REAL NOT NULL,
    PRIMARY KEY (job_id, step));
CREATE INDEX IF NOT EXISTS metrics_global ON metrics (global_step);
CREATE INDEX IF NOT EXISTS metrics_t ON metrics (t);
CREATE TABLE IF NOT EXISTS evals (
    job_id TEXT NOT NULL, step INTEGER NOT NULL, global_step INTEGER NOT NULL, eval_loss REAL, t REAL NOT NULL,
    PRIMARY KEY (job_id, step));
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY, original_name TEXT, priority TEXT, state TEXT, sha256 TEXT, size INTEGER,
    format TEXT, n_records INTEGER, n_bad INTEGER, bad_lines TEXT, queued_at REAL, started_at REAL,
    finished_at REAL, steps INTEGER, total_steps INTEGER, final_loss REAL, eval_loss REAL,
    crashes INTEGER NOT NULL DEFAULT 0, reason TEXT, adapter_version INTEGER);
CREATE INDEX IF NOT EXISTS jobs_sha ON jobs (sha256);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, t REAL NOT NULL, kind TEXT NOT NULL, job_id TEXT, message TEXT);
"""

JOB_COLUMNS = (
    "job_id", "original_name", "priority", "state", "sha256", "size", "format", "n_records", "n_bad",
    "bad_lines", "queued_at", "started_at", "finished_at", "steps", "total_steps", "final_loss",
    "eval_loss", "crashes", "reason", "adapter_version",
)


class HistoryDB:
    """Step metrics, evals, job records and events. The service is the only writer."""

    def __init__(self, path: str | Path, readonly: bool = False) -> None:
        self.path = Path(path)
        if readonly:
            self.conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=5, check_same_thread=False)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.conn = sqlite3.connect(self.path, timeout=10, check_same_thread=False)
            self.conn.execute("PRAGMA journal_mode=WAL")
            # NORMAL is durable across process crashes in WAL mode; a power cut may lose
            # the last few metric rows, which the resumed run writes again.
            self.conn.execute("PRAGMA synchronous=NORMAL")
            self.conn.executescript(_SCHEMA)
            self.conn.commit()
        self.conn.row_factory = sqlite3.Row

    @classmethod
    def open_readonly(cls, path: str | Path) -> "HistoryDB":
        return cls(path, readonly=True)

    def close(self) -> None:
        self.conn.close()

    # -- writes (service) -------------------------------------------------------
    def record_step(self, job_id: str, step: int, global_step: int, epoch: float, loss: float | None,
                    lr: float | None, grad_norm: float | None, tokens_per_sec: float | None, t: float) -> None:
        with self.conn:
            self.conn.execute(
                "INSERT OR REPLACE INTO metrics VALUES (?,?,?,?,?,?,?,?,?)",
                (job_id, step, global_step, epoch, loss, lr, grad_norm, tokens_per_sec, t),
            )

    def forget_steps_after(self, job_id: str, step: int) -> None:
        """A resume from a checkpoint at `step` replays later steps; drop their old rows."""
        with self.conn:
            self.conn.execute("DELETE FROM metrics WHERE job_id=? AND step>?", (job_id, step))
            self.conn.execute("DELETE FROM evals WHERE job_id=? AND step>?", (job_id, step))

    def discard_steps(self, job_id: str) -> tuple[int, float | None]:
        """A failed or skipped file's steps are not in the adapter, and the next file
        trains the same global steps again: drop its rows so the step history stays
        the adapter's own. Returns (steps dropped, loss of its last step)."""
        with self.conn:
            n, last = self.conn.execute(
                "SELECT COUNT(*), (SELECT loss FROM metrics WHERE job_id=? ORDER BY step DESC LIMIT 1) "
                "FROM metrics WHERE job_id=?", (job_id, job_id)).fetchone()
            self.conn.execute("DELETE FROM metrics WHERE job_id=?", (job_id,))
            self.conn.execute("DELETE FROM evals WHERE job_id=?", (job_id,))
        return n, last

    def record_eval(self, job_id: str, step: int, global_step: int, eval_loss: float, t: float) -> None:
        with self.conn:
            self.conn.execute("INSERT OR REPLACE INTO evals VALUES (?,?,?,?,?)", (job_id, step, global_step, eval_loss, t))

    def upsert_job(self, job_id: str, **fields: Any) -> None:
        unknown = set(fields) - set(JOB_COLUMNS)
        if unknown:
            raise ValueError(f"unknown job columns: {sorted(unknown)}")
        if "bad_lines" in fields and not isinstance(fields["bad_lines"], (str, type(None))):
            fields["bad_lines"] = json.dumps(fields["bad_lines"])
        cols = ["job_id", *fields]
        sets = ", ".join(f"{c}=excluded.{c}" for c in fields) or "job_id=excluded.job_id"
        with self.conn:
            self.conn.execute(
                f"INSERT INTO jobs ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))}) "
                f"ON CONFLICT(job_id) DO UPDATE SET {sets}",
                (job_id, *fields.values()),
            )

    def add_crash(self, job_id: str) -> int:
        """Count a trainer crash on this job; returns the new count."""
        with self.conn:
            self.conn.execute("INSERT INTO jobs (job_id, crashes) VALUES (?, 1) ON CONFLICT(job_id) DO UPDATE SET crashes=crashes+1", (job_id,))
        return self.job(job_id)["crashes"]

    def event(self, kind: str, message: str, job_id: str | None = None, t: float | None = None) -> None:
        with self.conn:
            self.conn.execute("INSERT INTO events (t, kind, job_id, message) VALUES (?,?,?,?)",
                              (time.time() if t is None else t, kind, job_id, message))

    # -- reads ------------------------------------------------------------------
    def job(self, job_id: str) -> dict[str, Any] | None:
        row = self.conn.execute("SELECT * FROM jobs WHERE job_id=?", (job_id,)).fetchone()
        return dict(row) if row else None

    def jobs(self, limit: int = 100) -> list[dict[str, Any]]:
        rows = self.conn.execute("SELECT * FROM jobs ORDER BY COALESCE(queued_at, 0) DESC LIMIT ?", (limit,))
        return [dict(r) for r in rows]

    def steps(self, job_id: str | None = None, since_global_step: int = -1) -> list[dict[str, Any]]:
        if job_id is None:
            rows = self.conn.execute("SELECT * FROM metrics WHERE global_step>? ORDER BY global_step", (since_global_step,))
        else:
            rows = self.conn.execute("SELECT * FROM metrics WHERE job_id=? AND global_step>? ORDER BY step", (job_id, since_global_step))
        return [dict(r) for r in rows]

    def evals(self, job_id: str | None = None) -> list[dict[str, Any]]:
        if job_id is None:
            rows = self.conn.execute("SELECT * FROM evals ORDER BY global_step")
        else:
            rows = self.conn.execute("SELECT * FROM evals WHERE job_id=? ORDER BY step", (job_id,))
        return [dict(r) for r in rows]

    def events(self, limit: int = 50) -> list[dict[str, Any]]:
        rows = self.conn.execute("SELECT * FROM events ORDER BY id DESC LIMIT ?", (limit,))
        return [dict(r) for r in rows]
