"""bench/perf.py's `daemon` section, and what the `flops` section computes with.

The real daemon trains the same file as the bare loop (bench/perf_runs.py
traind), on a temporary instance; its rate is the file's real tokens over the
time from its `job_started` event to its last step in history.db. Then the
same with the monitor running and a client that polls status, history and
queue and holds an event stream open, at 1 Hz (a dashboard tab) and at 10 Hz;
that client's latencies are the API figures. Inbox -> first step: a file
renamed into the inbox of an idle daemon (warm), and a daemon started with a
file waiting (cold), to the `t` of the file's first step.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


# ---------------------------------------------------------------- the daemon


def instance(root: Path, base: Path, threads: int) -> Path:
    conf = {
        "base_model": str(base), "intake": {"settle_seconds": 1.0, "scan_interval_seconds": 0.5},  # the default settle
        "data": {"max_length": 1024, "eval_fraction": 0.0},
        "model": {"quantization": "none"},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0,
                 "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]},
        "training": {"micro_batch_size": 8, "learning_rate": 2e-4, "warmup_steps": 0, "schedule": "constant",
                     "checkpoint_every_steps": 20, "cpu_threads": threads},
    }
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(conf, indent=2))
    return root / "config.json"


class Stack:
    """A daemon (and optionally its monitor) on one instance, as processes."""

    def __init__(self, config: Path) -> None:
        from daemon.config import load_config

        self.config, self.cfg = config, load_config(config)
        self.procs: list[subprocess.Popen] = []
        self.url: str | None = None

    def start_daemon(self) -> float:
        log = open(self.cfg.root / "stdout.log", "ab")
        self.procs.append(subprocess.Popen([sys.executable, "-m", "daemon", "--config", str(self.config)], cwd=REPO,
                                           stdout=log, stderr=log))
        return time.time()

    def start_monitor(self, port: int) -> str:
        import httpx

        log = open(self.cfg.root / "monitor.log", "ab")
        self.procs.append(subprocess.Popen([sys.executable, "-m", "monitor", "--config", str(self.config), "--port",
                                            str(port), "--log-level", "warning"], cwd=REPO, stdout=log, stderr=log))
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                if httpx.get(self.url + "/api/health", timeout=1).status_code == 200:
                    return self.url
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError("the monitor did not come up")

    def status(self) -> dict:
        from daemon.status import read_status

        return read_status(self.cfg.path("status")) or {}

    def wait(self, pred: Any, timeout: float = 1800, what: str = "") -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            st = self.status()
            if pred(st):
                return st
            if self.procs and self.procs[0].poll() is not None:
                raise RuntimeError(f"the daemon exited ({what}); see {self.cfg.root}")
            time.sleep(0.2)
        raise TimeoutError(what)

    def drop(self, src: Path, name: str) -> float:
        inbox = self.cfg.path("inbox")
        inbox.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, inbox / f"{name}.part")
        os.replace(inbox / f"{name}.part", inbox / name)
        return time.time()

    def job_times(self, original: str) -> tuple[float, float, float, int]:
        """(started event t, first step t, last step t, steps) of the file named `original`."""
        from daemon.history_db import HISTORY_FILE, HistoryDB

        db = HistoryDB.open_readonly(self.cfg.path("status") / HISTORY_FILE)
        try:
            job = next(j for j in db.jobs(10_000) if j["original_name"] == original)
            started = max(e["t"] for e in db.events(10_000) if e["kind"] == "job_started" and e["job_id"] == job["job_id"])
            steps = db.steps(job["job_id"])
        finally:
            db.close()
        return started, steps[0]["t"], steps[-1]["t"], len(steps)

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.terminate()
            try:
                p.wait(120)
            except subprocess.TimeoutExpired:
                p.kill()
        self.procs.clear()


class Poller(threading.Thread):
    """A dashboard's traffic: every 1/hz s status, history since the last step, queue; one event stream open."""

    def __init__(self, url: str, token: str, hz: float) -> None:
        super().__init__(daemon=True)
        self.url, self.headers, self.period = url, {"X-Traind-Token": token}, 1.0 / hz
        self.latency: dict[str, list[float]] = {"/api/status": [], "/api/history": [], "/api/queue": []}
        self.halt = threading.Event()

    def run(self) -> None:
        import httpx

        threading.Thread(target=self._events, daemon=True).start()
        with httpx.Client(base_url=self.url, headers=self.headers, timeout=30) as c:
            since = -1
            while not self.halt.wait(self.period):
                for path in self.latency:
                    t0 = time.perf_counter()
                    r = c.get(path, params={"since": since, "max_points": 2000} if path == "/api/history" else None)
                    self.latency[path].append((time.perf_counter() - t0) * 1000)
                    if path == "/api/history" and r.status_code == 200 and r.json()["last_global_step"] is not None:
                        since = r.json()["last_global_step"]

    def _events(self) -> None:
        import httpx

        try:
            with httpx.stream("GET", self.url + "/api/events", headers=self.headers, timeout=None) as r:
                for _ in r.iter_lines():
                    if self.halt.is_set():
                        return
        except httpx.HTTPError:
            return


