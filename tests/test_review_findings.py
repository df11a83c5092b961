"""Review findings on the service side, shown on the real daemon (real processes, no mocks).

Each test states what the README / docs/internals.md promise. They were written
as strict xfails by a code review, each showing a defect, and pass since the fixes.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from daemon import control
from daemon.states import ControlAction
from daemon.service.supervisor import last_logged_error
from bench.harness import lines_of, time_scale, write_instance
from bench.harness import Daemon

pytestmark = pytest.mark.e2e


@pytest.fixture
def daemon_factory(tmp_path, models_dir):
    made: list[Daemon] = []

    def make(name: str = "inst", env: dict | None = None, **overrides) -> Daemon:
        d = Daemon(write_instance(tmp_path / name, models_dir, **overrides), env=env)
        made.append(d)
        return d

    yield make
    for d in made:
        d.close()


def event_kinds(d: Daemon) -> list[str]:
    """The kinds of the daemon's history events ([] until its database exists)."""
    import sqlite3

    if not (d.cfg.path("status") / "history.db").exists():
        return []
    db = d.history()
    try:
        return [e["kind"] for e in db.events(limit=1000)]
    except sqlite3.OperationalError:  # created, schema not yet written
        return []
    finally:
        db.close()


def wait_until(pred, timeout: float, what: str) -> None:
    deadline = time.time() + timeout * time_scale()
    while time.time() < deadline:
        if pred():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow  # default-run time: CI must stay under 15 minutes (README, Tests)
def test_unloadable_base_model_is_reported_as_error(daemon_factory, tmp_path):
    bad = tmp_path / "badmodel"
    bad.mkdir()
    # passes config validation (a model type, a weights file, a tokenizer file) and does not load
    (bad / "config.json").write_text('{"model_type": "llama"}')
    (bad / "model.safetensors").write_bytes(b"\0" * 64)
    (bad / "tokenizer.json").write_text("{}")
    d = daemon_factory(base_model=str(bad), service={"restart_backoff_seconds": 0.1}).start()
    d.drop("a.jsonl", lines_of("text.jsonl", 12))
    wait_until(lambda: event_kinds(d).count("trainer_crash") >= 3, 120, "three trainer crashes")
    # the status file follows the history within one write
    st = d.wait_for(lambda s: s["status"] == "error", timeout=10, what="status error")
    assert "failed to start 3 times" in st["last_error"] and "cannot start" in st["detail"], st
    # the whole error, as the trainer logged it, in the status and in each crash's event
    whole = last_logged_error(sorted(d.cfg.path("logs").glob("trainer_2*.log"))[-1])
    assert whole and st["last_error"].endswith(whole), (st["last_error"], whole)
    db = d.history()
    crashes = [e for e in db.events(limit=100) if e["kind"] == "trainer_crash"]
    db.close()
    assert all(e["message"].endswith(whole) for e in crashes), crashes


def test_status_after_trainer_crash_has_no_stale_file(daemon_factory):
    d = daemon_factory(training={"epochs_per_file": 30}, service={"restart_backoff_seconds": 5.0}).start()
    d.drop("a.jsonl", lines_of("chat.jsonl", 40))
    st = d.wait_for(lambda s: s["status"] == "training" and s["current_step"] >= 2, what="training")
    os.kill(st["trainer_pid"], signal.SIGKILL)
    st = d.wait_for(lambda s: "restarting" in (s["detail"] or ""), what="restart pending")
    assert st["status"] == "idle" and st["trainer_pid"] is None
    assert st["current_file"] is None and st["job_id"] is None, (st["current_file"], st["current_step"])


@pytest.mark.slow  # default-run time: CI must stay under 15 minutes (README, Tests)
def test_skip_during_trainer_restart_is_not_lost(daemon_factory):
    d = daemon_factory(training={"epochs_per_file": 30}, service={"restart_backoff_seconds": 3.0}).start()
    d.drop("a.jsonl", lines_of("chat.jsonl", 40))
    st = d.wait_for(lambda s: s["status"] == "training" and s["current_step"] >= 2, what="training")
    os.kill(st["trainer_pid"], signal.SIGKILL)
    d.wait_for(lambda s: "restarting" in (s["detail"] or ""), what="restart pending")
    r = d.ctl("skip", "--no-wait")  # the status still names the file, so trainctl accepts it
    assert r.returncode == 0, r.stdout
    d.wait_for(lambda s: s["status"] in ("training", "idle") and s["trainer_pid"] and "restarting" not in s["detail"],
               what="trainer back")
    time.sleep(2.0)
    assert [e.original_name for e in d.queue.failed()] == ["a.jsonl"], d.queue.counts()


