"""The forgetting matrix stored and shown: history.db tables written by the service's tracker from real protocol
messages, the matrix assembled from them, GET /api/forgetting on a real uvicorn, `trainctl forgetting` as a
subprocess with the daemon stopped, the bounded Prometheus gauges and the status line.

    pytest tests/test_forgetting_views.py -q
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import pytest

from bench.harness import lines_of, write_instance
from daemon import forgetting_view, protocol as p
from daemon.history_db import HistoryDB
from daemon.jobqueue import JobQueue
from daemon.protocol import Job
from daemon.schema import TrainingStatus
from daemon.states import Priority
from daemon.service.tracker import JobTracker
from monitor import auth
from monitor.app import create_app
from tests.forgetting_helpers import report, sequence
from tests.monitor_helpers import REPO, FakeDaemon, make_instance, token_of, uvicorn_on_loopback
from tests.test_tracker import NOW, admit, setup

def start(q, tracker, tmp_path, name):
    entry = q.start(admit(q, tmp_path, name, lines_of("text.jsonl", 5)))
    tracker.begin(Job(entry.job_id, str(entry.path), name, "s" * 64, "text", 5))
    return entry.job_id


def done(job_id, version, forgetting):
    return p.Done(job_id=job_id, steps=2, final_loss=1.0, eval_loss=None, adapter_version=version, adapter_path="/x",
                  already_trained=False, activity_moved=None, forgetting=forgetting)


def trained_sequence(tmp_path):
    """a and b done, c held by the gate and then rejected: through the tracker, as the service records them."""
    cfg, q, db, tracker = setup(tmp_path)
    # the job ids come from the queue: each report is built once its file is in training
    a = start(q, tracker, tmp_path, "a.jsonl")
    scored_before_published = {**sequence((a, "x", "y"))[0], "version": None}  # the version comes with `done`
    tracker.on_message(done(a, 1, scored_before_published), NOW)
    b = start(q, tracker, tmp_path, "b.jsonl")
    tracker.on_message(done(b, 2, sequence((a, b, "y"))[1]), NOW + 1)
    db.event("consolidated", "adapter v2 merged into generation 1's base", t=NOW + 1.5)
    c = start(q, tracker, tmp_path, "c.jsonl")
    reports = sequence((a, b, c))
    tracker.on_held(p.Held(job_id=c, version=3, forgetting=reports[2], message="forgot a.jsonl"), NOW + 2)
    return cfg, q, db, tracker, (a, b, c), reports


def test_tracker_records_each_report_and_the_status_says_the_last(tmp_path):
    cfg, q, db, tracker, (a, b, c), reports = trained_sequence(tmp_path)
    held = tracker.status.forgetting
    assert held["outcome"] == "held" and held["job_id"] == c and held["version"] == 3
    assert held["worst"] == {"id": f"keep:{a}", "name": "a.jsonl", "change": pytest.approx(0.5)}
    assert held["probes_over"] == ["probe:general.jsonl"] and held["sets_over"] == 2 and held["gate"]["tripped"]
    assert held["probes"][0]["drift"] == pytest.approx(0.344)
    # the held version rejected: the same report again, with the file failed
    tracker.on_message(p.Failed(job_id=c, reason="forgetting", message="rejected", forgetting=reports[2]), NOW + 3)
    assert tracker.status.forgetting["outcome"] == "failed"
    assert [r[0] for r in db.conn.execute("SELECT outcome FROM forgetting_files ORDER BY t")] == ["done", "done", "failed"]
    assert db.conn.execute("SELECT COUNT(*) FROM forgetting WHERE job_id=?", (c,)).fetchone()[0] == 4  # not twice
    back = forgetting_view.report_of(db.conn, c)
    assert back["sets"] == reports[2]["sets"] and back["gate"] == reports[2]["gate"]
    assert back["backward_transfer"] == pytest.approx(reports[2]["backward_transfer"])
    # a restarted service says the last report again
    assert JobTracker(cfg, q, db, TrainingStatus()).status.forgetting == tracker.status.forgetting


@pytest.mark.parametrize("spoil, said", [
    (lambda r: r["sets"][0].pop("kind"), "sets[0].kind is missing"),
    (lambda r: r["sets"][0].update(loss="0.6"), "sets[0].loss is not a number: '0.6'"),
    (lambda r: r["sets"][0].update(reference=[0.6]), "sets[0].reference is not an object: [0.6]"),
    (lambda r: r.update(generation=None), "generation is missing"),
    (lambda r: r.update(gate={"over": "keep:x"}), "gate.over is not a list: 'keep:x'"),
])
def test_a_report_that_cannot_be_read_is_said_and_the_file_is_still_done(tmp_path, spoil, said):
    cfg, q, db, tracker = setup(tmp_path)
    a = start(q, tracker, tmp_path, "a.jsonl")
    bad = report(a, "a.jsonl", 1, own=(a, 0.6))
    spoil(bad)
    assert tracker.on_message(done(a, 1, bad), NOW) is True
    assert db.job(a)["state"] == "done" and tracker.status.forgetting is None
    events = [e["message"] for e in db.events() if e["kind"] == "forgetting_report"]
    assert events == [f"not recorded: forgetting report: {said}"]
    assert db.conn.execute("SELECT COUNT(*) FROM forgetting_files").fetchone()[0] == 0


def test_the_matrix_of_a_generation(tmp_path):
    cfg, q, db, tracker, (a, b, c), reports = trained_sequence(tmp_path)
    m = forgetting_view.matrix(db.conn)
    assert [f["job_id"] for f in m["files"]] == [a, b, c] and [f["index"] for f in m["files"]] == [0, 1, 2]
    assert [f["outcome"] for f in m["files"]] == ["done", "done", "held"]
    assert [f["version"] for f in m["files"]] == [1, 2, 3]
    assert [s["id"] for s in m["sets"]] == ["probe:general.jsonl", f"keep:{a}", f"keep:{b}", f"keep:{c}"]
    assert [s["learnt_at"] for s in m["sets"]] == [None, 0, 1, 2]
    cells = m["cells"]
    assert cells[0][2] is None and cells[0][3] is None  # b and c not learnt yet when a was scored
    assert cells[1][1]["change"] == pytest.approx(0.1) and not cells[1][1]["over"]
    assert cells[2][1]["change"] == pytest.approx(0.5) and cells[2][1]["over"]
    assert cells[2][1]["reference"]["loss"] == 0.6 and cells[2][3]["change"] == 0.0  # the diagonal
    assert cells[2][0]["over"] and cells[2][0]["change"] == pytest.approx(0.2)
    assert m["files"][2]["backward_transfer"]["loss"] == pytest.approx(((0.9 - 0.6) + (0.55 - 0.5)) / 2)
    assert m["files"][2]["backward_transfer"]["sets"] == 2
    assert m["files"][2]["worst"] == {"id": f"keep:{a}", "name": "a.jsonl", "change": pytest.approx(0.5)}
    (probe,) = m["probes"]
    assert probe["loss"] == [1.10, 1.12, 1.344] and probe["baseline"]["loss"] == 1.0
    assert probe["drift"] == pytest.approx([0.10, 0.12, 0.344])
    assert m["markers"] == [{"kind": "consolidation", "t": NOW + 1.5, "after": 1,
                             "message": "adapter v2 merged into generation 1's base"}]
    assert m["generation"] == 0 and m["generations"] == [0] and m["total_files"] == 3 and m["omitted_sets"] == 0


def test_the_matrix_is_bounded_and_picks_its_generation(tmp_path):
    cfg, q, db, tracker, (a, b, c), reports = trained_sequence(tmp_path)
    last2 = forgetting_view.matrix(db.conn, files=2)
    assert [f["index"] for f in last2["files"]] == [1, 2] and last2["first_index"] == 1
    assert [s["id"] for s in last2["sets"]] == ["probe:general.jsonl", f"keep:{b}", f"keep:{c}"]
    assert last2["omitted_sets"] == 1  # a's keep-set, learnt before the window
    for r in sequence(("n1", "n2", "n3"), generation=1, first_version=4)[:1]:
        db.record_forgetting(r, "done", NOW + 10)
    assert [f["job_id"] for f in forgetting_view.matrix(db.conn)["files"]] == ["n1"]  # the newest generation
    assert forgetting_view.matrix(db.conn, current_generation=0)["total_files"] == 3
    assert forgetting_view.matrix(db.conn, generation=7)["files"] == []
    many = [f"probe:p{i}.jsonl" for i in range(30)]
    db.record_forgetting(report("n2", "m.jsonl", 5, 1, probes=[(s[6:], 1.0, 1.0, 1.0) for s in many]), "done", NOW + 11)
    m = forgetting_view.matrix(db.conn, generation=1)
    assert len(m["sets"]) == forgetting_view.MAX_PROBES + 1 and m["omitted_sets"] == 31 - forgetting_view.MAX_PROBES  # general.jsonl and 30 more


# ---------------------------------------------------------------- the API, the CLI, the metrics

def fill(cfg) -> list[dict]:
    """What the service writes for the three-file sequence, a consolidation after the second."""
    db = HistoryDB(cfg.path("status") / "history.db")
    reports = sequence()
    for i, r in enumerate(reports):
        db.record_forgetting(r, "done", NOW + i)
    db.event("rollback", "rolled back to adapter v1 (published as v3)", t=NOW + 1.5)
    db.close()
    return reports


@pytest.fixture
def live(tmp_path):
    cfg = make_instance(tmp_path)
    with uvicorn_on_loopback(create_app(cfg)) as url:
        yield cfg, url


def trainctl(cfg, *args):
    return subprocess.run([sys.executable, "-m", "daemon.cli", "--config", str(cfg.root / "config.json"), *args],
                          capture_output=True, text=True, cwd=REPO, timeout=60, env=dict(os.environ, COLUMNS="200"))


def test_api_serves_the_matrix_and_the_cli_the_same_document(live):
    cfg, url = live
    empty = httpx.get(url + "/api/forgetting").json()
    assert empty["files"] == [] and empty["sets"] == [] and empty["generations"] == []
    assert json.loads(trainctl(cfg, "forgetting", "--json").stdout) == empty  # no history.db yet
    fill(cfg)
    body = httpx.get(url + "/api/forgetting").json()
    assert [f["job_id"] for f in body["files"]] == ["j1", "j2", "j3"]
    assert body["cells"][2][1]["change"] == pytest.approx(0.5) and body["cells"][2][1]["over"] is True
    assert body["markers"] == [{"kind": "rollback", "t": NOW + 1.5, "after": 1,
                                "message": "rolled back to adapter v1 (published as v3)"}]
    assert httpx.get(url + "/api/forgetting", params={"files": 1}).json()["first_index"] == 2
    assert httpx.get(url + "/api/forgetting", params={"files": 100000}).status_code == 422
    cli = trainctl(cfg, "forgetting", "--json")
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout) == body
    job = httpx.get(url + "/api/forgetting/jobs/j3").json()
    assert job["sets"] == sequence()[2]["sets"] and job["outcome"] == "done"
    assert httpx.get(url + "/api/forgetting/jobs/nope").status_code == 404


def test_api_needs_the_token_off_loopback(tmp_path):
    from fastapi.testclient import TestClient
    from monitor.settings import MonitorSettings

    cfg = make_instance(tmp_path)
    with TestClient(create_app(cfg, MonitorSettings(host="0.0.0.0")), base_url="http://192.0.2.10") as c:
        assert c.get("/api/forgetting").status_code == 401
        assert c.get("/api/forgetting", headers={auth.HEADER: token_of(cfg)}).status_code == 200


def test_cli_table_with_the_daemon_stopped(tmp_path):
    cfg = make_instance(tmp_path)
    none = trainctl(cfg, "forgetting")
    assert none.returncode == 0 and "no forgetting scored yet" in none.stdout
    fill(cfg)
    r = trainctl(cfg, "forgetting")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    row = next(line for line in lines if "c.jsonl" in line and line.lstrip().startswith("2"))
    assert "+50.0%*" in row and "+10.0%" in row and "+20.0%*" in row  # keep-set of a, of b; the probe over
    assert any("rollback after file 1" in line for line in lines)
    probe = next(line for line in lines if "general.jsonl" in line and "drift" in line)
    assert "+34.4%" in probe and "baseline 1" in probe
    assert trainctl(cfg, "forgetting", "--generation", "3").stdout.startswith("generation 3: no file scored")


def test_the_job_record_carries_the_files_report(tmp_path):
    cfg = make_instance(tmp_path)
    src = tmp_path / "c.jsonl"
    src.write_text(lines_of("text.jsonl", 5))
    q = JobQueue(cfg.path("queue"))
    entry = q.finish(q.start(q.admit(src, Priority.NORMAL, NOW)).job_id)
    db = HistoryDB(cfg.path("status") / "history.db")
    db.upsert_job(entry.job_id, state="done", original_name="c.jsonl")
    r = sequence(("j1", "j2", entry.job_id))[2]
    db.record_forgetting(r, "done", NOW)
    db.close()
    out = trainctl(cfg, "queue", "status", entry.job_id).stdout
    assert "forgetting" in out and "keep:j1" in out and "+50.0% over" in out and "backward transfer" in out
    from fastapi.testclient import TestClient

    with TestClient(create_app(cfg), base_url="http://127.0.0.1") as c:
        (item,) = c.get("/api/queue").json()["done"]
    said = item["forgetting"]
    assert said["outcome"] == "done" and said["version"] == 3 and said["gate"]["tripped"]
    assert said["worst"]["id"] == "keep:j1" and said["backward_transfer"]["sets"] == 2


def test_metrics_are_bounded_and_follow_the_status(tmp_path):
    from fastapi.testclient import TestClient

    cfg = make_instance(tmp_path)
    d = FakeDaemon(cfg)
    r = report("j9", "z.jsonl", 9, probes=[(f"p{i:02d}.jsonl", 1.5, 1.0, 1.2) for i in range(30)],
               keep=[("j1", "a.jsonl", 0.8, 0.6)])
    d.status(forgetting=forgetting_view.summary(r, "done"))
    with TestClient(create_app(cfg), base_url="http://127.0.0.1") as c:
        text = c.get("/metrics").text
    probe_lines = [line for line in text.splitlines() if line.startswith("traind_forgetting_probe_loss{")]
    assert len(probe_lines) == forgetting_view.MAX_PROBES and 'probe="probe:p00.jsonl"' in probe_lines[0]
    assert "traind_forgetting_gate_tripped 1.0" in text
    assert "traind_forgetting_worst_change 0.5" in text
    bwt = [line for line in text.splitlines() if line.startswith("traind_forgetting_backward_transfer_loss ")]
    assert len(bwt) == 1 and float(bwt[0].split()[1]) == pytest.approx(0.2)
    drift = [line for line in text.splitlines() if line.startswith("traind_forgetting_probe_drift{")]
    assert len(drift) == forgetting_view.MAX_PROBES and float(drift[0].split()[1]) == pytest.approx(0.25)
    d.db.close()


def test_status_says_what_was_forgotten_in_one_line(tmp_path):
    cfg = make_instance(tmp_path)
    d = FakeDaemon(cfg)
    d.status(forgetting=forgetting_view.summary(sequence()[2], "done"))
    out = trainctl(cfg, "status").stdout
    line = next(x for x in out.splitlines() if x.lstrip().startswith("forgetting"))
    assert "c.jsonl (v3)" in line and "worst keep-set of a.jsonl +50.0%" in line and "probes over: probe:general.jsonl" in line
    assert "GATE warn" in line
    d.db.close()


# ---------------------------------------------------------------- the real trainer's reports, end to end

@pytest.mark.e2e
def test_the_real_trainers_reports_reach_the_matrix_and_the_cli_reads_it_with_the_daemon_stopped(tmp_path, models_dir):
    """The seam: the trainer's reports (done) through the service into history.db, as the manifests keep them."""
    from bench.harness import Daemon
    from daemon import adapters

    probe = tmp_path / "probe.jsonl"
    probe.write_text("".join(lines_of("chat.jsonl").splitlines(keepends=True)[200:216]), encoding="utf-8")
    d = Daemon(write_instance(tmp_path / "inst", models_dir, data={"eval_fraction": 0.2},
                              forgetting={"probe_files": [str(probe)], "keep_examples": 4,
                                          "max_probe_increase": 10.0, "max_keep_increase": 10.0}))
    try:
        d.start()
        for k, (name, src) in enumerate((("a.jsonl", "chat.jsonl"), ("b.jsonl", "text.jsonl")), 1):
            d.drop(name, lines_of(src, 40))
            d.wait_counts(done=k)
        st = d.wait_for(lambda s: (s.get("forgetting") or {}).get("original_name") == "b.jsonl",
                        what="the status saying b.jsonl's scoring")
        assert st["forgetting"]["outcome"] == "done" and st["forgetting"]["version"] == 2
    finally:
        d.close()
    sent = [adapters.read_manifest(d.cfg.path("adapters") / adapters.version_dir_name(v)).forgetting for v in (1, 2)]
    r = subprocess.run([sys.executable, "-m", "daemon.cli", "--config", str(d.cfg.root / "config.json"), "forgetting",
                        "--json"], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)
    a, b = (s["job_id"] for s in sent)
    assert [f["job_id"] for f in m["files"]] == [a, b] and [f["version"] for f in m["files"]] == [1, 2]
    assert [s["id"] for s in m["sets"]] == ["probe:probe.jsonl", f"keep:{a}", f"keep:{b}"]
    later_a = next(s for s in sent[1]["sets"] if s["id"] == f"keep:{a}")
    assert m["cells"][1][1]["loss"] == later_a["loss"] and m["cells"][1][1]["change"] == later_a["change"]
    assert m["cells"][0][2] is None  # b's keep-set did not exist when a was scored
    assert m["files"][1]["backward_transfer"] == sent[1]["backward_transfer"]
    assert m["probes"][0]["loss"] == [next(s["loss"] for s in r_["sets"] if s["kind"] == "probe") for r_ in sent]


def test_the_probe_line_gives_the_drift_of_the_last_version_that_became_current():
    """A held or rolled-back file's probe figures are not the model's: the line's span and drift skip them."""
    from daemon.cli.forgetting_cmds import _probe_line

    p = {"name": "general.jsonl", "baseline": {"loss": 1.0}, "loss": [0.5, 0.45, 4.0], "drift": [-0.5, -0.55, 3.0]}
    line = _probe_line("P1", p, ["done", "done", "failed"])
    assert "loss 0.5 -> 0.45" in line and "drift -55.0%" in line, line
    assert "drift +300.0%" in _probe_line("P1", p, ["done", "done", "done"])
