import json

from daemon.config import load_config
from daemon.jobqueue import JobQueue
from daemon.states import FailReason, JobState, Priority
from daemon.status import HistoryDB, TrainingStatus
from daemon.tracker import ActiveJob, JobTracker
from tests.conftest import lines_of, write_instance

NOW = 1_800_000_000.0


def setup(tmp_path):
    cfg = load_config(write_instance(tmp_path / "i"))
    q = JobQueue(cfg.path("queue"))
    q.ensure()
    db = HistoryDB(cfg.path("status") / "history.db")
    return cfg, q, db, JobTracker(cfg, q, db, TrainingStatus())


def admit(q, tmp_path, name, text):
    src = tmp_path / name
    src.write_text(text)
    return q.admit(src, Priority.NORMAL, NOW)


def test_reconcile_mends_records_a_crash_left_behind(tmp_path):
    cfg, q, db, tracker = setup(tmp_path)
    done = q.start(admit(q, tmp_path, "d.jsonl", lines_of("text.jsonl", 5)))
    db.upsert_job(done.job_id, state="processing", sha256="x" * 64, format="text")
    q.finish(done.job_id)  # ...and the crash came before the record said so
    bad = admit(q, tmp_path, "b.jsonl", '{"text": 1}\n')
    q.fail(bad.job_id, FailReason.INVALID_DATA, "line 1, field text: must be a string", NOW)  # no record at all
    adapters = cfg.path("adapters")
    (adapters / "v0003").mkdir(parents=True)
    (adapters / "v0003" / "manifest.json").write_text(json.dumps({"trained_jobs": [done.job_id]}))
    (adapters / "current.json").write_text(json.dumps({"version": 3, "path": "v0003"}))

    assert tracker.reconcile(NOW) == 2
    d, b = db.job(done.job_id), db.job(bad.job_id)
    assert (d["state"], d["adapter_version"]) == ("done", 3)
    assert b["state"] == "failed" and b["reason"].startswith("invalid_data: line 1") and b["sha256"]
    assert tracker.reconcile(NOW) == 0  # idempotent


def test_late_messages_about_another_file_are_ignored(tmp_path):
    cfg, q, db, tracker = setup(tmp_path)
    entry = q.start(admit(q, tmp_path, "a.jsonl", lines_of("text.jsonl", 5)))
    tracker.begin(ActiveJob(entry.job_id, str(entry.path), "a.jsonl", "s" * 64, "text", 5))
    assert tracker.on_message({"type": "skipped", "job_id": "someone-else"}, NOW) is False
    assert q.processing()[0].job_id == entry.job_id  # untouched
    assert tracker.on_message({"type": "done", "job_id": entry.job_id, "steps": 2, "adapter_version": 1}, NOW) is True
    assert q.done()[0].job_id == entry.job_id and tracker.job is None
    assert db.job(entry.job_id)["state"] == JobState.DONE.value
