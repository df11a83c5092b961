"""Monitor API latency under concurrent load, while the daemon trains.

    # against a running stack (bin/start_all.sh):
    python bench/monitor_latency.py --url http://127.0.0.1:8080 --config config.json
    # self-contained: a temporary instance, the real daemon training the embedded
    # tiny model, the real monitor, then the load:
    python bench/monitor_latency.py --self-contained --concurrency 16 --duration 20

Every worker loops over the read endpoints (status, history, queue, gpu, memory,
metrics, health) while `--sse` clients hold live event streams open, as open
dashboard tabs do. Prints per-endpoint p50/p95/p99/max in milliseconds, and
(self-contained) the daemon's training rate before and during the load, since
training must never wait on the monitor. Figures are for reading, not asserting.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

log = logging.getLogger("bench")
ENDPOINTS = ["/api/status", "/api/history?max_points=2000", "/api/queue", "/api/gpu", "/api/memory", "/metrics", "/api/health"]
# Quick training on the embedded model, as the daemon's own e2e tests use.
FAST = {
    "intake": {"settle_seconds": 0.3, "scan_interval_seconds": 0.5},
    "data": {"max_length": 64, "eval_fraction": 0.1, "eval_max_examples": 8},
    "model": {"quantization": "none"},
    "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
    "training": {"micro_batch_size": 4, "learning_rate": 0.02, "warmup_steps": 2, "checkpoint_every_steps": 50, "epochs_per_file": 200},
    "service": {"status_interval_seconds": 1.0},
}


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


async def worker(client: httpx.AsyncClient, until: float, lat: dict[str, list[float]], errors: dict[str, int], offset: int) -> None:
    i = offset
    while time.monotonic() < until:
        path = ENDPOINTS[i % len(ENDPOINTS)]
        i += 1
        t0 = time.perf_counter()
        try:
            r = await client.get(path)
            ok = r.status_code == 200
        except httpx.HTTPError:
            ok = False
        dt = (time.perf_counter() - t0) * 1000
        key = path.split("?")[0]
        if ok:
            lat[key].append(dt)
        else:
            errors[key] += 1


async def sse_client(client: httpx.AsyncClient, until: float, counts: list[int]) -> None:
    try:
        async with client.stream("GET", "/api/events", timeout=None) as r:
            async for line in r.aiter_lines():
                if line.startswith("event: status"):
                    counts[0] += 1
                if time.monotonic() > until:
                    break
    except httpx.HTTPError as e:
        log.warning("SSE client: %s", e)


async def load(url: str, token: str | None, concurrency: int, duration: float, sse: int) -> tuple[dict, dict, int, float]:
    headers = {"X-Traind-Token": token} if token else {}
    limits = httpx.Limits(max_connections=concurrency + sse + 4)
    lat: dict[str, list[float]] = defaultdict(list)
    errors: dict[str, int] = defaultdict(int)
    sse_events = [0]
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30, limits=limits) as client:
        until = time.monotonic() + duration
        t0 = time.monotonic()
        tasks = [asyncio.create_task(sse_client(client, until, sse_events)) for _ in range(sse)]
        tasks += [asyncio.create_task(worker(client, until, lat, errors, k)) for k in range(concurrency)]
        await asyncio.gather(*tasks)
        elapsed = time.monotonic() - t0
    return lat, errors, sse_events[0], elapsed


def report(lat: dict, errors: dict, sse_events: int, elapsed: float, concurrency: int, sse: int) -> None:
    total = sum(len(v) for v in lat.values())
    print(f"\n{concurrency} concurrent clients + {sse} open SSE streams for {elapsed:.1f} s: "
          f"{total} requests, {total / elapsed:.0f} req/s, {sum(errors.values())} errors, {sse_events} SSE status events")
    print(f"{'endpoint':<16}{'n':>7}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'max ms':>9}")
    everything = []
    for key in sorted(lat):
        xs = lat[key]
        everything += xs
        print(f"{key:<16}{len(xs):>7}{statistics.median(xs):>9.1f}{pct(xs, 95):>9.1f}{pct(xs, 99):>9.1f}{max(xs):>9.1f}")
    if everything:
        print(f"{'all':<16}{len(everything):>7}{statistics.median(everything):>9.1f}{pct(everything, 95):>9.1f}"
              f"{pct(everything, 99):>9.1f}{max(everything):>9.1f}")


def prefill_history(path: Path, n: int) -> None:
    """A month of earlier training (n rows of an old job), so /api/history downsamples for real."""
    import math

    from daemon.history_db import HistoryDB

    db = HistoryDB(path)
    t0 = time.time() - 30 * 86400
    with db.conn:
        db.conn.executemany("INSERT INTO metrics (job_id, step, global_step, epoch, loss, lr, grad_norm, tokens_per_sec, t) VALUES (?,?,?,?,?,?,?,?,?)",
                            (("old-job", g, g, g / n, 2 + math.sin(g / 5000), 1e-4, 1.0, 900.0, t0 + g * 2.6) for g in range(n)))
    db.close()
    log.info("prefilled %d history rows", n)


def step_rate(status_dir: Path, seconds: float) -> float:
    from daemon.status import read_status

    a = (read_status(status_dir) or {}).get("global_step", 0)
    time.sleep(seconds)
    b = (read_status(status_dir) or {}).get("global_step", 0)
    return (b - a) / seconds


def self_contained(args: argparse.Namespace) -> None:
    from daemon.config import load_config
    from daemon.status import read_status

    root = Path(tempfile.mkdtemp(prefix="traind-bench-"))
    conf = {**FAST, "training": {**FAST["training"], "cpu_threads": args.cpu_threads}}
    (root / "config.json").write_text(json.dumps(conf))
    cfg = load_config(root / "config.json")
    if args.history_rows:
        prefill_history(cfg.path("status") / "history.db", args.history_rows)
    procs: list[subprocess.Popen] = []
    try:
        out = open(root / "bench_stdout.log", "ab")
        procs.append(subprocess.Popen([sys.executable, "-m", "daemon", "--config", str(root / "config.json")], cwd=REPO, stdout=out, stderr=out))
        inbox = cfg.path("inbox")
        inbox.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / "examples" / "chat.jsonl", inbox / "bench.jsonl.part")
        os.replace(inbox / "bench.jsonl.part", inbox / "bench.jsonl")
        log.info("waiting for the daemon to train (first start builds the embedded model)...")
        deadline = time.time() + 300
        while (read_status(cfg.path("status")) or {}).get("global_step", 0) < 3:
            if time.time() > deadline or procs[0].poll() is not None:
                raise SystemExit(f"daemon did not start training; see {root}")
            time.sleep(0.5)
        port = args.port or 18080
        procs.append(subprocess.Popen([sys.executable, "-m", "monitor", "--config", str(root / "config.json"), "--port", str(port),
                                       "--log-level", "warning"], cwd=REPO, stdout=out, stderr=out))
        url = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                httpx.get(url + "/api/health", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        before = step_rate(cfg.path("status"), 8)
        token = (cfg.path("status") / "monitor_token").read_text().strip()
        t_status0 = (read_status(cfg.path("status")) or {}).get("global_step", 0)
        lat, errors, n_sse, elapsed = asyncio.run(load(url, token, args.concurrency, args.duration, args.sse))
        during = ((read_status(cfg.path("status")) or {}).get("global_step", 0) - t_status0) / elapsed
        st = read_status(cfg.path("status")) or {}
        report(lat, errors, n_sse, elapsed, args.concurrency, args.sse)
        print(f"\ndaemon: status={st.get('status')} global_step={st.get('global_step')}; "
              f"training rate {before:.2f} steps/s before the load, {during:.2f} steps/s during it "
              f"(2 shared cores: the load competes with the trainer for CPU, it never blocks it)")
    finally:
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8080")
    p.add_argument("--config", help="instance config.json, to read status/monitor_token (needed off loopback)")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--sse", type=int, default=4, help="event streams held open meanwhile")
    p.add_argument("--self-contained", action="store_true", help="start a temporary daemon (training) and monitor")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--keep", action="store_true", help="keep the temporary instance")
    p.add_argument("--cpu-threads", type=int, default=0,
                   help="self-contained: the trainer's training.cpu_threads (0: auto, one per core but one)")
    p.add_argument("--history-rows", type=int, default=1_000_000, help="self-contained: earlier metric rows put in history.db first")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would drown the figures
    if args.self_contained:
        self_contained(args)
        return
    token = None
    if args.config:
        from daemon.config import load_config

        token = (load_config(args.config).path("status") / "monitor_token").read_text().strip()
    report(*asyncio.run(load(args.url, token, args.concurrency, args.duration, args.sse)), args.concurrency, args.sse)


if __name__ == "__main__":
    main()
