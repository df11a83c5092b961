"""A real traind instance driven from outside, as a user would: its config, the daemon as a process, its files.

    path = write_instance(tmp / "inst", models_dir, training={"learning_rate": 0.01})   # a fast config.json
    d = Daemon(path).start()
    d.drop("a.jsonl", lines_of("chat.jsonl", 20))          # into the inbox: temp name, then rename
    d.wait_for(lambda st: st["status"] == "training", timeout=60)
    d.ctl("pause")                                         # trainctl as a subprocess
    d.kill9()                                              # or d.stop() for a graceful stop

The tests (tests/) and the benchmarks that run the daemon (the soak, perf's
daemon runs) share it. Every wait is scaled by TRAIND_TEST_TIME_SCALE (a busy
machine waits longer on its conditions rather than failing them).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from daemon.config import load_config
from daemon.history_db import HistoryDB
from daemon.jobqueue import JobQueue
from daemon.status import read_status

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(base.get(k, {}), v) if isinstance(v, dict) else v
    return out


# Small and quick: a few seconds of training per file on 2 shared cores.
FAST: dict[str, Any] = {
    "intake": {"settle_seconds": 0.3, "scan_interval_seconds": 0.5},
    "data": {"max_length": 64, "eval_fraction": 0.1, "eval_max_examples": 8},
    "model": {"quantization": "none"},
    "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
    "training": {"micro_batch_size": 4, "learning_rate": 0.02, "warmup_steps": 2, "checkpoint_every_steps": 5, "cpu_threads": 1},
    "activity": {"every_steps": 10, "min_interval_seconds": 0.0},
    "service": {"status_interval_seconds": 0.5, "restart_backoff_seconds": 0.2, "stop_timeout_seconds": 60.0},
    "serve": {"enabled": False},  # start_all.sh starts it only where a test or bench asks for it
}


def write_instance(folder: Path, models_dir: Path | None = None, **overrides: Any) -> Path:
    """Write a config.json into `folder` (relative runtime paths) and return its path."""
    folder.mkdir(parents=True, exist_ok=True)
    raw = _merge(FAST, overrides)
    if models_dir is not None:
        raw = _merge(raw, {"paths": {"models": str(models_dir)}})
    path = folder / "config.json"
    path.write_text(json.dumps(raw, indent=2))
    return path


def lines_of(name: str, n: int | None = None) -> str:
    text = (EXAMPLES / name).read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    return "".join(lines[:n] if n else lines)


def time_scale() -> float:
    """How much longer than on a quiet machine a wait may take here: `TRAIND_TEST_TIME_SCALE` (tests/conftest.py
    sets it from the load at the session's start), else 1. Every timeout below is multiplied by it, so a slow
    or busy machine waits longer on its conditions rather than failing them."""
    try:
        return max(1.0, float(os.environ.get("TRAIND_TEST_TIME_SCALE", "1")))
    except ValueError:
        return 1.0


class Daemon:
    def __init__(self, config_path: Path, env: dict[str, str] | None = None) -> None:
        self.config_path = Path(config_path)
        self.cfg = load_config(config_path)
        self.env = dict(os.environ, **(env or {}))
        self.proc: subprocess.Popen | None = None
        self.queue = JobQueue(self.cfg.path("queue"))

    # -- process ---------------------------------------------------------------
    def start(self, new_session: bool = False) -> "Daemon":
        """`new_session`: the daemon leads its own process group (and session), so that
        `os.killpg(d.proc.pid, SIGKILL)` kills it as a whole without reaching the test."""
        log = open(self.cfg.root / "daemon_test_stdout.log", "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "daemon", "--config", str(self.config_path)],
                                     cwd=REPO, env=self.env, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                     start_new_session=new_session)
        log.close()  # the child has its own copy
        return self

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout: float = 90) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout * time_scale())

    def wait_exit(self, timeout: float = 90) -> int:
        return self.proc.wait(timeout * time_scale())

    def close(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        pid = (self.status() or {}).get("trainer_pid")
        if pid:  # the child dies with its parent; make sure before the tmp tree goes
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    # -- observation --------------------------------------------------------------
    def status(self) -> dict[str, Any] | None:
        return read_status(self.cfg.path("status"))

    def wait_for(self, pred: Callable[[dict], bool], timeout: float = 120, what: str = "") -> dict:
        deadline = time.time() + timeout * time_scale()
        st: dict = {}
        while time.time() < deadline:
            st = self.status() or {}
            if st and pred(st):
                return st
            if self.proc and self.proc.poll() is not None:
                raise AssertionError(f"daemon exited ({self.proc.returncode}) while waiting for {what}; log:\n{self.log_tail()}")
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}; last status {json.dumps(st)[:800]}\n{self.log_tail()}")

    def wait_counts(self, timeout: float = 120, **want: int) -> dict:
        return self.wait_for(lambda st: all(self.queue.counts()[k] == v for k, v in want.items()), timeout, f"queue {want}")

    def history(self) -> HistoryDB:
        return HistoryDB.open_readonly(self.cfg.path("status") / "history.db")

    def losses(self) -> list[tuple[int, float]]:
        db = self.history()
        try:
            return [(r["global_step"], r["loss"]) for r in db.steps()]
        finally:
            db.close()

    def log_tail(self, n: int = 40) -> str:
        out = []
        for p in sorted(self.cfg.path("logs").glob("*.log")) + [self.cfg.root / "daemon_test_stdout.log"]:
            if p.exists():
                out.append(f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-n:]))
        return "\n".join(out)

    # -- actions ---------------------------------------------------------------------
    def drop(self, name: str, text: str | bytes, sub: str = "") -> Path:
        """Write a file into the inbox the way a careful producer does: temp name, then rename."""
        folder = self.cfg.path("inbox") / sub
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / (name + ".part")
        tmp.write_bytes(text.encode() if isinstance(text, str) else text)
        os.replace(tmp, folder / name)
        return folder / name

    def ctl(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "daemon.cli", "--config", str(self.config_path), *args],
                              cwd=REPO, env=self.env, capture_output=True, text=True, timeout=timeout * time_scale())
