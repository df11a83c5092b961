"""The service's loop in process, against a fake trainer that speaks the protocol (tests/fake_trainer.py).

Each test is the real Service (queue, intake, tracker, history, status file, control files) turning `tick()`
with a clock the test moves; only the trainer child is the fake. Milliseconds each: the real child and its
socket are proven by the end-to-end tests.
"""

from __future__ import annotations

import dataclasses

import pytest

from daemon import adapters, control, diskspace, protocol
from daemon.service import state
from daemon.states import ControlAction, DesiredState, PauseReason, ServiceStatus, TrainerState
from daemon.status import read_status
from bench.harness import lines_of
from tests.fake_trainer import Clock, FakeTrainer, drop, service_with_fake, stop_service


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def svc(tmp_path, clock):
    service, _ = service_with_fake(tmp_path, clock)
    yield service
    stop_service(service)


def trainer() -> FakeTrainer:
    return FakeTrainer.made[-1]


def status(svc) -> dict:
    return read_status(svc.cfg.path("status"))


def ready(svc) -> FakeTrainer:
    t = trainer()
    t.ready()
    svc.tick()
    return t


def training(svc, name: str = "a.jsonl", n: int = 6) -> protocol.Job:
    """A file dropped, queued, handed over; the trainer has started it."""
    t = trainer()
    drop(svc, name, lines_of("text.jsonl", n))
    svc.tick()
    job = t.train_order()
    t.say(protocol.Started(job_id=job.job_id, total_steps=4, resumed_from_step=0, n_train=n - 1, n_eval=1,
                           n_dropped=0, epochs=1))
    svc.tick()
    return job


def step(job: protocol.Job, n: int, loss: float = 2.0) -> protocol.Step:
    return protocol.Step(job_id=job.job_id, step=n, total_steps=4, global_step=n, epoch=n / 4, loss=loss, lr=1e-3,
                         grad_norm=0.5, tokens=100, slots=110, tokens_per_sec=500.0, elapsed=float(n))


def done(job: protocol.Job, version: int = 1) -> protocol.Done:
    return protocol.Done(job_id=job.job_id, steps=4, final_loss=1.5, eval_loss=1.6, adapter_version=version,
                         adapter_path=f"/x/v{version:04d}", already_trained=False, activity_moved=None)


# ---------------------------------------------------------------- a file from the inbox to done/


def test_a_file_goes_from_the_inbox_to_the_trainer_and_to_done_with_its_records(svc, clock):
    assert status(svc)["status"] == "idle" and status(svc)["detail"] == "loading model"
    t = ready(svc)
    assert svc.status.detail == "waiting for files" and svc.sup.state is TrainerState.READY
    drop(svc, "a.jsonl", lines_of("text.jsonl", 6))
    svc.tick()
    job = t.train_order()
    assert job.original_name == "a.jsonl" and job.n_records == 6 and job.path.endswith("/processing/" + job.job_id)
    assert (svc.status.status, svc.status.detail) == (ServiceStatus.TRAINING, "preparing data")
    t.say(protocol.Started(job_id=job.job_id, total_steps=4, resumed_from_step=0, n_train=5, n_eval=1, n_dropped=0,
                           epochs=1))
    for n in (1, 2):
        clock.advance(1.0)
        t.say(step(job, n, loss=2.0 - n / 10))
        svc.tick()
    st = status(svc)
    assert (st["status"], st["detail"], st["current_step"], st["loss"]) == ("training", "training", 2, 1.8)
    assert st["eta_seconds"] == pytest.approx(2.0)  # two steps left at a step a second
    t.say(done(job))
    svc.tick()
    assert [e.job_id for e in svc.queue.done()] == [job.job_id]
    record = svc.db.job(job.job_id)
    assert (record["state"], record["steps"], record["final_loss"], record["adapter_version"]) == ("done", 4, 1.5, 1)
    assert [r["step"] for r in svc.db.steps(job.job_id)] == [1, 2]
    st = status(svc)
    assert (st["status"], st["detail"], st["current_file"], st["adapter_version"]) == ("idle", "waiting for files", None, 1)


