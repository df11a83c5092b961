"""Scale: a 1 GB file's peak memory, 10,000 queued files, history queries over a million steps.

    .venv/bin/python bench/perf_scale.py                     # all three (the 1 GB pass takes a while)
    .venv/bin/python bench/perf_scale.py --only rss --big-mb 200 --json out.json

  rss      peak RSS of a process that validates a file (as the service does), plans it (the trainer's one
           pass: counts and held-out examples) and trains 5 steps on it, for a 10 MB and a --big-mb file
           of realistic prompt/completion records (bench/workloads.py), each in a fresh process
  queue    10,000 small files renamed into the inbox of a running daemon: how long until every one is
           queued, then GET /api/queue and `trainctl queue list` with them pending
  history  GET /api/history over 1,000,000 metric rows (whole range, and a zoomed range), cold and warm
Figures are for reading, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def write_sized(path: Path, mb: float) -> Path:
    """Realistic records repeated (with a line number, so no two are alike) up to `mb` megabytes."""
    from bench.workloads import write_dataset

    seed = path.with_suffix(".seed.jsonl")
    write_dataset(seed, "realistic", 2000, seed=0)
    lines = seed.read_text(encoding="utf-8").splitlines()
    target, written, k = int(mb * 1e6), 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            rec = json.loads(lines[k % len(lines)])
            rec["prompt"] = f"#{k} " + rec["prompt"]
            line = json.dumps(rec) + "\n"
            f.write(line)
            written, k = written + len(line), k + 1
    seed.unlink()
    return path


def rss_child(path: Path, models: Path) -> dict[str, Any]:
    """In a fresh process: validate, plan and 5 steps on `path`; peak RSS after each stage."""
    import hashlib

    from daemon.config import config_from_dict
    from daemon.train.loop import Job, train_file
    from daemon.train.model import load_for_training
    from daemon.validate import validate_file

    def peak() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    cfg = config_from_dict({"paths": {"models": str(models), "checkpoints": str(path.parent / "ck")},
                            "data": {"max_length": 512}, "model": {"quantization": "none"},
                            "training": {"micro_batch_size": 8, "cpu_threads": 1}}, path.parent)
    out: dict[str, Any] = {"bytes": path.stat().st_size}
    t0 = time.monotonic()
    report = validate_file(path, cfg.data, 0)
    out.update(validate_seconds=time.monotonic() - t0, after_validate=peak(), records=report.n_valid)
    lm = load_for_training(cfg, seed=1)
    out["after_load"] = peak()
    steps: list[int] = []
    t0 = time.monotonic()
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            sha.update(chunk)
    train_file(lm, cfg, Job.for_file("rss", path, report.format.value, sha.hexdigest()), global_step=0,
               ckpt_folder=path.parent / "ck", report=lambda e: steps.append(1) if e.TYPE == "step" else None,
               control=lambda: "skip" if len(steps) >= 5 else "continue")
    out.update(plan_and_5_steps_seconds=time.monotonic() - t0, peak=peak())
    return out


def rss_section(work: Path, big_mb: float) -> dict[str, Any]:
    from daemon.train.tinymodel import ensure_embedded

    models = work / "models"
    ensure_embedded(models)
    res = {}
    for label, mb in (("10 MB", 10.0), (f"{big_mb:g} MB", big_mb)):
        path = write_sized(work / f"scale-{mb:g}.jsonl", mb)
        proc = subprocess.run([sys.executable, __file__, "--rss-child", str(path), "--models", str(models)],
                              capture_output=True, text=True, cwd=REPO)
        res[label] = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else {"error": proc.stderr[-2000:]}
        path.unlink()
        print(f"  rss {label}: {res[label]}", flush=True)
    small, big = res["10 MB"], res[f"{big_mb:g} MB"]
    if "error" not in small and "error" not in big:
        res["peak_difference_bytes"] = big["peak"] - small["peak"]
    return res


def queue_section(work: Path, n: int) -> dict[str, Any]:
    import httpx

    from bench.perf_daemon import Stack
    from daemon.config import load_config

    root = work / "queue-instance"
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps({"intake": {"settle_seconds": 0.2, "scan_interval_seconds": 0.5},
                                                  "model": {"quantization": "none"}, "training": {"cpu_threads": 1}}))
    cfg = load_config(root / "config.json")
    stack = Stack(root / "config.json")
    try:
        stack.start_daemon()
        stack.wait(lambda s: s.get("status") == "idle" and s.get("device"), 600, "the trainer ready")
        # paused: the files wait in the queue, as a long backlog does
        control = subprocess.run([sys.executable, "-m", "daemon.cli", "--config", str(root / "config.json"), "pause",
                                  "--no-wait"], capture_output=True, cwd=REPO)
        assert control.returncode == 0
        inbox = cfg.path("inbox")
        line = json.dumps({"prompt": "two plus two\n", "completion": "four"}) + "\n"
        t0 = time.time()
        for k in range(n):
            part = inbox / f"f{k:05d}.jsonl.part"
            part.write_text(line * 20)
            os.replace(part, inbox / f"f{k:05d}.jsonl")
        written = time.time() - t0
        st = stack.wait(lambda s: sum((s.get("queue") or {}).get(k, 0) for k in ("pending", "processing", "done")) >= n,
                        3600, "every file queued")
        queued = time.time() - t0
        url = stack.start_monitor(18950)
        token = (cfg.path("status") / "monitor_token").read_text().strip()
        lat = []
        for _ in range(5):
            t = time.perf_counter()
            httpx.get(url + "/api/queue", headers={"X-Traind-Token": token}, timeout=120)
            lat.append(time.perf_counter() - t)
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "daemon.cli", "--config", str(root / "config.json"), "queue", "list"],
                       capture_output=True, cwd=REPO)
        cli = time.perf_counter() - t
        return {"files": n, "write_seconds": written, "all_queued_seconds": queued, "queue": st.get("queue"),
                "api_queue_seconds_median": statistics.median(lat), "trainctl_queue_list_seconds": cli}
    finally:
        stack.stop()


def history_section(work: Path, rows: int) -> dict[str, Any]:
    from fastapi.testclient import TestClient

    from bench.monitor_latency import prefill_history
    from daemon.config import load_config
    from monitor.app import create_app

    root = work / "history-instance"
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text("{}")
    cfg = load_config(root / "config.json")
    cfg.path("status").mkdir(parents=True, exist_ok=True)
    prefill_history(cfg.path("status") / "history.db", rows)
    out: dict[str, Any] = {"rows": rows}
    with TestClient(create_app(cfg), base_url="http://127.0.0.1") as c:
        for label, q in (("whole range, first", "max_points=2000"), ("whole range, again", "max_points=2000"),
                         ("zoomed 10,000 steps", f"since={rows // 2}&until={rows // 2 + 10_000}&max_points=2000")):
            t = time.perf_counter()
            r = c.get(f"/api/history?{q}")
            out[label] = {"seconds": time.perf_counter() - t, "points": len(r.json()["points"])}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default="rss,queue,history")
    p.add_argument("--big-mb", type=float, default=1000.0)
    p.add_argument("--files", type=int, default=10_000)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--json", type=Path)
    p.add_argument("--rss-child", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--models", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    os.environ.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    import logging

    logging.basicConfig(level=logging.ERROR)
    if args.rss_child:
        print(json.dumps(rss_child(args.rss_child, args.models)))
        return
    with tempfile.TemporaryDirectory(prefix="traind-scale-") as tmp:
        work, res = Path(tmp), {}
        only = args.only.split(",")
        if "history" in only:
            res["history"] = history_section(work, args.rows)
            print(f"  history: {res['history']}", flush=True)
        if "queue" in only:
            res["queue"] = queue_section(work, args.files)
            print(f"  queue: {res['queue']}", flush=True)
        if "rss" in only:
            res["rss"] = rss_section(work, args.big_mb)
    print(json.dumps(res, indent=2))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
