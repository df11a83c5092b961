"""The real daemon as a process, on the embedded tiny model, on real files."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time

import psutil
import pytest

from daemon import control
from daemon.adapters import lineage
from daemon.lock import holder_pid
from daemon.sample_ledger import count_lines
from daemon.states import ControlAction
from pathlib import Path

from bench.harness import REPO, lines_of, time_scale, write_instance
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


def test_file_in_to_done_with_adapter_and_falling_loss(daemon_factory):
    d = daemon_factory(training={"epochs_per_file": 2}).start()
    d.drop("chat.jsonl", lines_of("chat.jsonl", 120))
    d.wait_counts(done=1, timeout=180)
    st = d.wait_for(lambda s: s["status"] == "idle" and s["adapter_version"] == 1, what="idle after the file")
    assert st["device"] == "cpu" and st["queue"]["done"] == 1 and st["last_error"] is None
    done = d.queue.done()[0]
    assert done.original_name == "chat.jsonl"
    assert done.path.read_text() == lines_of("chat.jsonl", 120)  # bytes untouched
    losses = [loss for _, loss in d.losses()]
    assert len(losses) == st["global_step"] >= 50
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first * 0.8, (first, last)
    current = json.loads((d.cfg.path("adapters") / "current.json").read_text())
    manifest = json.loads((d.cfg.path("adapters") / current["path"] / "manifest.json").read_text())
    assert manifest["trained_jobs"] == [done.job_id]
    assert (d.cfg.path("adapters") / current["path"] / "adapter_model.safetensors").stat().st_size > 0
    # the sample ledger: both epochs, every sample once each, as many steps as the file trained
    ledger = manifest["ledger"]
    assert [e["epoch"] for e in ledger["epochs"]] == [0, 1] and ledger["steps"] == manifest["steps"]
    assert all(e["samples"] == count_lines(e["lines"]) and e["lines"] == ledger["epochs"][0]["lines"]
               for e in ledger["epochs"])
    assert [m.version for m in lineage(d.cfg.path("adapters"))] == [1]
    db = d.history()
    job = db.job(done.job_id)
    assert job["state"] == "done" and job["format"] == "chat" and job["eval_loss"] is not None
    # per-layer LoRA activity: sampled every 10 steps and at the last, summarised in the status
    block = st["layer_activity_summary"]
    assert (block["job_id"], block["step"], block["global_step"]) == (done.job_id, job["steps"], st["global_step"])
    assert block["layers"] == [0, 1] and block["kinds"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert all(v > 0 for v in block["per_layer"]["relative"] + block["per_kind"]["update"] + block["per_layer"]["grad_b"])
    assert len(block["top_movers"]) == 5 and block["top_movers"][0]["measure"] == "relative_change"
    rows, n = db.activity_series()
    assert [r["step"] for r in rows] == list(range(10, job["steps"], 10)) + [job["steps"]] and rows[-1]["final"]
    assert db.latest_activity()["grid"]["change"][0][0] > 0
    # what the file moved: kept with its job record and in the adapter's manifest
    moved = json.loads(job["activity"])
    assert moved["values"] == manifest["activity_moved"]["values"] and all(v > 0 for v in moved["per_layer"]["moved"])
    assert list(d.cfg.path("logs").glob("daemon_*.log")) and list(d.cfg.path("logs").glob("trainer_*.log"))
    assert d.stop() == 0
    assert d.status()["status"] == "stopped"


def test_bad_files_fail_with_reasons_while_training_goes_on(daemon_factory):
    d = daemon_factory().start()
    d.drop("good.jsonl", lines_of("alpaca.jsonl", 60))
    d.drop("utf16.jsonl", '{"text": "hello"}\n'.encode("utf-16"))
    d.drop("array.jsonl", json.dumps([{"text": "a"}, {"text": "b"}]))
    d.drop("empty.jsonl", b"")
    d.drop("badroles.jsonl", "".join(json.dumps({"messages": [{"role": "bot", "content": "x"}]}) + "\n" for _ in range(20)))
    d.wait_counts(done=1, failed=4, timeout=180)
    reasons = {e.original_name: d.queue.read_error(e.job_id) for e in d.queue.failed()}
    assert set(reasons) == {"utf16.jsonl", "array.jsonl", "empty.jsonl", "badroles.jsonl"}
    assert all(r["reason"] == "invalid_data" for r in reasons.values())
    assert "UTF-16" in reasons["utf16.jsonl"]["message"]
    first = reasons["badroles.jsonl"]["errors"][0]
    assert first["line"] == 1 and "role" in first["field"]
    raw = {e.original_name: e.path.read_bytes() for e in d.queue.failed()}
    assert raw["utf16.jsonl"] == '{"text": "hello"}\n'.encode("utf-16")  # original bytes kept
    # a retry re-validates: the daemon refuses it with the reason, the file stays failed, untouched
    r = d.ctl("queue", "retry", "utf16.jsonl")
    assert r.returncode == 1 and "still fails validation" in r.stdout and "UTF-16" in r.stdout, r.stdout
    again = {e.original_name: e for e in d.queue.failed()}["utf16.jsonl"]
    assert again.path.read_bytes() == raw["utf16.jsonl"] and d.queue.read_error(again.job_id)["reason"] == "invalid_data"
    assert d.proc.poll() is None


def test_priorities_are_served_in_order(daemon_factory):
    d = daemon_factory()
    # Queue everything before the daemon starts, so the order is decided by priority alone.
    d.drop("low.jsonl", lines_of("text.jsonl", 12), sub="low")  # three contents: a copy would be a duplicate
    d.drop("normal.jsonl", lines_of("text.jsonl", 13))
    d.drop("high.jsonl", lines_of("text.jsonl", 14), sub="high")
    # Left while no daemon ran (a race with its crash): they must not stop or skip this run.
    control.request(d.cfg, ControlAction.STOP, by="test")
    control.request(d.cfg, ControlAction.SKIP, by="test")
    d.start()
    d.wait_counts(done=3, timeout=180)
    db = d.history()
    order = [j["original_name"] for j in sorted(db.jobs(), key=lambda j: j["started_at"])]
    assert order == ["high.jsonl", "normal.jsonl", "low.jsonl"]
    refused = [e["message"] for e in db.events(limit=100) if e["kind"] == "control_refused"]
    assert sorted(refused) == ["skip by test: made while the daemon was not running",
                               "stop by test: made while the daemon was not running"]


def test_pause_resume_skip_stop_through_trainctl(daemon_factory):
    d = daemon_factory(training={"epochs_per_file": 30}).start()
    d.drop("long.jsonl", lines_of("chat.jsonl", 40))
    d.wait_for(lambda s: s["status"] == "training" and s["current_step"] >= 2, what="training")
    r = d.ctl("pause")
    assert r.returncode == 0 and "paused" in r.stdout, r.stdout + r.stderr
    step = d.status()["current_step"]
    time.sleep(1.5)
    assert d.status()["status"] == "paused" and d.status()["current_step"] == step  # really holds
    held = d.status()
    assert held["eta_seconds"] is None and held["tokens_per_sec"] is None  # nothing is moving: no rate, no ETA
    assert "ETA -" in d.ctl("status").stdout
    r = d.ctl("resume")
    assert r.returncode == 0, r.stdout
    d.wait_for(lambda s: s["status"] == "training" and s["current_step"] > step, what="training again")
    r = d.ctl("status")
    assert "training" in r.stdout and "long.jsonl" in r.stdout and "ETA" in r.stdout
    js = json.loads(d.ctl("status", "--json").stdout)
    assert js["status"] == "training"
    r = d.ctl("skip")
    assert r.returncode == 0 and "skipped" in r.stdout, r.stdout
    failed = d.queue.failed()
    assert len(failed) == 1 and d.queue.read_error(failed[0].job_id)["reason"] == "skipped"
    assert not (d.cfg.path("adapters") / "current.json").exists()  # nothing kept from the skipped file
    assert d.history().steps(failed[0].job_id) == []  # nor in the step history, where the next file goes
    assert d.history().job(failed[0].job_id)["steps"] >= 2
    d.drop("next.jsonl", lines_of("chat.jsonl", 40))
    d.wait_for(lambda s: s["status"] == "training" and s["current_step"] >= 3, what="second file")
    r = d.ctl("stop")
    assert r.returncode == 0, r.stdout
    assert d.wait_exit() == 0
    st = d.status()
    assert st["status"] == "stopped"
    assert [e.original_name for e in d.queue.processing()] == ["next.jsonl"]  # resumes at next start
    assert list((d.cfg.path("checkpoints")).glob("*/step_*"))


@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)])  # one path
def test_a_stop_signal_to_every_process_at_once_still_checkpoints_at_the_step_reached(daemon_factory, sig):
    """What systemd's default stop (SIGTERM to every process of the unit) and Ctrl-C in a terminal (SIGINT to
    the foreground group) do: the trainer must not die of it before its stop checkpoint (#27, defect 1)."""
    d = daemon_factory(training={"epochs_per_file": 30, "checkpoint_every_steps": 1000}).start()
    d.drop("long.jsonl", lines_of("chat.jsonl", 40))
    st = d.wait_for(lambda s: s["status"] == "training" and s["current_step"] >= 3, what="training")
    for pid in (d.proc.pid, st["trainer_pid"]):  # no periodic checkpoint yet: only the stop can make one
        os.kill(pid, sig)
    assert d.wait_exit() == 0
    (entry,) = d.queue.processing()
    stopped = [e for e in d.history().events(100) if e["kind"] == "job_stopped"]
    assert stopped, "the trainer died before its stop checkpoint"
    step = int(stopped[-1]["message"].split("stopped at step ")[1].split(";")[0])
    latest = json.loads((d.cfg.path("checkpoints") / entry.job_id / "latest.json").read_text())
    assert latest["path"] == f"step_{step:06d}" and step >= 3


def catches(pid: int, sig: signal.Signals) -> bool:
    """Whether the process has a handler for the signal (Linux: the SigCgt mask of /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return False


@pytest.mark.parametrize("when", ["first handler", "trainer child started"])
def test_a_stop_while_the_daemon_starts_exits_cleanly_and_leaves_nothing(daemon_factory, request, when):
    """systemd's stop right after its start, or stop_all.sh right after start_all.sh: a SIGTERM as soon as the
    daemon can hear it (still importing), or the moment its trainer child appears, ends it with exit 0, its
    lock and the child's socket folder gone (the soak on main saw a clean stop exit -15 with the folder left)."""
    tmp = Path(tempfile.mkdtemp(prefix="tds-", dir="/tmp"))  # short: the socket path must fit 107 bytes
    request.addfinalizer(lambda: shutil.rmtree(tmp, ignore_errors=True))
    d = daemon_factory(env={"TMPDIR": str(tmp)}).start()
    deadline = time.monotonic() + 60 * time_scale()
    children: list[psutil.Process] = []
    while time.monotonic() < deadline and d.proc.poll() is None:
        if when == "first handler" and catches(d.proc.pid, signal.SIGTERM):
            break
        if when != "first handler" and (children := psutil.Process(d.proc.pid).children()):
            break
        time.sleep(0.002)
    assert d.proc.poll() is None, f"the daemon exited ({d.proc.returncode}) before it was stopped\n{d.log_tail(30)}"
    os.kill(d.proc.pid, signal.SIGTERM)
    assert d.wait_exit() == 0, d.log_tail(30)
    left = [p.name for p in tmp.iterdir() if p.name.startswith("traind-")]
    assert left == [], f"{left}\n{d.log_tail(30)}"
    _, alive = psutil.wait_procs(children, timeout=30 * time_scale())
    assert not alive, f"the trainer child outlived the daemon: {alive}\n{d.log_tail(30)}"
    assert holder_pid(d.cfg.path("status") / "daemon.lock") is None


def test_emergency_stop_file(daemon_factory):
    d = daemon_factory(training={"epochs_per_file": 30}).start()
    d.drop("long.jsonl", lines_of("chat.jsonl", 40))
    d.wait_for(lambda s: s["status"] == "training" and s["current_step"] >= 1, what="training")
    (d.cfg.root / ".stop").touch()
    assert d.wait_exit() == 0
    assert not (d.cfg.root / ".stop").exists()
    assert d.status()["status"] == "stopped"


def test_launch_script_refuses_second_instance(daemon_factory):
    d = daemon_factory()
    env = dict(os.environ, TRAIND_PYTHON=__import__("sys").executable)
    (d.cfg.path("status")).mkdir(parents=True, exist_ok=True)
    (d.cfg.path("status") / "daemon.lock").write_text("999999\n")  # stale pid of a dead process
    first = subprocess.run([str(REPO / "bin/launch_training_daemon.sh"), "--config", str(d.config_path)],
                           capture_output=True, text=True, env=env, timeout=60)
    assert first.returncode == 0, first.stderr
    pid = int(first.stdout.split("pid ")[1].split(",")[0])
    try:
        second = subprocess.run([str(REPO / "bin/launch_training_daemon.sh"), "--config", str(d.config_path)],
                                capture_output=True, text=True, env=env, timeout=60)
        assert second.returncode == 3
        assert f"pid {pid}" in second.stderr and "already running" in second.stderr
        direct = subprocess.run([__import__("sys").executable, "-m", "daemon", "--config", str(d.config_path)],
                                capture_output=True, text=True, timeout=60, cwd=REPO)
        assert direct.returncode == 3 and f"pid {pid}" in direct.stderr
    finally:
        os.kill(pid, 15)
        for _ in range(300):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)