def real_tokens(base: Path, data: Path) -> int:
    from transformers import AutoTokenizer

    from daemon.config import DataConfig
    from daemon.train.data import train_examples
    from daemon.validate import DataFormat

    tok = AutoTokenizer.from_pretrained(base)
    return sum(len(ex.input_ids) for ex in train_examples(data, DataFormat.PROMPT_COMPLETION, tok,
                                                          DataConfig(max_length=1024, eval_fraction=0.0), 0, 0))


def e2e(base: Path, data: Path, threads: int, hz: float | None, root: Path) -> dict[str, Any]:
    """One file through a fresh daemon (and monitor + client at `hz`); tokens/s, API latencies, warm latency."""
    from bench.monitor_latency import pct

    stack = Stack(instance(root, base, threads))
    poller = None
    try:
        stack.start_daemon()
        stack.wait(lambda s: s.get("status") == "idle" and s.get("device"), 600, "the trainer ready")
        if hz:
            url = stack.start_monitor(18000 + int(hz * 10) % 1000)
            poller = Poller(url, (stack.cfg.path("status") / "monitor_token").read_text().strip(), hz)
            poller.start()
        stack.drop(data, "data.jsonl")
        stack.wait(lambda s: (s.get("queue") or {}).get("done") == 1 and s.get("status") == "idle", what="the file done")
        started, _, last, steps = stack.job_times("data.jsonl")
        out: dict[str, Any] = {"tokens_per_sec": real_tokens(base, data) / (last - started), "steps": steps,
                               "step_seconds": (last - started) / steps}
        if poller is not None:
            poller.halt.set()
            out["api_ms"] = {p: {"p50": statistics.median(v), "p99": pct(v, 99), "n": len(v)}
                             for p, v in poller.latency.items() if v}
        out["inbox_to_first_step_warm"] = warm_latency(stack, data)
        return out
    finally:
        stack.stop()


def warm_latency(stack: Stack, data: Path) -> dict[str, float]:
    """An idle daemon, the model loaded: a small file renamed into the inbox, to its first step recorded.

    Split with the version's step log (daemon/adapters.py STEP_LOG): that first step's own compute
    (tokens / tokens_per_sec) and everything before it (intake, validation, queue, dispatch, the pass over
    the file, the step's report reaching the history)."""
    from daemon import adapters

    small = stack.cfg.root / "small.jsonl"
    small.write_text("\n".join(data.read_text(encoding="utf-8").splitlines()[:16]) + "\n", encoding="utf-8")
    dropped = stack.drop(small, "small.jsonl")
    stack.wait(lambda s: (s.get("queue") or {}).get("done") == 2 and s.get("status") == "idle", what="the small file")
    started, first, _, _ = stack.job_times("small.jsonl")
    log = adapters.read_step_log(adapters.read_current(stack.cfg.path("adapters")).path)
    step = log[0]["tokens"] / log[0]["tokens_per_sec"]
    return {"latency": first - dropped, "to_started": started - dropped, "first_step_seconds": step,
            "overhead": first - dropped - step}


def cold_latency(base: Path, data: Path, threads: int, root: Path) -> float:
    """A file waiting in the inbox when the daemon starts: from the start to its first step."""
    stack = Stack(instance(root, base, threads))
    small = root / "small.jsonl"
    small.write_text("\n".join(data.read_text(encoding="utf-8").splitlines()[:16]) + "\n", encoding="utf-8")
    try:
        stack.drop(small, "small.jsonl")
        start = stack.start_daemon()
        stack.wait(lambda s: (s.get("queue") or {}).get("done") == 1, 600, "the small file")
        return stack.job_times("small.jsonl")[1] - start
    finally:
        stack.stop()


