"""Rollback, consolidation and `config approve` across generations (#26), in-process.

The adapter store is written as the trainer writes it (adapters.publish, manifests with `generation`,
`base_path`, `consolidated_from`, `dataset`); the service is the real Service, started, its trainer a fake
speaking the protocol (tests/fake_trainer.py), fed control requests as trainctl leaves them; the trainer's
decisions are worker functions on a Session whose connection is a real Pipe. Only the test that loads a
base needs torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from multiprocessing import Pipe
from pathlib import Path

import pytest

from daemon import adapters, control, lockedkeys, protocol
from daemon.cli.dispatch import main as trainctl
from daemon.config import load_config
from daemon.lock import acquire
from daemon.states import ControlAction
from daemon.history_db import HISTORY_FILE, HistoryDB
from bench.harness import write_instance
from tests.fake_trainer import FakeTrainer, drop, service_with_fake, stop_service

NOW = 1_800_000_000.0


# ---------------------------------------------------------------- a lineage as the trainer leaves it

def sha(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def base_of(cfg, generation: int) -> Path:
    folder = cfg.path("consolidated") / f"20260101T00000{generation}Z"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def publish(cfg, version: int, generation: int, file: str | None = None, parent: dict | None = None, **extra) -> dict:
    """One version as the trainer publishes it: after a file (`file`), or a consolidation's fresh adapter or a
    rollback (no file; `consolidated_from` / `rollback_of` in `extra`)."""
    dataset = list((parent or {}).get("dataset", []))
    m = {"version": version, "parent_version": parent["version"] if parent else None, "generation": generation,
         "job_id": f"job-{file}" if file else None, "original_name": file, "sha256": sha(file) if file else None,
         "steps": 3 if file else 0, "global_step": (parent or {}).get("global_step", 0) + (3 if file else 0),
         "trained_jobs": list((parent or {}).get("trained_jobs", [])) + ([f"job-{file}"] if file else []), **extra}
    if generation:
        m["base_path"] = m["base_model"] = str(extra.pop("base", None) or base_of(cfg, generation))
        m.pop("base", None)
    if file:
        dataset.append({"sha256": sha(file), "job_id": f"job-{file}", "original_name": file, "version": version,
                        "generation": generation, "steps": 3})
    m["dataset"] = dataset
    adapters.publish(cfg.path("adapters"), m, lambda folder: (folder / "adapter_model.safetensors").write_bytes(b"w"))
    return m


def two_generations(cfg, trained_on_1: bool = True) -> list[dict]:
    """v1 learnt one.jsonl on generation 0; consolidated into generation 1 (v2, the fresh adapter); v3 learnt
    two.jsonl on generation 1 (unless `trained_on_1` is False)."""
    v1 = publish(cfg, 1, 0, "one.jsonl")
    v2 = publish(cfg, 2, 1, parent=v1, consolidated_from=1, lineage=str(base_of(cfg, 1) / "lineage.json"))
    return [v1, v2] + ([publish(cfg, 3, 1, "two.jsonl", parent=v2)] if trained_on_1 else [])


@pytest.fixture
def cfg(tmp_path):
    return load_config(write_instance(tmp_path / "i"))


@pytest.fixture
def service(tmp_path):
    """The real service, started, its trainer a fake that speaks the protocol and is ready; its `cfg` is the
    instance the `cfg` fixture of a test that asks for both describes."""
    svc, trainer = service_with_fake(tmp_path.parent / (tmp_path.name + "-svc"))
    trainer.ready()
    svc.tick()
    yield svc
    stop_service(svc)


@pytest.fixture
def served(service):
    """(service, its cfg): tests that write the adapter store write the one the service reads."""
    return service, service.cfg


def refusals(svc) -> list[str]:
    return [e["message"] for e in svc.db.events() if e["kind"] == "control_refused"]


def session(cfg):
    """The trainer's session over the current version, its connection a real Pipe; (session, service end)."""
    from daemon.train.session import Session

    mine, theirs = Pipe()
    cur = adapters.read_current(cfg.path("adapters"))
    return Session(cfg, mine, None, cur.version, cur.manifest, None), theirs


