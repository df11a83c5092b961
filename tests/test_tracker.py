import json

import pytest

from daemon.config import load_config
from daemon.jobqueue import JobQueue
from daemon.schema import TrainingStatus
from daemon.states import FailReason, JobState, Priority
from daemon.history_db import HistoryDB
from daemon import protocol as p
from daemon.protocol import Job
from daemon.service.tracker import JobTracker
from bench.harness import lines_of, write_instance

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


def job_of(entry, name: str) -> Job:
    return Job(entry.job_id, str(entry.path), name, "s" * 64, "text", 5)


def done(job_id: str, version: int = 1) -> p.Done:
    return p.Done(job_id=job_id, steps=2, final_loss=1.0, eval_loss=None, adapter_version=version,
                  adapter_path="/x", already_trained=False, activity_moved=None)


def step(job_id: str, n: int, loss: float) -> p.Step:
    return p.Step(job_id=job_id, step=n, total_steps=10, global_step=20 + n, epoch=0.1 * n, loss=loss, lr=1e-3,
                  grad_norm=0.5, tokens=100, slots=100, tokens_per_sec=50.0, elapsed=1.0)


def started(job_id: str) -> p.Started:
    return p.Started(job_id=job_id, total_steps=10, resumed_from_step=0, n_train=4, n_eval=1, n_dropped=0, epochs=1)


def test_late_messages_about_another_file_are_ignored(tmp_path):
    cfg, q, db, tracker = setup(tmp_path)
    entry = q.start(admit(q, tmp_path, "a.jsonl", lines_of("text.jsonl", 5)))
    tracker.begin(job_of(entry, "a.jsonl"))
    assert tracker.on_message(p.Skipped(job_id="someone-else", steps_discarded=0), NOW) is False
    assert q.processing()[0].job_id == entry.job_id  # untouched
    assert tracker.on_message(done(entry.job_id), NOW) is True
    assert q.done()[0].job_id == entry.job_id and tracker.job is None
    assert db.job(entry.job_id)["state"] == JobState.DONE.value


def test_a_skipped_file_leaves_no_steps_in_the_history(tmp_path):
    """The adapter drops a skipped file's steps and the next file trains those global
    steps again: the history must not hold two rows per global step."""
    cfg, q, db, tracker = setup(tmp_path)
    a = q.start(admit(q, tmp_path, "a.jsonl", lines_of("text.jsonl", 5)))
    tracker.begin(job_of(a, "a.jsonl"))
    tracker.on_message(started(a.job_id), NOW)
    for n in (1, 2, 3):
        tracker.on_message(step(a.job_id, n, 2.0 - n / 10), NOW)
    tracker.on_message(p.Eval(job_id=a.job_id, step=3, global_step=23, eval_loss=1.9), NOW)
    assert tracker.on_message(p.Skipped(job_id=a.job_id, steps_discarded=3), NOW) is True
    assert db.steps() == [] and db.evals() == []
    record = db.job(a.job_id)
    assert record["state"] == "failed" and record["steps"] == 3 and record["final_loss"] == pytest.approx(1.7)
    assert "3 steps dropped from the step history, last loss 1.7" in db.events()[0]["message"]


def test_a_file_done_clears_the_last_error(tmp_path):
    cfg, q, db, tracker = setup(tmp_path)
    a = q.start(admit(q, tmp_path, "a.jsonl", lines_of("text.jsonl", 5)))
    tracker.begin(job_of(a, "a.jsonl"))
    tracker.on_message(p.Failed(job_id=a.job_id, reason="training_error", message="CUDA out of memory"), NOW)
    assert tracker.status.last_error == "CUDA out of memory"
    b = q.start(admit(q, tmp_path, "b.jsonl", lines_of("text.jsonl", 5)))
    tracker.begin(job_of(b, "b.jsonl"))
    tracker.on_message(done(b.job_id), NOW)
    assert tracker.status.last_error is None
    assert any("CUDA out of memory" in e["message"] for e in db.events())  # the history keeps it


