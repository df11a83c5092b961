"""trainctl (daemon/cli/) as people run it: `python -m daemon.cli --config PATH ...` against temporary instances.

No daemon and no model: the queue is populated with `JobQueue`, the status with
`StatusWriter`, and a running daemon is played by a process holding the daemon lock.
Every test checks the exit code, what was printed and the files left behind.
"""

from __future__ import annotations

import json
import re
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from daemon.config import Config, explain, load_config
from daemon.jobqueue import ERROR_SUFFIX, JobQueue, QueueEntry
from daemon.lock import holder_pid
from daemon.states import FailReason, JobState, Priority, ServiceStatus
from daemon.schema import DistributedSetup, RankFigures, TrainingStatus
from daemon.history_db import HistoryDB
from daemon.status import StatusWriter
from bench.harness import EXAMPLES, REPO, write_instance

TEXT = '{"text": "hello"}\n'
SIZE = len(TEXT) * 3  # bytes of each queued file


@pytest.fixture
def cfg(tmp_path: Path) -> Config:
    return load_config(write_instance(tmp_path / "inst"))


def trainctl(cfg: Config | Path, *args: str) -> subprocess.CompletedProcess:
    config = cfg if isinstance(cfg, Path) else cfg.root / "config.json"
    return subprocess.run([sys.executable, "-m", "daemon.cli", "--config", str(config), *args],
                          capture_output=True, text=True, cwd=REPO, timeout=60)


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


# ---------------------------------------------------------------- config


def test_config_validate_valid(cfg: Config) -> None:
    r = trainctl(cfg, "config", "validate")
    assert (r.returncode, r.stdout) == (0, f"{cfg.root / 'config.json'}: valid\n")
    assert not (cfg.root / "queue").exists()  # checking a config creates nothing


def test_config_validate_lists_every_problem(tmp_path: Path) -> None:
    path = write_instance(tmp_path / "inst", data={"bad_line_policy": "maybe"}, lora={"r": 0},
                          training={"schedule": "zigzag", "warp": 9})
    r = trainctl(path, "config", "validate")
    assert r.returncode == 1
    assert "4 problem(s)" in r.stdout
    for key in ("`data.bad_line_policy` = 'maybe'", "`lora.r` = 0", "`training.schedule` = 'zigzag'",
                "`training.warp` is not a known key"):
        assert key in r.stdout, (key, r.stdout)


def test_config_explain_lists_every_key(cfg: Config) -> None:
    r = trainctl(cfg, "config", "explain")
    assert r.returncode == 0
    shown = [line[2:].split(" = ")[0] for line in r.stdout.splitlines()[1:] if not line.startswith("      ")]
    assert shown == [key for key, _, _ in explain()] and len(shown) > 40
    assert '  training.schedule = "cosine"   (default)' in r.stdout


# ---------------------------------------------------------------- queue add


def test_queue_add_valid_file_never_overwrites(cfg: Config) -> None:
    src = EXAMPLES / "chat.jsonl"
    first = trainctl(cfg, "queue", "add", str(src))
    second = trainctl(cfg, "queue", "add", str(src))
    high = trainctl(cfg, "queue", "add", str(src), "--priority", "high")
    assert [first.returncode, second.returncode, high.returncode] == [0, 0, 0]
    assert "240 records, format chat" in first.stdout and "(normal" in first.stdout
    assert "daemon is not running" in first.stdout and "(high" in high.stdout
    inbox = cfg.path("inbox")
    assert files_under(inbox) == ["chat-2.jsonl", "chat.jsonl", "high/chat.jsonl"]  # no .part left behind
    assert all((inbox / n).read_bytes() == src.read_bytes() for n in files_under(inbox))


