"""Layer activity on the service side: totals, top movers, the status block, and the history table's bounds."""

from __future__ import annotations

import json
import math
import random
import sqlite3

from daemon import activity_summary
from daemon.history_db import HistoryDB
from tests.monitor_helpers import ALL_LINEAR, synthetic_activity

GRID = {
    "layers": [0, 1], "kinds": ["q_proj", "v_proj"],
    "values": {
        "update": [[3.0, 4.0], [None, 1.0]],
        "base": [[10.0, 10.0], [None, 5.0]],
        "change": [[0.3, 0.0], [None, 0.4]],
    },
}


def test_totals_are_frobenius_norms_and_relative_totals_a_ratio_of_them() -> None:
    layers = activity_summary.per_layer(GRID)
    assert layers["update"] == [5.0, 1.0]  # sqrt(3² + 4²); the missing module is not a zero
    assert math.isclose(layers["relative"][0], 5.0 / math.sqrt(200)) and layers["relative"][1] == 0.2
    kinds = activity_summary.per_kind(GRID)
    assert kinds["update"] == [3.0, math.sqrt(17)] and math.isclose(kinds["relative"][1], math.sqrt(17) / math.sqrt(125))
    assert set(layers) == {"update", "relative", "change"}  # grad_a/grad_b absent from this grid, not invented


def test_top_movers_rank_recent_change_relative_to_the_base() -> None:
    movers = activity_summary.top_movers(GRID, k=2)
    assert [(m.layer, m.kind, m.measure) for m in movers] == [(1, "v_proj", "relative_change"), (0, "q_proj", "relative_change")]
    assert math.isclose(movers[0].value, 0.4 / 5.0)
    first = {**GRID, "values": {k: v for k, v in GRID["values"].items() if k != "change"}}
    assert activity_summary.top_movers(first, k=1)[0].measure == "relative"  # no change yet at a first sample


def test_status_block_is_rounded_and_complete() -> None:
    msg = synthetic_activity(40, 1040, 80, ALL_LINEAR, random.Random(1), job_id="j")
    block = activity_summary.summary(msg, 1.8e9)
    assert (block.job_id, block.step, block.global_step) == ("j", 40, 1040) and block.sampled_at.startswith("2027-")
    assert set(block.per_layer) == set(activity_summary.MEASURES) and all(len(v) == 80 for v in block.per_layer.values())
    assert all(len(v) == 7 for v in block.per_kind.values()) and len(block.top_movers) == activity_summary.TOP_MOVERS
    exact = activity_summary.per_layer(msg)["update"][5]
    assert block.per_layer["update"][5] == float(f"{exact:.3e}") and math.isclose(block.per_layer["update"][5], exact, rel_tol=1e-3)


def record(db: HistoryDB, job: str, step: int, g: int, final: bool = False, n_layers: int = 2) -> None:
    msg = synthetic_activity(step, g, n_layers, ALL_LINEAR[:4], random.Random(step), job_id=job, final=final)
    db.record_activity(job, step, g, float(g), final, msg["layers"], msg["kinds"], activity_summary.per_layer(msg), msg["values"])


def test_series_is_every_kth_sample_and_always_the_last(tmp_path) -> None:
    db = HistoryDB(tmp_path / "h.db")
    for g in range(1, 101):
        record(db, "a", g, g)
    rows, total = db.activity_series(max_points=10)
    assert total == 100 and [r["global_step"] for r in rows] == [1, 11, 21, 31, 41, 51, 61, 71, 81, 91, 100]
    rows, total = db.activity_series(since=90, until=95)
    assert total == 5 and [r["global_step"] for r in rows] == [91, 92, 93, 94, 95]
    latest = db.latest_activity()
    assert latest["global_step"] == 100 and latest["grid"]["update"][1][3] > 0 and latest["layers"] == [0, 1]


def test_table_thins_itself_and_keeps_each_files_last_sample(tmp_path) -> None:
    db = HistoryDB(tmp_path / "h.db")
    for g in range(1, 401):
        record(db, f"job{(g - 1) // 100}", g, g, final=g % 100 == 0)
    dropped, cut = db.thin_activity(max_rows=200, max_grids=50)
    rows = db.conn.execute("SELECT global_step, final, grid IS NOT NULL FROM activity ORDER BY global_step").fetchall()
    assert dropped == 99 and len(rows) == 301  # every other sample of the older half, the files' last ones kept
    assert {g for g, final, _ in rows if final} == {100, 200, 300, 400}  # file ends are never thinned
    with_grid = [g for g, final, has in rows if has]
    # at most 50 full grids: the older file ends, then the newest samples
    assert len(with_grid) == 50 and with_grid[:3] == [100, 200, 300] and with_grid[3:] == [g for g, _, _ in rows][-47:]
    assert cut == 301 - 50
    assert db.latest_activity()["global_step"] == 400


def test_many_small_files_thin_their_last_samples_too(tmp_path) -> None:
    """A generator feeding a file a minute: nearly every sample is a file's last; the table stays bounded."""
    db = HistoryDB(tmp_path / "h.db")
    for g in range(1, 301):
        record(db, f"job{g}", 1, g, final=True)
    dropped, cut = db.thin_activity(max_rows=200, max_grids=20)
    assert dropped == 75 and db.conn.execute("SELECT COUNT(*) FROM activity").fetchone()[0] == 225
    assert db.conn.execute("SELECT COUNT(*) FROM activity WHERE grid IS NOT NULL").fetchone()[0] == 20
    assert db.latest_activity()["global_step"] == 300  # the newest keep theirs


def test_resume_and_failure_drop_the_samples_the_adapter_does_not_keep(tmp_path) -> None:
    db = HistoryDB(tmp_path / "h.db")
    for s in range(1, 11):
        record(db, "a", s, s)
    db.forget_steps_after("a", 6)  # resumed from the checkpoint at step 6: steps 7-10 are trained again
    assert [r["step"] for r in db.activity_series()[0]] == [1, 2, 3, 4, 5, 6]
    db.discard_steps("a")  # then skipped: none of it is in the adapter
    assert db.activity_series() == ([], 0) and db.latest_activity() is None


def test_an_older_history_gets_the_new_column(tmp_path) -> None:
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE jobs (job_id TEXT PRIMARY KEY, original_name TEXT, priority TEXT, state TEXT, sha256 TEXT, "
                 "size INTEGER, format TEXT, n_records INTEGER, n_bad INTEGER, bad_lines TEXT, queued_at REAL, "
                 "started_at REAL, finished_at REAL, steps INTEGER, total_steps INTEGER, final_loss REAL, eval_loss REAL, "
                 "crashes INTEGER NOT NULL DEFAULT 0, reason TEXT, adapter_version INTEGER)")
    conn.execute("INSERT INTO jobs (job_id, state) VALUES ('old', 'done')")
    conn.commit()
    conn.close()
    db = HistoryDB(path)
    db.upsert_job("new", state="done", activity={"layers": [0]})
    assert db.job("old")["activity"] is None and json.loads(db.job("new")["activity"]) == {"layers": [0]}
