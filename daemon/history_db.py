"""The history: `history.db`, SQLite in WAL mode, what grows (per-step metrics, eval losses, job records, events).

    db = HistoryDB(cfg.path("status") / HISTORY_FILE)                 # the service: the one writer
    db.record_step(job_id, step=3, global_step=40, epoch=0.3, loss=2.1, lr=1e-4, grad_norm=0.5, tokens_per_sec=900, t=now)
    HistoryDB.open_readonly(path)                                      # monitor and CLI

Months of training stay cheap to query; the live snapshot is daemon.status.
Schema: docs/internals.md. Standard library only.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from pathlib import Path
from typing import Any, Callable

from daemon import atomic, forgetting_view
from daemon.diskspace import is_disk_full, is_unwritable, writable

HISTORY_FILE = "history.db"

log = logging.getLogger(__name__)

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
CREATE TABLE IF NOT EXISTS activity (
    job_id TEXT NOT NULL, step INTEGER NOT NULL, global_step INTEGER NOT NULL, t REAL NOT NULL,
    final INTEGER NOT NULL DEFAULT 0, layers TEXT NOT NULL, kinds TEXT NOT NULL, per_layer TEXT NOT NULL,
    grid TEXT, PRIMARY KEY (job_id, step));
CREATE INDEX IF NOT EXISTS activity_global ON activity (global_step);
CREATE TABLE IF NOT EXISTS series (id INTEGER PRIMARY KEY, started_at REAL NOT NULL, reason TEXT);
CREATE TABLE IF NOT EXISTS metrics_archive (
    series INTEGER NOT NULL, job_id TEXT NOT NULL, step INTEGER NOT NULL, global_step INTEGER NOT NULL, epoch REAL,
    loss REAL, lr REAL, grad_norm REAL, tokens_per_sec REAL, t REAL NOT NULL,
    PRIMARY KEY (series, job_id, step));
CREATE INDEX IF NOT EXISTS metrics_archive_global ON metrics_archive (series, global_step);
CREATE TABLE IF NOT EXISTS evals_archive (
    series INTEGER NOT NULL, job_id TEXT NOT NULL, step INTEGER NOT NULL, global_step INTEGER NOT NULL,
    eval_loss REAL, t REAL NOT NULL, PRIMARY KEY (series, job_id, step));
CREATE TABLE IF NOT EXISTS activity_archive (
    series INTEGER NOT NULL, job_id TEXT NOT NULL, step INTEGER NOT NULL, global_step INTEGER NOT NULL, t REAL NOT NULL,
    final INTEGER NOT NULL DEFAULT 0, layers TEXT NOT NULL, kinds TEXT NOT NULL, per_layer TEXT NOT NULL,
    grid TEXT, PRIMARY KEY (series, job_id, step));
CREATE TABLE IF NOT EXISTS forgetting_files (
    job_id TEXT PRIMARY KEY, generation INTEGER NOT NULL, version INTEGER, t REAL NOT NULL, original_name TEXT,
    outcome TEXT NOT NULL, seconds REAL, train_seconds REAL, budget_seconds REAL, sampled INTEGER NOT NULL DEFAULT 0,
    examples_per_set INTEGER, bwt_loss REAL, bwt_accuracy REAL, bwt_sets INTEGER, worst_id TEXT, worst_name TEXT,
    worst_change REAL,
    gate_action TEXT, gate_tripped INTEGER NOT NULL DEFAULT 0, gate_over TEXT, gate_message TEXT);
CREATE INDEX IF NOT EXISTS forgetting_files_generation ON forgetting_files (generation, t);
CREATE TABLE IF NOT EXISTS forgetting (
    job_id TEXT NOT NULL, set_id TEXT NOT NULL, generation INTEGER NOT NULL, version INTEGER, t REAL NOT NULL,
    kind TEXT NOT NULL, name TEXT, set_job_id TEXT, examples INTEGER, tokens INTEGER, loss REAL, accuracy REAL,
    reference_loss REAL, reference_accuracy REAL, baseline_loss REAL, baseline_accuracy REAL,
    change REAL, drift REAL, limit_increase REAL, over INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (job_id, set_id));
CREATE INDEX IF NOT EXISTS forgetting_generation ON forgetting (generation, t);
"""