def test_late_answers_about_another_file_change_nothing(svc):
    ready(svc)
    job = training(svc)
    trainer().say(protocol.Skipped(job_id="20260101T000000Z-000009--other.jsonl", steps_discarded=3))
    svc.tick()
    assert [e.job_id for e in svc.queue.processing()] == [job.job_id] and svc.tracker.job == job


def test_a_message_that_is_not_the_protocols_is_logged_and_the_loop_goes_on(svc, caplog):
    t = ready(svc)
    job = training(svc)
    t.say({"type": "step", "job_id": job.job_id, "step": "one"}, {"type": "telepathy"}, step(job, 1))
    with caplog.at_level("ERROR"):
        svc.tick()
    said = [r.getMessage() for r in caplog.records if "ignoring a message from the trainer" in r.getMessage()]
    assert len(said) == 2 and "field 'step': 'one' is not int" in said[0] and "'telepathy'" in said[1]
    assert svc.status.current_step == 1  # the well-formed one was taken


# ---------------------------------------------------------------- pause, resume, stop


def test_a_pause_is_shown_once_the_trainer_holds_and_a_resume_measures_the_rate_afresh(svc, clock):
    t = ready(svc)
    job = training(svc)
    t.say(step(job, 1))
    svc.tick()
    control.set_desired_state(svc.cfg, DesiredState.PAUSED, by="test")
    svc.tick()
    assert t.sent(protocol.Pause) and svc.status.status is ServiceStatus.TRAINING  # asked, not yet held
    assert svc.status.pause_reason is PauseReason.USER
    t.say(protocol.Paused(job_id=job.job_id))
    svc.tick()
    st = status(svc)
    assert (st["status"], st["detail"]) == ("paused", "paused; the model stays loaded")
    assert st["eta_seconds"] is None and st["tokens_per_sec"] is None
    control.set_desired_state(svc.cfg, DesiredState.RUNNING, by="test")
    clock.advance(600)  # ten minutes paused: not ten minutes a step
    svc.tick()
    assert t.sent(protocol.Resume)
    t.say(protocol.Resumed(job_id=job.job_id), step(job, 2))
    clock.advance(1)
    svc.tick()
    t.say(step(job, 3))
    clock.advance(1)
    svc.tick()
    assert svc.status.status is ServiceStatus.TRAINING and svc.status.eta_seconds == pytest.approx(1.0)


def test_a_pause_while_idle_holds_the_queue(svc):
    t = ready(svc)
    control.set_desired_state(svc.cfg, DesiredState.PAUSED, by="test")
    drop(svc, "a.jsonl", lines_of("text.jsonl", 6))
    svc.tick()
    assert (svc.status.status, svc.status.detail) == (ServiceStatus.PAUSED, "paused; no file is started")
    assert not t.sent(protocol.Train) and svc.queue.counts()["pending"] == 1


def test_a_stop_checkpoints_the_file_in_training_and_exits(svc):
    t = ready(svc)
    job = training(svc)
    control.request(svc.cfg, ControlAction.STOP, by="test")
    svc.tick()
    assert t.sent(protocol.Stop) and svc.status.status is ServiceStatus.STOPPING
    t.say(protocol.Stopped(job_id=job.job_id, checkpoint_step=3))
    t.die(0)
    svc.tick()
    assert svc.stop.exit_now and [e.job_id for e in svc.queue.processing()] == [job.job_id]
    assert any(e["kind"] == "job_stopped" and "step 3" in e["message"] for e in svc.db.events())


# ---------------------------------------------------------------- crashes and refusals


def test_a_crashed_trainer_is_restarted_after_its_backoff_and_gets_the_file_again(svc, clock):
    first = ready(svc)
    job = training(svc)
    first.die(-9)
    svc.tick()
    assert svc.status.detail == "trainer restarting (signal 9)" and svc.db.job(job.job_id)["crashes"] == 1
    assert len(FakeTrainer.made) == 1
    clock.advance(2.1)  # service.restart_backoff_seconds
    svc.tick()
    second = trainer()
    assert second is not first and svc.status.detail == "loading model"
    second.ready()
    svc.tick()
    again = second.train_order()
    assert again.job_id == job.job_id  # the file left in processing/ resumes first


