"""Inbox -> first step on a warm daemon, split: intake to `started`, the first step's own compute, the rest.

    .venv/bin/python bench/inbox_latency.py --model 25m --drops 4 [--json out.json]

A real daemon (bench/perf_daemon.py's instance: the default settle window, one thread) on a locally
built base (bench/workloads.py), warmed by one file; then small files (16 realistic records) are
dropped one at a time as a producer following the README does (NAME.part, then a rename). For each:
the time from the rename to the first step's row in the history, to the file's `started`, and that
first step's own compute (tokens / tokens_per_sec from the version's step log). Figures are for
reading, never asserted.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> None:
    from bench.perf_daemon import Stack, instance
    from bench.workloads import build_model, write_dataset
    from daemon import adapters

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="25m")
    p.add_argument("--drops", type=int, default=4)
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "traind-perf")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    from daemon.train.tinymodel import ensure_embedded

    base = build_model(args.model, args.work / f"model-{args.model}", ensure_embedded(args.work / "models"))
    lines = write_dataset(args.work / "latency-realistic.jsonl", "realistic", 16 * (args.drops + 1), seed=3).read_text().splitlines()
    root = Path(tempfile.mkdtemp(prefix="traind-latency-", dir=args.work))
    stack = Stack(instance(root, base, 1))
    stack.start_daemon()
    rows = []
    try:
        first = root / "warm-up.jsonl"
        first.write_text("\n".join(lines[:16]) + "\n")
        stack.drop(first, "warm-up.jsonl")
        stack.wait(lambda s: (s.get("queue") or {}).get("done") == 1 and s.get("status") == "idle", what="warm-up")
        for k in range(args.drops):
            small = root / f"small{k}.jsonl"
            small.write_text("\n".join(lines[16 * (k + 1):16 * (k + 2)]) + "\n")
            t = stack.drop(small, small.name)
            stack.wait(lambda s, k=k: (s.get("queue") or {}).get("done") == 2 + k and s.get("status") == "idle", what=small.name)
            started, first_t, _, _ = stack.job_times(small.name)
            log = adapters.read_step_log(adapters.read_current(stack.cfg.path("adapters")).path)
            step = log[0]["tokens"] / log[0]["tokens_per_sec"]
            row = {"latency": first_t - t, "to_started": started - t, "first_step": step, "overhead": first_t - t - step}
            rows.append(row)
            print("  ".join(f"{k2} {v:.3f} s" for k2, v in row.items()), flush=True)
    finally:
        stack.stop()
        shutil.rmtree(root, ignore_errors=True)
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    print("median: " + "  ".join(f"{k} {v:.3f} s" for k, v in med.items()))
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "drops": rows, "median": med}, indent=2))


if __name__ == "__main__":
    main()
