"""traind's step eager against `training.compile` (the decoder compiled once, dynamic shapes), in one process.

    .venv/bin/python bench/compile.py                                  # 25M, fixed and realistic (about 10 minutes)
    .venv/bin/python bench/compile.py --models 5m --data realistic --rounds 3

Two copies of the same model (same seed, traind's defaults: bf16 compute where the CPU has
it, grouping, packing, label-only logits), one with `training.compile`. Round 0 runs an
epoch on each and is not counted: it is where the compiled copy compiles (its time is
reported as the compile cost, which a daemon pays once per loaded model). Then the two
alternate, an epoch each, for --rounds rounds; the ratio is the median of compiled / eager
per round. Model FLOP/s and the bf16 matmul peak are measured as bench/perf.py's flops
section does, the peak before every counted round, so the efficiency with and without
compiling (per round against that round's peak, the median of the rounds) sits beside
the ratio.
Writes bench/results/compile-<stamp>.json. Uses the models and data of bench/perf.py
(built in --work on first use).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from stamped import write_result  # noqa: E402 - bench/ is on the path


def one_point(args: argparse.Namespace, prep: dict, model: str, kind: str) -> dict[str, Any]:
    import dataclasses

    import perf_runs
    from flops import matmul_peak, model_flops_per_token

    from daemon.train.batching import micro_batches
    from daemon.train.loop import build_optimizer, make_scaler
    from daemon.train.model import load_for_training
    from daemon.train.step import fast_paths, optimizer_step

    base, data = prep["bases"][model], prep["data"][kind][model]
    ns = argparse.Namespace(base=base, max_length=1024, quant="none", device="cpu", batch=8, threads=args.threads)
    cfg = perf_runs.traind_config(ns, args.work / "compile-root", True, True)
    copies = {}
    for name in ("eager", "compiled"):
        c = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, compile=name == "compiled"))
        lm = load_for_training(c, seed=1)
        lm.fast = fast_paths(lm)
        opt, sched = build_optimizer(lm.model, c.training, 1_000_000)
        copies[name] = (lm, opt, sched, make_scaler(lm))
    exs = perf_runs.examples(data, copies["eager"][0].tokenizer, cfg.data)
    # the daemon's micro-batches: grouped by length within the shuffle window (each step then cuts them in
    # width pieces where that pays, as the daemon's does)
    micro = list(micro_batches(exs, 8, "grouped", cfg.data.shuffle_buffer, cfg.training.seed, 0))
    tokens = sum(len(e.input_ids) for mb in micro for e in mb)
    rates: dict[str, list[float]] = {n: [] for n in copies}
    first: dict[str, float] = {}
    dtype = str(copies["eager"][0].dtype).removeprefix("torch.")
    peaks: list[float] = []
    for r in range(args.rounds + 1):
        if r:  # the peak beside each counted round: this machine's speed drifts by 15-25% within an hour
            peaks.append(matmul_peak(args.threads, dtype=dtype))
        for name, (lm, opt, sched, scaler) in copies.items():
            t0 = time.perf_counter()
            for mb in micro:
                optimizer_step(lm, [mb], lm.fast, True, opt, sched, scaler, 1.0)
            seconds = time.perf_counter() - t0
            if r == 0:
                first[name] = seconds
            else:
                rates[name].append(tokens / seconds)
            print(f"{model} {kind} round {r} {name:8s} {tokens / seconds:7.0f} tokens/s", flush=True)
    ratios = [c / e for c, e in zip(rates["compiled"], rates["eager"])]
    per_token = model_flops_per_token(base, data)
    eager, compiled = statistics.median(rates["eager"]), statistics.median(rates["compiled"])

    def efficiency(name: str) -> float:  # per round against that round's peak, then the median
        return statistics.median(rate * per_token / peak for rate, peak in zip(rates[name], peaks))

    return {"model": model, "data": kind, "examples": len(exs), "tokens_per_epoch": tokens,
            "eager_tokens_per_sec": eager, "compiled_tokens_per_sec": compiled, "pair_ratios": ratios,
            "compiled_over_eager": statistics.median(ratios),
            "compile_seconds": first["compiled"] - first["eager"] * compiled / eager,
            "matmul_peak": statistics.median(peaks), "matmul_peaks": peaks,
            "efficiency_eager": efficiency("eager"), "efficiency_compiled": efficiency("compiled")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="25m")
    p.add_argument("--data", default="fixed,realistic")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--examples", type=int, default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", type=Path, default=Path("/tmp") / "traind-perf")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    p.add_argument("--warm-cache", action="store_true",
                   help="keep torch's compile cache (default: a fresh one, so the compile time is a first start's)")
    args = p.parse_args()
    import atexit
    import logging
    import os
    import shutil
    import tempfile

    if not args.warm_cache:  # before torch compiles anything: inductor reads it when it first caches
        cache = tempfile.mkdtemp(prefix="traind-inductor-")
        atexit.register(shutil.rmtree, cache, True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
    import warnings

    import torch

    from perf import prepare

    logging.basicConfig(level=logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    models, kinds = args.models.split(","), args.data.split(",")
    prep = prepare(args.work, models, kinds, args.examples)
    rows = [one_point(args, prep, m, k) for m in models for k in kinds]
    for row in rows:
        print(f"{row['model']} {row['data']}: compiled / eager {row['compiled_over_eager']:.2f}x, "
              f"compile {row['compile_seconds']:.0f} s, efficiency {row['efficiency_eager']:.0%} -> "
              f"{row['efficiency_compiled']:.0%} of {row['matmul_peak'] / 1e9:.1f} GFLOP/s")
    write_result(args.out, "compile", {"torch": torch.__version__, "threads": args.threads, "rounds": args.rounds,
                                       "compile_cache": "warm" if args.warm_cache else "fresh", "results": rows})


if __name__ == "__main__":
    main()