def test_queue_add_invalid_file_writes_nothing(cfg: Config, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(TEXT + '{"text": 5}\n' + TEXT + '{"text": oops}\n', encoding="utf-8")
    r = trainctl(cfg, "queue", "add", str(bad))
    assert r.returncode == 1
    assert f"{bad} refused: 2 of 4 lines bad" in r.stdout
    assert "  line 2, field text: must be a string, got number" in r.stdout
    assert "  line 4: invalid JSON at column 10" in r.stdout
    assert files_under(cfg.path("inbox")) == []


def test_queue_add_missing_file(cfg: Config, tmp_path: Path) -> None:
    r = trainctl(cfg, "queue", "add", str(tmp_path / "nope.jsonl"))
    assert r.returncode == 1 and "is not a file" in r.stdout
    assert files_under(cfg.path("inbox")) == []


# ---------------------------------------------------------------- queue list / status / retry / remove


def populate(cfg: Config, tmp_path: Path) -> dict[str, QueueEntry]:
    """One file pending in each priority, one processing, one done, one failed (with its .error.json)."""
    q = JobQueue(cfg.path("queue"))
    q.ensure()
    now = time.time()

    def admit(name: str, prio: Priority = Priority.NORMAL) -> QueueEntry:
        src = tmp_path / name
        src.write_text(TEXT * 3, encoding="utf-8")
        return q.admit(src, prio, now)

    e = {"high": admit("h.jsonl", Priority.HIGH), "normal": admit("n.jsonl"), "low": admit("l.jsonl", Priority.LOW)}
    e["processing"] = q.start(admit("p.jsonl"))
    e["done"] = q.finish(q.start(admit("d.jsonl")).job_id)
    e["failed"] = q.fail(q.start(admit("f.jsonl")).job_id, FailReason.TRAINING_ERROR, "CUDA out of memory", now)
    return e


def test_retry_validates_the_file_again(cfg: Config, tmp_path: Path) -> None:
    """A file refused at intake is not trained on retry without its checks: still bad,
    it stays failed with the fresh reason; good now, it is queued with its format known."""
    q = JobQueue(cfg.path("queue"))
    q.ensure()
    bad = tmp_path / "latin.jsonl"
    bad.write_bytes('{"text": "caf\u00e9"}\n'.encode("latin-1"))
    refused = q.reject(bad, {"reason": "invalid_data", "message": "not UTF-8"}, time.time())
    r = trainctl(cfg, "queue", "retry", "latin.jsonl")
    assert r.returncode == 1 and "refused: latin.jsonl still fails validation: " in r.stdout and "UTF-8" in r.stdout, r.stdout
    assert q.find(refused.job_id).state is JobState.FAILED
    assert q.read_error(refused.job_id)["reason"] == "invalid_data" and "line 1" in r.stdout

    fixed = q.folder(JobState.FAILED) / refused.job_id  # the user repairs it in place
    fixed.write_text('{"text": "café"}\n', encoding="utf-8")
    r = trainctl(cfg, "queue", "retry", "latin.jsonl")
    assert (r.returncode, r.stdout) == (0, f"queue retry: {refused.job_id} is now pending\n")
    db = HistoryDB(cfg.path("status") / "history.db")
    record = db.job(refused.job_id)
    db.close()
    assert (record["state"], record["format"], record["n_records"]) == ("pending", "text", 1)


def test_queue_status_and_list(cfg: Config, tmp_path: Path) -> None:
    e = populate(cfg, tmp_path)
    r = trainctl(cfg, "queue", "status")
    assert (r.returncode, r.stdout) == (
        0, "pending_high 1  pending_normal 1  pending_low 1  pending 3  processing 1  done 1  failed 1\n")
    r = trainctl(cfg, "queue", "list")
    assert r.returncode == 0
    lines = r.stdout.splitlines()
    assert [ln for ln in lines if not ln.startswith(" ")] == ["pending (3)", "processing (1)", "done (1)", "failed (1)"]
    assert lines[1:4] == [f"  [{p}] {e[p].job_id}  {SIZE} B" for p in ("high", "normal", "low")]
    assert f"  {e['failed'].job_id}  {SIZE} B  <- training_error: CUDA out of memory" in lines


def test_queue_list_json(cfg: Config, tmp_path: Path) -> None:
    e = populate(cfg, tmp_path)
    r = trainctl(cfg, "queue", "list", "--json")
    assert r.returncode == 0
    body = json.loads(r.stdout)
    assert [x["job_id"] for x in body["pending"]] == [e[p].job_id for p in ("high", "normal", "low")]
    assert [x["priority"] for x in body["pending"]] == ["high", "normal", "low"]
    assert [x["job_id"] for x in body["processing"]] == [e["processing"].job_id]
    assert [x["original_name"] for x in body["done"]] == ["d.jsonl"]
    (failed,) = body["failed"]
    assert failed["error"]["reason"] == "training_error" and failed["error"]["message"] == "CUDA out of memory"
    assert body["pending"][0]["error"] is None


def test_queue_retry_without_daemon(cfg: Config, tmp_path: Path) -> None:
    e = populate(cfg, tmp_path)
    job = e["failed"].job_id
    r = trainctl(cfg, "queue", "retry", "f.jsonl", "--priority", "high")  # by original name
    assert (r.returncode, r.stdout) == (0, f"queue retry: {job} is now pending\n")
    q = JobQueue(cfg.path("queue"))
    assert (q.folder(JobState.PENDING, Priority.HIGH) / job).is_file()
    failed = cfg.path("queue") / "failed"
    assert not (failed / job).exists() and not (failed / (job + ERROR_SUFFIX)).exists()
    assert json.loads((failed / (job + ERROR_SUFFIX + ".prev")).read_text())["reason"] == "training_error"
    assert holder_pid(cfg.path("status") / "daemon.lock") is None  # the lock was let go


def test_queue_remove_without_daemon(cfg: Config, tmp_path: Path) -> None:
    e = populate(cfg, tmp_path)
    job = e["normal"].job_id
    r = trainctl(cfg, "queue", "remove", job)
    assert (r.returncode, r.stdout) == (0, f"queue remove: {job} is now failed\n")
    failed = cfg.path("queue") / "failed"
    assert (failed / job).is_file() and not e["normal"].path.exists()
    assert json.loads((failed / (job + ERROR_SUFFIX)).read_text())["reason"] == "removed"


@pytest.mark.parametrize("which", ["processing", "done", "failed"])
def test_queue_remove_refuses_a_file_that_is_not_pending(cfg: Config, tmp_path: Path, which: str) -> None:
    e = populate(cfg, tmp_path)
    before = files_under(cfg.path("queue"))
    r = trainctl(cfg, "queue", "remove", e[which].job_id)
    assert r.returncode == 1
    assert f"{e[which].job_id} is {which}; only pending files can be removed" in r.stdout
    assert files_under(cfg.path("queue")) == before


def test_queue_retry_of_unknown_name(cfg: Config, tmp_path: Path) -> None:
    populate(cfg, tmp_path)
    before = files_under(cfg.path("queue"))
    r = trainctl(cfg, "queue", "retry", "nothing.jsonl")
    assert r.returncode == 1 and "no queued file named 'nothing.jsonl'" in r.stdout
    assert files_under(cfg.path("queue")) == before


# ---------------------------------------------------------------- status


def write_status(cfg: Config, age: float = 0.0, **fields) -> None:
    st = TrainingStatus(**{
        "status": ServiceStatus.TRAINING, "detail": "training", "current_file": "chat.jsonl",
        "job_id": "20261122T020301Z-000001--chat.jsonl", "current_step": 25, "total_steps": 100, "epoch": 0.25,
        "loss": 1.23456, "lr": 2e-4, "tokens_per_sec": 1234.4, "eta_seconds": 125, "eval_loss": None,
        "queue": {"pending_high": 1, "pending_normal": 2, "pending_low": 0, "pending": 3, "processing": 1, "done": 4, "failed": 0},
        "device": "cpu", "base_model": "embedded:tiny-qwen3", "adapter_version": 2, "write_interval_seconds": 0.5, **fields,
    })
    StatusWriter(cfg.path("status")).write(st, now=time.time() - age)


def test_status_without_status_file(cfg: Config) -> None:
    r = trainctl(cfg, "status")
    assert (r.returncode, r.stdout) == (0, "traind: no status yet (the daemon has never run for this config)\n")


def test_status_fresh(cfg: Config, lock_holder: int) -> None:
    write_status(cfg)
    r = trainctl(cfg, "status")
    assert r.returncode == 0
    lines = r.stdout.splitlines()
    assert lines[0] == f"traind  training   pid {lock_holder}"
    assert "  file     chat.jsonl   (20261122T020301Z-000001--chat.jsonl)" in lines
    assert ("  progress [#######-----------------------]  25.0%  step 25/100  epoch 0.25  ETA 2m 05s") in lines
    assert "  loss     1.2346   eval -   lr 2.00e-04   1,234 tok/s" in lines
    assert "  queue    pending 3 (high 1, normal 2, low 0)  processing 1  done 4  failed 0" in lines
    assert "not responding" not in r.stdout and len(lines) <= 24  # one screen
    assert "ranks" not in r.stdout  # one trainer process: as it always was


def test_status_while_paused_shows_no_rate_and_no_eta(cfg: Config, lock_holder: int) -> None:
    write_status(cfg, status=ServiceStatus.PAUSED)  # an older daemon's status still carried them
    lines = trainctl(cfg, "status").stdout.splitlines()
    assert lines[0] == f"traind  paused   pid {lock_holder}"
    assert "  progress [#######-----------------------]  25.0%  step 25/100  epoch 0.25  ETA -" in lines
    assert "  loss     1.2346   eval -   lr 2.00e-04   - tok/s" in lines


def test_status_of_a_running_daemon_that_cannot_write_its_status_says_why(cfg: Config, lock_holder: int) -> None:
    """Its status is old and its folder is full: the CLI says that, not "not responding" (the daemon cannot)."""
    from daemon.cli.status_cmds import render_status

    write_status(cfg, age=60)
    st = json.loads((cfg.path("status") / "training_status.json").read_text())
    full = render_status(st, lock_holder, lambda: ("full", "the disk of /x is full (0 bytes free)"))
    assert full.splitlines()[0].startswith("traind  paused (disk full)  !! the daemon cannot write its status: the disk "
                                           "of /x is full (0 bytes free); training is held until it can")
    assert "not responding" not in full
    assert "not responding" in render_status(st, lock_holder, lambda: None)


def test_status_shows_each_rank_and_the_slowest(cfg: Config, lock_holder: int) -> None:
    ranks = [RankFigures(rank=0, node=0, host="node-a", device="cuda:0", tokens=1200, compute_seconds=1.0,
                         tokens_per_sec=1200.0, rss_bytes=3 * 2**30, gpu_memory_bytes=5 * 2**30),
             RankFigures(rank=1, node=1, host="node-bb", device="cuda:0", tokens=1100, compute_seconds=1.4,
                         tokens_per_sec=785.7, rss_bytes=int(2.5 * 2**30), gpu_memory_bytes=None)]
    write_status(cfg, world_size=2, distributed=DistributedSetup("ddp", "gloo", 2), ranks=ranks, slowest_rank=1)
    r = trainctl(cfg, "status")
    assert r.returncode == 0
    lines = r.stdout.splitlines()
    i = lines.index("  ranks    2 (ddp, gloo, 2 nodes)")
    assert lines[i + 1:i + 3] == [
        "           rank 0  node-a   cuda:0  1,200 tok/s   RSS 3.0 GiB   GPU 5.0 GiB",
        "           rank 1  node-bb  cuda:0    786 tok/s   RSS 2.5 GiB   <- slowest"]
    body = json.loads(trainctl(cfg, "status", "--json").stdout)
    assert body["world_size"] == 2 and body["slowest_rank"] == 1 and body["distributed"]["nnodes"] == 2
    assert [(x["rank"], x["host"], x["gpu_memory_bytes"]) for x in body["ranks"]] == [(0, "node-a", 5 * 2**30),
                                                                                      (1, "node-bb", None)]



def test_status_of_many_ranks_stays_one_screen() -> None:
    from daemon.cli.status_cmds import RANK_LINES, render_status

    st = TrainingStatus(status=ServiceStatus.TRAINING, world_size=64, slowest_rank=40,
                        ranks=[RankFigures(rank=r, host="h", device="cpu", tokens_per_sec=100.0) for r in range(64)]).to_dict()
    text = render_status(st, None)
    assert text.count(" tok/s   RSS") == RANK_LINES + 1 and "rank 40  h  cpu  100 tok/s   RSS -   <- slowest" in text
    assert f"... and {64 - RANK_LINES - 1} more (trainctl status --json)" in text


def test_status_stale_while_lock_is_held(cfg: Config, lock_holder: int) -> None:
    write_status(cfg, age=90)
    r = trainctl(cfg, "status")
    assert r.returncode == 0
    assert r.stdout.splitlines()[0].startswith("traind  training  !! no status update for 1m 3")
    assert "daemon not responding" in r.stdout and f"pid {lock_holder}" in r.stdout


def test_status_without_lock_holder(cfg: Config) -> None:
    write_status(cfg)
    r = trainctl(cfg, "status")
    assert r.returncode == 0
    assert r.stdout.splitlines()[0] == "traind  not running (last said: training)"
    assert "not responding" not in r.stdout


def test_status_json(cfg: Config) -> None:
    write_status(cfg)
    r = trainctl(cfg, "status", "--json")
    assert r.returncode == 0
    body = json.loads(r.stdout)
    assert body == json.loads((cfg.path("status") / "training_status.json").read_text())
    assert (body["status"], body["current_step"], body["schema_version"]) == ("training", 25, 1)


def test_status_json_without_status_file(cfg: Config) -> None:
    r = trainctl(cfg, "status", "--json")
    assert r.returncode == 0 and json.loads(r.stdout) is None


# ---------------------------------------------------------------- control without a daemon


def test_pause_and_resume_without_daemon_record_the_desired_state(cfg: Config) -> None:
    desired = cfg.path("status") / "control" / "desired_state.json"
    r = trainctl(cfg, "pause")
    assert (r.returncode, r.stdout) == (0, "pause: recorded; the daemon is not running and will start paused\n")
    assert json.loads(desired.read_text())["state"] == "paused"
    r = trainctl(cfg, "resume")
    assert (r.returncode, r.stdout) == (0, "resume: recorded; the daemon is not running and will start running\n")
    body = json.loads(desired.read_text())
    assert (body["state"], body["by"]) == ("running", "cli")


def test_skip_without_daemon_fails(cfg: Config) -> None:
    write_status(cfg)  # even with a file named in a leftover status
    r = trainctl(cfg, "skip")
    assert (r.returncode, r.stdout) == (1, "skip: the daemon is not running; nothing is training\n")
    assert files_under(cfg.path("status") / "control") == []


def test_stop_without_daemon(cfg: Config) -> None:
    r = trainctl(cfg, "stop")
    assert (r.returncode, r.stdout) == (0, "stop: the daemon is not running\n")
    assert files_under(cfg.path("status") / "control") == []
    assert not (cfg.root / ".stop").exists()


def test_config_from_environment(cfg: Config) -> None:
    env = dict(os.environ, TRAIND_CONFIG=str(cfg.root / "config.json"))
    r = subprocess.run([sys.executable, "-m", "daemon.cli", "queue", "status"], capture_output=True, text=True,
                       cwd=REPO, env=env, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("pending_high 0")


def test_queue_retry_refuses_a_file_that_is_not_failed(cfg: Config, tmp_path: Path, lock_holder: int) -> None:
    e = populate(cfg, tmp_path)
    r = trainctl(cfg, "queue", "retry", e["done"].job_id)  # refused before any request is left for the daemon
    assert r.returncode == 1 and f"{e['done'].job_id} is done; only failed files can be retried" in r.stdout
    assert files_under(cfg.path("status") / "control") == []


def test_retry_leaves_no_reason_file_listed_as_a_job(cfg: Config, tmp_path: Path) -> None:
    e = populate(cfg, tmp_path)
    assert trainctl(cfg, "queue", "retry", e["failed"].job_id).returncode == 0
    r = trainctl(cfg, "queue", "status")
    assert "failed 0" in r.stdout  # the kept `.error.json.prev` is not a queued file


def test_queue_status_of_one_file_shows_its_record(cfg: Config, tmp_path: Path) -> None:
    from daemon.history_db import HistoryDB
    e = populate(cfg, tmp_path)
    db = HistoryDB(cfg.path("status") / "history.db")
    db.upsert_job(e["done"].job_id, format="chat", n_records=40, n_bad=12, final_loss=1.25, adapter_version=3,
                  bad_lines=[{"line": n, "field": "text", "reason": "must be a string"} for n in range(1, 13)])
    db.close()
    r = trainctl(cfg, "queue", "status", "d.jsonl")
    assert r.returncode == 0
    assert "state     done" in r.stdout and "final_loss 1.25" in r.stdout and "adapter_version 3" in r.stdout
    assert "bad line  line 1, field text: must be a string" in r.stdout and "... and 2 more" in r.stdout
    r = trainctl(cfg, "queue", "status", e["failed"].job_id)
    assert "failed    training_error: CUDA out of memory" in r.stdout


def test_queue_add_warns_about_lines_it_will_skip(cfg: Config, tmp_path: Path) -> None:
    src = tmp_path / "some_bad.jsonl"
    src.write_text(TEXT * 30 + '{"text": 5}\n', encoding="utf-8")
    r = trainctl(cfg, "queue", "add", str(src))
    assert r.returncode == 0
    assert "1 bad line(s) will be skipped" in r.stdout and "line 31, field text" in r.stdout
    assert files_under(cfg.path("inbox")) == ["some_bad.jsonl"]


def test_status_watch_piped_writes_no_screen_codes(cfg: Config) -> None:
    write_status(cfg)
    proc = subprocess.Popen([sys.executable, "-m", "daemon.cli", "--config", str(cfg.root / "config.json"),
                             "status", "--watch", "0.2"], stdout=subprocess.PIPE, text=True, cwd=REPO,
                            # a shell's background job (CI, nohup ... &) hands SIGINT down ignored: undo that
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(2.0)
    proc.send_signal(signal.SIGINT)
    try:
        text, _ = proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert proc.returncode == 0 and "\x1b[" not in text
    assert text.count("--- ") >= 2 and text.count("traind") >= 2  # one screen after another


@pytest.mark.parametrize("interval", ["-1", "0", "soon"])
def test_status_watch_refuses_a_bad_interval_with_a_usage_message(cfg: Config, interval: str) -> None:
    r = trainctl(cfg, "status", "--watch", interval)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "--watch" in r.stderr and interval in r.stderr


def test_status_reads_any_iso_time_and_survives_a_garbled_one() -> None:
    from daemon.cli.status_cmds import render_status
    base = {"status": "idle", "queue": {}}
    now = time.time()
    offset = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(now - 30))
    assert re.search(r"updated  3[0-2]s ago", render_status({**base, "updated_at": offset}, None))
    assert "updated  never" in render_status({**base, "updated_at": "yesterday-ish"}, None)


# ---------------------------------------------------------------- a broken config.json beside a running daemon (#26.9)


def hold_lock(cfg: Config) -> subprocess.Popen:
    """A process that holds the daemon lock, as a running daemon does."""
    code = ("import sys, time; from daemon.lock import acquire; acquire(sys.argv[1]); "
            "print('locked', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(cfg.path("status") / "daemon.lock")],
                            stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert proc.stdout is not None and proc.stdout.readline() == "locked\n"
    return proc


@pytest.mark.parametrize("status_dir, damage", [("state", "typo"), ("status", "not JSON")])
def test_a_running_instance_stays_readable_and_stoppable_with_config_json_broken(tmp_path: Path, status_dir: str,
                                                                                damage: str) -> None:
    """A typo in config.json while the daemon runs: status, health, pause and stop read the config the daemon
    runs with (status/running_config.json, found through the file's paths.status, else the default), say so
    once on stderr, and act; what would change the config's meaning still refuses."""
    from daemon import atomic
    from daemon.config import resolved_dict
    from daemon.service import RUNNING_CONFIG

    path = write_instance(tmp_path / "inst", paths={"status": status_dir})
    cfg = load_config(path)
    write_status(cfg)
    atomic.write_json(cfg.path("status") / RUNNING_CONFIG, resolved_dict(cfg))  # as the daemon does at start
    text = path.read_text()
    path.write_text(text.replace('"learning_rate"', '"learnig_rate"') if damage == "typo" else text[:-3])
    problem = "`training.learnig_rate` is not a known key" if damage == "typo" else "not valid JSON at line"

    r = trainctl(path, "status")  # no daemon: the config error, as before
    assert r.returncode == 1 and problem in r.stdout and r.stderr == ""
    holder = hold_lock(cfg)
    try:
        write_status(cfg)
        r = trainctl(path, "status")
        assert r.returncode == 0, r.stdout + r.stderr
        headline = r.stdout.splitlines()[0]  # (on a busy machine it may add that the status is a second old)
        assert headline.startswith("traind  training") and headline.endswith(f"pid {holder.pid}"), headline
        assert r.stderr.startswith(f"trainctl: {path} has 1 problem(s):\n") and problem in r.stderr
        assert r.stderr.count("\n") == 3 and r.stderr.endswith(
            f"trainctl: using the config the running daemon (pid {holder.pid}) started with "
            f"({cfg.path('status') / RUNNING_CONFIG}); fix {path} before it starts again\n"), r.stderr

        r = trainctl(path, "health")
        assert "FAIL  config      " in r.stdout and problem in r.stdout and r.returncode == 2, r.stdout
        r = trainctl(path, "pause", "--no-wait")
        assert (r.returncode, r.stdout) == (0, "pause: requested\n") and problem in r.stderr
        assert json.loads((cfg.path("status") / "control" / "desired_state.json").read_text())["state"] == "paused"
        r = trainctl(path, "stop", "--no-wait")
        assert (r.returncode, r.stdout) == (0, f"stop: requested (pid {holder.pid})\n") and problem in r.stderr
        assert [p.read_text().count('"stop"') for p in (cfg.path("status") / "control" / "requests").iterdir()] == [1]

        for refused in (("config", "approve"), ("queue", "add", str(EXAMPLES / "chat.jsonl"))):
            r = trainctl(path, *refused)
            assert r.returncode == 1 and problem in r.stdout and "running daemon" not in r.stdout + r.stderr, refused
        assert not (cfg.path("queue") / "pending").exists() or files_under(cfg.path("queue") / "pending") == []
    finally:
        holder.kill()
        holder.wait()


# ---------------------------------------------------------------- eval on what is not a file (#26.11)


@pytest.mark.parametrize("what, said", [("missing", "no such file"), ("folder", "is a directory")])
def test_eval_refuses_what_is_not_a_readable_file_before_loading_a_model(cfg: Config, tmp_path: Path, what: str,
                                                                         said: str) -> None:
    target = tmp_path / "data"
    if what == "folder":
        target.mkdir()
    r = subprocess.run([sys.executable, "-m", "daemon.cli", "--config", str(cfg.root / "config.json"), "eval", "data",
                        "--adapter", "none"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert (r.returncode, r.stdout, r.stderr) == (1, f"trainctl: eval: data: {said}\n", "")
    assert not cfg.path("models").exists()  # refused before any model was built or loaded


# ---------------------------------------------------------------- config explain shows the value and the default


def test_config_explain_shows_the_value_in_the_config_beside_the_default(tmp_path: Path) -> None:
    path = write_instance(tmp_path / "inst", training={"learning_rate": 0.002})
    r = trainctl(path, "config", "explain")
    assert r.returncode == 0
    lines = r.stdout.splitlines()
    assert lines[0] == f"config explain: {path} (* where it differs from the default)"
    assert "* training.learning_rate = 0.002   (default 0.0002)" in lines
    assert '  training.schedule = "cosine"   (default)' in lines
    assert "  training.weight_decay = 0.0   (default)" in lines


def test_config_explain_works_on_a_config_that_does_not_load(tmp_path: Path) -> None:
    path = write_instance(tmp_path / "inst", training={"learning_rate": 0.002, "learnig_rate": 1})
    r = trainctl(path, "config", "explain")
    assert r.returncode == 0
    lines = r.stdout.splitlines()
    assert lines[0] == (f"config explain: {path} does not load (1 problem(s); `trainctl config validate` lists them): "
                        "the values it sets, where they fit (* where they differ from the default)")
    assert "* training.learning_rate = 0.002   (default 0.0002)" in lines
    path.write_text("{")
    r = trainctl(path, "config", "explain")
    assert r.returncode == 0
    lines = r.stdout.splitlines()
    assert lines[0].startswith(f"config explain: {path} does not load (not valid JSON at line 1")
    assert lines[0].endswith("): the defaults only")
    assert "  training.learning_rate   (default 0.0002)" in lines