def answer(conn) -> dict:
    assert conn.poll(5), "the trainer said nothing"
    return conn.recv()


# ---------------------------------------------------------------- 4. a refused rollback changes nothing

def in_training(service, cfg) -> str:
    drop(service, "long.jsonl", '{"text": "a line"}\n' * 5)
    service.tick()
    return FakeTrainer.made[-1].train_order().job_id


def test_the_service_refuses_a_rollback_to_another_generation_before_the_trainer_hears_of_it(served):
    service, cfg = served
    two_generations(cfg)
    job_id = in_training(service, cfg)
    control.request(cfg, ControlAction.ROLLBACK, by="cli", version=1)
    service.tick()
    trainer = FakeTrainer.made[-1]
    assert not trainer.sent(protocol.Rollback)  # nothing is sent: the file in training is never interrupted
    assert service.tracker.job is not None and service.tracker.job.job_id == job_id
    [why] = refusals(service)
    assert why.startswith("rollback: ") and "generation 0" in why and "a rollback stays within a generation" in why
    control.request(cfg, ControlAction.ROLLBACK, by="cli", version=2)  # within generation 1: taken
    service.tick()
    assert [m.version for m in trainer.sent(protocol.Rollback)] == [2]


def test_the_trainer_refuses_a_rollback_to_another_generation_and_the_file_trains_on(cfg):
    from daemon.train.session import on_message_in_job

    two_generations(cfg)
    sess, conn = session(cfg)
    assert on_message_in_job(sess, protocol.Rollback(version=1), "job-long") == "continue"
    said = answer(conn)
    assert said["type"] == "rollback_refused" and said["version"] == 1 and said["job_id"] is None  # not interrupted
    assert "a rollback stays within a generation" in said["message"]
    assert sess.rollback_to is None
    assert on_message_in_job(sess, protocol.Rollback(version=9), "job-long") == "continue"  # not kept
    assert "v9" in answer(conn)["message"]
    assert on_message_in_job(sess, protocol.Rollback(version=2), "job-long") == "skip"  # a rollback it makes
    assert sess.rollback_to == 2


def test_a_rollback_refused_after_the_file_stopped_keeps_its_checkpoints(cfg):
    from daemon.train.lineage import rollback

    two_generations(cfg)
    sess, conn = session(cfg)
    ckpt = sess.checkpoints("job-long") / "step_000003"
    ckpt.mkdir(parents=True)
    (ckpt / "state.json").write_text("{}")
    sess.rollback_to = 1
    rollback(sess, "job-long")
    said = answer(conn)
    assert said["type"] == "rollback_refused" and said["job_id"] == "job-long"
    assert (ckpt / "state.json").is_file()  # it resumes from there, not from step 0
    assert adapters.read_current(cfg.path("adapters")).version == 3


def test_trainctl_rollback_refuses_another_generation_without_leaving_a_request(cfg, capsys):
    two_generations(cfg)
    assert trainctl(["--config", str(cfg.root / "config.json"), "rollback", "1"]) == 1
    said = capsys.readouterr().out
    assert "a rollback stays within a generation" in said and "generation 0" in said, said
    assert control.pending_requests(cfg) == []


# ---------------------------------------------------------------- 6. a consolidation with nothing learnt

def test_nothing_learnt_on_a_generation_is_named(cfg):
    v1, v2, v3 = two_generations(cfg)
    published = {v.version: v for v in adapters.versions(cfg.path("adapters"))}  # as the store reads them back
    why = adapters.nothing_learnt(published[2])
    assert "no file has trained on generation 1" in why and "v2" in why
    assert adapters.nothing_learnt(published[3]) is None
    assert adapters.nothing_learnt(published[1]) is None
    # a rollback to a generation's first version has learnt nothing on it either
    publish(cfg, 4, 1, parent=v2, rollback_of=2)
    why = adapters.nothing_learnt(adapters.read_current(cfg.path("adapters")))
    assert "no file has trained on generation 1" in why and "rollback" in why