def test_locked_key_change_refused_until_approved(daemon_factory):
    d = daemon_factory().start()
    d.drop("a.jsonl", lines_of("text.jsonl", 12))
    d.wait_counts(done=1)
    assert d.stop() == 0
    d2 = daemon_factory(lora={"r": 8})  # same folder, rank changed
    d2.start()
    assert d2.wait_exit() == 2
    st = d2.status()
    assert st["status"] == "error" and "lora.r" in st["last_error"] and "4" in st["last_error"] and "8" in st["last_error"]
    assert st["queue"]["done"] == 1 and st["adapter_version"] == 1  # the refusal still shows the instance as it is
    r = d2.ctl("config", "validate")
    assert r.returncode == 1 and "lora.r" in r.stdout
    r = d2.ctl("config", "approve")
    assert r.returncode == 0 and "archived" in r.stdout, r.stdout
    d2.start()
    d2.wait_for(lambda s: s["status"] == "idle" and s["detail"] == "waiting for files", what="started after approval")
    assert d2.stop() == 0


def test_skip_and_stop_act_while_paused(daemon_factory):
    d = daemon_factory(training={"epochs_per_file": 30}).start()
    d.drop("a.jsonl", lines_of("chat.jsonl", 40))
    d.wait_for(lambda s: s["status"] == "training" and s["current_step"] >= 2, what="training")
    assert d.ctl("pause").returncode == 0
    r = d.ctl("skip")
    assert r.returncode == 0 and "skipped" in r.stdout, r.stdout
    d.wait_for(lambda s: s["status"] == "paused" and s["current_file"] is None, what="paused, no file")
    d.drop("b.jsonl", lines_of("chat.jsonl", 40))
    d.wait_counts(pending=1)
    time.sleep(1.0)
    assert d.queue.counts()["pending"] == 1 and d.status()["status"] == "paused"  # paused: nothing starts
    assert d.ctl("resume").returncode == 0
    d.wait_for(lambda s: s["status"] == "training" and s["current_step"] >= 2, what="b training")
    assert d.ctl("pause").returncode == 0
    r = d.ctl("stop")
    assert r.returncode == 0 and "b.jsonl resumes" in r.stdout, r.stdout
    assert d.wait_exit() == 0 and d.status()["status"] == "stopped"
    assert [e.original_name for e in d.queue.processing()] == ["b.jsonl"]