def test_a_trainer_that_never_starts_is_an_error_with_its_reason(svc, clock, caplog):
    for _ in range(3):
        trainer().die(1)
        svc.tick()
        clock.advance(61)
        svc.tick()
    st = status(svc)
    assert st["status"] == "error" and st["detail"].startswith("the trainer cannot start; retrying in")
    assert "failed to start 3 times in a row (exit code 1)" in st["last_error"]
    drop(svc, "a.jsonl", lines_of("text.jsonl", 6))
    with caplog.at_level("ERROR"):
        ready(svc)  # it came up in the end: a file is handed over in the same tick
    assert svc.status.status is ServiceStatus.TRAINING
    assert not [r for r in caplog.records if "not allowed" in r.getMessage()]


def test_a_config_the_trainer_refuses_holds_the_queue_without_restarts(svc, clock):
    t = trainer()
    t.say(protocol.ConfigRefused(problems=["`training.optimizer` = 'adamw_8bit' runs on CUDA only", "no flash-attn"]))
    t.die(78)
    drop(svc, "a.jsonl", lines_of("text.jsonl", 6))
    svc.tick()
    clock.advance(3600)
    svc.tick()
    st = status(svc)
    assert st["status"] == "error" and "(1) `training.optimizer`" in st["last_error"] and "(2) no flash-attn" in st["last_error"]
    assert len(FakeTrainer.made) == 1 and svc.sup.state is TrainerState.REFUSED  # never restarted
    assert svc.queue.counts()["pending"] == 1 and not svc.queue.failed()


# ---------------------------------------------------------------- a full disk, as the trainer says it


def test_a_full_disk_the_trainer_meets_holds_until_space_is_back(svc, clock):
    t = ready(svc)
    job = training(svc)
    folder = svc.cfg.path("checkpoints")  # as the trainer reports it: the free bytes it found there
    t.say(protocol.DiskFullReport(job_id=job.job_id, site="checkpoint", folder=str(folder),
                                  free_bytes=diskspace.free_bytes(folder), message="No space left on device"))
    svc.tick()
    st = status(svc)
    assert st["status"] == "paused" and st["pause_reason"] == "disk_full" and st["disk_full"]["site"] == "checkpoint"
    assert "resumes by itself once space is back" in st["detail"]
    assert not svc.queue.failed()
    clock.advance(svc.cfg.service.disk_check_seconds + 0.1)  # the retry time: the disk is not full here
    svc.tick()
    assert t.sent(protocol.Resume) and svc.status.pause_reason is None
    t.say(protocol.Resumed(job_id=job.job_id))
    svc.tick()
    assert svc.status.status is ServiceStatus.TRAINING
    assert [e["kind"] for e in svc.db.events() if e["kind"] in ("disk_full", "disk_ok")] == ["disk_ok", "disk_full"]  # newest first


# ---------------------------------------------------------------- rollbacks and consolidations


def publish_version(svc, version: int, job: str | None, generation: int = 0, **extra) -> None:
    m = {"version": version, "parent_version": version - 1 or None, "generation": generation, "job_id": job,
         "sha256": "a" * 64 if job else None, "original_name": job, "trained_jobs": [job] if job else [],
         "global_step": 4 * version, **extra}
    adapters.publish(svc.cfg.path("adapters"), m, lambda folder: (folder / "adapter_model.safetensors").write_bytes(b"w"))


def test_a_rollback_is_sent_once_the_trainer_is_up_and_no_file_starts_before_its_answer(svc):
    publish_version(svc, 1, "one")
    publish_version(svc, 2, "two")
    control.request(svc.cfg, ControlAction.ROLLBACK, by="test", version=1)
    svc.tick()
    t = trainer()
    assert not t.sent(protocol.Rollback)  # the trainer is still loading
    drop(svc, "a.jsonl", lines_of("text.jsonl", 6))
    t.ready()
    svc.tick()
    assert [m.version for m in t.sent(protocol.Rollback)] == [1] and not t.sent(protocol.Train)
    t.say(protocol.RolledBack(version=3, rollback_of=1, job_id=None, undone=["two"]))
    svc.tick()
    assert svc.status.adapter_version == 3 and t.sent(protocol.Train)
    assert any("rolled back to adapter v1 (published as v3)" in e["message"] for e in svc.db.events())