def test_the_trainer_refuses_to_consolidate_a_fresh_adapter(cfg):
    from daemon.train.lineage import consolidate_now

    two_generations(cfg, trained_on_1=False)
    sess, conn = session(cfg)
    consolidate_now(sess, protocol.Consolidate(description="again", adapter_version=2))
    said = answer(conn)
    assert said["type"] == "consolidation_refused" and "no file has trained on generation 1" in said["message"]
    assert sorted(p.name for p in cfg.path("consolidated").iterdir()) == ["20260101T000001Z"]  # no new base
    assert adapters.read_current(cfg.path("adapters")).version == 2


def test_the_service_refuses_a_consolidation_with_nothing_learnt_unless_a_file_is_training(served):
    service, cfg = served
    two_generations(cfg, trained_on_1=False)
    control.request(cfg, ControlAction.CONSOLIDATE, by="cli", description="again")
    service.tick()
    assert service.requests.consolidation is None
    assert refusals(service) == ["consolidate: no file has trained on generation 1's base yet (adapter v2 is the "
                                 "fresh adapter published when v1 was consolidated); a new generation would be a copy "
                                 "of that base"]
    # a file in training publishes a version before the consolidation runs (between files): it may have something
    in_training(service, cfg)
    control.request(cfg, ControlAction.CONSOLIDATE, by="cli", description="after the file")
    service.tick()
    assert service.requests.consolidation == "after the file"


def test_trainctl_consolidate_with_nothing_learnt_is_refused_while_the_daemon_is_down(cfg, capsys):
    two_generations(cfg, trained_on_1=False)
    assert trainctl(["--config", str(cfg.root / "config.json"), "consolidate", "--description", "again"]) == 1
    said = capsys.readouterr().out
    assert "no file has trained on generation 1" in said, said
    assert control.pending_requests(cfg) == []


def test_a_second_consolidate_at_once_says_so_in_one_clear_line(served, capsys):
    service, cfg = served
    two_generations(cfg)
    service.requests.consolidation = "the first one"  # on its way
    lock = acquire(cfg.path("status") / "daemon.lock")  # the daemon runs (this process holds its lock)
    done = threading.Event()

    def serve() -> None:  # the service's loop, as far as control goes
        while not done.is_set():
            service._handle_control(time.time())
            time.sleep(0.05)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        rc = trainctl(["--config", str(cfg.root / "config.json"), "consolidate", "--description", "second", "--timeout", "30"])
    finally:
        done.set()
        t.join(5)
        os.close(lock)
    said = capsys.readouterr().out.splitlines()
    assert rc == 1 and said[-1] == "consolidate: refused: a consolidation is already on its way", said
    assert refusals(service) == ["consolidate: a consolidation is already on its way"]


# ---------------------------------------------------------------- smaller: unpin

def test_unpin_of_a_version_not_pinned_is_refused(cfg, capsys):
    publish(cfg, 1, 0, "one.jsonl")
    conf = str(cfg.root / "config.json")
    assert trainctl(["--config", conf, "adapters", "unpin", "1"]) == 1
    assert "v1 is not pinned" in capsys.readouterr().out
    assert trainctl(["--config", conf, "adapters", "pin", "1"]) == 0
    assert trainctl(["--config", conf, "adapters", "unpin", "1"]) == 0
    assert "v1 unpinned" in capsys.readouterr().out


# ---------------------------------------------------------------- 5. config approve after consolidations

def three_generations(cfg) -> list[dict]:
    """generation 0 (one.jsonl), 1 (two.jsonl), 2 (three.jsonl, trained on its base after the consolidation)."""
    v1, v2, v3 = two_generations(cfg)
    v4 = publish(cfg, 4, 2, parent=v3, consolidated_from=3)
    return [v1, v2, v3, v4, publish(cfg, 5, 2, "three.jsonl", parent=v4)]


