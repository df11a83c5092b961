"""Training throughput of traind's loop (plain and 4-bit base) against transformers.Trainer + PEFT.

    python bench/throughput.py                           # embedded tiny model, built into a temp dir
    python bench/throughput.py --steps 60 --threads 1    # one torch thread (shared cores)
    python bench/throughput.py --base /models/Qwen3-0.6B --steps 20 --max-length 256

All three runs share one process, one base, one LoRA config, the same tokenised
examples (examples/chat.jsonl through daemon.train.data, loss on assistant turns) and
the same micro-batch size, so the traind/Trainer ratio is quoted from one run:

  traind none   daemon.train.loop.train_file on the full-precision base (fp32 on CPU)
  traind nf4    the same on a bitsandbytes nf4 base (fp32 compute)
  Trainer       transformers.Trainer on a get_peft_model() of the full-precision base

Each run does --warmup steps that are not timed, then --steps timed ones.
steps/s counts optimizer steps; tokens/s counts non-pad input tokens. Figures
are for reading, never asserted: on shared cores they move with the load, which
is printed next to them.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
DATA = REPO / "examples" / "chat.jsonl"

log = logging.getLogger("bench")


@dataclass(frozen=True)
class Result:
    name: str
    steps: int
    seconds: float
    tokens: int

    def row(self, baseline: "Result") -> str:
        # Trainer shuffles its own way, so its batches pad differently: tokens/s is the fairer ratio.
        steps_ratio = (self.steps / self.seconds) / (baseline.steps / baseline.seconds)
        tokens_ratio = (self.tokens / self.seconds) / (baseline.tokens / baseline.seconds)
        return (f"{self.name:<14}{self.steps:>7}{self.seconds:>9.2f}{self.steps / self.seconds:>9.2f}"
                f"{self.tokens / self.seconds:>11.0f}{steps_ratio:>10.2f}{tokens_ratio:>10.2f}")


def timed(name: str, marks: list[tuple[float, int]], warmup: int, steps: int) -> Result:
    """Rate over the steps after `warmup`, from (time at step end, tokens of that step) marks."""
    t_start = marks[warmup - 1][0]  # end of the last untimed step
    window = marks[warmup:warmup + steps]
    return Result(name, len(window), window[-1][0] - t_start, sum(tok for _, tok in window))


def make_config(args: argparse.Namespace, root: Path, quantization: str) -> Any:
    from daemon.config import EMBEDDED_MODEL, config_from_dict

    raw = {
        "base_model": str(args.base) if args.base else EMBEDDED_MODEL,
        "paths": {"models": str(root / "models"), "checkpoints": str(root / "checkpoints")},
        "data": {"max_length": args.max_length, "eval_fraction": 0.0},
        "model": {"quantization": quantization, "device": "cpu", "compute_dtype": "float32"},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        # constant schedule: the rate does not depend on it, and Trainer gets the same
        "training": {"micro_batch_size": args.batch_size, "learning_rate": 2e-4, "warmup_steps": 0,
                     "schedule": "constant", "epochs_per_file": 1000, "checkpoint_every_steps": 1_000_000},
    }
    return config_from_dict(raw, root)


def run_traind(args: argparse.Namespace, root: Path, quantization: str) -> Result:
    """daemon.train.loop.train_file as the trainer child runs it; skipped once enough steps are done."""
    from daemon.train.loop import Job, train_file
    from daemon.train.model import load_for_training

    cfg = make_config(args, root, quantization)
    lm = load_for_training(cfg, seed=cfg.training.seed)
    sha = hashlib.sha256(DATA.read_bytes()).hexdigest()
    marks: list[tuple[float, int]] = []
    needed = args.warmup + args.steps

    def report(event: dict[str, Any]) -> None:
        if event["type"] == "step":
            marks.append((time.perf_counter(), event["tokens"]))

    train_file(lm, cfg, Job(f"bench-{quantization}", DATA, "chat", sha), global_step=0,
               ckpt_folder=root / "checkpoints" / quantization, report=report,
               control=lambda: "skip" if len(marks) >= needed else "continue")  # skip: no checkpoint at the end
    return timed(f"traind {quantization}", marks, args.warmup, args.steps)


def run_trainer(args: argparse.Namespace, root: Path) -> Result:
    """Plain transformers.Trainer + PEFT: same base, LoRA, examples, batch size; fp32 on CPU."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    from daemon.train.data import collate, train_examples
    from daemon.train.loop import job_seed
    from daemon.train.model import resolve_base
    from daemon.validate import DataFormat

    cfg = make_config(args, root, "none")
    base = resolve_base(cfg)
    tok = AutoTokenizer.from_pretrained(base)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    seed = job_seed(cfg.training.seed, hashlib.sha256(DATA.read_bytes()).hexdigest())
    needed = args.warmup + args.steps
    examples: list = []
    for epoch in range(needed):  # whole epochs, traind's order, until enough for every step
        examples += list(train_examples(DATA, DataFormat.CHAT, tok, cfg.data, seed, epoch))
        if len(examples) >= needed * args.batch_size:
            break

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.config.use_cache = False
    lc = cfg.lora
    model = get_peft_model(model, LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                                             target_modules=list(lc.target_modules), bias="none", task_type="CAUSAL_LM"))
    marks: list[tuple[float, int]] = []
    batch_tokens: list[int] = []

    def collator(batch: list) -> dict:
        out = collate(batch, tok.pad_token_id)
        batch_tokens.append(int(out["attention_mask"].sum()))
        return out

    class Marks(TrainerCallback):
        def on_step_end(self, *_: Any, **__: Any) -> None:
            marks.append((time.perf_counter(), batch_tokens[len(marks)]))  # batches are collated in step order

    targs = TrainingArguments(
        output_dir=str(root / "trainer"), per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1,
        max_steps=needed, learning_rate=cfg.training.learning_rate, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=cfg.training.max_grad_norm, optim="adamw_torch", use_cpu=True,
        save_strategy="no", eval_strategy="no", logging_strategy="no", report_to=[], disable_tqdm=True,
        dataloader_num_workers=0, remove_unused_columns=False, seed=cfg.training.seed,
    )
    trainer = Trainer(model=model, args=targs, train_dataset=examples, data_collator=collator, callbacks=[Marks()])
    trainer.remove_callback(PrinterCallback)  # it prints the end-of-run metrics dict over our table
    trainer.train()
    return timed("Trainer+PEFT", marks, args.warmup, args.steps)


