"""Throughput of the daemon with several trainer ranks against one process, on this machine.

    python bench/distributed.py [--size 5m] [--examples 400] [--pairs 3] [--ranks 2] [--out bench/results/distributed-run.json]

The real daemon, end to end, trains the same realistic file (bench/workloads.py)
on a temporary instance with `distributed.nproc_per_node` 1, then N (the
runs interleaved, --pairs times), with the same global batch, fp32 compute,
an unquantised base and `training.cpu_threads` 0 (auto: the machine's cores
split between the ranks). A run's rate is the file's real tokens over the
time from its first step to its last in history.db (steps 2..n), so model
loading and the launcher's start are left out. Beside the speed, the loss
parity of the two: the largest |difference| of the final adapters' weights.

Several ranks on one machine only pay when one process cannot use its cores
(a small model whose matmuls do not scale to every thread); with big matmuls
that already use every core, the ranks share them and add an all-reduce per
step. On GPUs each rank has its own device and the ratio is what DDP gives.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def real_tokens(path: Path, base: Path) -> int:
    """Input tokens of the file's training examples, as the trainer counts them (no padding)."""
    from transformers import AutoTokenizer

    from daemon.config import DataConfig
    from daemon.train.data import plan_file, train_examples
    from daemon.validate import DataFormat

    tok = AutoTokenizer.from_pretrained(base)
    dc = DataConfig(max_length=512, eval_fraction=0.0)
    plan_file(path, DataFormat.PROMPT_COMPLETION, tok, dc, 0, lambda: None)
    return sum(len(e.input_ids) for e in train_examples(path, DataFormat.PROMPT_COMPLETION, tok, dc, 0, 0))


def run(root: Path, base: Path, data: Path, ranks: int, threads: int) -> dict:
    from daemon.history_db import HISTORY_FILE, HistoryDB

    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    cfg = {"base_model": str(base), "model": {"quantization": "none", "compute_dtype": "float32"},
           "intake": {"settle_seconds": 0.2, "scan_interval_seconds": 0.5},
           "data": {"max_length": 512, "eval_fraction": 0.0},
           "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj",
                                                                              "gate_proj", "up_proj", "down_proj"]},
           "training": {"micro_batch_size": 8, "grad_accum_steps": 2, "cpu_threads": threads,
                        "checkpoint_every_steps": 1000},
           "activity": {"every_steps": 0}, "distributed": {"nproc_per_node": ranks}}
    (root / "config.json").write_text(json.dumps(cfg))
    log = open(root / "daemon.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "daemon", "--config", str(root / "config.json")], cwd=REPO,
                            stdout=log, stderr=log, env=dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1"))
    try:
        (root / "inbox").mkdir(exist_ok=True)
        shutil.copy(data, root / "inbox" / "bench.jsonl.part")
        os.replace(root / "inbox" / "bench.jsonl.part", root / "inbox" / "bench.jsonl")
        deadline = time.time() + 3600
        while not (root / "queue" / "done").exists() or not any((root / "queue" / "done").glob("*")):
            if proc.poll() is not None or time.time() > deadline or list((root / "queue" / "failed").glob("*.jsonl")):
                raise RuntimeError(f"the run did not finish; see {root}")
            time.sleep(0.5)
    finally:
        proc.terminate()
        proc.wait(120)
    db = HistoryDB.open_readonly(root / "status" / HISTORY_FILE)
    try:
        steps = db.steps(db.jobs()[0]["job_id"])
    finally:
        db.close()
    from safetensors.torch import load_file

    return {"steps": len(steps), "seconds": steps[-1]["t"] - steps[0]["t"],
            "adapter": load_file(str(next((root / "adapters").glob("v*/adapter_model.safetensors"))))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="5m", help="bench/workloads.py model size")
    parser.add_argument("--examples", type=int, default=400)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="training.cpu_threads of every run (0: auto)")
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "traind-distributed-bench"))
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "distributed-run.json"))
    args = parser.parse_args()
    from bench.workloads import build_model, write_dataset
    from daemon.train.tinymodel import ensure_embedded

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    base = work / f"model-{args.size}"
    if not (base / "config.json").exists():
        build_model(args.size, base, tokenizer_from=ensure_embedded(work / "models"))
    data = write_dataset(work / "realistic.jsonl", "realistic", n=args.examples, seed=0)
    tokens = real_tokens(data, base)
    rows = []
    for pair in range(args.pairs):
        for ranks in (1, args.ranks):
            r = run(work / f"run-{ranks}", base, data, ranks, args.threads)
            # steps 2..n: the file's tokens times (n-1)/n (each step's share of the file's tokens is close)
            rate = tokens * (r["steps"] - 1) / r["steps"] / r["seconds"]
            rows.append({"pair": pair, "ranks": ranks, "steps": r["steps"], "seconds": r["seconds"],
                         "tokens_per_sec": rate, "adapter": r["adapter"]})
            print(f"pair {pair} ranks {ranks}: {r['steps']} steps in {r['seconds']:.2f} s, {rate:.0f} tokens/s", flush=True)
    one = [r for r in rows if r["ranks"] == 1]
    many = [r for r in rows if r["ranks"] == args.ranks]
    ratios = [m["tokens_per_sec"] / o["tokens_per_sec"] for o, m in zip(one, many)]
    parity = max(max(float((o["adapter"][k] - m["adapter"][k]).abs().max()) for k in o["adapter"]) for o, m in zip(one, many))
    import torch

    result = {"size": args.size, "examples": args.examples, "real_tokens": tokens, "ranks": args.ranks,
              "cores": len(os.sched_getaffinity(0)), "threads": args.threads, "torch": torch.__version__,
              "runs": [{k: v for k, v in r.items() if k != "adapter"} for r in rows],
              "ratio_median": statistics.median(ratios), "ratios": ratios, "max_adapter_diff": parity}
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"{args.ranks} ranks / 1 process, tokens/s: median {result['ratio_median']:.2f}x "
          f"(pairs: {', '.join(f'{x:.2f}' for x in ratios)}); adapters differ by at most {parity:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
