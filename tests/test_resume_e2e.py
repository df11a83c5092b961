"""Crash the real daemon (or its trainer child) with SIGKILL mid-file; the restart must
resume from the last checkpoint and match an uninterrupted run step for step."""

from __future__ import annotations

import json
import os
import signal

import pytest

from daemon.adapters import STEP_LOG
from daemon.states import JobState
from daemon.history_db import HISTORY_FILE, HistoryDB
from daemon.train.checkpoint import read_step_log
from bench.harness import lines_of, write_instance
from bench.harness import Daemon

pytestmark = pytest.mark.e2e

# Long enough (about 200 optimizer steps) that a kill lands mid-file; dropout on,
# so the restored RNG state matters.
SETTINGS = dict(training={"epochs_per_file": 8, "checkpoint_every_steps": 5}, lora={"dropout": 0.1})
DATA = lines_of("chat.jsonl", 100)
TOL = 1e-5


@pytest.fixture
def factory(tmp_path, models_dir):
    made: list[Daemon] = []

    def make(name: str, env: dict | None = None, **over) -> Daemon:
        d = Daemon(write_instance(tmp_path / name, models_dir, **{**SETTINGS, **over}), env=env)
        made.append(d)
        return d

    yield make
    for d in made:
        d.close()


def adapter_tensors(d: Daemon) -> dict:
    from safetensors.torch import load_file
    current = json.loads((d.cfg.path("adapters") / "current.json").read_text())
    return load_file(d.cfg.path("adapters") / current["path"] / "adapter_model.safetensors")


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def moved(d: Daemon) -> list[float]:
    """What the file moved, per module (its job record), flattened."""
    record = json.loads(d.history().jobs()[0]["activity"])
    return [v for row in record["values"]["moved"] for v in row if v is not None]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, models_dir):
    """One uninterrupted run of the file: losses per step and the final adapter."""
    d = Daemon(write_instance(tmp_path_factory.mktemp("ref"), models_dir, **SETTINGS))
    try:
        d.start()
        d.drop("data.jsonl", DATA)
        d.wait_counts(done=1, timeout=300)
        d.wait_for(lambda s: s["status"] == "idle", what="idle")
        yield dict(d.losses()), adapter_tensors(d), moved(d)
    finally:
        d.close()


def compare(d: Daemon, reference) -> tuple[float, float]:
    ref_losses, ref_adapter, ref_moved = reference
    got = dict(d.losses())
    assert sorted(got) == sorted(ref_losses), "every step once, no gaps, no extras"
    loss_diff = max(abs(got[s] - ref_losses[s]) for s in ref_losses)
    adapter_diff = max_diff(adapter_tensors(d), ref_adapter)
    print(f"resume equivalence: {len(got)} steps, max |loss diff| {loss_diff:.3e}, max |adapter diff| {adapter_diff:.3e}")
    assert loss_diff <= TOL and adapter_diff <= TOL
    # What the file moved is measured from the adapter before the file, not from the resumed checkpoint:
    # nothing counted twice, nothing lost.
    got_moved = moved(d)
    moved_diff = max(abs(a - b) / b for a, b in zip(got_moved, ref_moved))
    print(f"what the file moved: {len(got_moved)} modules, max relative diff {moved_diff:.3e}")
    assert len(got_moved) == len(ref_moved) and moved_diff <= TOL
    return loss_diff, adapter_diff


def test_kill9_of_daemon_mid_file_resumes_exactly(factory, reference):
    d = factory("crash").start()
    d.drop("data.jsonl", DATA)
    st = d.wait_for(lambda s: s["status"] == "training" and s["current_step"] >= 12, what="step 12")
    child = st["trainer_pid"]
    d.kill9()
    assert st["current_step"] < st["total_steps"], "the kill must land mid-file"
    for _ in range(100):  # the child dies with its parent (PR_SET_PDEATHSIG)
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        __import__("time").sleep(0.05)
    else:
        pytest.fail("trainer child outlived the killed daemon")
    assert [e.original_name for e in d.queue.processing()] == ["data.jsonl"]
    d.start()
    d.wait_counts(done=1, processing=0, timeout=300)
    d.wait_for(lambda s: s["status"] == "idle", what="idle")
    assert len(d.queue.done()) == 1 and not d.queue.failed()
    compare(d, reference)
    # the published version keeps the file's step log: every step once, as the history has it
    logged = read_step_log(d.cfg.path("adapters") / "v0001" / STEP_LOG)
    assert [(m["global_step"], m["loss"]) for m in logged] == d.losses()
    job = d.history().jobs()[0]
    assert job["crashes"] == 0  # a daemon kill is not the file's fault


def test_kill9_of_trainer_child_is_restarted_and_resumes_exactly(factory, reference):
    d = factory("childcrash").start()
    d.drop("data.jsonl", DATA)
    st = d.wait_for(lambda s: s["status"] == "training" and s["current_step"] >= 12, what="step 12")
    os.kill(st["trainer_pid"], signal.SIGKILL)
    d.wait_for(lambda s: s.get("trainer_pid") not in (None, st["trainer_pid"]), what="a new child")
    d.wait_counts(done=1, processing=0, timeout=300)
    d.wait_for(lambda s: s["status"] == "idle", what="idle")
    assert d.proc.poll() is None  # the service lived through it
    compare(d, reference)
    db = d.history()
    assert db.jobs()[0]["crashes"] == 1
    assert any(e["kind"] == "trainer_crash" for e in db.events())


def test_file_finished_before_a_crash_is_not_trained_again(factory):
    d = factory("twice", training={"epochs_per_file": 1}).start()
    d.drop("data.jsonl", lines_of("text.jsonl", 30))
    d.wait_counts(done=1)
    d.wait_for(lambda s: s["status"] == "idle", what="idle")
    d.kill9()
    steps_before = d.losses()
    # The state a crash leaves between the adapter's publication and the move to done/:
    entry = d.queue.done()[0]
    os.rename(entry.path, d.queue.folder(JobState.PROCESSING) / entry.job_id)
    db = HistoryDB(d.cfg.path("status") / HISTORY_FILE)  # ...whose `done` record never came
    db.upsert_job(entry.job_id, state="processing", activity=None)
    with db.conn:  # ...nor the last steps' records (the service was behind when it died)
        db.conn.execute("DELETE FROM metrics WHERE job_id=? AND step>2", (entry.job_id,))
    db.close()
    d.start()
    d.wait_counts(done=1, processing=0)
    d.wait_for(lambda s: s["status"] == "idle", what="idle")
    assert d.losses() == steps_before  # no step trained again
    assert json.loads((d.cfg.path("adapters") / "current.json").read_text())["version"] == 1
    assert all(v > 0 for v in moved(d))  # what it moved, taken from the adapter's manifest
    assert any("not trained again" in e["message"] for e in d.history().events())


def test_repeated_trainer_crashes_fail_the_file_and_the_daemon_goes_on(factory):
    # The child dies right after its first checkpoint's first durable write, every time.
    d = factory("crashloop", env={"TRAIND_TRAINER_CRASH_AFTER_OP": "1"},
                service={"max_crashes_per_file": 3, "restart_backoff_seconds": 0.1}).start()
    d.drop("doomed.jsonl", DATA)
    d.wait_counts(failed=1, processing=0, timeout=300)
    failed = d.queue.failed()[0]
    err = d.queue.read_error(failed.job_id)
    assert err["reason"] == "crashed" and "3 times" in err["message"]
    assert d.proc.poll() is None