def test_a_rollback_to_a_version_not_kept_is_refused_before_anything_is_sent(svc):
    t = ready(svc)
    training(svc)
    control.request(svc.cfg, ControlAction.ROLLBACK, by="test", version=7)
    svc.tick()
    assert not t.sent(protocol.Rollback) and svc.tracker.job is not None
    assert any(e["kind"] == "control_refused" and "no adapter v7" in e["message"] for e in svc.db.events())


def test_a_consolidation_waits_for_the_file_in_training_and_says_what_it_does(svc):
    t = ready(svc)
    job = training(svc)
    control.request(svc.cfg, ControlAction.CONSOLIDATE, by="test", description="two weeks")
    svc.tick()
    assert not t.sent(protocol.Consolidate)  # between files only
    publish_version(svc, 1, job.job_id)
    t.say(done(job))
    svc.tick()
    (asked,) = t.sent(protocol.Consolidate)
    assert (asked.description, asked.adapter_version) == ("two weeks", 1)
    assert svc.status.detail == "consolidating the adapter into a new base"
    drop(svc, "b.jsonl", lines_of("text.jsonl", 7))
    svc.tick()
    assert len(t.sent(protocol.Train)) == 1  # no file starts before the answer
    t.say(protocol.Consolidated(generation=1, path="/models/gen1", adapter_version=2, consolidated_version=1,
                                max_logit_diff=1e-6, reload_logit_diff=0.0, seconds=3.0, files=1, description="two weeks"))
    svc.tick()
    assert svc.status.base_model == "/models/gen1" and len(t.sent(protocol.Train)) == 2


def test_a_consolidation_sent_to_a_trainer_that_died_goes_to_the_next_one(svc, clock):
    publish_version(svc, 1, "one")
    svc.db.upsert_job("one", state="done")
    t = ready(svc)
    control.request(svc.cfg, ControlAction.CONSOLIDATE, by="test", description="d")
    svc.tick()
    assert len(t.sent(protocol.Consolidate)) == 1
    t.die(-9)
    svc.tick()
    clock.advance(2.1)
    svc.tick()
    second = ready(svc)
    (again,) = second.sent(protocol.Consolidate)
    assert again.adapter_version == 1  # the version it merges, as first asked


# ---------------------------------------------------------------- the status, from the facts


@pytest.mark.parametrize("facts, want", [
    (state.Facts(trainer=TrainerState.STARTING), (ServiceStatus.IDLE, "loading model")),
    (state.Facts(trainer=TrainerState.READY), (ServiceStatus.IDLE, "waiting for files")),
    (state.Facts(trainer=TrainerState.BUSY, job=True), (ServiceStatus.TRAINING, "preparing data")),
    (state.Facts(trainer=TrainerState.BUSY, job=True, started=True), (ServiceStatus.TRAINING, "training")),
    (state.Facts(trainer=TrainerState.BUSY, job=True, started=True, paused_by_user=True),
     (ServiceStatus.TRAINING, "training")),  # asked; the trainer has not said it holds yet
    (state.Facts(trainer=TrainerState.BUSY, job=True, started=True, paused_by_user=True, holds=True),
     (ServiceStatus.PAUSED, "paused; the model stays loaded")),
    (state.Facts(trainer=TrainerState.READY, disk=PauseReason.DISK_FULL, disk_detail="paused: disk full: ..."),
     (ServiceStatus.PAUSED, "paused: disk full: ...")),
    (state.Facts(trainer=TrainerState.DOWN, restarting="trainer restarting (signal 9)"),
     (ServiceStatus.IDLE, "trainer restarting (signal 9)")),
    (state.Facts(trainer=TrainerState.STARTING, cannot_start="the trainer cannot start; retrying in 8 s"),
     (ServiceStatus.ERROR, "the trainer cannot start; retrying in 8 s (loading model)")),
    (state.Facts(trainer=TrainerState.DOWN, cannot_start="the trainer cannot start; retrying in 8 s"),
     (ServiceStatus.ERROR, "the trainer cannot start; retrying in 8 s")),
    (state.Facts(trainer=TrainerState.REFUSED, refused=True), (ServiceStatus.ERROR, state.derive(state.Facts(refused=True))[1])),
    (state.Facts(trainer=TrainerState.BUSY, job=True, stopping="signal", paused_by_user=True, holds=True),
     (ServiceStatus.STOPPING, "stopping (signal)")),
    (state.Facts(trainer=TrainerState.READY, lineage="consolidating the adapter into a new base"),
     (ServiceStatus.IDLE, "consolidating the adapter into a new base")),
])
def test_the_status_is_derived_from_the_facts(facts, want):
    assert state.derive(facts) == want


