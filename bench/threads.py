"""Training speed by CPU thread policy, on a quiet machine and beside busy neighbours.

    .venv/bin/python bench/threads.py                      # the ~5M model, 25 s per cell
    .venv/bin/python bench/threads.py --model 18m --seconds 40 --json out.json

Each cell trains the same model (daemon.train.step.optimizer_step on packed,
length-grouped micro-batches of 8 realistic examples) for --seconds and
reports optimizer steps per second, with
  policies   1 thread; every core, fixed; auto (every core, with daemon.train.threads.ThreadGovernor)
  neighbours none; a process spinning a whole core at normal priority; the same at nice 10
             (as the monitor runs); one busy a quarter of the time
Why it matters: torch's OpenMP threads work in lock step, and a neighbour at
the same priority that preempts one of them stalls the rest (the docstring of
daemon/train/threads.py). Figures are for reading, never asserted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

NEIGHBOURS = {
    "none": None,
    "busy core": [sys.executable, "-c", "while True: pass"],
    "busy core, nice 10": ["nice", "-n", "10", sys.executable, "-c", "while True: pass"],
    "busy 25%": [sys.executable, "-c", "import time\nwhile True:\n  t = time.time()\n  while time.time() - t < 0.01: pass\n"
                 "  time.sleep(0.03)"],
}


def setup(model: str, root: Path) -> tuple[Any, list]:
    from bench.workloads import build_model, write_dataset
    from daemon.config import config_from_dict
    from daemon.train.batching import grouped_batches
    from daemon.train.data import train_examples
    from daemon.train.model import load_for_training
    from daemon.train.step import fast_paths
    from daemon.train.tinymodel import ensure_embedded
    from daemon.validate import DataFormat

    base = build_model(model, root / model, ensure_embedded(root / "models"))
    data = write_dataset(root / "data.jsonl", "realistic", 400)
    cfg = config_from_dict({"base_model": str(base), "paths": {"models": str(root / "models")},
                            "data": {"max_length": 1024, "eval_fraction": 0.0},
                            "model": {"quantization": "none", "device": "cpu"},
                            "lora": {"r": 8, "alpha": 16, "dropout": 0.0,
                                     "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}},
                           root)
    lm = load_for_training(cfg, seed=1)
    lm.fast = fast_paths(lm)
    examples = list(train_examples(data, DataFormat.PROMPT_COMPLETION, lm.tokenizer, cfg.data, 0, 0))
    return lm, list(grouped_batches(examples, 8, 1024, 1, 0))


def rate(lm: Any, batches: list, seconds: float, governor: Any) -> float:
    import torch

    from daemon.train.step import optimizer_step

    params = [p for p in lm.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    t0, k = time.monotonic(), 0
    while time.monotonic() - t0 < seconds:
        if governor is not None:
            governor.tick()
        optimizer_step(lm, [batches[k % len(batches)]], lm.fast, True, opt, sched, scaler, 1.0)
        k += 1
    return k / (time.monotonic() - t0)


def cell(lm: Any, batches: list, policy: str, neighbour: str, seconds: float, cores: int) -> float:
    import torch

    from daemon.train.threads import ThreadGovernor

    torch.set_num_threads(1 if policy == "1 thread" else cores)
    governor = ThreadGovernor(cores) if policy == "auto" else None
    proc = subprocess.Popen(NEIGHBOURS[neighbour]) if NEIGHBOURS[neighbour] else None
    try:
        time.sleep(0.5)
        return rate(lm, batches, seconds, governor)
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="5m", help="a size of bench/workloads.py (5m, 18m, 25m)")
    p.add_argument("--seconds", type=float, default=25.0, help="training time per cell")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args()
    os.environ["HF_HUB_OFFLINE"] = "1"
    logging.basicConfig(level=logging.WARNING)
    from daemon.train.threads import usable_cores

    cores = usable_cores()
    with tempfile.TemporaryDirectory(prefix="traind-bench-") as tmp:
        lm, batches = setup(args.model, Path(tmp))
        rate(lm, batches, 3.0, None)  # warm-up
        policies = ("1 thread", f"{cores} threads", "auto")
        table = {n: {pol: cell(lm, batches, "1 thread" if pol == "1 thread" else ("auto" if pol == "auto" else "fixed"),
                                n, args.seconds, cores) for pol in policies} for n in NEIGHBOURS}
    print(f"\noptimizer steps/s, {args.model} model, micro-batch 8 of realistic lengths, {cores} cores, load now "
          f"{os.getloadavg()[0]:.2f}")
    print(f"{'neighbour':<22}" + "".join(f"{pol:>12}" for pol in policies))
    for n, row in table.items():
        print(f"{n:<22}" + "".join(f"{v:>12.2f}" for v in row.values()))
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "cores": cores, "steps_per_sec": table}, indent=2))


if __name__ == "__main__":
    main()
