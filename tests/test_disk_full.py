"""A full disk at every write: the daemon pauses (reason disk_full, with the folder and
the free bytes), keeps every previous file valid, fails no file, and resumes by itself
once space is back.

    TRAIND_ENOSPC_AT=SITE[,SITE]      every write at SITE raises OSError(ENOSPC) part-way (daemon/atomic.py)
    TRAIND_TRAINER_ENOSPC_AT=SITE     ... in the trainer child
    TRAIND_ENOSPC_ARMED=PATH          armed only while PATH exists; its content, if any, names the sites

Sites: checkpoint, adapter (trainer); status, history, queue, intake, log (service);
upload (monitor); SITE/fsync fails the fsync instead. A real full filesystem (a
small tmpfs) is used where the machine lets the test mount one. The default run
has the real full filesystem, the threshold and every site in process; the two
daemon-wide sweeps of the injected sites are `slow` (`pytest -m slow`).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import skip_or_fail

from daemon import atomic, diskspace
from daemon.service.diskguard import DiskGuard
from daemon.diskspace import DiskFull
from daemon.logs import DailyFileHandler
from daemon.history_db import HistoryDB
from bench.harness import lines_of, time_scale, write_instance
from bench.harness import Daemon

TOL = 1e-5


@pytest.fixture
def armed(tmp_path, monkeypatch):
    """Arm the injection in this process: armed(site) arms, armed(None) disarms."""
    gate = tmp_path / "enospc-gate"
    monkeypatch.setenv("TRAIND_ENOSPC_ARMED", str(gate))

    def arm(site: str | None) -> None:
        if site is None:
            gate.unlink(missing_ok=True)
        else:
            gate.write_text(site)

    return arm


# ---------------------------------------------------------------- what counts as a full disk


class _FullFile:
    """A file object whose writes fail as on a full disk after a few bytes (what torch.save writes into)."""

    def __init__(self, path: Path) -> None:
        self.f = open(path, "wb")
        self.written = 0

    def write(self, data) -> int:  # noqa: ANN001
        if self.written + len(data) > 64:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.written += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def test_every_shape_of_a_full_disk_is_recognised_and_nothing_else(tmp_path):
    torch = pytest.importorskip("torch")
    assert diskspace.is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert diskspace.is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    # torch.save's own error on a full disk: a RuntimeError that does not say why, raised from ours
    with pytest.raises(RuntimeError) as caught:
        torch.save({"w": torch.zeros(1000)}, _FullFile(tmp_path / "o.pt"))
    assert "No space" not in str(caught.value)
    assert diskspace.is_disk_full(caught.value)
    # SQLite's own error, for real: a database that may not grow
    db = sqlite3.connect(tmp_path / "h.db")
    db.execute("CREATE TABLE t (x)")
    db.execute(f"PRAGMA max_page_count = {db.execute('PRAGMA page_count').fetchone()[0]}")
    with pytest.raises(sqlite3.OperationalError) as caught:
        with db:
            db.executemany("INSERT INTO t VALUES (?)", [(b"x" * 4000,)] * 10)
    assert diskspace.is_disk_full(caught.value)
    # safetensors' words
    assert diskspace.is_disk_full(RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"))
    for other in (OSError(errno.EACCES, "Permission denied"), RuntimeError("CUDA out of memory"), ValueError("bad"),
                  sqlite3.OperationalError("database is locked")):
        assert not diskspace.is_disk_full(other)
    full = diskspace.disk_full_from(OSError(errno.ENOSPC, "No space", str(tmp_path / "q" / ".x.tmp")), tmp_path, "queue")
    assert full.folder == str(tmp_path) and full.free_bytes > 0 and full.site == "queue"


def test_threshold_raises_before_writing(tmp_path):
    diskspace.require_space(tmp_path, 0, "checkpoint")  # 0: no threshold
    with pytest.raises(DiskFull) as caught:
        diskspace.require_space(tmp_path, 2**62, "checkpoint")
    assert caught.value.site == "checkpoint" and caught.value.folder == str(tmp_path)


# ---------------------------------------------------------------- atomic writes


@pytest.mark.parametrize("site", ["status", "status/fsync"])
def test_a_failed_write_or_fsync_keeps_the_previous_file_and_leaves_no_temp(tmp_path, armed, site):
    path = tmp_path / "training_status.json"
    atomic.write_json(path, {"n": 1}, site="status")
    armed(site)
    for _ in range(3):  # never retried into success: each attempt fails as a whole
        with pytest.raises(OSError) as caught:
            atomic.write_json(path, {"n": 2, "pad": "x" * 5000}, site="status")
        assert caught.value.errno == errno.ENOSPC
        assert json.loads(path.read_text()) == {"n": 1}
        assert [p.name for p in tmp_path.iterdir() if p.name != "enospc-gate"] == [path.name]
    atomic.write_json(path, {"n": 3}, site="other")  # only the armed site fails
    armed(None)
    atomic.write_json(path, {"n": 4, "pad": "x" * 5000}, site="status")
    assert json.loads(path.read_text())["n"] == 4


def test_a_refused_move_leaves_the_file_where_it_was(tmp_path, armed):
    src, dst = tmp_path / "a" / "f.jsonl", tmp_path / "b" / "f.jsonl"
    src.parent.mkdir()
    src.write_text('{"text": "x"}\n')
    armed("intake")
    with pytest.raises(OSError):
        atomic.move_file(src, dst, site="intake")
    assert src.read_text() == '{"text": "x"}\n' and not dst.exists()
    armed(None)
    atomic.move_file(src, dst, site="intake")
    assert dst.exists() and not src.exists()


# ---------------------------------------------------------------- history and log


def test_history_holds_writes_on_a_full_disk_and_replays_them_in_order(tmp_path, armed):
    db = HistoryDB(tmp_path / "history.db")
    told: list[BaseException] = []
    db.on_disk_full = told.append
    db.record_step("job", 1, 1, 0.1, 2.0, 1e-3, 0.5, 100.0, 1.0)
    armed("history")
    db.record_step("job", 2, 2, 0.2, 1.9, 1e-3, 0.5, 100.0, 2.0)
    db.event("disk_full", "paused")
    db.upsert_job("job", state="done")
    assert len(told) == 1 and diskspace.is_disk_full(told[0])  # said once, never raised
    assert [r["step"] for r in db.steps("job")] == [1] and len(db.held) == 3
    assert not db.flush()  # still full: kept
    armed(None)
    assert db.flush() and not db.held
    assert [r["step"] for r in db.steps("job")] == [1, 2]
    assert db.job("job")["state"] == "done" and db.events()[0]["kind"] == "disk_full"
    db.close()


def test_log_records_are_dropped_and_counted_while_the_log_cannot_be_written(tmp_path, armed):
    handler = DailyFileHandler(tmp_path, "daemon")
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("test_disk_full.log")
    logger.propagate, logger.level = False, logging.INFO
    logger.addHandler(handler)
    try:
        logger.info("one")
        armed("log")
        logger.info("two")
        logger.info("three")
        assert handler.dropped == 2
        armed(None)
        logger.info("four")
    finally:
        logger.removeHandler(handler)
        handler.close()
    text = handler.current_path().read_text()
    assert text.splitlines() == ["one", "2 log record(s) dropped: the log could not be written (disk full?)", "four"]


# ---------------------------------------------------------------- the service's pause (time as a parameter)


def test_disk_guard_pauses_below_the_threshold_and_backs_off_on_failed_writes(tmp_path):
    free = {tmp_path: 10_000}
    guard = DiskGuard([tmp_path], min_free=5_000, check_seconds=1.0, free=lambda p: free[Path(p)])
    assert guard.check(0.0) is None
    free[tmp_path] = 4_000
    assert guard.check(1.0) == "tripped" and guard.full.site == "threshold" and guard.full.free_bytes == 4_000
    assert guard.check(5.0) is None  # still below
    free[tmp_path] = 6_000
    assert guard.check(6.0) == "cleared" and guard.full is None
    # a write failed although the threshold holds: retried after 1 s, then 2 s, then 4 s while failures
    # follow each other (a minute after the pause before ended, the count starts again)
    t = 100.0
    for wait in (1.0, 2.0, 4.0):
        assert guard.trip(DiskFull(tmp_path, 6_000, "checkpoint", "No space left on device"), t)
        assert not guard.trip(DiskFull(tmp_path, 6_000, "status", "No space left on device"), t + 0.1)  # same pause
        assert guard.check(t + wait - 0.01) is None
        assert guard.check(t + wait) == "cleared"
        t += wait + 1.0
    # space freed ends a pause before its retry time
    assert guard.trip(DiskFull(tmp_path, 6_000, "checkpoint", "No space left on device"), 50.0)
    free[tmp_path] = 6_000 + 2**21
    assert guard.check(50.5) == "cleared"


def test_a_pause_that_spent_the_status_room_lasts_until_the_room_is_kept_again(tmp_path, monkeypatch):
    """The room kept beside the status went into saying the pause: past its retry time the pause stays while
    that room cannot be set aside again (a disk full but for it would say "idle" until some write failed
    again, or never), and ends once it can, with the room kept again."""
    import daemon.status as status_module

    writer = status_module.StatusWriter(tmp_path, reserve_bytes=4096)
    assert writer.ensure_reserve() and writer.release_reserve() and not writer.reserve.exists()
    free = {"bytes": 3 * 4096}  # the room needs 4 times itself free before it is set aside again
    monkeypatch.setattr(status_module, "free_bytes", lambda p: free["bytes"])
    guard = DiskGuard([tmp_path], min_free=0, check_seconds=1.0, free=lambda p: free["bytes"],
                      room_kept=writer.room_kept)
    assert guard.trip(DiskFull(tmp_path, 0, "history", "No space left on device"), 0.0)
    assert guard.check(1.0) is None and guard.check(60.0) is None and guard.full is not None
    assert not writer.reserve.exists()
    free["bytes"] = 2**30  # space back
    assert guard.check(61.0) == "cleared" and writer.reserve.stat().st_size == 4096


# ---------------------------------------------------------------- the trainer's loop


def test_a_checkpoint_refused_for_space_is_written_again_and_the_file_trains_as_uninterrupted(models_dir, tmp_path, armed):
    torch = pytest.importorskip("torch")
    from tests.test_loop import make_cfg, run, small_file, sha
    from daemon.train import checkpoint as ckpt
    from daemon.train.loop import Job, train_file
    from daemon.train.model import load_for_training, lora_max_abs_diff, lora_state

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = small_file(tmp_path, "alpaca.jsonl", 40)
        job = Job.for_file("job-1", data, "alpaca", sha(data))
        cfg = make_cfg(models_dir, tmp_path / "ref", checkpoint_every_steps=3)
        _, ref_events, ref_lm = run(cfg, job)

        cfg = make_cfg(models_dir, tmp_path / "full", checkpoint_every_steps=3)
        folder = cfg.path("checkpoints") / job.job_id
        waits: list[DiskFull] = []

        def wait_for_space(full: DiskFull) -> str:
            waits.append(full)
            assert ckpt.latest_step(folder) == 3 and not list(folder.glob(".step_*"))  # the previous one stands
            armed(None)  # space is back
            return "continue"

        def control() -> str:
            if ckpt.latest_step(folder) == 3 and not waits:
                armed("checkpoint")  # the disk fills up after the first checkpoint
            return "continue"

        lm = load_for_training(cfg, seed=cfg.training.seed)
        events: list[dict] = []
        out = train_file(lm, cfg, job, global_step=0, ckpt_folder=folder, report=lambda m: events.append(m.to_wire()), control=control,
                         wait_for_space=wait_for_space)
        assert out.status == "done" and [w.site for w in waits] == ["checkpoint"]
        assert waits[0].folder == str(folder) and waits[0].free_bytes > 0
        assert lora_max_abs_diff(lora_state(lm.model), lora_state(ref_lm.model)) <= TOL
        assert [e["loss"] for e in events if e["type"] == "step"] == [e["loss"] for e in ref_events if e["type"] == "step"]

        # below the threshold: held before anything is written, and a stop then keeps nothing new
        low = make_cfg(models_dir, tmp_path / "low", checkpoint_every_steps=3)
        low = dataclasses.replace(low, service=dataclasses.replace(low.service, min_free_bytes=2**62))
        seen: list[DiskFull] = []
        out = train_file(load_for_training(low, seed=low.training.seed), low, job, global_step=0,
                         ckpt_folder=low.path("checkpoints") / job.job_id, report=lambda m: None,
                         control=lambda: "continue", wait_for_space=lambda f: seen.append(f) or "stop")
        assert out.status == "stopped" and out.checkpoint_step is None and seen[0].site == "checkpoint"
        from daemon.train import checkpoint as ckpt
        assert ckpt.step_dirs(low.path("checkpoints") / job.job_id) == []  # no checkpoint (the step log may be there)
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------- the monitor's upload


def test_upload_on_a_full_disk_answers_507_and_leaves_nothing_in_the_inbox(tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    from monitor.app import create_app
    from tests.monitor_helpers import make_instance

    (tmp_path / "inst").mkdir()
    (tmp_path / "low").mkdir()
    cfg = make_instance(tmp_path / "inst", service={"min_free_bytes": 0})
    monkeypatch.setenv("TRAIND_ENOSPC_AT", "upload")
    with TestClient(create_app(cfg), base_url="http://127.0.0.1") as c:
        token = (cfg.path("status") / "monitor_token").read_text().strip()
        body = lines_of("text.jsonl", 20).encode()
        r = c.post("/api/queue?name=data.jsonl", content=body, headers={"X-Traind-Token": token})
        assert r.status_code == 507, r.text
        assert "disk space" in r.json()["detail"] and str(cfg.path("inbox")) in r.json()["detail"]
        assert [p for p in cfg.path("inbox").rglob("*") if p.is_file()] == []
        monkeypatch.delenv("TRAIND_ENOSPC_AT")
        r = c.post("/api/queue?name=data.jsonl", content=body, headers={"X-Traind-Token": token})
        assert r.status_code == 201 and (cfg.path("inbox") / "data.jsonl").read_bytes() == body

    low = make_instance(tmp_path / "low", service={"min_free_bytes": 2**62})  # below the threshold: refused up front
    with TestClient(create_app(low), base_url="http://127.0.0.1") as c:
        token = (low.path("status") / "monitor_token").read_text().strip()
        r = c.post("/api/queue?name=data.jsonl", content=body, headers={"X-Traind-Token": token})
        assert r.status_code == 507 and "min_free_bytes" in r.json()["detail"]
        assert [p for p in low.path("inbox").rglob("*") if p.is_file()] == []


# ---------------------------------------------------------------- the real daemon

FAST_DISK = {"service": {"disk_check_seconds": 0.5, "min_free_bytes": 0}, "training": {"epochs_per_file": 2}}
FIRST = lines_of("text.jsonl", 24)
SECOND = lines_of("chat.jsonl", 60)  # 28 steps, a checkpoint every 5


def chunk(i: int, n: int = 8) -> str:
    """The i-th slice of n lines of the bundled text examples: small distinct files."""
    return "".join(lines_of("text.jsonl").splitlines(keepends=True)[i * n:(i + 1) * n])


def adapter_tensors(d: Daemon) -> dict:
    from safetensors.torch import load_file
    current = json.loads((d.cfg.path("adapters") / "current.json").read_text())
    return load_file(d.cfg.path("adapters") / current["path"] / "adapter_model.safetensors")


def disk_paused(site: str):  # noqa: ANN201
    """The status once the pause has reached the child (a step may still end between the trip and its `paused`)."""
    return lambda s: (s["status"] == "paused" and s.get("pause_reason") == "disk_full"
                      and (s.get("disk_full") or {}).get("site") == site)


def check_paused(d: Daemon, st: dict, site: str, folder: Path) -> None:
    """Alive, paused for disk with the folder and its free bytes, no file failed; the CLI says it too."""
    assert d.proc.poll() is None
    assert st["status"] == "paused" and isinstance(st["disk_full"]["free_bytes"], int)
    assert Path(st["disk_full"]["folder"]).is_relative_to(folder), st["disk_full"]
    assert not d.queue.failed(), "a full disk is not the file's fault"
    # what `trainctl status` prints for this status (a pause retried every 0.5 s may end before a CLI
    # process starts; the threshold test runs the real command against a pause that lasts)
    from daemon.cli.status_cmds import render_status
    out = render_status(st, d.proc.pid)
    assert "paused (disk full)" in out and "DISK     FULL" in out and site in out, out


@pytest.fixture
def factory(tmp_path, models_dir):
    made: list[Daemon] = []

    def make(name: str, gate: Path | None = None, **over) -> Daemon:
        env = {"TRAIND_ENOSPC_ARMED": str(gate)} if gate else {}
        d = Daemon(write_instance(tmp_path / name, models_dir, **{**FAST_DISK, **over}), env=env)
        made.append(d)
        return d

    yield make
    for d in made:
        d.close()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, models_dir):
    """The two files trained straight through: the adapter a full disk must not change."""
    d = Daemon(write_instance(tmp_path_factory.mktemp("ref"), models_dir, **FAST_DISK))
    try:
        d.start()
        d.drop("a_first.jsonl", FIRST)
        d.wait_counts(done=1, timeout=300)
        d.drop("b_second.jsonl", SECOND)
        d.wait_counts(done=2, timeout=300)
        yield dict(d.losses()), adapter_tensors(d)
    finally:
        d.close()


@pytest.mark.e2e
@pytest.mark.slow  # about 60 s with its reference run
def test_trainer_checkpoint_and_adapter_writes_on_a_full_disk_pause_and_resume_exactly(factory, tmp_path, reference):
    gate = tmp_path / "gate"
    d = factory("trainer", gate).start()
    d.drop("a_first.jsonl", FIRST)
    d.wait_counts(done=1, timeout=300)
    v1 = (d.cfg.path("adapters") / "current.json").read_text()
    gate.write_text("match:step_000010")  # the second file's second checkpoint (step 10) cannot be written
    d.drop("b_second.jsonl", SECOND)
    st = d.wait_for(disk_paused("checkpoint"), what="disk pause at a checkpoint")
    job = st["job_id"]
    check_paused(d, st, "checkpoint", d.cfg.path("checkpoints"))
    step = st["current_step"]
    time.sleep(1.5)  # held: no step trained, retried writes refused, the previous checkpoint intact
    assert d.status()["current_step"] == step and [e.job_id for e in d.queue.processing()] == [job]
    assert step == 10 and st["disk_full"]["free_bytes"] > 0
    folder = d.cfg.path("checkpoints") / job
    assert json.loads((folder / "latest.json").read_text())["path"] == f"step_{step - 5:06d}"
    from daemon.train.checkpoint import read_checkpoint
    assert read_checkpoint(folder / f"step_{step - 5:06d}").position.step == step - 5
    assert not list(folder.glob(".step_*"))

    gate.write_text("adapter")  # the checkpoint goes through; the adapter's publication will not
    st = d.wait_for(disk_paused("adapter"), timeout=120, what="disk pause at the adapter")
    check_paused(d, st, "adapter", d.cfg.path("adapters"))
    assert (d.cfg.path("adapters") / "current.json").read_text() == v1  # the previous adapter stays current
    assert not list(d.cfg.path("adapters").glob(".v*"))  # no half-made version left
    gate.unlink()  # space is back
    d.wait_counts(done=2, processing=0, timeout=120)
    st = d.wait_for(lambda s: s["status"] == "idle", what="idle")
    assert st["pause_reason"] is None and st["disk_full"] is None and not d.queue.failed()
    ref_losses, ref_adapter = reference
    got = dict(d.losses())
    assert sorted(got) == sorted(ref_losses) and max(abs(got[s] - ref_losses[s]) for s in got) <= TOL
    assert max(float((adapter_tensors(d)[k] - ref_adapter[k]).abs().max()) for k in ref_adapter) <= TOL
    kinds = [e["kind"] for e in d.history().events()]
    assert "disk_full" in kinds and "disk_ok" in kinds and d.history().job(job)["crashes"] == 0


@pytest.mark.e2e
@pytest.mark.slow  # about 40 s: five files, one per site
def test_service_writes_on_a_full_disk_pause_and_resume(factory, tmp_path):
    gate = tmp_path / "gate"
    d = factory("service", gate).start()
    d.wait_for(lambda s: s["status"] == "idle" and s["detail"] == "waiting for files", what="ready")
    inbox = d.cfg.path("inbox")

    # intake: the file stays in the inbox, byte for byte, and is taken once space is back
    gate.write_text("intake")
    body = chunk(0)
    d.drop("in.jsonl", body)
    st = d.wait_for(disk_paused("intake"), what="pause at intake")
    check_paused(d, st, "intake", d.cfg.path("queue"))
    assert (inbox / "in.jsonl").read_text() == body and d.queue.counts()["pending"] == 0
    gate.unlink()
    d.wait_counts(done=1, timeout=120)

    # a queue move (pending -> processing): the file stays pending
    gate.write_text("queue")
    d.drop("q.jsonl", chunk(1))
    st = d.wait_for(disk_paused("queue"), what="pause at a queue move")
    check_paused(d, st, "queue", d.cfg.path("queue"))
    assert [e.original_name for e in d.queue.pending()] == ["q.jsonl"]
    gate.unlink()
    d.wait_counts(done=2, timeout=120)

    # history: held, written once space is back; the service does not crash
    d.wait_for(lambda s: s["status"] == "idle", what="idle")
    steps_before = len(d.losses())
    gate.write_text("history")
    d.drop("h.jsonl", chunk(2))
    st = d.wait_for(disk_paused("history"), what="pause at a history write")
    check_paused(d, st, "history", d.cfg.path("status"))
    gate.unlink()
    d.wait_counts(done=3, timeout=120)
    d.wait_for(lambda s: s["status"] == "idle", what="idle")
    db = d.history()
    h_job = next(j for j in db.jobs() if j["original_name"] == "h.jsonl")
    assert h_job["state"] == "done" and len(d.losses()) > steps_before
    assert [r["step"] for r in db.steps(h_job["job_id"])] == list(range(1, h_job["steps"] + 1))

    # status: it cannot say so itself; the previous status file stays whole, nothing half-written beside it,
    # the pause is in the history, and the status says what happened once it can be written again
    status_file = d.cfg.path("status") / "training_status.json"
    gate.write_text("status")
    time.sleep(0.6)
    before = status_file.read_text()
    d.drop("s.jsonl", chunk(3))
    time.sleep(2.0)
    assert status_file.read_text() == before and json.loads(before)["status"] == "idle"
    assert not [p for p in status_file.parent.iterdir() if p.name.endswith(".tmp")]
    assert any(e["kind"] == "disk_full" and "status write failed" in e["message"] for e in d.history().events())
    assert d.proc.poll() is None
    gate.unlink()
    d.wait_for(lambda s: s["updated_at"] != json.loads(before)["updated_at"], what="status written again")
    d.wait_counts(done=4, timeout=120)

    # log: records dropped and counted, the daemon pauses and then says how many it lost
    d.wait_for(lambda s: s["status"] == "idle" and s["pause_reason"] is None, what="idle")
    gate.write_text("log")
    d.drop("l.jsonl", chunk(4))  # its intake is logged
    st = d.wait_for(disk_paused("log"), what="pause at a log write")
    check_paused(d, st, "log", d.cfg.path("logs"))
    gate.unlink()
    d.wait_counts(done=5, timeout=120)
    d.wait_for(lambda s: s["pause_reason"] is None, what="resumed after the log")
    assert d.proc.poll() is None and not d.queue.failed()
    logs = "".join(p.read_text() for p in d.cfg.path("logs").glob("daemon_*.log"))
    assert "log record(s) dropped" in logs
    kinds = [e["kind"] for e in d.history().events(500)]
    assert kinds.count("disk_full") >= 5 and kinds.count("disk_ok") >= 5
    assert d.stop() == 0


@pytest.mark.e2e
def test_free_space_below_the_threshold_pauses_before_any_write(factory):
    d = factory("threshold", service={"min_free_bytes": 2**62, "disk_check_seconds": 0.5}).start()
    st = d.wait_for(disk_paused("threshold"), what="threshold pause")
    check_paused(d, st, "threshold", d.cfg.root)
    assert st["disk_full"]["min_free_bytes"] == 2**62
    out = d.ctl("status").stdout
    assert "paused (disk full)" in out and "DISK     FULL" in out and "threshold" in out, out
    d.drop("data.jsonl", lines_of("text.jsonl", 8))
    assert "resumes by itself" in d.ctl("resume").stdout  # the person's resume is taken; the disk still holds
    time.sleep(2.0)
    assert [p.name for p in d.cfg.path("inbox").glob("*.jsonl")] == ["data.jsonl"]
    assert d.queue.counts()["pending"] == 0
    assert not [p for p in d.cfg.path("checkpoints").iterdir() if not p.name.startswith(".")]
    assert d.status()["pause_reason"] == "disk_full"
    assert d.stop() == 0


# ---------------------------------------------------------------- a real full filesystem


@pytest.fixture
def small_fs(request, tmp_path):
    """A 64 MiB tmpfs mounted for the test; always unmounted. As root a refused mount fails the test. Where the
    system refuses the mount to another user, the test runs again, whole, in a user and mount namespace of its
    own (`unshare --user --map-root-user --mount`: root there, so the mount is allowed, and the daemon it starts
    lives there too); its outcome is this test's, and the fixture then yields None (the body already ran there).
    Skipped only where the system refuses that namespace as well, with both answers as the reason."""
    mnt = tmp_path / "small_fs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)], capture_output=True, text=True)
    refused = r.stderr.strip() or f"exit status {r.returncode}"
    if r.returncode != 0 and os.geteuid() != 0:
        yield run_in_a_namespace_of_its_own(request.node.nodeid, refused, tmp_path / "in_namespace")
        return
    assert r.returncode == 0, f"running as root, yet a 64 MiB tmpfs could not be mounted: {refused}"
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def run_in_a_namespace_of_its_own(nodeid: str, refused: str, basetemp: Path) -> None:
    """Run test `nodeid` as root of a new user and mount namespace; fail with its output if it failed there."""
    import sys

    cmd = ["unshare", "--user", "--map-root-user", "--mount", sys.executable, "-m", "pytest", "-q", "-p", "no:xdist",
           "-p", "no:cacheprovider", f"--basetemp={basetemp}", nodeid]  # a folder this user owns (root there)
    try:
        inner = subprocess.run(cmd, cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True,
                               timeout=600 * time_scale())
    except FileNotFoundError:  # no unshare(1) on this system
        skip_or_fail(f"mounting a 64 MiB tmpfs was refused to uid {os.geteuid()} ({refused}) and there is no "
                    "unshare to run it in a namespace of its own")
    said = (inner.stdout + inner.stderr).strip()
    if inner.returncode != 0 and said.startswith("unshare:"):  # the namespace itself was refused, nothing ran
        skip_or_fail(f"mounting a 64 MiB tmpfs was refused to uid {os.geteuid()} ({refused}), and so was a user "
                    f"namespace to run it in ({said.splitlines()[0]})")
    assert inner.returncode == 0 and " passed" in said, f"in a namespace of its own: {' '.join(cmd)}\n{said[-4000:]}"


def fill(folder: Path, leave: int = 0) -> Path:
    """Fill `folder`'s filesystem, leaving about `leave` bytes free; the filler's path."""
    filler = folder / "filler"
    with open(filler, "wb") as f:
        while diskspace.free_bytes(folder) > leave:
            try:
                f.write(b"\0" * min(1 << 20, max(4096, diskspace.free_bytes(folder) - leave)))
                f.flush()
            except OSError:
                break
    return filler


@pytest.mark.e2e
def test_a_really_full_checkpoint_filesystem_pauses_and_resumes_when_space_is_freed(factory, small_fs):
    if small_fs is None:  # it ran, and passed, in a namespace of its own (small_fs)
        return
    d = factory("realfs", paths={"checkpoints": str(small_fs)}).start()
    d.wait_for(lambda s: s["status"] == "idle" and s["detail"] == "waiting for files", what="ready")
    filler = fill(small_fs)  # the first checkpoint (step 5) will not fit
    d.drop("data.jsonl", SECOND)
    st = d.wait_for(disk_paused("checkpoint"), what="real disk-full pause")
    check_paused(d, st, "checkpoint", small_fs)
    assert st["disk_full"]["free_bytes"] < diskspace.NEARLY_FULL_BYTES and st["current_step"] == 5
    job = st["job_id"]
    time.sleep(1.5)  # retried and refused again: held at step 5, nothing half-written taken for a checkpoint
    assert d.status()["current_step"] == 5 and d.proc.poll() is None
    assert not (small_fs / job / "latest.json").exists() and not list((small_fs / job).glob("*step_*"))
    filler.unlink()
    d.wait_counts(done=1, processing=0, timeout=120)
    assert not d.queue.failed() and d.history().job(job)["crashes"] == 0
    assert not (small_fs / job).exists()  # its checkpoints went with its publication


# ---------------------------------------------------------------- when the status itself cannot be written (#26: 12)


@pytest.mark.e2e
def test_a_disk_filled_to_its_last_byte_by_another_program_still_gets_the_pause_into_the_status(factory, small_fs):
    """Another program fills the status folder's disk to its last byte: the daemon pauses, and the status says
    so (the room kept beside it is released for that), where before it said "idle" for as long as it lasted."""
    if small_fs is None:  # it ran, and passed, in a namespace of its own (small_fs)
        return
    d = factory("statusfs", paths={"status": str(small_fs)}).start()
    d.wait_for(lambda s: s["status"] == "idle" and s["detail"] == "waiting for files", what="ready")
    assert (small_fs / ".status_reserve").stat().st_size > 0
    filler = fill(small_fs)
    st = d.wait_for(lambda s: s.get("pause_reason") == "disk_full", timeout=60, what="the pause in the status")
    assert st["status"] == "paused" and st["disk_full"]["site"] in ("status", "history"), st
    assert not (small_fs / ".status_reserve").exists()
    # The pause lasts while the room it spent cannot be kept again (the disk is still full but for it); the CLI
    # is read until it says so, however slowly it starts on a busy machine.
    deadline = time.time() + 30 * time_scale()
    while "paused (disk full)" not in (out := d.ctl("status").stdout) and time.time() < deadline:
        time.sleep(0.2)
    assert "paused (disk full)" in out and "DISK     FULL" in out and "not responding" not in out, out
    filler.unlink()
    d.wait_for(lambda s: s["status"] == "idle" and s.get("pause_reason") is None, timeout=60, what="space back")
    deadline = time.time() + 30
    while not (small_fs / ".status_reserve").exists() and time.time() < deadline:
        time.sleep(0.1)
    assert (small_fs / ".status_reserve").exists()  # set aside again for the next time
    d.drop("data.jsonl", lines_of("text.jsonl", 8))
    d.wait_counts(done=1, timeout=120)


def _unwritable(folder: Path, on: bool) -> None:
    """No file can be created in `folder`: as root an immutable folder (root ignores permission bits), as any
    other user (the daemon runs as the test's user) a folder without write permission. Never a skip."""
    if os.geteuid() != 0:
        folder.chmod(0o555 if on else 0o755)
        return
    r = subprocess.run(["chattr", "+i" if on else "-i", str(folder)], capture_output=True, text=True)
    assert r.returncode == 0, f"chattr {'+' if on else '-'}i {folder} failed as root: {r.stderr.strip()}"


@pytest.mark.e2e
def test_a_status_folder_that_cannot_be_written_is_named_to_readers_with_one_log_line(factory, tmp_path):
    """status/ made unwritable while the daemon trains (an immutable folder: even root cannot create files in
    it): no traceback a second in the log but one line naming it; `trainctl status`, `trainctl health` and the
    monitor say the daemon cannot write its status instead of "not responding"; writable again, it goes on."""
    from daemon.diskspace import write_trouble
    from monitor.liveness import assess, parse_iso

    d = factory("readonly", training={"epochs_per_file": 30})
    status = d.cfg.path("status")
    d.start()
    d.drop("long.jsonl", lines_of("chat.jsonl", 40))
    d.wait_for(lambda s: s["status"] == "training" and s["current_step"] >= 2, what="training")
    _unwritable(status, True)
    try:
        time.sleep(4.0)  # eight status intervals, a few disk checks
        st = d.status()
        age = time.time() - parse_iso(st["updated_at"])
        assert age > 3 * st["write_interval_seconds"]
        out = d.ctl("status").stdout
        assert "cannot write its status" in out and str(status) in out and "not responding" not in out, out
        health = d.ctl("health").stdout
        assert "cannot write its status" in health, health
        live = assess(st, time.time(), trouble=lambda: write_trouble(status))
        assert live.stale and live.cause == "unwritable" and "cannot write its status" in live.reason
        log = "\n".join(p.read_text() for p in d.cfg.path("logs").glob("daemon_*.log"))
        assert log.count("Traceback") == 0 and log.count("cannot be written") == 1, log[-3000:]
        held = d.history().steps()
        step = max(r["step"] for r in held) if held else 0
    finally:
        _unwritable(status, False)
    st = d.wait_for(lambda s: s["status"] == "training" and s.get("pause_reason") is None, timeout=60,
                    what="training again once status/ can be written")
    assert st["current_step"] <= step + 2  # held while it could not say what it did
    assert any(e["kind"] == "unwritable" for e in d.history().events(200))
    assert d.queue.counts()["failed"] == 0