def test_a_file_that_grew_while_training_is_flagged(tmp_path):
    cfg, q, db, tracker = setup(tmp_path)
    a = q.start(admit(q, tmp_path, "a.jsonl", lines_of("text.jsonl", 5)))
    db.upsert_job(a.job_id, size=a.size, state="processing")
    with open(a.path, "a") as f:  # the writer still had it open
        f.write(lines_of("text.jsonl", 2))
    tracker.begin(job_of(a, "a.jsonl"))
    tracker.on_message(done(a.job_id), NOW)
    changed = [e["message"] for e in db.events() if e["kind"] == "job_changed"]
    assert len(changed) == 1 and f"({a.size} -> " in changed[0]


def test_every_job_message_reaches_a_handler():
    """A job message the tracker does not handle never reaches the history (steps_again once did not)."""
    from daemon.service.tracker import JOB_MESSAGES

    sent = {cls for cls in p.messages(p.TO_SERVICE) if "job_id" in cls.__dataclass_fields__}
    assert sent - set(JOB_MESSAGES) == {p.Paused, p.Resumed, p.DiskFullReport, p.Stopped, p.ConfigRefused,
                                        p.RolledBack, p.RollbackRefused, p.Held}  # the service's own, not the file's


# ---------------------------------------------------------------- several trainer processes (ranks)


def two_ranks(slow: int = 1) -> list[dict]:
    return [{"rank": r, "node": 0, "host": "node-a", "device": "cpu", "tokens": 500 + r,
             "compute_seconds": 2.0 if r == slow else 1.0, "tokens_per_sec": (500 + r) / (2.0 if r == slow else 1.0),
             "rss_bytes": (3 + r) * 2**30, "gpu_memory_bytes": None} for r in (1, 0)]  # out of order on purpose


@pytest.fixture
def service(tmp_path):
    """The real service, started, its trainer a fake speaking the protocol (tests/fake_trainer.py)."""
    from tests.fake_trainer import Clock, service_with_fake, stop_service

    svc, _ = service_with_fake(tmp_path, Clock(NOW))
    yield svc
    stop_service(svc)


def training(svc):
    from tests.fake_trainer import FakeTrainer, drop

    drop(svc, "a.jsonl", lines_of("text.jsonl", 5))
    svc.tick()
    job = FakeTrainer.made[-1].train_order()
    FakeTrainer.made[-1].say(started(job.job_id))
    svc.tick()
    return job.job_id


def written_status(svc) -> dict:
    from daemon.status import read_status

    svc._write_status(force=True)
    return read_status(svc.cfg.path("status"))


def ranked_step(job_id: str, n: int, loss: float, ranks: list[dict] | None, world_size: int | None = 2) -> p.Step:
    return p.Step(job_id=job_id, step=n, total_steps=10, global_step=n, epoch=0.1 * n, loss=loss, lr=1e-3,
                  grad_norm=None, tokens=1001, slots=1001, tokens_per_sec=700.0, elapsed=1.0, world_size=world_size,
                  ranks=ranks)


def test_two_ranks_reach_the_status_from_ready_and_step(service, tmp_path):
    from monitor.models import Status
    from tests.fake_trainer import FakeTrainer

    trainer = FakeTrainer.made[-1]
    trainer.ready(world_size=2, strategy="ddp", backend="gloo", nnodes=1)
    service.tick()
    job_id = training(service)
    trainer.say(ranked_step(job_id, 1, 2.0, two_ranks()))
    service.tick()
    st = written_status(service)
    assert st["world_size"] == 2 and st["distributed"] == {"strategy": "ddp", "backend": "gloo", "nnodes": 1}
    assert [r["rank"] for r in st["ranks"]] == [0, 1] and st["slowest_rank"] == 1
    assert st["ranks"][1] == {"rank": 1, "node": 0, "host": "node-a", "device": "cpu", "tokens": 501,
                              "compute_seconds": 2.0, "tokens_per_sec": 250.5, "rss_bytes": 4 * 2**30,
                              "gpu_memory_bytes": None}
    read = Status.model_validate({**st, "stale": False, "requested_state": "running", "now": NOW})
    assert read.ranks[1].tokens_per_sec == 250.5 and read.distributed.strategy == "ddp"

    # the next step: rank 0 is now the one the other waits for
    trainer.say(ranked_step(job_id, 2, 1.9, two_ranks(slow=0)))
    service.tick()
    assert service.status.slowest_rank == 0

    # the trainer dies: its per-rank figures go with its tokens/s; the setup it said at `ready` stays
    trainer.die(-9)
    service.tick()
    st = written_status(service)
    assert st["tokens_per_sec"] is None and st["ranks"] is None and st["slowest_rank"] is None
    assert st["world_size"] == 2 and st["distributed"]["backend"] == "gloo"