def test_second_sigterm_stops_at_once(daemon_factory):
    d = daemon_factory(training={"epochs_per_file": 30}).start()
    d.drop("a.jsonl", lines_of("chat.jsonl", 40))
    st = d.wait_for(lambda s: s["status"] == "training" and s["current_step"] >= 2, what="training")
    d.proc.send_signal(signal.SIGTERM)
    d.proc.send_signal(signal.SIGTERM)
    assert d.wait_exit(30) == 0
    with pytest.raises(ProcessLookupError):  # the child was killed, not left behind
        for _ in range(50):
            os.kill(st["trainer_pid"], 0)
            time.sleep(0.1)
    assert [e.original_name for e in d.queue.processing()] == ["a.jsonl"]  # resumes at the next start


def test_a_file_changed_after_it_was_queued_is_not_trained(daemon_factory):
    d = daemon_factory().start()
    assert d.ctl("pause").returncode == 0
    d.drop("grows.jsonl", lines_of("text.jsonl", 12))
    d.wait_for(lambda s: s["queue"].get("pending") == 1, what="queued while paused")
    entry = d.queue.pending()[0]
    with open(entry.path, "a", encoding="utf-8") as f:  # a writer that kept it open past the settle window
        f.write(lines_of("text.jsonl", 3))
    assert d.ctl("resume").returncode == 0
    d.wait_counts(failed=1)
    err = d.queue.read_error(entry.job_id)
    assert err["reason"] == "invalid_data" and "changed after it was queued" in err["message"], err
    assert d.proc.poll() is None


def test_queue_remove_through_the_running_daemon(daemon_factory):
    d = daemon_factory().start()
    assert d.ctl("pause").returncode == 0
    d.drop("unwanted.jsonl", lines_of("text.jsonl", 12))
    d.wait_for(lambda s: s["queue"].get("pending") == 1, what="queued while paused")
    r = d.ctl("queue", "remove", "unwanted.jsonl")
    assert r.returncode == 0 and "is now failed" in r.stdout, r.stdout
    entry = d.queue.failed()[0]
    assert d.queue.read_error(entry.job_id)["reason"] == "removed"
    assert d.history().job(entry.job_id)["reason"] == "removed"
    r = d.ctl("queue", "remove", "unwanted.jsonl")  # not pending any more
    assert r.returncode != 0 and "only pending files can be removed" in r.stdout + r.stderr, r.stdout