def test_stop_while_the_model_loads_keeps_saying_stopping(daemon_factory):
    d = daemon_factory().start()
    logs = d.cfg.path("logs")

    def child_connected() -> bool:  # the child connects right after this line, then loads the model
        return any("trainer pid" in p.read_text(errors="replace") for p in logs.glob("trainer_*.log"))

    wait_until(child_connected, 60, "the trainer child to start")
    d.proc.send_signal(signal.SIGTERM)
    seen = []
    while d.proc.poll() is None:
        st = d.status() or {}
        if not seen or seen[-1] != st.get("status"):
            seen.append(st.get("status"))
        time.sleep(0.01)
    assert d.proc.returncode == 0
    after_stop = seen[seen.index("stopping"):] if "stopping" in seen else seen
    assert "idle" not in after_stop, seen


def _cpu_seconds(pid: int) -> float | None:
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_the_loop_does_not_spin_while_the_child_exits(daemon_factory):
    d = daemon_factory().start()
    d.wait_for(lambda s: s["detail"] == "waiting for files", what="ready")
    time.sleep(0.5)
    before = _cpu_seconds(d.proc.pid)
    d.proc.send_signal(signal.SIGTERM)  # idle: the service sends `shutdown` and waits for the child to go
    last = before
    while d.proc.poll() is None:
        last = _cpu_seconds(d.proc.pid) or last
        time.sleep(0.02)
    assert d.proc.returncode == 0
    assert last - before < 0.5, f"the daemon used {last - before:.2f} s of CPU while its child exited"


def test_a_malformed_request_file_does_not_kill_the_daemon(daemon_factory):
    d = daemon_factory().start()
    d.wait_for(lambda s: s["detail"] == "waiting for files", what="ready")
    req = control.request(d.cfg, ControlAction.RETRY, by="script", job_id="whatever.jsonl", priority="urgent")
    deadline = time.time() + 20
    while req.exists() and d.proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert not req.exists() and d.proc.poll() is None, d.log_tail(5)  # refused and consumed, daemon alive


def _big_text(n: int) -> str:
    import json

    words = "the quick brown fox jumps over the lazy dog while seven wise owls count the stars".split()
    return "".join(json.dumps({"text": " ".join(words[(i + k) % len(words)] for k in range(120))}) + "\n"
                   for i in range(n))


@pytest.mark.slow  # default-run time: CI must stay under 15 minutes (README, Tests)
def test_skip_crossing_done_does_not_mark_a_trained_file_failed(daemon_factory):
    # A long final eval (about 2 s here) holds the child between its last step and `done`.
    d = daemon_factory(data={"max_length": 256, "eval_fraction": 0.8, "eval_max_examples": 5000},
                       training={"micro_batch_size": 16, "warmup_steps": 1}).start()
    d.drop("a.jsonl", _big_text(1000))
    st = d.wait_for(lambda s: s["status"] == "training" and s["job_id"], what="a training")
    job_a = st["job_id"]
    d.drop("b.jsonl", lines_of("text.jsonl", 12))

    def last_step_done() -> bool:
        db = d.history()
        try:
            job = db.job(job_a) or {}
            steps = [r["step"] for r in db.steps(job_a)]
            return bool(job.get("total_steps")) and bool(steps) and max(steps) == job["total_steps"]
        finally:
            db.close()

    wait_until(last_step_done, 120, "a's last optimizer step")
    assert not d.queue.done()  # still in the final eval / publish
    control.request(d.cfg, ControlAction.SKIP, by="test", job_id=job_a)  # what `trainctl skip` writes
    d.wait_counts(done=2, timeout=120)
    d.wait_for(lambda s: s["status"] == "idle" and s["current_file"] is None, what="idle")
    time.sleep(1.0)
    db = d.history()
    try:
        states = {j["original_name"]: (j["state"], j["reason"]) for j in db.jobs()}
    finally:
        db.close()
    assert states["a.jsonl"][0] == "done" and states["b.jsonl"][0] == "done", states





@pytest.mark.slow  # default-run time: CI must stay under 15 minutes (README, Tests)
def test_restarted_child_uses_the_config_the_service_validated(daemon_factory):
    import json

    d = daemon_factory(service={"restart_backoff_seconds": 0.2}).start()
    d.drop("a.jsonl", lines_of("text.jsonl", 12))
    d.wait_counts(done=1)
    st = d.wait_for(lambda s: s["detail"] == "waiting for files" and s["adapter_version"] == 1, what="idle, v1")
    raw = json.loads(d.config_path.read_text())
    raw["lora"]["r"] = 8  # meant for the next start, where `trainctl config approve` would be asked for
    d.config_path.write_text(json.dumps(raw))
    os.kill(st["trainer_pid"], signal.SIGKILL)  # e.g. an OOM kill
    time.sleep(0.5)
    d.wait_for(lambda s: s["detail"] == "waiting for files" and s["trainer_pid"], timeout=40, what="trainer back")
    time.sleep(3.0)
    assert event_kinds(d).count("trainer_crash") == 1, d.log_tail(8)