def set_threads(n: int) -> int:
    """Before torch is imported: n > 0 pins OpenMP/MKL and torch to n threads (as training.cpu_threads)."""
    if n > 0:
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(n)
    import torch

    if n > 0:
        torch.set_num_threads(n)
    return torch.get_num_threads()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, help="a local Hugging Face model folder (default: the embedded tiny model)")
    parser.add_argument("--steps", type=int, default=40, help="timed optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before the timed ones")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--batch-size", type=int, default=4, help="micro-batch size of every run")
    parser.add_argument("--max-length", type=int, default=256, help="tokens per example")
    args = parser.parse_args()
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be >= 1")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    threads = set_threads(args.threads)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="traind-bench-") as tmp:
        root = Path(tmp)
        if args.base is None:
            from daemon.train.tinymodel import ensure_embedded

            ensure_embedded(root / "models")  # built before any timing
        results = [run_traind(args, root, "none"), run_traind(args, root, "nf4"), run_trainer(args, root)]
    lc = make_config(args, Path("."), "none").lora
    print(f"\nbase {args.base or 'embedded tiny model'}; micro-batch {args.batch_size}, max_length {args.max_length}, "
          f"LoRA r={lc.r} on {','.join(lc.target_modules)}, fp32 on CPU, {threads} torch thread(s); "
          f"{args.warmup} untimed + {args.steps} timed steps per run")
    print(f"{'run':<14}{'steps':>7}{'seconds':>9}{'steps/s':>9}{'tokens/s':>11}{'steps/s':>10}{'tokens/s':>10}")
    print(f"{'':<50}{'/ Trainer':>10}{'/ Trainer':>10}")
    for r in results:
        print(r.row(results[-1]))
    print(f"load average (1 min) before {load_before:.2f}, after {os.getloadavg()[0]:.2f}, on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
