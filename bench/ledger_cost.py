"""What the sample ledger costs on a large file: time per optimizer step and size (no training).

    .venv/bin/python -m bench.ledger_cost --lines 1000000 --window 1024 --micro-batch 4

One epoch of a file of `--lines` lines with a hole every 20,000 lines (as held-out
lines make), consumed in the order of traind's shuffle window, `--micro-batch`
samples per step, recorded by daemon.sample_ledger.SampleLedger.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from daemon.sample_ledger import SampleLedger  # noqa: E402


def stream(n: int, window: int, seed: int = 1) -> list[int]:
    """Lines in the order of a shuffle window (as daemon.train.data.train_examples draws them)."""
    rng, buf, order = random.Random(seed), [], []
    for x in (x for x in range(1, n + 1) if x % 20000):
        if len(buf) < window:
            buf.append(x)
            continue
        j = rng.randrange(len(buf))
        buf[j], x = x, buf[j]
        order.append(x)
    rng.shuffle(buf)
    return order + buf


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.ledger_cost", description=__doc__.split("\n\n")[0])
    ap.add_argument("--lines", type=int, default=1_000_000)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--micro-batch", type=int, default=4)
    args = ap.parse_args(argv)
    order = stream(args.lines, args.window)
    ledger, largest, spent = SampleLedger(), 0, 0.0
    for i in range(0, len(order), args.micro_batch):
        t0 = time.perf_counter()
        ledger.add_step(0, order[i:i + args.micro_batch])
        spent += time.perf_counter() - t0
        if i % 100_000 == 0:  # a checkpoint's ledger.json, sampled
            largest = max(largest, len(json.dumps(ledger.to_dict())))
    d = ledger.to_dict()
    print(json.dumps({"samples": d["samples"], "steps": d["steps"], "us_per_step": round(spent / d["steps"] * 1e6, 2),
                      "final_bytes": len(json.dumps(d)), "final_ranges": len(d["epochs"][0]["lines"]),
                      "largest_sampled_bytes": largest}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