def steps_in_history(cfg, n: int) -> None:
    db = HistoryDB(cfg.path("status") / HISTORY_FILE)
    for g in range(1, n + 1):
        db.record_step("job-three.jsonl", g, g, 0.1, 2.0 - g / 100, 1e-3, 0.5, 100.0, NOW + g)
    db.close()


def change_lora_r(cfg, **more):
    path = write_instance(cfg.root, lora={"r": 8}, **more)
    return load_config(path)


def test_approve_after_consolidations_continues_on_the_newest_generation(cfg, capsys):
    three_generations(cfg)
    lockedkeys.record(cfg, NOW)
    lockedkeys.note_consolidation(cfg, str(base_of(cfg, 1)), 1, NOW + 1)
    lockedkeys.note_consolidation(cfg, str(base_of(cfg, 2)), 2, NOW + 2)
    steps_in_history(cfg, 5)
    cfg = change_lora_r(cfg)
    assert trainctl(["--config", str(cfg.root / "config.json"), "config", "approve"]) == 0
    said = capsys.readouterr().out
    assert "approved lora.r: 4 -> 8" in said
    assert f"training continues on generation 2's base {base_of(cfg, 2)} with a fresh adapter" in said, said
    start = json.loads((cfg.path("adapters") / "start.json").read_text())
    assert (start["base_path"], start["generation"]) == (str(base_of(cfg, 2)), 2)
    # the files in the base (generations 0 and 1) stay learnt; three.jsonl went with the archived adapter
    assert [e["original_name"] for e in start["dataset"]] == ["one.jsonl", "two.jsonl"]
    assert adapters.read_current(cfg.path("adapters")) is None and lockedkeys.check(cfg) == []
    assert adapters.base_in_use(cfg.path("adapters"), adapters.config_base(cfg))["generation"] == 2
    # base_model changed before the next start: a lineage of its own, on that base (start.json is not for it)
    assert adapters.base_in_use(cfg.path("adapters"), "/models/another") is None

    lockedkeys.record(cfg)  # what the next start does while no adapter exists yet
    history = json.loads((cfg.path("status") / lockedkeys.FILE).read_text())["history"]
    assert [("consolidation" in h, "changes" in h) for h in history] == [(True, False), (True, False), (False, True)]
    assert history[2]["continues_on"] == {"generation": 2, "base_path": str(base_of(cfg, 2))}


def test_the_locked_keys_history_outlives_the_next_start(cfg):
    lockedkeys.record(cfg, NOW)
    lockedkeys.note_consolidation(cfg, str(base_of(cfg, 1)), 1, NOW + 1)
    lockedkeys.record(cfg)  # the service's start while no adapter exists (as after an approval archived them)
    history = json.loads((cfg.path("status") / lockedkeys.FILE).read_text())["history"]
    assert history == [{"at": NOW + 1, "consolidation": {"generation": 1, "base_in_use": str(base_of(cfg, 1))}}]


def test_approve_without_consolidations_starts_on_the_config_base(cfg, capsys):
    publish(cfg, 1, 0, "one.jsonl")
    lockedkeys.record(cfg, NOW)
    cfg = change_lora_r(cfg)
    assert trainctl(["--config", str(cfg.root / "config.json"), "config", "approve"]) == 0
    said = capsys.readouterr().out
    assert "training starts a fresh adapter on base_model embedded:tiny-qwen3 (generation 0)" in said, said
    assert not (cfg.path("adapters") / "start.json").exists()


def test_approve_from_the_config_base_when_asked(cfg, capsys):
    three_generations(cfg)
    lockedkeys.record(cfg, NOW)
    cfg = change_lora_r(cfg)
    assert trainctl(["--config", str(cfg.root / "config.json"), "config", "approve", "--from-config-base"]) == 0
    assert "training starts a fresh adapter on base_model embedded:tiny-qwen3 (generation 0)" in capsys.readouterr().out
    assert not (cfg.path("adapters") / "start.json").exists()


