"""Helpers for the monitor tests: a temporary instance, a fake daemon that writes
status and history like the service does, and the monitor as a real subprocess."""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import psutil

from daemon import activity_summary
from daemon.config import Config, load_config
from daemon.jobqueue import JobQueue
from daemon.schema import TrainingStatus
from daemon.states import DesiredState, ServiceStatus
from daemon.history_db import HISTORY_FILE, HistoryDB
from daemon.status import StatusWriter

REPO = Path(__file__).resolve().parent.parent
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_instance(root: Path, **sections: Any) -> Config:
    """A complete instance in `root`: config.json with relative paths, runtime folders made."""
    raw = {"paths": {"inbox": "inbox", "queue": "queue", "status": "status", "adapters": "adapters",
                     "checkpoints": "checkpoints", "logs": "logs", "models": "models"}, **sections}
    (root / "config.json").write_text(json.dumps(raw, indent=2))
    cfg = load_config(root / "config.json")
    JobQueue(cfg.path("queue")).ensure()
    for sub in ("", "high", "low"):
        (cfg.path("inbox") / sub).mkdir(parents=True, exist_ok=True)
    cfg.path("status").mkdir(parents=True, exist_ok=True)
    return cfg


class FakeDaemon:
    """Writes what the service writes, with this test process as the 'daemon' pid (so it is alive)."""

    def __init__(self, cfg: Config, pid: int | None = None) -> None:
        self.cfg = cfg
        self.writer = StatusWriter(cfg.path("status"))
        self.db = HistoryDB(cfg.path("status") / HISTORY_FILE)
        self.pid = os.getpid() if pid is None else pid
        self.started_at = psutil.Process(os.getpid()).create_time() + 0.5
        self.rng = random.Random(7)
        self.global_step = 0

    def status(self, now: float | None = None, **fields: Any) -> dict:
        fields.setdefault("status", ServiceStatus.TRAINING)
        fields["status"] = ServiceStatus(fields["status"])
        fields["desired_state"] = DesiredState(fields.get("desired_state", "running"))
        st = TrainingStatus(pid=self.pid, started_at=self.started_at, global_step=self.global_step, **fields)
        self.writer.write(st, now=now)
        return st.to_dict()

    def steps(self, n: int, job_id: str = "20261122T020301Z-000001--data.jsonl") -> None:
        with self.db.conn:  # one transaction: fast, and a reader sees all or none
            for _ in range(n):
                g = self.global_step
                loss = 2.5 * math.exp(-g / 300) + 0.4 + self.rng.gauss(0, 0.05)
                self.db.conn.execute("INSERT OR REPLACE INTO metrics (job_id, step, global_step, epoch, loss, lr, grad_norm, tokens_per_sec, t) VALUES (?,?,?,?,?,?,?,?,?)",
                                     (job_id, g, g, g / 1000, loss, 2e-4 * min(1, (g + 1) / 20), 0.8, 900 + self.rng.gauss(0, 30), time.time()))
                self.global_step += 1

    def eval(self, eval_loss: float, job_id: str = "20261122T020301Z-000001--data.jsonl") -> None:
        self.db.record_eval(job_id, self.global_step - 1, self.global_step - 1, eval_loss, time.time())

    def activity(self, step: int, n_layers: int = 2, kinds: tuple[str, ...] = ATTENTION, final: bool = False,
                 job_id: str = "20261122T020301Z-000001--data.jsonl", t: float | None = None,
                 frozen_below: int | None = None, intruders: bool = False) -> Any:
        """Record one activity sample as the service does (history row); returns the status block for status().
        `frozen_below`: layers under it frozen (lora.freeze_stalled); `intruders`: counts (activity.intruders)."""
        msg = synthetic_activity(step, self.global_step, n_layers, kinds, self.rng, job_id, final)
        if frozen_below is not None:
            msg["values"]["frozen"] = [[1.0 if i < frozen_below else 0.0 for _ in kinds] for i in range(n_layers)]
        if intruders:
            msg["values"]["intruders"] = [[float((i * 7 + j) % 5 == 0) * (1 + i // 10) for j in range(len(kinds))]
                                          for i in range(n_layers)]
        now = time.time() if t is None else t
        self.db.record_activity(job_id, step, self.global_step, now, final, msg["layers"], msg["kinds"],
                                activity_summary.per_layer(msg, activity_summary.HISTORY_MEASURES), msg["values"])
        return activity_summary.summary(msg, now)



def synthetic_activity(step: int, global_step: int, n_layers: int, kinds: tuple[str, ...], rng: random.Random,
                       job_id: str = "job", final: bool = False) -> dict[str, Any]:
    """An `activity` message as the trainer sends it, with plausible numbers: updates grow with the
    square root of the step, later layers and v/o/down move more, a little noise."""
    def cell(i: int, j: int) -> dict[str, float]:
        base = 8.0 * (1.5 if kinds[j] in ("gate_proj", "up_proj", "down_proj") else 1.0)
        profile = (0.4 + i / max(1, n_layers - 1)) * (1.6 if kinds[j] in ("v_proj", "o_proj", "down_proj") else 1.0)
        update = base * 2e-3 * math.sqrt(step + 1) * profile * (1 + 0.1 * rng.random())
        change = update * 0.05 * (0.5 + rng.random())
        return {"update": update, "relative": update / base, "change": change, "grad_a": 0.01 * profile * rng.random(),
                "grad_b": 0.02 * profile * rng.random(), "base": base}
    cells = [[cell(i, j) for j in range(len(kinds))] for i in range(n_layers)]
    measures = ("update", "relative", "change", "grad_a", "grad_b", "base")
    return {"type": "activity", "job_id": job_id, "step": step, "global_step": global_step, "final": final,
            "layers": list(range(n_layers)), "kinds": list(kinds),
            "values": {m: [[c[m] for c in row] for row in cells] for m in measures}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def uvicorn_on_loopback(app: Any) -> Iterator[str]:
    """`app` on a real uvicorn at 127.0.0.1 (a free port), in a thread, for the block; yields its URL."""
    import threading

    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        t.join(10)


def token_of(cfg: Config) -> str:
    return (cfg.path("status") / "monitor_token").read_text().strip()


@contextlib.contextmanager
def monitor_process(cfg: Config, port: int | None = None, host: str = "127.0.0.1",
                    log_path: Path | None = None) -> Iterator[str]:
    """`python -m monitor` for `cfg` on loopback; yields its base URL, stops it with SIGTERM."""
    port = port or free_port()
    log = open(log_path or (cfg.root / "monitor.log"), "ab")
    proc = subprocess.Popen([sys.executable, "-m", "monitor", "--config", str(cfg.root / "config.json"),
                             "--host", host, "--port", str(port), "--log-level", "warning"],
                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://{host}:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"monitor exited with {proc.returncode}; see {log.name}")
            try:
                if httpx.get(url + "/api/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("monitor did not answer within 20 s")
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