def test_every_message_the_trainer_may_send_has_a_handler(svc, caplog):
    """Each trainer-to-service type, as the trainer would send it, is taken by the loop (no "no handler")."""
    from tests.test_protocol import example

    t = ready(svc)
    training(svc)
    with caplog.at_level("WARNING", logger="daemon.service.loop"):
        for cls in protocol.messages(protocol.TO_SERVICE):
            t.say(example(cls))
    svc.tick()
    assert not [r.getMessage() for r in caplog.records if "no handler" in r.getMessage()]


# ---------------------------------------------------------------- what review found (#27)


def test_a_message_whose_handling_fails_loses_neither_the_rest_nor_the_exit(svc, clock, monkeypatch):
    """The batch and the child's exit in one poll: the failing handler is logged, the rest still count, and the
    trainer is restarted (before, the exit was lost and the service waited for ever)."""
    t = ready(svc)
    job = training(svc)
    real = svc.tracker.on_message
    calls = {"n": 0}

    def failing_once(msg, now):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("a bug in a handler")
        return real(msg, now)

    monkeypatch.setattr(svc.tracker, "on_message", failing_once)
    t.say(step(job, 1), step(job, 2))
    t.die(-9)
    svc.tick()
    assert [r["step"] for r in svc.db.steps(job.job_id)] == [2]  # the rest of the batch was taken
    assert svc.sup.state is TrainerState.DOWN and svc.db.job(job.job_id)["crashes"] == 1  # ...and the exit
    clock.advance(2.1)
    svc.tick()
    assert len(FakeTrainer.made) == 2  # restarted


def test_an_unreadable_answer_that_ends_the_file_ends_the_trainer_and_the_file_resumes(svc, clock):
    t = ready(svc)
    job = training(svc)
    t.say({"type": "done", "job_id": job.job_id, "steps": "four"})  # not the protocol's: cannot be read
    svc.tick()
    assert t.code == -9  # the crash path decides (published: done; else it resumes from its checkpoint)
    svc.tick()
    clock.advance(2.1)
    svc.tick()
    second = ready(svc)
    assert second.train_order().job_id == job.job_id


def test_a_skip_of_a_file_a_dead_trainer_left_reaches_the_live_one_at_once(svc, clock):
    first = ready(svc)
    job = training(svc)
    first.die(-9)
    svc.tick()
    clock.advance(2.1)
    svc.tick()
    control.set_desired_state(svc.cfg, DesiredState.PAUSED, by="test")  # so the file is not handed over again
    second = ready(svc)
    control.request(svc.cfg, ControlAction.SKIP, by="test", job_id=job.job_id)
    svc.tick()
    assert [m.job_id for m in second.sent(protocol.Skip)] == [job.job_id]  # its checkpoints go now
    assert [e.job_id for e in svc.queue.failed()] == [job.job_id]


def test_a_train_the_trainer_never_got_is_not_a_crash_of_the_file(svc):
    t = ready(svc)
    t.connection = None  # the socket closed: the child is going
    drop(svc, "a.jsonl", lines_of("text.jsonl", 6))
    svc.tick()
    assert svc.tracker.job is None and svc.sup.state is TrainerState.READY
    (entry,) = svc.queue.processing()
    t.die(-9)
    svc.tick()
    assert (svc.db.job(entry.job_id) or {}).get("crashes", 0) == 0


