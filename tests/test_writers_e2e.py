"""Files written in place by a writer that keeps them open, and files taken away mid-training (#26: 1, 13).

The real daemon as a process on the embedded model; the writer is another real process."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from bench.harness import lines_of, write_instance
from bench.harness import Daemon

pytestmark = pytest.mark.e2e

# A writer that opens the file once and writes a line every `pause` seconds, longer than the settle window.
WRITER = """
import sys, time
lines = open(sys.argv[2], encoding="utf-8").read().splitlines(keepends=True)
with open(sys.argv[1], "w", encoding="utf-8") as f:
    for i, line in enumerate(lines):
        f.write(line)
        f.flush()
        print(i + 1, flush=True)
        time.sleep(float(sys.argv[3]))
"""


@pytest.fixture
def factory(tmp_path, models_dir):
    made: list[Daemon] = []

    def make(name: str, env: dict | None = None, **over) -> Daemon:
        d = Daemon(write_instance(tmp_path / name, models_dir, **over), env=env)
        made.append(d)
        return d

    yield make
    for d in made:
        d.close()


def write_slowly(d: Daemon, name: str, body: str, pause: float) -> subprocess.Popen:
    src = d.cfg.root / f"{name}.source"
    src.write_text(body, encoding="utf-8")
    return subprocess.Popen([sys.executable, "-c", WRITER, str(d.cfg.path("inbox") / name), str(src), str(pause)],
                            stdout=subprocess.PIPE, text=True)


def test_a_file_held_open_by_a_slow_writer_is_taken_whole_once_closed(factory):
    """One line every 1 s, the settle window 0.3 s: the file is taken only once its writer closes it,
    with every line, as one job."""
    d = factory("held").start()
    d.wait_for(lambda s: s["status"] == "idle" and s["detail"] == "waiting for files", what="ready")
    body = lines_of("text.jsonl", 6)
    writer = write_slowly(d, "slow.jsonl", body, pause=1.0)
    try:
        for i in range(1, 6):
            assert writer.stdout.readline() == f"{i}\n"
        counts = d.queue.counts()
        assert counts["pending"] + counts["processing"] + counts["done"] + counts["failed"] == 0, counts
        assert (d.cfg.path("inbox") / "slow.jsonl").exists()
    finally:
        assert writer.wait(30) == 0
    d.wait_counts(done=1, timeout=180)
    (job,) = d.queue.done()
    assert job.path.read_text(encoding="utf-8") == body
    db = d.history()
    assert db.job(job.job_id)["n_records"] == 6 and db.job(job.job_id)["changed"] is None
    assert "open for writing by pid" in (d.cfg.path("logs") / next(p.name for p in d.cfg.path("logs").glob("daemon_*.log"))).read_text()


def test_where_writers_cannot_be_seen_a_file_that_changes_after_it_trained_is_flagged(factory):
    """The issue's case where the platform cannot tell who holds a file (TRAIND_PROC_DIR empty: as for another
    user's process, or a network file system): the timing rule takes the first line; what the writer adds while
    the file trains or after it finished is said, in the events and the job record, not lost in silence."""
    d = factory("blind", env={"TRAIND_PROC_DIR": "/nonexistent-proc"}).start()
    d.wait_for(lambda s: s["status"] == "idle" and s["detail"] == "waiting for files", what="ready")
    writer = write_slowly(d, "slow.jsonl", lines_of("text.jsonl", 4), pause=2.5)
    try:
        d.wait_counts(done=1, timeout=120)  # taken after its first line (the writer still holds it)
    finally:
        assert writer.wait(60) == 0
    (job,) = d.queue.done()
    deadline = time.time() + 60
    while time.time() < deadline and not (d.history().job(job.job_id) or {}).get("changed"):
        time.sleep(0.2)
    record = d.history().job(job.job_id)
    assert record["n_records"] < 4 and record["changed"], record
    events = [e for e in d.history().events(200) if e["kind"] == "job_changed"]
    assert events and all(e["job_id"] == job.job_id for e in events), events
    assert "slow.jsonl" in events[0]["message"] and "slow.jsonl" in record["changed"], (record["changed"], events)
    assert f"CHANGED   {record['changed']}" in d.ctl("queue", "status", job.job_id).stdout
    from monitor.queue_view import queue_view  # what GET /api/queue and the dashboard's done row show
    assert queue_view(d.queue, db_path=d.cfg.path("status") / "history.db").done[0].changed == record["changed"]
    assert d.proc.poll() is None


def test_a_file_removed_from_processing_while_it_trains_stops_and_publishes_nothing(factory):
    d = factory("removed", training={"epochs_per_file": 30}).start()
    d.drop("a.jsonl", lines_of("text.jsonl", 24))
    st = d.wait_for(lambda s: s["status"] == "training" and (s.get("current_step") or 0) >= 2, timeout=120,
                    what="training")
    (entry,) = d.queue.processing()
    entry.path.unlink()  # by hand, while it trains
    d.wait_for(lambda s: s.get("job_id") is None and s["status"] == "idle", timeout=60, what="the file stopped")
    record = d.history().job(st["job_id"])
    assert record["state"] == "failed" and record["reason"].startswith("removed:"), record
    assert "removed from queue/processing/" in record["reason"]
    assert not (d.cfg.path("adapters") / "current.json").exists()  # no version stands for a file no queue holds
    assert any(e["kind"] == "job_removed" for e in d.history().events(100))
    assert d.queue.counts()["processing"] == 0 and d.proc.poll() is None
    d.drop("b.jsonl", lines_of("text.jsonl", 8))  # and the daemon goes on with the next file
    d.wait_counts(done=1, timeout=120)
