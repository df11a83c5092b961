"""Monitor API against a real app on a temporary instance tree.

    pytest tests/test_monitor_api.py -q

The test plays the daemon: it writes status and history with the service's own
writers (`StatusWriter`, `HistoryDB`) and queue files with `JobQueue`, then checks
what the monitor serves and what it writes (control files, inbox uploads).
"""

from __future__ import annotations

import json
import math
import os
import random
import stat
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import httpx
import psutil
import pytest
import uvicorn
from fastapi.testclient import TestClient

from daemon import control
from daemon.states import ControlAction, DesiredState, FailReason, Priority
from daemon.history_db import HISTORY_FILE, HistoryDB
from monitor import auth, events
from monitor.app import create_app
from monitor.gpu import GpuProbe
from monitor.history import downsample
from monitor.liveness import assess
from monitor.settings import MonitorSettings
from tests.monitor_helpers import REPO, FakeDaemon, free_port, make_instance, token_of

JOB = "20261122T020301Z-000001--data.jsonl"


@pytest.fixture
def cfg(tmp_path):
    return make_instance(tmp_path)


@pytest.fixture
def client(cfg):
    with TestClient(create_app(cfg), base_url="http://127.0.0.1") as c:
        c.headers_with_token = {auth.HEADER: token_of(cfg)}
        yield c


@pytest.fixture
def daemon(cfg):
    d = FakeDaemon(cfg)
    yield d
    d.db.close()


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# ---------------------------------------------------------------- token

def test_token_file_is_created_0600_and_reused(cfg):
    create_app(cfg)
    path = cfg.path("status") / auth.TOKEN_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    first = token_of(cfg)
    assert len(first) >= 32
    create_app(cfg)
    assert token_of(cfg) == first


def test_monitor_imports_no_torch_and_builds_nothing_at_import():
    code = "import sys, monitor.app, monitor.__main__ as m; assert 'torch' not in sys.modules and 'transformers' not in sys.modules; assert not hasattr(monitor.app, 'app')"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


# ---------------------------------------------------------------- status and staleness

def test_no_status_file_is_stale(client):
    s = client.get("/api/status").json()
    assert s["stale"] is True and s["status"] is None and "no status file" in s["stale_reason"]
    h = client.get("/api/health").json()
    assert h["ok"] is True and h["daemon"] == "absent"


def test_fresh_status_from_live_pid_is_not_stale(client, daemon):
    daemon.status(current_file="data.jsonl", job_id=JOB, current_step=3, total_steps=10, loss=1.25)
    s = client.get("/api/status").json()
    assert (s["status"], s["stale"], s["daemon_alive"], s["loss"], s["current_file"]) == ("training", False, True, 1.25, "data.jsonl")
    assert client.get("/api/health?strict=true").status_code == 200


def test_old_update_is_stale(client, daemon):
    daemon.status(now=time.time() - 3 * 2.0 - 1)  # write interval 2 s: three missed writes
    s = client.get("/api/status").json()
    assert s["stale"] is True and "no status update" in s["stale_reason"] and s["status"] == "training"
    assert client.get("/api/health?strict=true").status_code == 503


def test_gone_pid_is_stale_even_when_fresh(cfg, client):
    FakeDaemon(cfg, pid=dead_pid()).status()
    s = client.get("/api/status").json()
    assert s["stale"] is True and "is gone" in s["stale_reason"] and s["daemon_alive"] is False


def test_stale_threshold_follows_write_interval():
    now = 1_000_000.0
    alive = lambda pid, started: True  # noqa: E731
    raw = {"pid": 1, "updated_at": "1970-01-12T13:46:30.000Z", "write_interval_seconds": 5.0}  # now - 10 s
    assert assess(raw, now, alive).stale is False  # 10 s < 3 x 5 s
    raw["write_interval_seconds"] = 3.0
    assert assess(raw, now, alive).stale is True  # 10 s > 3 x 3 s


# ---------------------------------------------------------------- history

def test_history_returns_every_row_when_small_and_increments(client, daemon):
    daemon.steps(50)
    daemon.eval(0.8)
    h = client.get("/api/history").json()
    assert [p["global_step"] for p in h["points"]] == list(range(50))
    assert h["downsampled"] is False and h["evals"][0]["eval_loss"] == 0.8
    h2 = client.get("/api/history?since=44").json()
    assert [p["global_step"] for p in h2["points"]] == [45, 46, 47, 48, 49]
    assert client.get("/api/history?max_points=5").status_code == 422