# A series of steps is the history of one adapter from global step 0. `trainctl config approve` of another
# adapter shape starts a new one (start_series): the steps, evals and activity so far move to the *_archive
# tables under the old series' id, so `metrics` (and every chart) holds the current adapter's steps alone
# while the old ones stay queryable. Series 0 is the first (no row in `series`).
SERIES_TABLES = (
    ("metrics", "job_id, step, global_step, epoch, loss, lr, grad_norm, tokens_per_sec, t, reward_accuracy, reward_margin"),
    ("evals", "job_id, step, global_step, eval_loss, t, preference"),
    ("activity", "job_id, step, global_step, t, final, layers, kinds, per_layer, grid"),
)

_METRICS = SERIES_TABLES[0][1]  # named: columns added later sit after the first nine

# Columns added after a history.db may already exist: (table, column, type), added at open.
_ADDED_COLUMNS = (("jobs", "activity", "TEXT"), ("jobs", "duplicate_of", "TEXT"), ("jobs", "forced", "INTEGER"),
                  ("jobs", "eval_set_before", "REAL"), ("jobs", "eval_set_after", "REAL"), ("jobs", "end_global_step", "INTEGER"),
                  ("jobs", "changed", "TEXT"),
                  ("jobs", "series", "INTEGER"),  # the series its end_global_step counts in (NULL: 0)
                  ("jobs", "replay", "TEXT"),
                  # preference files: a step's reward accuracy and margin, the held-out figures (JSON) of an
                  # eval, and the file's before and after (JSON: daemon/train/preference.py)
                  ("metrics", "reward_accuracy", "REAL"), ("metrics", "reward_margin", "REAL"),
                  ("metrics_archive", "reward_accuracy", "REAL"), ("metrics_archive", "reward_margin", "REAL"),
                  ("evals", "preference", "TEXT"), ("evals_archive", "preference", "TEXT"),
                  ("jobs", "preference", "TEXT"))  # data.replay_fraction: fraction, samples, sources (JSON)  # the series its end_global_step counts in (NULL: 0)

# The activity table thins itself (docs/internals.md): beyond ACTIVITY_MAX_ROWS rows every
# other one of the older half goes (per-layer totals, like a downsampled chart), and only the
# newest ACTIVITY_MAX_GRIDS samples keep their full per-module grid; a file's last sample is
# the last to go. Bounds the table at about 20k x (6 numbers per layer) + 2k full grids.
ACTIVITY_MAX_ROWS = 20_000
ACTIVITY_MAX_GRIDS = 2_000
ACTIVITY_THIN_EVERY = 100  # inserts between two thinning checks

MAX_HELD_WRITES = 100_000  # transactions held while the disk is full (a day of steps at one a second)
_ADD_CRASH = "INSERT INTO jobs (job_id, crashes) VALUES (?, 1)"

JOB_COLUMNS = (
    "job_id", "original_name", "priority", "state", "sha256", "size", "format", "n_records", "n_bad",
    "bad_lines", "queued_at", "started_at", "finished_at", "steps", "total_steps", "final_loss",
    "eval_loss", "crashes", "reason", "adapter_version", "activity", "duplicate_of", "forced",
    "eval_set_before", "eval_set_after", "end_global_step", "changed", "series", "replay", "preference",
)