def test_approve_refuses_to_continue_on_a_base_that_is_gone(cfg, capsys):
    three_generations(cfg)
    lockedkeys.record(cfg, NOW)
    shutil.rmtree(base_of(cfg, 2))
    cfg = change_lora_r(cfg)
    assert trainctl(["--config", str(cfg.root / "config.json"), "config", "approve"]) == 1
    said = capsys.readouterr().out
    assert "generation 2's base" in said and "--from-config-base" in said, said
    assert adapters.read_current(cfg.path("adapters")).version == 5  # nothing moved
    assert lockedkeys.check(cfg) != []


def test_the_trainer_starts_on_the_base_approve_carried_over(tmp_path, models_dir):
    torch = pytest.importorskip("torch")
    from daemon.dataset_ledger import DatasetLedger
    from daemon.train.model import resolve_base
    from daemon.train.lineage import base_fields
    from daemon.train.session import load_session

    cfg = load_config(write_instance(tmp_path / "i", models_dir))
    merged = cfg.path("consolidated") / "20260101T000001Z"  # a real model folder stands for generation 1's base
    shutil.copytree(resolve_base(cfg), merged)
    v1 = publish(cfg, 1, 0, "one.jsonl")
    v2 = publish(cfg, 2, 1, parent=v1, consolidated_from=1, base=merged)
    publish(cfg, 3, 1, "two.jsonl", parent=v2, base=merged)
    lockedkeys.record(cfg, NOW)
    cfg = load_config(write_instance(tmp_path / "i", models_dir, lora={"r": 8}))
    lockedkeys.approve(cfg, NOW + 10)

    mine, theirs = Pipe()
    threads = torch.get_num_threads()
    try:
        sess = load_session(cfg, mine, 1)
    finally:
        torch.set_num_threads(threads)
    ready = answer(theirs)
    assert ready["type"] == "ready" and ready["base_model"] == str(merged) and ready["adapter_version"] is None
    assert Path(sess.lm.base_path) == merged
    assert base_fields(sess) == {"base_model": str(merged), "base_path": str(merged), "generation": 1,
                                "quantization": sess.lm.quantization}
    db = HistoryDB(cfg.path("status") / HISTORY_FILE)
    ledger = DatasetLedger(cfg.path("adapters"), db, adapters.config_base(cfg))
    assert ledger.earlier(sha("one.jsonl"))["original_name"] == "one.jsonl"  # merged into the base: still learnt
    assert ledger.earlier(sha("two.jsonl")) is None  # only the archived adapter had it
    db.close()


# ---------------------------------------------------------------- 7. a new series of steps after approve

def test_approve_starts_a_new_series_and_keeps_the_old_one(cfg):
    three_generations(cfg)
    lockedkeys.record(cfg, NOW)
    steps_in_history(cfg, 5)
    db = HistoryDB(cfg.path("status") / HISTORY_FILE)
    db.record_eval("job-three.jsonl", 5, 5, 1.5, NOW + 5)
    db.upsert_job("job-three.jsonl", state="done", eval_set_before=2.0, eval_set_after=1.9, end_global_step=5)
    db.close()
    cfg = change_lora_r(cfg)
    lockedkeys.approve(cfg, NOW + 10)

    db = HistoryDB(cfg.path("status") / HISTORY_FILE)  # the service at its next start
    assert db.series == 1 and db.steps() == [] and db.evals() == [] and db.eval_set_points() == []
    for g in range(1, 4):  # the new adapter's steps: the same global steps again
        db.record_step("job-new.jsonl", g, g, 0.1, 3.0, 1e-3, 0.5, 100.0, NOW + 20 + g)
    assert [r["job_id"] for r in db.steps()] == ["job-new.jsonl"] * 3
    assert [r["global_step"] for r in db.steps(series=0)] == [1, 2, 3, 4, 5]  # the old series stays queryable
    assert [r["eval_loss"] for r in db.evals(series=0)] == [1.5]
    assert [p["after"] for p in db.eval_set_points(series=0)] == [1.9]
    [old, new] = db.series_list(with_steps=True)
    assert (old["id"], old["steps"], new["id"], new["steps"]) == (0, 5, 1, 3)
    assert new["started_at"] == NOW + 10 and "lora.r: 4 -> 8" in new["reason"]
    assert any(e["kind"] == "config_approved" for e in db.events())
    db.close()