def bare(base: Path, data: Path, heldout: Path, threads: int, out: Path) -> float:
    from bench.perf_runs import one_run

    return one_run("traind", base, data, heldout, "none", threads, out)["tokens_per_sec"]


def daemon_section(args: Any, prep: dict) -> dict[str, Any]:
    model = args.models.split(",")[0]
    kind = "realistic" if "realistic" in args.data else args.data.split(",")[0]
    base, data, heldout = prep["bases"][model], prep["data"][kind][model], prep["data"][kind]["heldout"]
    root = Path(tempfile.mkdtemp(prefix="traind-perf-daemon-", dir=args.work))
    rounds: list[dict[str, Any]] = []
    for k in range(args.pairs):
        r = {"bare": bare(base, data, heldout, args.threads, root / f"bare-{k}.json")}
        for label, hz in (("daemon", None), ("daemon + dashboard 1 Hz", 1.0), ("daemon + 10 Hz", 10.0)):
            r[label] = e2e(base, data, args.threads, hz, root / f"{k}-{label.replace(' ', '_')}")
            print(f"  round {k + 1}: {label}: {r[label]['tokens_per_sec']:.0f} tok/s (bare {r['bare']:.0f})", flush=True)
        rounds.append(r)
    cold = cold_latency(base, data, args.threads, root / "cold")
    return {"model": model, "data": kind, "rounds": rounds, "cold_inbox_to_first_step": cold,
            **summary(rounds)}


def summary(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    med = statistics.median
    out: dict[str, Any] = {
        "daemon_over_bare": med(r["daemon"]["tokens_per_sec"] / r["bare"] for r in rounds),
        "slowdown_dashboard_1hz": med(1 - r["daemon + dashboard 1 Hz"]["tokens_per_sec"] / r["daemon"]["tokens_per_sec"] for r in rounds),
        "slowdown_10hz": med(1 - r["daemon + 10 Hz"]["tokens_per_sec"] / r["daemon"]["tokens_per_sec"] for r in rounds),
        "warm_inbox_to_first_step": med(r["daemon"]["inbox_to_first_step_warm"]["latency"] for r in rounds),
        "warm_first_step_seconds": med(r["daemon"]["inbox_to_first_step_warm"]["first_step_seconds"] for r in rounds),
        "warm_overhead": med(r["daemon"]["inbox_to_first_step_warm"]["overhead"] for r in rounds),
        "warm_to_started": med(r["daemon"]["inbox_to_first_step_warm"]["to_started"] for r in rounds),
        "step_seconds": med(r["daemon"]["step_seconds"] for r in rounds),
    }
    for label in ("daemon + dashboard 1 Hz", "daemon + 10 Hz"):
        api = [r[label].get("api_ms", {}) for r in rounds]
        out[f"api_{label}"] = {p: {"p50": med(a[p]["p50"] for a in api if p in a), "p99": max(a[p]["p99"] for a in api if p in a)}
                               for p in api[0]}
    return out


def markdown_lines(d: dict[str, Any]) -> list[str]:
    lines = [f"## The daemon around the loop ({d['model']} model, {d['data']} data)", "",
             "| measure | value |", "| --- | --- |",
             f"| daemon end to end / bare loop (tokens/s) | {d['daemon_over_bare']:.3f} |",
             f"| slowdown with the dashboard open (1 Hz polls + event stream) | {d['slowdown_dashboard_1hz']:.1%} |",
             f"| slowdown at 10 Hz | {d['slowdown_10hz']:.1%} |",
             f"| inbox -> first step, warm (a step takes {d['step_seconds']:.2f} s) | {d['warm_inbox_to_first_step']:.2f} s |",
             f"| ... of which that first step's own compute | {d['warm_first_step_seconds']:.2f} s |",
             f"| ... and everything else (intake to `started`: {d['warm_to_started']:.2f} s) | {d['warm_overhead']:.2f} s |",
             f"| inbox -> first step, cold (from the daemon's start) | {d['cold_inbox_to_first_step']:.2f} s |"]
    for label in ("daemon + dashboard 1 Hz", "daemon + 10 Hz"):
        for path, v in d[f"api_{label}"].items():
            lines.append(f"| {path} while training, {label.split('+ ')[1]}: p50 / p99 | {v['p50']:.1f} / {v['p99']:.1f} ms |")
    return lines + [""]