def test_one_process_looks_as_it_always_did(service, tmp_path):
    from tests.fake_trainer import FakeTrainer

    trainer = FakeTrainer.made[-1]
    trainer.ready(world_size=2, strategy="ddp", backend="gloo", nnodes=1)
    trainer.ready()  # a restarted trainer of one process
    service.tick()
    assert (service.status.world_size, service.status.distributed) == (1, None)
    job_id = training(service)
    trainer.say(ranked_step(job_id, 1, 2.0, None, world_size=None))
    service.tick()
    st = written_status(service)
    assert (st["world_size"], st["distributed"], st["ranks"], st["slowest_rank"]) == (1, None, None, None)
    assert st["tokens_per_sec"] == 700.0 and st["current_step"] == 1


def test_the_slowest_rank_is_the_longest_compute_and_the_lowest_on_a_tie():
    from daemon.service import rank_status as ranks

    figures, slowest = ranks.figures([{"rank": r, "compute_seconds": s} for r, s in
                                      ((0, 1.0), (1, 3.0), (2, 3.0), (3, None))])
    assert [r.rank for r in figures] == [0, 1, 2, 3] and slowest == 1
    assert ranks.figures([{"rank": 0, "compute_seconds": 1.0}]) == (None, None)  # one process
    assert ranks.figures(None) == (None, None)
    ready = p.Ready(device="cuda", compute_dtype="bfloat16", quantization="nf4", base_model="b", adapter_version=None,
                    trainable_params=1, total_params=2, load_seconds=1.0, world_size=4, strategy="fsdp",
                    backend="nccl", nnodes=2)
    assert ranks.setup(ready)[1].nnodes == 2


def test_a_file_is_in_done_only_once_its_record_is_complete(tmp_path):
    """Whoever sees the file in done/ (a script, `trainctl`, a test waiting on the queue) reads its record whole:
    the record, with what the done message carried, is written before the move, not after."""
    cfg, q, db, tracker = setup(tmp_path)
    a = q.start(admit(q, tmp_path, "a.jsonl", lines_of("text.jsonl", 5)))
    tracker.begin(job_of(a, "a.jsonl"))
    seen: list[dict] = []
    move = q.finish

    def finish_and_look(job_id, *args, **kw):
        reader = HistoryDB.open_readonly(cfg.path("status") / "history.db")  # as another process reads it
        try:
            seen.append(dict(reader.job(job_id) or {}))
        finally:
            reader.close()
        return move(job_id, *args, **kw)

    q.finish = finish_and_look
    replay = {"fraction": 0.25, "samples": 3, "steps": 2, "sources": [], "left_out": 0}
    tracker.on_message(p.Done(job_id=a.job_id, steps=2, final_loss=1.0, eval_loss=None, adapter_version=1,
                              adapter_path="/x", already_trained=False, activity_moved=None, replay=replay), NOW)
    assert q.counts()["done"] == 1 and len(seen) == 1
    assert seen[0].get("state") == "done" and seen[0].get("steps") == 2, seen
    assert json.loads(seen[0]["replay"]) == replay
    assert [e["kind"] for e in db.events()].count("job_done") == 1
