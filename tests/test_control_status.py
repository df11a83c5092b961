import json
import os
import subprocess
import sys

import pytest

from daemon import adapters, control, lockedkeys
from daemon.config import load_config
from daemon.errors import AlreadyRunningError
from daemon.lock import acquire, holder_pid
from daemon.schema import TrainingStatus
from daemon.states import ControlAction, DesiredState, ServiceStatus
from daemon.history_db import HistoryDB
from daemon.status import StatusWriter, read_status
from bench.harness import write_instance


def test_desired_state_round_trip_and_damaged_file(instance):
    cfg, _ = instance
    assert control.read_desired_state(cfg) is DesiredState.RUNNING
    control.set_desired_state(cfg, DesiredState.PAUSED)
    assert control.read_desired_state(cfg) is DesiredState.PAUSED
    (control.control_dir(cfg) / "desired_state.json").write_text("{garbage")
    assert control.read_desired_state(cfg) is DesiredState.RUNNING  # a torn file never freezes training


def test_requests_come_back_in_order_and_are_consumed(instance):
    cfg, _ = instance
    control.request(cfg, ControlAction.SKIP, job_id="j1", now=10.0)
    control.request(cfg, ControlAction.RETRY, job_id="j2", priority="high", now=11.0)
    (control.requests_dir(cfg) / "0-junk.json").write_text("not json")
    reqs = control.pending_requests(cfg)
    assert [(r.action, r.job_id, r.priority) for r in reqs] == [(ControlAction.SKIP, "j1", None), (ControlAction.RETRY, "j2", "high")]
    assert not (control.requests_dir(cfg) / "0-junk.json").exists()
    for r in reqs:
        control.consume(r)
    assert control.pending_requests(cfg) == []


def test_status_file_has_the_contract_fields(tmp_path):
    StatusWriter(tmp_path).write(TrainingStatus(status=ServiceStatus.TRAINING, current_file="a.jsonl", loss=1.5), now=0.25)
    st = read_status(tmp_path)
    required = {"schema_version", "status", "current_file", "current_step", "total_steps", "global_step", "epoch",
                "loss", "lr", "tokens_per_sec", "eta_seconds", "eval_loss", "queue", "device", "pid",
                "started_at", "updated_at", "last_error"}
    assert required <= set(st)
    assert st["status"] == "training" and st["loss"] == 1.5 and st["updated_at"] == "1970-01-01T00:00:00.250Z"


def test_history_db_is_wal_and_replaces_replayed_steps(tmp_path):
    db = HistoryDB(tmp_path / "h.db")
    for step in range(1, 6):
        db.record_step("j", step, step, step / 5, 3.0 - step * 0.1, 1e-3, 0.5, 100.0, float(step))
    db.forget_steps_after("j", 3)  # resumed from a checkpoint at step 3
    db.record_step("j", 4, 4, 0.8, 2.55, 1e-3, 0.5, 100.0, 9.0)
    ro = HistoryDB.open_readonly(tmp_path / "h.db")
    assert ro.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert [(r["step"], r["loss"]) for r in ro.steps("j")] == [(1, 2.9), (2, 2.8), (3, 2.7), (4, 2.55)]
    assert db.add_crash("j") == 1 and db.add_crash("j") == 2
    with pytest.raises(sqlite_readonly_error()):
        ro.conn.execute("DELETE FROM metrics")


def test_missed_steps_fill_the_gaps_and_keep_what_is_recorded(tmp_path):
    db = HistoryDB(tmp_path / "h.db")
    assert db.steps_recorded_through("j") == 0
    for step in (1, 2, 5):  # a service that died behind, then recorded a resumed run's step 5
        db.record_step("j", step, step, 0.0, 1.0, 1e-3, 0.5, 100.0, 1.0)
    assert db.steps_recorded_through("j") == 2
    sent = [{"step": s, "global_step": s, "loss": 2.0} for s in range(3, 6)]
    assert db.record_missed_steps("j", sent, 2.0) == 2  # 3 and 4; 5 is kept as recorded
    assert [(r["step"], r["loss"]) for r in db.steps("j")] == [(1, 1.0), (2, 1.0), (3, 2.0), (4, 2.0), (5, 1.0)]
    assert db.steps_recorded_through("j") == 5


def sqlite_readonly_error():
    import sqlite3
    return sqlite3.OperationalError


def test_lock_is_exclusive_and_dies_with_its_holder(tmp_path):
    lock = tmp_path / "daemon.lock"
    holder = subprocess.Popen([sys.executable, "-c", f"from daemon.lock import acquire; import time; acquire({str(lock)!r}); print('ok', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ok"
        assert holder_pid(lock) == holder.pid
        with pytest.raises(AlreadyRunningError, match=f"pid {holder.pid}"):
            acquire(lock)
    finally:
        holder.kill()
        holder.wait()
    assert lock.read_text().strip() == str(holder.pid)  # stale pid left behind...
    assert holder_pid(lock) is None  # ...never blocks
    fd = acquire(lock)
    assert lock.read_text().strip() == str(os.getpid())
    os.close(fd)


def test_locked_keys_refuse_then_approve_archives(tmp_path, models_dir):
    path = write_instance(tmp_path / "i", models_dir)
    cfg = load_config(path)
    lockedkeys.record(cfg)
    adapters.publish(cfg.path("adapters"), {"version": 1}, lambda folder: None)
    assert lockedkeys.check(cfg) == []
    path2 = write_instance(tmp_path / "i", models_dir, lora={"r": 16})
    cfg2 = load_config(path2)
    assert lockedkeys.check(cfg2) == [("lora.r", 4, 16)]
    done = lockedkeys.approve(cfg2)
    assert lockedkeys.check(cfg2) == []
    assert len(done.archived) == 1 and done.new_adapter and done.continues_on is None and (tmp_path / "i" / "archive").is_dir()
    assert json.loads((cfg.path("status") / "locked_keys.json").read_text())["history"][0]["changes"] == [["lora.r", 4, 16]]


def test_a_key_locked_by_a_later_version_is_taken_at_its_default(tmp_path, models_dir):
    """An instance recorded before `training.optimizer` was locked: the default is what it trained with."""
    cfg = load_config(write_instance(tmp_path / "i", models_dir))
    lockedkeys.record(cfg)
    (cfg.path("adapters")).mkdir(parents=True)
    (cfg.path("adapters") / "current.json").write_text('{"version": 1}')
    path = cfg.path("status") / "locked_keys.json"
    old = json.loads(path.read_text())
    del old["values"]["training.optimizer"]  # as an older traind wrote it
    path.write_text(json.dumps(old))
    assert lockedkeys.check(cfg) == []  # starts as before the upgrade
    other = load_config(write_instance(tmp_path / "i", models_dir, training={"optimizer": "adamw_8bit"}))
    assert lockedkeys.check(other) == [("training.optimizer", "adamw", "adamw_8bit")]
