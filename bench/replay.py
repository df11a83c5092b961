"""What `data.replay_fraction` does: an earlier file's held-out loss after a second file, and the second file's own.

    .venv/bin/python bench/replay.py                                   # the embedded model, f = 0, 0.25, 0.5 (a minute)
    .venv/bin/python bench/replay.py --base /path/to/SmolLM2-135M-Instruct --fractions 0 0.25 --lines 400

For each fraction f, from the same start: train file A (examples/text.jsonl) on a fresh adapter, score
A's and B's held-out examples, train file B (examples/alpaca.jsonl) with replay from A at f, score both
again. Forgetting is A's held-out loss after B against right after A; learning is B's held-out loss
after B. The held-out examples are each file's own (data.eval_fraction; never trained on, never
replayed). In process, as the trainer runs a file (daemon.train.loop.train_file), fp32 on the CPU.
Writes bench/results/replay-<stamp>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from stamped import write_result  # noqa: E402 - bench/ is on the path


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def one_fraction(base: str, models: Path, work: Path, files: dict[str, Path], f: float, args: Any) -> dict[str, Any]:
    from daemon.config import Config, DataConfig, LoraConfig, ModelConfig, PathsConfig, TrainingConfig
    from daemon.train.data import eval_examples
    from daemon.train.loop import Job, job_seed, train_file
    from daemon.train.model import load_for_training
    from daemon.train.replay import sources_from
    from daemon.train.step import evaluate, fast_paths
    from daemon.validate import DataFormat

    cfg = Config(base_model=base, paths=PathsConfig(models=str(models), checkpoints=str(work / f"ckpt-{f}")),
                 data=DataConfig(max_length=args.max_length, eval_fraction=0.1, eval_max_examples=32, replay_fraction=f),
                 model=ModelConfig(quantization="none", device="cpu", compute_dtype="float32"),
                 lora=LoraConfig(r=8, alpha=16, dropout=0.0),
                 training=TrainingConfig(micro_batch_size=4, learning_rate=args.lr, warmup_steps=5,
                                         epochs_per_file=args.epochs, checkpoint_every_steps=10_000, seed=11))
    lm = load_for_training(cfg, seed=cfg.training.seed)
    lm.fast = fast_paths(lm)
    fmts = {"A": DataFormat.TEXT, "B": DataFormat.ALPACA}
    held = {k: eval_examples(p, fmts[k], lm.tokenizer, cfg.data, job_seed(cfg.training.seed, sha(p)))
            for k, p in files.items()}

    def score() -> dict[str, float]:
        return {k: evaluate(lm, h, 4, lm.fast, cfg.data.packing) for k, h in held.items()}

    def run(key: str, replay: list) -> tuple[Any, float]:
        p = files[key]
        t0 = time.monotonic()
        out = train_file(lm, cfg, Job.for_file(key, p, fmts[key].value, sha(p)), global_step=0,
                         ckpt_folder=work / f"ckpt-{f}" / key, report=lambda m: None, control=lambda: "continue",
                         replay_from=replay)
        return out, time.monotonic() - t0

    run("A", [])
    after_a = score()
    out, seconds = run("B", sources_from([{"sha256": sha(files["A"]), "job_id": files["A"].name}], files["A"].parent))
    after_b = score()
    row = {"fraction": f, "a_after_a": after_a["A"], "a_after_b": after_b["A"],
           "a_increase": after_b["A"] / after_a["A"] - 1, "b_before": after_a["B"], "b_after": after_b["B"],
           "b_steps": out.steps, "replayed": (out.ledger.get("replay") or {}).get("samples", 0),
           "b_seconds": round(seconds, 2)}
    print(f"f={f}: A held-out {row['a_after_a']:.3f} after A -> {row['a_after_b']:.3f} after B "
          f"({row['a_increase']:+.0%}); B held-out {row['b_before']:.3f} -> {row['b_after']:.3f}; "
          f"B: {out.steps} steps, {row['replayed']} replayed, {seconds:.1f}s", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="embedded:tiny-qwen3", help="base_model (a local model folder, or the embedded one)")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.0, 0.25, 0.5])
    parser.add_argument("--lines", type=int, default=160, help="lines of each example file")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(max(1, torch.get_num_threads() // 2))
    work = Path(tempfile.mkdtemp(prefix="traind-replay-bench-"))
    models = work / "models"
    if args.base.startswith("embedded:"):
        from daemon.train.tinymodel import ensure_embedded

        ensure_embedded(models)
    done = work / "done"
    done.mkdir()
    files = {}
    for key, name in (("A", "text.jsonl"), ("B", "alpaca.jsonl")):
        lines = (REPO / "examples" / name).read_text(encoding="utf-8").splitlines()[: args.lines]
        files[key] = done / f"{key}-{name}"
        files[key].write_text("\n".join(lines) + "\n", encoding="utf-8")
    rows = [one_fraction(args.base, models, work, files, f, args) for f in args.fractions]
    write_result(args.out, "replay", {"base": args.base, "lines": args.lines, "epochs": args.epochs, "lr": args.lr,
                                      "max_length": args.max_length, "rows": rows})


if __name__ == "__main__":
    main()