def test_no_rollback_is_sent_while_the_disk_is_held_and_a_second_one_is_refused(svc, clock):
    publish_version(svc, 1, "one")
    publish_version(svc, 2, "two")
    t = ready(svc)
    folder = svc.cfg.path("adapters")
    t.say(protocol.DiskFullReport(job_id="x", site="adapter", folder=str(folder),
                                  free_bytes=diskspace.free_bytes(folder), message="No space left on device"))
    control.request(svc.cfg, ControlAction.ROLLBACK, by="test", version=1)
    svc.tick()
    assert not t.sent(protocol.Rollback)  # a rollback publishes a version: not onto a full disk
    control.request(svc.cfg, ControlAction.ROLLBACK, by="test", version=2)
    svc.tick()
    assert any("a rollback to v1 is already on its way" in e["message"] for e in svc.db.events())
    clock.advance(svc.cfg.service.disk_check_seconds + 0.1)
    svc.tick()
    assert [m.version for m in t.sent(protocol.Rollback)] == [1]
    assert svc.status.detail == "rolling back to adapter v1"


def test_a_failed_status_write_at_the_end_keeps_saying_stopped(svc, monkeypatch):
    """A full disk met by the last status write: what the status says of the hold is brought up to date, but
    a stopped daemon does not go back to "stopping" (the old service kept it; the first refactor did not)."""
    import errno

    t = ready(svc)
    control.request(svc.cfg, ControlAction.STOP, by="test")
    svc.tick()
    t.die(0)
    svc.tick()
    svc.publisher.show(ServiceStatus.STOPPED, "stopped")

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(svc.cfg.path("status") / "x"))

    monkeypatch.setattr(svc.writer, "write", full)
    svc._write_status(force=True)
    assert svc.status.status is ServiceStatus.STOPPED and svc.status.pause_reason is PauseReason.DISK_FULL


def test_the_stop_signals_are_the_services_before_it_starts_anything(tmp_path, monkeypatch):
    """The service's SIGTERM/SIGINT handlers are in place before `start` spawns the trainer child: a stop that
    lands while it starts is a warm stop, not the signal's default death with the child's folder left behind
    (what the kill -9 soak on main found: a clean stop right after a restart exited -15)."""
    import signal

    from bench.harness import FAST, write_instance
    from daemon.config import load_config
    from daemon.service import Service
    from tests.fake_trainer import Clock

    path = write_instance(tmp_path / "inst", **FAST)
    svc = Service(load_config(path), path, clock=Clock(), spawn=FakeTrainer)
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    seen: dict = {}

    def start() -> None:
        seen.update({s: signal.getsignal(s) for s in before})
        raise RuntimeError("enough: the handlers at start are what this test is about")

    monkeypatch.setattr(svc, "start", start)
    try:
        with pytest.raises(RuntimeError, match="enough"):
            svc.run()
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
    assert set(seen) == set(before)
    for s, handler in seen.items():
        assert callable(handler) and handler is not before[s] and handler is not signal.default_int_handler, s


def test_intruders_over_their_limit_are_a_forgetting_event_and_nothing_else(svc):
    """activity.intruders with forgetting.max_intruders_increase: the report's `over` is a warning event; the file
    is done and nothing pauses (the gate itself did not trip)."""
    ready(svc)
    job = training(svc)
    gate = {"action": "warn", "tripped": False, "over": [], "message": None}
    said = "intruder dimensions rose from 3 to 9 (limit +2): new dominant directions the base did not have"
    report = {"job_id": job.job_id, "sets": [], "gate": gate,
              "intruders": {"count": 9, "before": 3, "increase": 6, "limit": 2, "over": True, "message": said}}
    trainer().say(dataclasses.replace(done(job), forgetting=report))
    svc.tick()
    assert [e.job_id for e in svc.queue.done()] == [job.job_id]
    events = [e["message"] for e in svc.db.events() if e["kind"] == "forgetting"]
    assert events == [f"adapter v1: {said}"]
    assert status(svc)["status"] == "idle"