def _brute_force(rows, lo, width):
    """Reference: per bucket the first, last, min-loss and max-loss rows (global steps)."""
    buckets = {}
    for g, loss in rows:
        buckets.setdefault((g - lo) // width, []).append((g, loss))
    keep = set()
    for b in buckets.values():
        keep |= {b[0][0], b[-1][0], min(b, key=lambda r: r[1])[0], max(b, key=lambda r: r[1])[0]}
    return sorted(keep)


def test_downsampling_matches_reference_on_irregular_steps(tmp_path):
    db = HistoryDB(tmp_path / HISTORY_FILE)
    rng = random.Random(1)
    steps = sorted(rng.sample(range(50_000), 10_000))  # gaps, as after skipped files
    rows = [(g, rng.random()) for g in steps]  # distinct losses: one min/max row per bucket
    with db.conn:
        db.conn.executemany("INSERT INTO metrics (job_id, step, global_step, epoch, loss, lr, grad_norm, tokens_per_sec, t) VALUES ('j', ?, ?, 0, ?, 1e-4, 1, 900, 0)", [(g, g, loss) for g, loss in rows])
    s = downsample(db.conn, "metrics", ("global_step", "loss"), "loss", -1, None, 400)
    assert s.total == 10_000 and len(s.rows) <= 400
    assert [r["global_step"] for r in s.rows] == _brute_force(rows, steps[0], s.bucket_width)


def test_downsampling_a_million_rows_keeps_min_and_max(tmp_path, cfg):
    """~1M synthetic rows written through HistoryDB; the extremes must survive (correctness, not timing)."""
    db = HistoryDB(cfg.path("status") / HISTORY_FILE)
    n, spike, dip = 1_000_000, 777_777, 123_457
    def rows():
        for g in range(n):
            loss = 100.0 if g == spike else (-5.0 if g == dip else 2.0 + math.sin(g / 1000))
            yield ("job", g, g, g / n, loss, 1e-4, 1.0, 900.0, float(g))
    with db.conn:
        db.conn.executemany("INSERT INTO metrics (job_id, step, global_step, epoch, loss, lr, grad_norm, tokens_per_sec, t) VALUES (?,?,?,?,?,?,?,?,?)", rows())
        db.conn.executemany("INSERT INTO evals (job_id, step, global_step, eval_loss, t) VALUES (?,?,?,?,?)", [("job", g, g, 1.0 + g / n, float(g)) for g in range(0, n, 50_000)])
    db.close()
    with TestClient(create_app(cfg), base_url="http://127.0.0.1") as c:
        h = c.get("/api/history?max_points=2000").json()
    pts = h["points"]
    assert h["total_rows"] == n and h["downsampled"] is True and len(pts) <= 2000
    losses = {p["global_step"]: p["loss"] for p in pts}
    assert losses[spike] == 100.0 and losses[dip] == -5.0
    assert pts[0]["global_step"] == 0 and pts[-1]["global_step"] == n - 1
    assert [p["global_step"] for p in pts] == sorted(losses)
    assert len(h["evals"]) == 20
    # a zoomed range comes back at full resolution
    with TestClient(create_app(cfg), base_url="http://127.0.0.1") as c:
        z = c.get(f"/api/history?since={spike - 101}&until={spike + 100}&max_points=2000").json()
    assert [p["global_step"] for p in z["points"]] == list(range(spike - 100, spike + 101))


def test_summary_path_keeps_each_buckets_extremes(tmp_path, monkeypatch):
    from monitor import history
    from monitor.history_index import FINE, HistoryIndex

    monkeypatch.setattr(history, "SQL_MAX_ROWS", 0)  # force the in-memory summary on a small table
    db = HistoryDB(tmp_path / HISTORY_FILE)
    rng = random.Random(2)
    steps = sorted(rng.sample(range(100_000), 20_000))
    rows = [(g, rng.random()) for g in steps]
    with db.conn:
        db.conn.executemany("INSERT INTO metrics (job_id, step, global_step, epoch, loss, lr, grad_norm, tokens_per_sec, t) VALUES ('j', ?, ?, 0, ?, 1e-4, 1, 900, 1.0)", [(g, g, l) for g, l in rows])
    idx = HistoryIndex()
    s = history.metrics_series(db.conn, idx, 99, 90_000, 400)
    got = [r["global_step"] for r in s.rows]
    inside = [(g, l) for g, l in rows if 99 < g <= 90_000]
    assert len(got) <= 400 and s.total == len(inside) and s.bucket_width % FINE == 0
    assert set(got) <= {g for g, _ in inside}
    first_b = math.ceil(100 / FINE)
    interior = [(g, l) for g, l in inside if first_b * FINE <= g < (90_001 // FINE) * FINE]
    assert set(_brute_force(interior, first_b * FINE, s.bucket_width)) <= set(got)
    assert min(inside, key=lambda r: r[1])[0] in got and max(inside, key=lambda r: r[1])[0] in got


def test_summary_follows_new_and_replayed_steps(tmp_path, monkeypatch):
    """After a resume the service deletes rows past the checkpoint and writes them again."""
    from monitor import history
    from monitor.history_index import HistoryIndex

    monkeypatch.setattr(history, "SQL_MAX_ROWS", 0)
    db = HistoryDB(tmp_path / HISTORY_FILE)
    for g in range(1000):
        db.record_step("j", g, g, 0, 99.0 if g == 900 else 1.0, 1e-4, 1, 900, t=100.0)
    idx = HistoryIndex()
    keep = lambda: {r["global_step"]: r["loss"] for r in history.metrics_series(db.conn, idx, -1, None, 64).rows}  # noqa: E731
    assert keep()[900] == 99.0
    db.forget_steps_after("j", 500)  # resumed from the checkpoint at step 500 ...
    assert max(keep()) == 500
    for g in range(501, 700):  # ... and trained again, differently
        db.record_step("j", g, g, 0, 50.0 if g == 600 else 0.5, 1e-4, 1, 900, t=200.0)
    k = keep()
    assert k[600] == 50.0 and max(k) == 699 and 900 not in k
    for g in range(700, 1200):
        db.record_step("j", g, g, 0, -3.0 if g == 1100 else 0.4, 1e-4, 1, 900, t=300.0)
    k = keep()
    assert k[1100] == -3.0 and k[600] == 50.0 and max(k) == 1199 and len(k) <= 64


# ---------------------------------------------------------------- queue

def _queue_files(cfg, daemon_queue):
    now = time.time()
    for name, prio in (("a.jsonl", Priority.HIGH), ("b.jsonl", Priority.NORMAL), ("c.jsonl", Priority.LOW)):
        p = cfg.root / name
        p.write_text('{"text": "hi"}\n')
        daemon_queue.admit(p, prio, now)
    bad = cfg.root / "bad.jsonl"
    bad.write_text("not json\n")
    daemon_queue.reject(bad, {"reason": FailReason.INVALID_DATA.value, "message": "1 bad line",
                              "errors": [{"line": 1, "field": None, "reason": "not valid JSON"}]}, now)


def test_queue_lists_pending_by_priority_and_failed_reasons(client, cfg):
    from daemon.jobqueue import JobQueue
    q = JobQueue(cfg.path("queue"))
    _queue_files(cfg, q)
    started = q.start(q.next_pending())
    v = client.get("/api/queue").json()
    assert [e["original_name"] for e in v["processing"]] == ["a.jsonl"] and started.job_id == v["processing"][0]["job_id"]
    assert [e["original_name"] for e in v["pending"]["normal"]] == ["b.jsonl"]
    assert [e["original_name"] for e in v["pending"]["low"]] == ["c.jsonl"]
    f = v["failed"][0]
    assert (f["original_name"], f["reason"], f["errors"][0]["line"]) == ("bad.jsonl", "invalid_data", 1)
    assert v["counts"] == {"pending_high": 0, "pending_normal": 1, "pending_low": 1, "pending": 2, "processing": 1, "done": 0, "failed": 1}


def test_a_duplicate_in_done_names_the_file_it_repeats(client, cfg):
    from daemon.jobqueue import JobQueue
    q = JobQueue(cfg.path("queue"))
    _queue_files(cfg, q)
    earlier = {"sha256": "ab" * 32, "job_id": "20261201T000000Z-000001--first.jsonl", "original_name": "first.jsonl",
               "version": 3, "generation": 0}
    q.finish_duplicate(q.next_pending().job_id, earlier, "a.jsonl repeats first.jsonl", 1.0)
    done = client.get("/api/queue").json()["done"]
    assert [(d["original_name"], d["duplicate_of"]) for d in done] == [("a.jsonl", earlier)]
    assert q.counts()["done"] == 1  # the note beside it is not a queued file


def test_queue_items_carry_priority_and_skipped_bad_lines_from_the_job_records(client, cfg):
    """A done file trained without its bad lines (policy skip) says so; a failed one keeps its priority."""
    from daemon.jobqueue import JobQueue
    q = JobQueue(cfg.path("queue"))
    _queue_files(cfg, q)
    started = q.start(q.next_pending())  # a.jsonl, high
    q.finish(started.job_id)
    db = HistoryDB(cfg.path("status") / HISTORY_FILE)
    bad = [{"line": n, "field": "messages[0].role", "reason": "'human' is not one of system, user, assistant"} for n in range(1, 31)]
    db.upsert_job(started.job_id, original_name="a.jsonl", priority="high", state="done", format="chat",
                  n_records=200, n_bad=30, bad_lines=json.dumps(bad), finished_at=1700000000.0, adapter_version=3,
                  activity={"layers": [0], "kinds": ["q_proj"], "values": {}})
    failed = q.failed()[0]
    db.upsert_job(failed.job_id, original_name="bad.jsonl", priority="low", state="failed", n_bad=1)
    db.close()
    v = client.get("/api/queue").json()
    item = v["done"][0]
    assert (item["priority"], item["n_bad"], item["n_records"], item["format"], item["adapter_version"]) == ("high", 30, 200, "chat", 3)
    assert len(item["bad_lines"]) == 20 and item["bad_lines"][0]["line"] == 1  # the first ones, bounded
    assert item["has_activity"] is True  # what it moved can be asked for
    f = v["failed"][0]
    assert (f["priority"], f["reason"], f["n_bad"], f["has_activity"]) == ("low", "invalid_data", 1, False)
    # files the daemon has no record of (yet) are listed all the same
    assert [e["priority"] for e in v["pending"]["normal"]] == ["normal"] and v["pending"]["normal"][0]["n_bad"] is None


def _done_files(cfg, n: int, db: HistoryDB) -> list[str]:
    """n files trained and done, oldest first, each with its steps and losses in its job record."""
    from daemon.jobqueue import JobQueue
    q = JobQueue(cfg.path("queue"))
    ids = []
    for k in range(n):
        p = cfg.root / f"f{k:02d}.jsonl"
        p.write_text(f'{{"text": "file {k}"}}\n')
        done = q.finish(q.start(q.admit(p, Priority.NORMAL, 1_700_000_000.0 + k)).job_id)
        db.upsert_job(done.job_id, original_name=p.name, state="done", steps=10 + k, total_steps=10 + k,
                      final_loss=1.0 / (k + 1), eval_loss=2.0 / (k + 1) if k % 2 else None, finished_at=1.7e9 + k)
        ids.append(done.job_id)
    return ids


def test_done_files_page_through_with_their_steps_and_losses(client, cfg):
    db = HistoryDB(cfg.path("status") / HISTORY_FILE)
    ids = _done_files(cfg, 25, db)
    db.close()
    first = client.get("/api/queue", params={"done_limit": 10}).json()
    assert first["counts"]["done"] == 25 and first["done_offset"] == 0
    assert [d["job_id"] for d in first["done"]] == ids[::-1][:10]  # most recent first
    third = client.get("/api/queue", params={"done_limit": 10, "done_offset": 20}).json()
    assert [d["job_id"] for d in third["done"]] == ids[::-1][20:] and third["done_offset"] == 20
    row = third["done"][0]  # f04.jsonl
    assert (row["original_name"], row["steps"], row["final_loss"], row["eval_loss"]) == ("f04.jsonl", 14, 0.2, None)
    assert third["done"][1]["eval_loss"] == pytest.approx(2 / 4)
    assert client.get("/api/queue", params={"done_offset": 30}).json()["done"] == []


def test_what_a_duplicate_moved_says_it_was_not_trained(client, cfg):
    from daemon.intake import finish_duplicate
    from daemon.jobqueue import JobQueue
    q = JobQueue(cfg.path("queue"))
    db = HistoryDB(cfg.path("status") / HISTORY_FILE)
    first = _done_files(cfg, 1, db)[0]
    again = cfg.root / "again.jsonl"
    again.write_text('{"text": "file 0"}\n')
    entry = q.admit(again, Priority.NORMAL, 1_800_000_000.0)
    earlier = {"sha256": "ab" * 32, "job_id": first, "original_name": "f00.jsonl", "version": 3, "generation": 0}
    finish_duplicate(entry, earlier, 1_800_000_001.0, q, db)  # as the service records one
    db.close()
    detail = client.get(f"/api/activity/jobs/{entry.job_id}").json()["detail"]
    assert detail == (f"{entry.job_id} was not trained: its content repeats f00.jsonl ({first}), already in "
                      "adapter v3; nothing moved")


def test_queue_without_a_history_database(client, cfg):
    from daemon.jobqueue import JobQueue
    _queue_files(cfg, JobQueue(cfg.path("queue")))
    assert not (cfg.path("status") / HISTORY_FILE).exists()
    v = client.get("/api/queue").json()
    assert v["failed"][0]["priority"] is None and v["counts"]["pending"] == 3


# ---------------------------------------------------------------- control

@pytest.mark.parametrize("action", ["pause", "resume", "skip", "stop"])
def test_control_needs_the_token(client, action):
    assert client.post(f"/api/control/{action}").status_code == 401
    assert client.post(f"/api/control/{action}", headers={auth.HEADER: "wrong" * 8}).status_code == 401
    assert client.post(f"/api/control/{action}", headers={"Authorization": "Bearer nope"}).status_code == 401


def test_pause_resume_set_the_desired_state(client, cfg):
    r = client.post("/api/control/pause", headers=client.headers_with_token)
    assert r.status_code == 200 and r.json()["requested_state"] == "paused"
    assert control.read_desired_state(cfg) is DesiredState.PAUSED
    assert client.get("/api/status").json()["requested_state"] == "paused"
    client.post("/api/control/resume", headers={"Authorization": "Bearer " + token_of(cfg)})
    assert control.read_desired_state(cfg) is DesiredState.RUNNING


def test_skip_and_stop_are_refused_with_no_daemon_running(client, cfg):
    """Else they would wait in status/control/ and stop or skip the next start."""
    for action in ("skip", "stop"):
        r = client.post(f"/api/control/{action}", headers=client.headers_with_token)
        assert r.status_code == 409 and r.json()["detail"] == f"{action}: the daemon is not running"
    assert control.pending_requests(cfg) == []


def test_skip_and_stop_leave_requests_for_the_daemon(client, cfg, lock_holder):
    assert client.post("/api/control/skip", headers=client.headers_with_token, json={"job_id": JOB}).status_code == 200
    assert client.post("/api/control/stop", headers=client.headers_with_token).status_code == 200
    reqs = control.pending_requests(cfg)
    assert [(r.action, r.by, r.job_id) for r in reqs] == [(ControlAction.SKIP, "monitor", JOB), (ControlAction.STOP, "monitor", None)]
    assert [p["action"] for p in client.get("/api/status").json()["pending_requests"]] == ["skip", "stop"]


def test_consolidate_and_rollback_need_a_description_and_a_kept_version(client, cfg, lock_holder):
    from daemon import atomic
    tok = client.headers_with_token
    r = client.post("/api/control/consolidate", headers=tok, json={"description": "week one"})
    assert r.status_code == 409 and "no adapter" in r.json()["detail"]  # nothing to merge yet
    for v in (1, 2):
        atomic.write_json(cfg.path("adapters") / f"v000{v}" / "manifest.json", {"version": v})
    atomic.write_json(cfg.path("adapters") / "current.json", {"version": 2, "path": "v0002"})
    assert client.post("/api/control/consolidate", headers=tok, json={"description": ""}).status_code == 422
    assert client.post("/api/control/consolidate", headers=tok, json={"description": "   "}).status_code == 422
    assert client.post("/api/control/consolidate", headers=tok, json={"description": "week one"}).status_code == 200
    assert client.post("/api/control/rollback", headers=tok, json={"version": 7}).status_code == 404
    assert client.post("/api/control/rollback", headers=tok, json={"version": 0}).status_code == 422
    assert client.post("/api/control/rollback", headers=tok, json={"version": 1}).status_code == 200
    reqs = [(r.action, r.description, r.version) for r in control.pending_requests(cfg)]
    assert reqs == [(ControlAction.CONSOLIDATE, "week one", None), (ControlAction.ROLLBACK, None, 1)]
    assert client.post("/api/control/rollback", json={"version": 1}).status_code in (401, 403)  # writes need the token
    # a consolidation made generation 1: v1 and v2 trained on generation 0's base, and a rollback stays within one
    atomic.write_json(cfg.path("adapters") / "v0003" / "manifest.json", {"version": 3, "generation": 1, "consolidated_from": 2})
    atomic.write_json(cfg.path("adapters") / "current.json", {"version": 3, "path": "v0003"})
    r = client.post("/api/control/rollback", headers=tok, json={"version": 1})
    assert r.status_code == 409 and "a rollback stays within a generation" in r.json()["detail"]
    assert len(control.pending_requests(cfg)) == 2  # nothing more was asked of the daemon


def test_retry_and_remove_are_requests_and_only_for_listed_jobs(client, cfg):
    from daemon.jobqueue import JobQueue
    q = JobQueue(cfg.path("queue"))
    _queue_files(cfg, q)
    failed, pending = q.failed()[0].job_id, q.pending()[0].job_id
    tok = client.headers_with_token
    assert client.post(f"/api/queue/{failed}/retry", headers=tok, json={"priority": "high"}).status_code == 200
    assert client.post(f"/api/queue/{pending}/remove", headers=tok).status_code == 200
    reqs = [(r.action, r.job_id, r.priority) for r in control.pending_requests(cfg)]
    assert reqs == [(ControlAction.RETRY, failed, "high"), (ControlAction.REMOVE, pending, None)]
    # the monitor itself moved nothing: the daemon owns queue moves
    assert q.failed()[0].job_id == failed and q.pending()[0].job_id == pending
    assert client.post(f"/api/queue/{pending}/retry", headers=tok).status_code == 404  # not failed
    assert client.post("/api/queue/..%2F..%2Fconfig.json/remove", headers=tok).status_code in (404, 405)  # no route
    assert client.post("/api/queue/..config.json/remove", headers=tok).status_code == 404
    assert len(control.pending_requests(cfg)) == 2  # refused ones left nothing behind
    assert client.post(f"/api/queue/{failed}/retry").status_code == 401


# ---------------------------------------------------------------- upload

def test_upload_lands_in_the_inbox_for_its_priority(client, cfg):
    body = b'{"text": "one"}\n{"text": "two"}\n'
    r = client.post("/api/queue?name=my%20data.jsonl&priority=high", content=body, headers=client.headers_with_token)
    assert r.status_code == 201, r.text
    assert r.json() == {"name": "my_data.jsonl", "priority": "high", "size": len(body)}
    assert (cfg.path("inbox") / "high" / "my_data.jsonl").read_bytes() == body
    # same name again: a suffix, never an overwrite
    r2 = client.post("/api/queue?name=my_data.jsonl&priority=high", content=b'{"text": "3"}\n', headers=client.headers_with_token)
    assert r2.json()["name"] == "my_data-1.jsonl"
    assert (cfg.path("inbox") / "high" / "my_data.jsonl").read_bytes() == body
    r3 = client.post("/api/queue?name=n.jsonl", content=body, headers=client.headers_with_token)
    assert (cfg.path("inbox") / r3.json()["name"]).is_file()
    leftovers = [p.name for p in cfg.path("inbox").rglob("*") if p.name.endswith(".part")]
    assert leftovers == []


def test_upload_strips_paths_and_refuses_odd_names(client, cfg):
    tok = client.headers_with_token
    r = client.post("/api/queue?name=../../evil.jsonl", content=b"{}\n", headers=tok)
    assert r.status_code == 201 and r.json()["name"] == "evil.jsonl"
    assert (cfg.path("inbox") / "evil.jsonl").is_file() and not (cfg.root.parent / "evil.jsonl").exists()
    for bad in ("data.txt", ".hidden.jsonl", "a%00b.jsonl", "-x.jsonl", "%E2%80%AEevil.jsonl", "a%E2%80%8Bb.jsonl",
                "it%27s.jsonl", "a" * 200 + ".jsonl", "%C3%A9" * 95 + ".jsonl"):
        assert client.post(f"/api/queue?name={bad}", content=b"{}\n", headers=tok).status_code == 400, bad
    # names in other scripts stay recognisable; a decomposed é is stored composed (NFC)
    for raw, stored in (("donn%C3%A9es_%C3%A9t%C3%A9.jsonl", "données_été.jsonl"), ("e%CC%81t%C3%A9.jsonl", "été.jsonl"),
                        ("%E6%95%B0%E6%8D%AE.jsonl", "数据.jsonl")):
        r = client.post(f"/api/queue?name={raw}", content=b"{}\n", headers=tok)
        assert r.status_code == 201 and r.json()["name"] == stored and (cfg.path("inbox") / stored).is_file()
    assert client.post("/api/queue?name=e.jsonl", content=b"", headers=tok).status_code == 400
    assert client.post("/api/queue?name=x.jsonl&priority=urgent", content=b"{}\n", headers=tok).status_code == 422
    assert client.post("/api/queue?name=x.jsonl", content=b"{}\n").status_code == 401


def test_upload_over_the_limit_is_refused_while_streaming(cfg):
    app = create_app(cfg, MonitorSettings(max_upload_bytes=1000))
    with TestClient(app, base_url="http://127.0.0.1") as c:
        tok = {auth.HEADER: token_of(cfg)}
        assert c.post("/api/queue?name=big.jsonl", content=b"x" * 1001, headers=tok).status_code == 413
        # no Content-Length (chunked): the byte count while streaming must catch it
        chunks = (b'{"text": "0123456789"}\n' for _ in range(100))
        assert c.post("/api/queue?name=big.jsonl", content=chunks, headers=tok).status_code == 413
        assert c.post("/api/queue?name=ok.jsonl", content=b"y" * 1000, headers=tok).status_code == 201
    names = sorted(p.name for p in cfg.path("inbox").rglob("*") if p.is_file())
    assert names == ["ok.jsonl"]


def test_intake_limit_from_config_applies_to_uploads(tmp_path):
    cfg = make_instance(tmp_path, intake={"max_file_bytes": 10})
    with TestClient(create_app(cfg), base_url="http://127.0.0.1") as c:
        r = c.post("/api/queue?name=a.jsonl", content=b"x" * 11, headers={auth.HEADER: token_of(cfg)})
    assert r.status_code == 413


# ---------------------------------------------------------------- exposure

def test_off_loopback_every_api_endpoint_needs_the_token(cfg):
    app = create_app(cfg, MonitorSettings(host="0.0.0.0"))
    with TestClient(app, base_url="http://192.0.2.10") as c:
        for path in ("/api/status", "/api/history", "/api/queue", "/api/gpu", "/api/memory", "/api/health", "/api/events", "/metrics",
                     "/openapi.json", "/docs"):
            assert c.get(path).status_code == 401, path
        tok = {auth.HEADER: token_of(cfg)}
        assert c.get("/openapi.json", headers=tok).json()["paths"]["/api/status"]
        assert c.get("/api/status", headers=tok).status_code == 200
        assert c.get("/metrics", headers={"Authorization": "Bearer " + token_of(cfg)}).status_code == 200
        page = c.get("/")  # the page itself holds no data; its API calls carry the token
        assert page.status_code == 200 and "traind" in page.text and token_of(cfg) not in page.text


def test_loopback_monitor_refuses_foreign_host_names(client):
    """DNS rebinding: evil.example resolving to 127.0.0.1 must not read the API."""
    assert client.get("/api/status", headers={"Host": "evil.example"}).status_code == 421
    assert client.get("/api/status", headers={"Host": "localhost:8080"}).status_code == 200
    r = client.get("/")
    assert "frame-ancestors 'none'" in r.headers["content-security-policy"]


def test_docs_and_static_assets_are_local(client):
    docs = client.get("/docs").text
    assert "/vendor/swagger-ui/swagger-ui-bundle.js" in docs and "cdn." not in docs
    assert client.get("/vendor/swagger-ui/swagger-ui-bundle.js").status_code == 200
    page = client.get("/").text
    assert "vendor/uplot/uPlot.iife.min.js" in page and "http" not in page.split("<body")[0].replace("http-equiv", "")
    assert client.get("/vendor/uplot/uPlot.iife.min.js").status_code == 200
    assert client.get("/openapi.json").json()["paths"]["/api/status"]


# ---------------------------------------------------------------- resources

def test_gpu_view_says_why_or_lists_the_gpus(client):
    """No NVIDIA driver (this machine): `available: false` and the reason; with one, the GPUs."""
    g = client.get("/api/gpu").json()
    if g["available"]:
        assert g["gpus"] and all(x["name"] and x["memory_total_bytes"] for x in g["gpus"]) and g["reason"] is None
    else:
        assert g["gpus"] == [] and g["reason"]


class _FakeNvml(SimpleNamespace):
    """Just enough of pynvml for the probe's device loop."""


def _fake_nvml(calls: list[str]):
    class NVMLError(Exception):
        pass

    class NotSupported(NVMLError):
        pass

    def unsupported(*_a):
        raise NotSupported("Not Supported")

    handle = object()
    return _FakeNvml(
        NVMLError=NVMLError, NVML_TEMPERATURE_GPU=0, NVML_CLOCK_SM=1, NVML_CLOCK_MEM=2,
        nvmlInit=lambda: calls.append("init"), nvmlShutdown=lambda: calls.append("shutdown"),
        nvmlDeviceGetCount=lambda: 1, nvmlDeviceGetHandleByIndex=lambda i: handle,
        nvmlSystemGetDriverVersion=lambda: b"550.54",
        nvmlDeviceGetName=lambda h: b"NVIDIA GeForce RTX 4090", nvmlDeviceGetUUID=lambda h: "GPU-1",
        nvmlDeviceGetUtilizationRates=lambda h: SimpleNamespace(gpu=87, memory=40),
        nvmlDeviceGetMemoryInfo=lambda h: SimpleNamespace(used=20 * 2**30, total=24 * 2**30, free=4 * 2**30),
        nvmlDeviceGetTemperature=lambda h, kind: 71, nvmlDeviceGetPowerUsage=lambda h: 350_500,
        nvmlDeviceGetEnforcedPowerLimit=unsupported,  # consumer cards refuse some queries
        nvmlDeviceGetClockInfo=lambda h, kind: 2520 if kind == 1 else 10501,
        nvmlDeviceGetComputeRunningProcesses=lambda h: [SimpleNamespace(pid=os.getpid(), usedGpuMemory=19 * 2**30)],
        nvmlDeviceGetGraphicsRunningProcesses=lambda h: [],
    )


def test_gpu_device_loop_reads_every_field_and_holds_one_handle():
    calls: list[str] = []
    probe = GpuProbe(nvml=_fake_nvml(calls))
    v1, v2 = probe.read(), probe.read()
    assert calls == ["init"]  # initialised once, handle held between reads
    g = v1.gpus[0]
    assert v1.available and v1.driver_version == "550.54" and v2.gpus[0].name == "NVIDIA GeForce RTX 4090"
    assert (g.utilization_percent, g.memory_used_bytes, g.temperature_c, g.power_watts) == (87, 20 * 2**30, 71, 350.5)
    assert g.power_limit_watts is None and (g.clock_sm_mhz, g.clock_mem_mhz) == (2520, 10501)
    assert g.processes[0].pid == os.getpid() and g.processes[0].used_memory_bytes == 19 * 2**30
    probe.close()
    assert calls == ["init", "shutdown"]


def test_gpu_library_missing_reports_the_reason():
    class NVMLError(Exception):
        pass

    def init():
        raise NVMLError("NVML Shared Library Not Found")

    v = GpuProbe(nvml=SimpleNamespace(NVMLError=NVMLError, nvmlInit=init)).read()
    assert v.available is False and "Library Not Found" in v.reason


def test_memory_reports_host_and_daemon_process(client, daemon):
    daemon.status()
    m = client.get("/api/memory").json()
    assert m["ram_total_bytes"] > 0 and 0 <= m["ram_used_percent"] <= 100
    procs = {p["role"]: p for p in m["processes"]}
    assert procs["daemon"]["running"] and procs["daemon"]["rss_bytes"] > 0
    assert procs["trainer"]["running"] is False
    folders = [f for d in m["disks"] for f in d["folders"]]
    assert {"inbox", "queue", "status"} <= set(folders) and all(d["free_bytes"] > 0 for d in m["disks"])


# ---------------------------------------------------------------- metrics

def test_prometheus_metrics(client, daemon, cfg):
    daemon.status(loss=1.5, tokens_per_sec=900.0, queue={"pending": 2})
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    lines = r.text.splitlines()
    assert "traind_up 1.0" in lines and "traind_loss 1.5" in lines and "traind_tokens_per_second 900.0" in lines
    assert 'traind_state{state="training"} 1.0' in lines
    assert 'traind_queue_files{state="pending",priority="high"} 0.0' in lines
    assert "traind_gpu_available 0.0" in lines or "traind_gpu_available 1.0" in lines
    assert any(l.startswith('traind_process_rss_bytes{role="daemon"}') for l in lines)
    assert not any(l.startswith("traind_eval_loss ") for l in lines)  # unknown: absent, not 0


def test_metrics_of_several_ranks(client, daemon):
    lines = client.get("/metrics").text.splitlines()
    assert not any(l.startswith("traind_rank_") for l in lines)  # one process (no status: unknown)
    daemon.status(world_size=1)
    assert "traind_world_size 1.0" in client.get("/metrics").text.splitlines()
    ranks = [{"rank": r, "host": "node-a", "device": "cpu", "tokens_per_sec": 400.0 + r, "compute_seconds": 1.0}
             for r in range(3)]
    daemon.status(world_size=3, distributed={"strategy": "ddp", "backend": "gloo", "nnodes": 1}, ranks=ranks, slowest_rank=0)
    lines = client.get("/metrics").text.splitlines()
    assert "traind_world_size 3.0" in lines
    assert [l for l in lines if l.startswith("traind_rank_tokens_per_second{")] == [
        f'traind_rank_tokens_per_second{{rank="{r}"}} {400.0 + r}' for r in range(3)]


def test_metrics_keep_each_metric_in_one_group(client, daemon):
    """Prometheus/OpenMetrics parsers reject a metric whose samples are split up."""
    daemon.status()
    lines = client.get("/metrics").text.splitlines()
    names = [l.split("{")[0].split(" ")[0] for l in lines if not l.startswith("#")]
    seen, last = set(), None
    for n in names:
        assert n == last or n not in seen, f"{n} appears in two groups"
        seen.add(n)
        last = n
    assert sum(l.startswith("traind_process_up{") for l in lines) == 3  # daemon, trainer, monitor
    for i, line in enumerate(lines):
        if line.startswith("# TYPE "):
            assert lines[i - 1].startswith("# HELP " + line.split()[2] + " ")


def test_stale_metrics_say_not_responding_and_drop_rates(cfg, client):
    FakeDaemon(cfg, pid=dead_pid()).status(tokens_per_sec=10_000.0, eta_seconds=60.0, loss=1.5, world_size=2,
                                           ranks=[{"rank": r, "tokens_per_sec": 5_000.0} for r in (0, 1)])
    lines = client.get("/metrics").text.splitlines()
    assert "traind_world_size 2.0" in lines and not any(l.startswith("traind_rank_tokens_per_second{") for l in lines)
    assert "traind_up 0.0" in lines and 'traind_state{state="not_responding"} 1.0' in lines
    assert 'traind_state{state="training"} 0.0' in lines
    assert not any(l.startswith(("traind_tokens_per_second ", "traind_eta_seconds ")) for l in lines)
    assert "traind_loss 1.5" in lines  # the last known loss is still a fact


def test_cpu_percent_windows_are_shared_between_pollers(monkeypatch):
    """Two pollers within the window get the same figure, not two short-window ones."""
    from monitor import host

    monkeypatch.setattr(host, "MIN_CPU_WINDOW_SECONDS", 0.3)
    sampler = host.ProcessSampler()
    calls = []
    real = sampler._measure_host
    monkeypatch.setattr(sampler, "_measure_host", lambda: calls.append(1) or real())
    time.sleep(0.35)
    first = sampler.host_cpu_percent()
    assert sampler.host_cpu_percent() == first and len(calls) == 1
    time.sleep(0.35)
    sampler.host_cpu_percent()
    assert len(calls) == 2


def test_host_cpu_is_right_from_any_request_thread():
    """Requests run on a thread pool; psutil's own cpu_percent() keeps one sample per
    thread and said 0 % on each thread's first call while a core was busy."""
    from concurrent.futures import ThreadPoolExecutor

    from monitor import host

    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        sampler = host.ProcessSampler()
        with ThreadPoolExecutor(8) as pool:
            seen = []
            for _ in range(3):
                time.sleep(host.MIN_CPU_WINDOW_SECONDS + 0.1)
                seen.append(pool.submit(sampler.host_cpu_percent).result())
    finally:
        burner.kill()
        burner.wait()
    cores = psutil.cpu_count() or 1
    assert all(v >= 0.5 * 100 / cores for v in seen), seen  # one busy core, whichever thread asks


# ---------------------------------------------------------------- SSE

@pytest.fixture
def live_server(cfg, monkeypatch):
    """The app on a real uvicorn on 127.0.0.1 (SSE needs a real streaming server)."""
    monkeypatch.setattr(events, "HEARTBEAT_SECONDS", 1.0)
    app = create_app(cfg)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", app
    app.state.monitor.closing = True
    server.should_exit = True
    t.join(10)


def _sse_events(lines, want: int, timeout: float):
    """Parse SSE frames from an iterator of lines until `want` status events or timeout."""
    got, frame, comments, retry = [], {}, 0, None
    deadline = time.monotonic() + timeout
    for line in lines:
        if line == "":
            if frame.get("event") == "status":
                got.append(json.loads(frame["data"]))
            frame = {}
            if len(got) >= want or time.monotonic() > deadline:
                break
        elif line.startswith(":"):
            comments += 1
        else:
            k, _, v = line.partition(": ")
            if k == "retry":
                retry = int(v)
            frame[k] = v
    return got, comments, retry


def test_sse_pushes_status_changes_with_retry_and_heartbeat(live_server, daemon):
    url, app = live_server
    daemon.status(current_step=1, total_steps=10)
    with httpx.stream("GET", url + "/api/events", timeout=10) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = r.iter_lines()
        first, _, retry = _sse_events(lines, 1, 5)
        assert retry == 3000 and first[0]["current_step"] == 1 and first[0]["stale"] is False
        daemon.status(current_step=2, total_steps=10)
        second, _, _ = _sse_events(lines, 1, 5)
        assert second[0]["current_step"] == 2
        # nothing changes now: within a heartbeat interval a comment keeps the stream alive
        assert any(line.startswith(":") for line, _ in zip(lines, range(5)))
    # the disconnected client's generator ended and released its slot
    deadline = time.monotonic() + 5
    while app.state.monitor.sse_clients and time.monotonic() < deadline:
        time.sleep(0.1)
    assert app.state.monitor.sse_clients == 0


def test_sse_reports_a_daemon_going_stale_without_any_file_change(live_server, daemon):
    url, _ = live_server
    daemon.status(now=time.time() - 5.0)  # fresh for 6 s (3 x 2 s), then stale with no new write
    with httpx.stream("GET", url + "/api/events", timeout=10) as r:
        got, _, _ = _sse_events(r.iter_lines(), 2, 6)
    assert [g["stale"] for g in got] == [False, True]


# ---------------------------------------------------------------- layer activity

def test_activity_is_empty_before_the_first_sample(client):
    body = client.get("/api/activity").json()
    assert body["latest"] is None and body["series"]["values"] == [] and body["total_rows"] == 0
    assert client.get(f"/api/activity/jobs/{JOB}").status_code == 404


def test_activity_serves_the_latest_grid_and_per_layer_series(client, daemon):
    from tests.monitor_helpers import ALL_LINEAR

    for k in range(1, 61):
        daemon.steps(10)
        block = daemon.activity(10 * k, n_layers=80, kinds=ALL_LINEAR, final=k == 60)
    daemon.status(layer_activity_summary=block)
    body = client.get("/api/activity?max_points=20&top=5&measure=change").json()
    latest = body["latest"]
    assert (latest["step"], latest["final"], len(latest["layers"]), latest["kinds"]) == (600, True, 80, list(ALL_LINEAR))
    cell = {m: latest["values"][m][79][2] for m in ("change", "relative_change", "update", "relative")}
    assert math.isclose(cell["relative_change"], cell["change"] / (cell["update"] / cell["relative"]), rel_tol=2e-3)
    series = body["series"]
    assert body["total_rows"] == 60 and body["downsampled"] and len(series["global_steps"]) == 21
    assert series["global_steps"][-1] == daemon.global_step and series["measure"] == "change"
    now = latest["per_layer"]["change"]
    assert series["layers"] == sorted(sorted(range(80), key=lambda i: -now[i])[:5])  # the five top layers now
    assert all(len(v) == 5 for v in series["values"])
    status = client.get("/api/status").json()["layer_activity_summary"]
    assert status["global_step"] == latest["global_step"] and len(status["per_layer"]["relative"]) == 80


def test_activity_of_a_finished_file_and_bounded_metrics(client, daemon, cfg):
    from daemon import activity_summary

    moved = {"layers": [0, 1], "kinds": ["q_proj", "v_proj"],
             "values": {"moved": [[0.3, 0.4], [0.1, 0.2]], "moved_relative": [[0.03, 0.04], [0.01, 0.04]],
                        "base": [[10.0, 10.0], [10.0, 5.0]]}}
    daemon.db.upsert_job(JOB, original_name="data.jsonl", state="done", steps=40, activity=activity_summary.file_moved(moved))
    body = client.get(f"/api/activity/jobs/{JOB}").json()
    assert body["per_layer"]["moved"] == pytest.approx([0.5, math.sqrt(0.05)]) and body["top"][0]["value"] == 0.04
    assert body["original_name"] == "data.jsonl" and body["values"]["moved"] == moved["values"]["moved"]
    daemon.db.upsert_job("other.jsonl", state="failed")
    assert "no activity record" in client.get("/api/activity/jobs/other.jsonl").json()["detail"]
    block = daemon.activity(10, n_layers=80)
    daemon.status(layer_activity_summary=block)
    lines = client.get("/metrics").text.splitlines()
    per_kind = [line for line in lines if line.startswith("traind_lora_relative_update{")]
    assert len(per_kind) == 4 and 'kind="v_proj"' in per_kind[2]  # one series per module kind, never per layer
    assert any(line.startswith("traind_lora_relative_update_max ") for line in lines)


def test_deep_health_runs_the_same_checks_as_trainctl(client, cfg):
    plain = client.get("/api/health").json()
    assert plain["checks"] is None and plain["exit_code"] is None
    deep = client.get("/api/health?deep=true").json()
    names = [c["name"] for c in deep["checks"]]
    assert names == ["config", "daemon", "queue", "disk", "adapter", "checkpoint"]
    assert deep["exit_code"] == 2 and [c["level"] for c in deep["checks"] if c["name"] == "daemon"] == ["problem"]
    assert client.get("/api/health?deep=true&strict=true").status_code == 503