def test_the_history_api_shows_the_current_series_and_where_it_began(cfg, monkeypatch):
    from monitor import history
    from monitor.history_index import HistoryIndex

    db = HistoryDB(cfg.path("status") / HISTORY_FILE)
    for g in range(1, 101):
        db.record_step("old", g, g, 0.0, 5.0, 1e-3, 0.5, 100.0, NOW + g)
    db.start_series("config approve: lora.r: 4 -> 8", NOW + 200)
    for g in range(1, 41):
        db.record_step("new", g, g, 0.0, 1.0, 1e-3, 0.5, 100.0, NOW + 300 + g)
    db.close()
    path = cfg.path("status") / HISTORY_FILE
    for sql_max in (history.SQL_MAX_ROWS, 0):  # bucketed in SQLite, and from the monitor's summary
        monkeypatch.setattr(history, "SQL_MAX_ROWS", sql_max)
        h = history.read_history(path, HistoryIndex(), -1, None, 2000 if sql_max else 16)
        assert {p.job_id for p in h.points} == {"new"} and h.total_rows == 40
        assert h.series.id == 1 and h.series.started_at == NOW + 200 and "lora.r" in h.series.reason
        assert [s.id for s in h.all_series] == [0, 1]
    old = history.read_history(path, HistoryIndex(), -1, None, 2000, series=0)
    assert {p.job_id for p in old.points} == {"old"} and old.total_rows == 100 and old.series.id == 0


def test_a_rollback_whose_version_cannot_be_published_changes_nothing(tmp_path, models_dir, monkeypatch):
    """A full disk at the rolled-back version's publication: the adapter keeps the weights it had, the file it
    interrupted keeps its checkpoints, and the answer is a refusal, not a crash that comes back (#27 review)."""
    import errno

    torch = pytest.importorskip("torch")
    from daemon.train import lineage, session
    from daemon.train.activity_probe import ActivityProbe
    from daemon.train.model import load_for_training, lora_state, publish_adapter

    cfg = load_config(write_instance(tmp_path / "i", models_dir))
    threads = torch.get_num_threads()
    try:
        lm = load_for_training(cfg, seed=cfg.training.seed)
    finally:
        torch.set_num_threads(threads)
    folder = cfg.path("adapters")
    m1 = {"version": 1, "parent_version": None, "generation": 0, "job_id": "job-one", "sha256": sha("one"),
          "original_name": "one", "trained_jobs": ["job-one"], "global_step": 3}
    publish_adapter(folder, lm.model, m1)
    with torch.no_grad():
        for p in lm.model.parameters():
            if p.requires_grad:
                p.add_(0.01)  # the second file moved the weights
    m2 = {**m1, "version": 2, "parent_version": 1, "job_id": "job-two", "trained_jobs": ["job-one", "job-two"]}
    publish_adapter(folder, lm.model, m2)
    mine, theirs = Pipe()
    sess = session.Session(cfg, mine, lm, 2, adapters.AdapterManifest.from_dict(m2), ActivityProbe(lm.model))
    kept = sess.checkpoints("job-long") / "step_000003"
    kept.mkdir(parents=True)
    before = lora_state(lm.model)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(lineage, "publish_adapter", full)
    sess.rollback_to = 1
    lineage.rollback(sess, "job-long")
    said = answer(theirs)
    assert said["type"] == "rollback_refused" and said["job_id"] == "job-long" and "No space left" in said["message"]
    assert kept.is_dir()  # the interrupted file resumes from its checkpoint
    assert sess.version == 2 and adapters.read_current(folder).version == 2
    after = lora_state(lm.model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # the weights it had