def atomic_enospc(site: str, path: Path) -> None:
    """The history's injection point (daemon/atomic.py): SQLite's own words for a full disk."""
    if atomic.enospc_due(site, f"{site} {path}"):
        raise sqlite3.OperationalError("database or disk is full")


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
            self._add_columns()
            self.conn.commit()
        self.conn.row_factory = sqlite3.Row
        self.series = self._current_series()  # read once: a new series begins only while the daemon is stopped
        self._activity_inserts = 0
        self.on_disk_full: Callable[[BaseException], None] | None = None  # the service's disk guard
        self.on_event: Callable[[str, str, str | None, float], None] | None = None  # webhooks (daemon/service/notify.py)
        self.held: list[list[tuple[str, tuple]]] = []  # writes a full disk refused, in order, replayed by flush()
        self.held_dropped = 0  # writes dropped beyond MAX_HELD_WRITES

    def _add_columns(self) -> None:
        """Bring a history.db written by an older traind up to date (new columns start NULL)."""
        for table, column, kind in _ADDED_COLUMNS:
            have = {row[1] for row in self.conn.execute(f"PRAGMA table_info({table})")}
            if column not in have:
                self.conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")

    def _current_series(self) -> int:
        try:
            return self.conn.execute("SELECT COALESCE(MAX(id), 0) FROM series").fetchone()[0]
        except sqlite3.OperationalError:  # a history.db from before series, opened read-only
            return 0

    @classmethod
    def open_readonly(cls, path: str | Path) -> "HistoryDB":
        return cls(path, readonly=True)

    def close(self) -> None:
        self.conn.close()

    # -- writes (service) -------------------------------------------------------
    def _write(self, *statements: tuple[str, tuple]) -> bool:
        """Run `statements` in one transaction; False when a full disk refused them.

        A refused transaction is held, with every later one (so they keep their
        order), and replayed by `flush()` once space is back: a full disk costs the
        history nothing, and never takes the service down.
        """
        batch = list(statements)
        if self.held:
            self._hold(batch)
            return False
        try:
            atomic_enospc("history", self.path)
            with self.conn:
                for sql, args in batch:
                    self.conn.execute(sql, args)
            return True
        except (sqlite3.OperationalError, OSError) as e:
            if not self._held_for(e):
                raise
            self._hold(batch)
            if self.on_disk_full is not None:
                self.on_disk_full(e)
            return False

    def _held_for(self, e: BaseException) -> bool:
        """A write refused for the folder's sake (full, or not writable at all), not the statement's."""
        return is_disk_full(e) or (is_unwritable(e) and not writable(self.path.parent))

    def _hold(self, batch: list[tuple[str, tuple]]) -> None:
        if len(self.held) >= MAX_HELD_WRITES:
            self.held_dropped += 1
            return
        self.held.append(batch)

    def flush(self) -> bool:
        """Replay the held writes (space is back); False when the disk refuses them again."""
        while self.held:
            try:
                atomic_enospc("history", self.path)
                with self.conn:
                    for sql, args in self.held[0]:
                        self.conn.execute(sql, args)
            except (sqlite3.OperationalError, OSError) as e:
                if not self._held_for(e):
                    raise
                if self.on_disk_full is not None:
                    self.on_disk_full(e)
                return False
            self.held.pop(0)
        return True

    def record_step(self, job_id: str, step: int, global_step: int, epoch: float, loss: float | None,
                    lr: float | None, grad_norm: float | None, tokens_per_sec: float | None, t: float,
                    reward_accuracy: float | None = None, reward_margin: float | None = None) -> None:
        self._write((f"INSERT OR REPLACE INTO metrics ({_METRICS}) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                     (job_id, step, global_step, epoch, loss, lr, grad_norm, tokens_per_sec, t, reward_accuracy,
                      reward_margin)))

    def record_missed_steps(self, job_id: str, steps: list[dict[str, Any]], t: float) -> int:
        """Step reports sent again (a resume, a version's step log): insert those not recorded, in one
        transaction; the rows already there stay as they are. Returns how many were new."""
        rows = [(job_id, m["step"], m.get("global_step"), m.get("epoch"), m.get("loss"), m.get("lr"),
                 m.get("grad_norm"), m.get("tokens_per_sec"), t, m.get("reward_accuracy"), m.get("reward_margin"))
                for m in steps]
        before = self.conn.total_changes
        sql = f"INSERT OR IGNORE INTO metrics ({_METRICS}) VALUES (?,?,?,?,?,?,?,?,?,?,?)"
        if not self._write(*((sql, r) for r in rows)):  # held for a full disk: written once space is back
            return 0
        return self.conn.total_changes - before

    def steps_recorded_through(self, job_id: str) -> int:
        """The last step n of the file such that steps 1..n are all recorded (0 when step 1 is not)."""
        n = 0
        for (step,) in self.conn.execute("SELECT step FROM metrics WHERE job_id=? ORDER BY step", (job_id,)):
            if step != n + 1:
                break
            n = step
        return n

    def forget_steps_after(self, job_id: str, step: int) -> None:
        """A resume from a checkpoint at `step` replays later steps; drop their old rows."""
        self._write(*[(f"DELETE FROM {table} WHERE job_id=? AND step>?", (job_id, step))
                      for table in ("metrics", "evals", "activity")])

    def discard_steps(self, job_id: str) -> tuple[int, float | None]:
        """A failed or skipped file's steps are not in the adapter, and the next file
        trains the same global steps again: drop its rows so the step history stays
        the adapter's own. Returns (steps dropped, loss of its last step)."""
        n, last = self.conn.execute(
            "SELECT COUNT(*), (SELECT loss FROM metrics WHERE job_id=? ORDER BY step DESC LIMIT 1) "
            "FROM metrics WHERE job_id=?", (job_id, job_id)).fetchone()
        self._write(*[(f"DELETE FROM {table} WHERE job_id=?", (job_id,)) for table in ("metrics", "evals", "activity")])
        return n, last

    def record_eval(self, job_id: str, step: int, global_step: int, eval_loss: float, t: float,
                    preference: dict[str, Any] | None = None) -> None:
        self._write(("INSERT OR REPLACE INTO evals (job_id, step, global_step, eval_loss, t, preference) "
                     "VALUES (?,?,?,?,?,?)", (job_id, step, global_step, eval_loss, t,
                                             json.dumps(preference) if preference is not None else None)))

    def record_activity(self, job_id: str, step: int, global_step: int, t: float, final: bool,
                        layers: list[int], kinds: list[str], per_layer: dict, grid: dict) -> None:
        """One activity sample: per-layer totals and the full per-module grid ({measure: [[...]]})."""
        written = self._write(("INSERT OR REPLACE INTO activity VALUES (?,?,?,?,?,?,?,?,?)",
                               (job_id, step, global_step, t, int(final), json.dumps(layers), json.dumps(kinds),
                                json.dumps(per_layer), json.dumps(grid))))
        self._activity_inserts += 1
        if written and self._activity_inserts % ACTIVITY_THIN_EVERY == 0:
            try:
                self.thin_activity()
            except sqlite3.OperationalError as e:  # thinning waits for the next round
                if not is_disk_full(e):
                    raise

    def thin_activity(self, max_rows: int = ACTIVITY_MAX_ROWS, max_grids: int = ACTIVITY_MAX_GRIDS) -> tuple[int, int]:
        """Keep the activity table bounded; returns (rows dropped, grids dropped).

        Over `max_rows`, every other sample of the older half goes; a file's last sample only where the
        older half holds nothing else (each file's record keeps what it moved anyway). Over `max_grids`,
        the oldest samples lose their grids, files' last samples last.
        """
        with self.conn:
            dropped = 0
            n = self.conn.execute("SELECT COUNT(*) FROM activity").fetchone()[0]
            if n > max_rows:
                older = self.conn.execute("SELECT rowid, final FROM activity ORDER BY t LIMIT ?", (n // 2,)).fetchall()
                pick = [r for r, final in older if not final] or [r for r, _ in older]
                self.conn.executemany("DELETE FROM activity WHERE rowid=?", [(r,) for r in pick[::2]])
                dropped = len(pick[::2])
            grids = self.conn.execute("SELECT COUNT(*) FROM activity WHERE grid IS NOT NULL").fetchone()[0]
            cut = self.conn.execute(
                "UPDATE activity SET grid=NULL WHERE rowid IN (SELECT rowid FROM activity WHERE grid IS NOT NULL "
                "ORDER BY final, t LIMIT ?)", (max(0, grids - max_grids),)).rowcount
        return dropped, cut

    def upsert_job(self, job_id: str, **fields: Any) -> None:
        unknown = set(fields) - set(JOB_COLUMNS)
        if unknown:
            raise ValueError(f"unknown job columns: {sorted(unknown)}")
        for key in ("bad_lines", "activity"):
            if key in fields and not isinstance(fields[key], (str, type(None))):
                fields[key] = json.dumps(fields[key])
        if fields.get("end_global_step") is not None:
            fields.setdefault("series", self.series)
        cols = ["job_id", *fields]
        sets = ", ".join(f"{c}=excluded.{c}" for c in fields) or "job_id=excluded.job_id"
        self._write((f"INSERT INTO jobs ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))}) "
                     f"ON CONFLICT(job_id) DO UPDATE SET {sets}", (job_id, *fields.values())))

    def add_crash(self, job_id: str) -> int:
        """Count a trainer crash on this job; returns the new count (held writes included)."""
        before = (self.job(job_id) or {}).get("crashes") or 0
        held = sum(1 for batch in self.held for sql, args in batch if sql.startswith(_ADD_CRASH) and args == (job_id,))
        self._write((_ADD_CRASH + " ON CONFLICT(job_id) DO UPDATE SET crashes=crashes+1", (job_id,)))
        return before + held + 1

    def start_series(self, reason: str, t: float) -> int:
        """Begin a new series of steps (a new adapter, from global step 0); returns its id. The rows of the
        current series move to the *_archive tables, in one transaction. Run by `trainctl config approve`
        while the daemon is stopped (it holds the daemon's lock: no other writer)."""
        old = self._current_series()
        with self.conn:
            for table, cols in SERIES_TABLES:
                self.conn.execute(f"INSERT OR REPLACE INTO {table}_archive (series, {cols}) SELECT ?, {cols} FROM {table}",
                                  (old,))
                self.conn.execute(f"DELETE FROM {table}")
            self.conn.execute("INSERT INTO series (id, started_at, reason) VALUES (?,?,?)", (old + 1, t, reason))
        self.series = old + 1
        return self.series

    def record_forgetting(self, report: dict[str, Any], outcome: str, t: float) -> None:
        """A file's forgetting report (daemon/train/forgetting.py; `outcome` done, held or failed): its summary
        in `forgetting_files`, one `forgetting` row per set scored, replacing what an earlier report of the same
        file said (a held version accepted or rejected reports again). ValueError names a field it lacks."""
        row, cells = forgetting_view.rows_of(report, outcome, t)
        self._write(("DELETE FROM forgetting WHERE job_id=?", (row[0],)),
                    (f"INSERT OR REPLACE INTO forgetting_files VALUES ({','.join('?' * len(row))})", row),
                    *((f"INSERT OR REPLACE INTO forgetting VALUES ({','.join('?' * len(c))})", c) for c in cells))

    def event(self, kind: str, message: str, job_id: str | None = None, t: float | None = None) -> None:
        t = time.time() if t is None else t
        self._write(("INSERT INTO events (t, kind, job_id, message) VALUES (?,?,?,?)", (t, kind, job_id, message)))
        if self.on_event is not None:
            self.on_event(kind, message, job_id, t)

    # -- reads ------------------------------------------------------------------
    def job(self, job_id: str) -> dict[str, Any] | None:
        row = self.conn.execute("SELECT * FROM jobs WHERE job_id=?", (job_id,)).fetchone()
        return dict(row) if row else None

    def jobs(self, limit: int = 100) -> list[dict[str, Any]]:
        rows = self.conn.execute("SELECT * FROM jobs ORDER BY COALESCE(queued_at, 0) DESC LIMIT ?", (limit,))
        return [dict(r) for r in rows]

    def _table(self, table: str, series: int | None) -> tuple[str, str, tuple]:
        """Where a series' rows are: (table, extra condition, its arguments). The current one is `table`."""
        if series is None or series == self.series:
            return table, "1", ()
        return f"{table}_archive", "series=?", (series,)

    def steps(self, job_id: str | None = None, since_global_step: int = -1, series: int | None = None) -> list[dict[str, Any]]:
        """Step rows of the current series (or of `series`), of one job or of all."""
        table, cond, args = self._table("metrics", series)
        if job_id is None:
            rows = self.conn.execute(f"SELECT * FROM {table} WHERE {cond} AND global_step>? ORDER BY global_step",
                                     (*args, since_global_step))
        else:
            rows = self.conn.execute(f"SELECT * FROM {table} WHERE {cond} AND job_id=? AND global_step>? ORDER BY step",
                                     (*args, job_id, since_global_step))
        return [dict(r) for r in rows]

    def evals(self, job_id: str | None = None, series: int | None = None) -> list[dict[str, Any]]:
        table, cond, args = self._table("evals", series)
        if job_id is None:
            rows = self.conn.execute(f"SELECT * FROM {table} WHERE {cond} ORDER BY global_step", args)
        else:
            rows = self.conn.execute(f"SELECT * FROM {table} WHERE {cond} AND job_id=? ORDER BY step", (*args, job_id))
        return [dict(r) for r in rows]

    def eval_set_points(self, since: int = -1, until: int | None = None, series: int | None = None) -> list[dict[str, Any]]:
        """The fixed eval set's loss before and after each done file, at the global step the file ended
        (files that ended in the current series, or in `series`)."""
        rows = self.conn.execute(
            "SELECT job_id, original_name, end_global_step AS global_step, eval_set_before AS before, "
            "eval_set_after AS after, finished_at AS t FROM jobs WHERE eval_set_after IS NOT NULL "
            "AND COALESCE(series, 0) = ? AND end_global_step > ? AND end_global_step <= ? ORDER BY end_global_step",
            (self.series if series is None else series, since, until if until is not None else 2**62))
        return [dict(r) for r in rows]

    def series_list(self, with_steps: bool = False) -> list[dict[str, Any]]:
        """Every series of steps, oldest first: `id`, `started_at` and `reason` (None for the first), and with
        `with_steps` the number of step rows each holds."""
        out = {0: {"id": 0, "started_at": None, "reason": None}}
        counts: dict[int, int] = {}
        try:
            out |= {r["id"]: dict(r) for r in self.conn.execute("SELECT id, started_at, reason FROM series")}
            if with_steps:
                counts = dict(self.conn.execute("SELECT series, COUNT(*) FROM metrics_archive GROUP BY series").fetchall())
        except sqlite3.OperationalError:  # a history.db from before series: one series
            pass
        if with_steps:
            counts[self.series] = self.conn.execute("SELECT COUNT(*) FROM metrics").fetchone()[0]
            for i, r in out.items():
                r["steps"] = counts.get(i, 0)
        return [out[i] for i in sorted(out)]

    def events(self, limit: int = 50) -> list[dict[str, Any]]:
        rows = self.conn.execute("SELECT * FROM events ORDER BY id DESC LIMIT ?", (limit,))
        return [dict(r) for r in rows]

    def latest_activity(self, job_id: str | None = None) -> dict[str, Any] | None:
        """The newest activity sample that still has its full grid (of one job, or of any)."""
        where, args = ("WHERE grid IS NOT NULL AND job_id=?", (job_id,)) if job_id else ("WHERE grid IS NOT NULL", ())
        # by time, not global step: an approved base or LoRA change starts a new adapter at global step 0
        row = self.conn.execute(f"SELECT * FROM activity {where} ORDER BY t DESC LIMIT 1", args).fetchone()
        return _activity_row(row) if row else None

    def activity_series(self, since: int = -1, until: int | None = None, max_points: int = 500) -> tuple[list[dict[str, Any]], int]:
        """Per-layer totals over global steps in (since, until], every k-th row so that at most
        `max_points` come back (the last one always); returns (rows, rows in the range)."""
        until = 2**62 if until is None else until
        with self.conn:  # one read transaction: the count and the rows agree even while the service inserts
            n = self.conn.execute("SELECT COUNT(*) FROM activity WHERE global_step>? AND global_step<=?",
                                  (since, until)).fetchone()[0]
            k = max(1, -(-n // max(1, max_points)))
            rows = self.conn.execute(
                "SELECT job_id, step, global_step, t, final, layers, kinds, per_layer FROM (SELECT *, ROW_NUMBER() OVER "
                "(ORDER BY global_step, t) AS rn FROM activity WHERE global_step>? AND global_step<=?) "
                "WHERE (rn - 1) % ? = 0 OR rn = ? ORDER BY global_step, t", (since, until, k, n)).fetchall()
        return [_activity_row(r) for r in rows], n


def _activity_row(row: sqlite3.Row) -> dict[str, Any]:
    d = dict(row)
    for key in ("layers", "kinds", "per_layer", "grid"):
        if d.get(key) is not None:
            d[key] = json.loads(d[key])
    d["final"] = bool(d.get("final"))
    return d
