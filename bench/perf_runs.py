"""One training run of one trainer, measured: what bench/perf.py starts in a subprocess per run.

    python bench/perf_runs.py RUNNER --base DIR --data FILE --heldout FILE --out FILE.json

RUNNER is one of:
  traind        daemon.train.loop.train_file, as the trainer child runs it, with traind's defaults (its batching,
                and compute_dtype auto: bf16 on a CPU with native bf16, else fp32)
  traind-plain  fp32, neither length grouping nor packing, full logits (the loop before any lever)
  traind-grouped, traind-packed: fp32 and only that lever; traind-full-logits: fp32, grouping and packing;
  traind-fp32   every batching lever, fp32 compute (all but the compute dtype)
  traind-bf16-peft  traind's defaults, but the LoRA factors and attention as PEFT and transformers run them in
                bf16 (the LoRA upcast to fp32, SDPA in bf16 at every length, PEFT's own LoRA forward): without
                daemon.train.precision and daemon.train.fused
  traind-unfused  traind's defaults with PEFT's own LoRA forward (scale, then add): without daemon.train.fused
  traind-full-last-block  traind's defaults with the last block at every position: without daemon.train.lastblock
  trainer       transformers.Trainer + PEFT, its defaults: random batches, each padded to its longest, fp32
  trainer-glen  the same with group_by_length=True
  trainer-bf16  Trainer + PEFT defaults with the base loaded in the compute dtype traind chose (bf16 where
                the CPU has it): the same numerics as traind, so the ratio is what traind's loop adds
  sft           TRL SFTTrainer with its defaults (it tokenises the prompt/completion file itself)

All train the same base with LoRA r=8 (alpha 16, no dropout) on every linear
layer of the blocks, AdamW at lr 2e-4 constant, micro-batch --batch, the same
thread count (nf4 weights with --quant nf4; the LoRA weights and AdamW in fp32), for one
epoch over the same file. Each process first warms up (two forward/backward
passes on a random batch, not timed), then times the whole epoch: every runner
pays for every batch it makes, whatever order it puts them in. Tokens are the
real tokens of the examples (padding excluded), slots the positions computed.
After training, each run's held-out loss on the same examples (the plain
full-logits loss, one example at a time) is its loss-parity figure.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LR = 2e-4


def one_run(runner: str, base: Path, data: Path, heldout: Path, quant: str, threads: int, out: Path,
            device: str = "cpu") -> dict:
    """One runner's measured run in its own process (this script), as its JSON result; `error` when it failed."""
    cmd = [sys.executable, __file__, runner, "--base", str(base), "--data", str(data),
           "--heldout", str(heldout), "--quant", quant, "--threads", str(threads), "--out", str(out), "--device", device]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0 or not out.exists():
        return {"runner": runner, "error": (proc.stderr or proc.stdout)[-2000:]}
    return json.loads(out.read_text())


def traind_config(args: argparse.Namespace, root: Path, grouped: bool, packed: bool, dtype: str = "auto") -> Any:
    from daemon.config import config_from_dict

    return config_from_dict({
        "base_model": str(args.base), "paths": {"models": str(root / "models"), "checkpoints": str(root / "ck")},
        "data": {"max_length": args.max_length, "eval_fraction": 0.0, "group_by_length": grouped, "packing": packed},
        "model": {"quantization": args.quant, "device": args.device, "compute_dtype": dtype},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": TARGETS},
        "training": {"micro_batch_size": args.batch, "learning_rate": LR, "warmup_steps": 0, "schedule": "constant",
                     "epochs_per_file": 1, "checkpoint_every_steps": 1_000_000, "cpu_threads": args.threads},
        "activity": {"every_steps": 0},
    }, root)


def examples(path: Path, tokenizer: Any, data_cfg: Any) -> list:
    from daemon.train.data import train_examples
    from daemon.validate import DataFormat

    return list(train_examples(path, DataFormat.PROMPT_COMPLETION, tokenizer, data_cfg, 0, 0))


def heldout_loss(model: Any, tokenizer: Any, path: Path, data_cfg: Any) -> float:
    """Token-mean loss on the held-out file: one example at a time, full logits, no shortcut."""
    import torch

    from daemon.train.batching import collate
    from daemon.train.step import loss_sum

    model.eval()
    total = count = 0.0
    with torch.no_grad():
        for ex in examples(path, tokenizer, data_cfg):
            s, n = loss_sum(model, collate([ex], tokenizer.pad_token_id))
            total, count = total + float(s), count + n
    return total / count


def warm_up(model: Any, vocab: int) -> None:
    """Two forward/backward passes on a random batch: kernels and allocator warm, nothing learnt (grads dropped)."""
    import torch

    ids = torch.randint(0, vocab, (2, 64), generator=torch.Generator().manual_seed(0)).to(model.device)
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
    model.zero_grad(set_to_none=True)


def unfused(lm: Any) -> None:
    """Undo daemon.train.fused on a loaded model: PEFT's own LoRA forward (scale, then add)."""
    from daemon.train.fused import fused_classes

    for m in lm.model.modules():
        if type(m) in fused_classes():
            m.__class__ = type(m).__mro__[1]


def without_precision_levers(lm: Any) -> None:
    """Undo daemon.train.precision and daemon.train.fused on a loaded model: PEFT's fp32 LoRA route and its own
    forward, transformers' SDPA at every length."""
    from torch import nn

    from daemon.train.precision import ActivationDtypeLinear

    unfused(lm)
    for m in lm.model.modules():
        for f in [*getattr(m, "lora_A", {}).values(), *getattr(m, "lora_B", {}).values()]:
            if type(f) is ActivationDtypeLinear:
                f.__class__ = nn.Linear
                m.cast_input_dtype_enabled = True
    lm.model.get_base_model().set_attn_implementation("sdpa")


def run_traind(args: argparse.Namespace, root: Path, grouped: bool, packed: bool, label_only: bool = True,
               dtype: str = "auto", precision_levers: bool = True, fused: bool = True,
               last_block: bool = True) -> dict[str, Any]:
    import dataclasses

    from daemon.train.loop import Job, train_file
    from daemon.train.model import load_for_training
    from daemon.train.step import fast_paths

    cfg = traind_config(args, root, grouped, packed, dtype)
    lm = load_for_training(cfg, seed=1)
    if not precision_levers:
        without_precision_levers(lm)
    if not fused:
        unfused(lm)
    lm.fast = fast_paths(lm)  # once per loaded model in the daemon too: not part of a file's training
    if not label_only:
        lm.fast = dataclasses.replace(lm.fast, label_only=False)
    if not last_block:
        lm.fast = dataclasses.replace(lm.fast, last_block=False)
    warm_up(lm.model, len(lm.tokenizer))
    marks: list[tuple[float, int, int]] = []

    def report(e: Any) -> None:  # a daemon.protocol message
        if e.TYPE == "started":
            marks.append((time.perf_counter(), 0, 0))
        elif e.TYPE == "step":
            marks.append((time.perf_counter(), e.tokens, e.slots))

    sha = hashlib.sha256(args.data.read_bytes()).hexdigest()
    train_file(lm, cfg, Job.for_file("perf", args.data, "prompt_completion", sha), global_step=0, ckpt_folder=root / "ck",
               report=report, control=lambda: "continue")
    result = measured(marks)
    result["fast_paths"] = vars(lm.fast) if lm.fast else None
    result["compute_dtype"] = str(lm.dtype).removeprefix("torch.")
    result["heldout_loss"] = heldout_loss(lm.model, lm.tokenizer, args.heldout, cfg.data)
    return result


def measured(marks: list[tuple[float, int, int]]) -> dict[str, Any]:
    """Rate over the epoch, from (time at the start, 0, 0) and (time at each step's end, real tokens, slots) marks."""
    timed = marks[1:]
    seconds = timed[-1][0] - marks[0][0]
    tokens, slots = sum(m[1] for m in timed), sum(m[2] for m in timed)
    return {"steps": len(timed), "seconds": seconds, "tokens": tokens, "slots": slots,
            "tokens_per_sec": tokens / seconds, "padding_waste": 1 - tokens / slots}


def compute_dtype(args: argparse.Namespace, as_traind: bool = False) -> Any:
    """Trainer's default: fp32 on the CPU; bf16 (fp16 on older GPUs) on CUDA. `as_traind`: traind's auto choice."""
    import torch

    if as_traind:
        from daemon.config import ModelConfig
        from daemon.train.model import capabilities, choose_dtype

        return choose_dtype(ModelConfig(), args.device, capabilities())
    if args.device == "cpu":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def peft_model(args: argparse.Namespace, as_traind: bool = False) -> Any:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = compute_dtype(args, as_traind)
    kw: dict[str, Any] = {"dtype": dtype, "device_map": {"": args.device}}
    if args.quant == "nf4":
        kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(args.base, **kw)
    model.config.use_cache = False
    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS,
                                            bias="none", task_type="CAUSAL_LM"))


class Marks:
    """A TrainerCallback that notes the time of every step's end, with the tokens and slots of its batch."""

    def __init__(self) -> None:
        from transformers import TrainerCallback

        self.marks: list[tuple[float, int, int]] = []
        self.batches: list[tuple[int, int]] = []
        outer = self

        class Callback(TrainerCallback):
            def on_train_begin(self, *_: Any, **__: Any) -> None:
                outer.marks.append((time.perf_counter(), 0, 0))

            def on_step_end(self, *_: Any, **__: Any) -> None:
                tokens, slots = outer.batches[len(outer.marks) - 1]
                outer.marks.append((time.perf_counter(), tokens, slots))

        self.callback = Callback()

    def collated(self, batch: dict) -> dict:
        mask = batch["attention_mask"]
        self.batches.append((int(mask.sum()), int(mask.numel())))
        return batch


def trainer_args(args: argparse.Namespace, root: Path, **over: Any) -> dict[str, Any]:
    return dict(output_dir=str(root / "out"), per_device_train_batch_size=args.batch, num_train_epochs=1,
                learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, use_cpu=args.device == "cpu",
                save_strategy="no", eval_strategy="no", logging_strategy="no", report_to=[], disable_tqdm=True,
                dataloader_num_workers=0, seed=1, **over)


def run_trainer(args: argparse.Namespace, root: Path, group_by_length: bool, as_traind: bool = False) -> dict[str, Any]:
    """Trainer + PEFT on traind's own tokenised examples (the same tokens), padded by its collator."""
    from transformers import AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    cfg = traind_config(args, root, False, False)
    tok = AutoTokenizer.from_pretrained(args.base)
    data = [{"input_ids": ex.input_ids, "labels": ex.labels, "attention_mask": [1] * len(ex.input_ids)}
            for ex in examples(args.data, tok, cfg.data)]
    marks, pad = Marks(), DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
    model = peft_model(args, as_traind)
    strategy = "group_by_length" if group_by_length else "random"  # transformers 5's name for group_by_length=True
    targs = TrainingArguments(**trainer_args(args, root, train_sampling_strategy=strategy, optim="adamw_torch",
                                             remove_unused_columns=False))
    trainer = Trainer(model=model, args=targs, train_dataset=data, data_collator=lambda b: marks.collated(pad(b)),
                      processing_class=tok, callbacks=[marks.callback])
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    result = measured(marks.marks)
    result["compute_dtype"] = str(compute_dtype(args, as_traind)).removeprefix("torch.")
    result["heldout_loss"] = heldout_loss(model, tok, args.heldout, cfg.data)
    return result


def run_sft(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """TRL SFTTrainer with its defaults on the prompt/completion file (and the same LoRA through peft_config)."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    cfg = traind_config(args, root, False, False)
    tok = AutoTokenizer.from_pretrained(args.base)
    rows = [json.loads(line) for line in args.data.read_text(encoding="utf-8").splitlines()]
    marks = Marks()
    sft_cfg = SFTConfig(**trainer_args(args, root), max_length=args.max_length)
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(args.base), args=sft_cfg,
                         train_dataset=Dataset.from_list(rows), processing_class=tok, callbacks=[marks.callback],
                         peft_config=LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS,
                                                task_type="CAUSAL_LM"))
    collator = trainer.data_collator
    trainer.data_collator = lambda b: marks.collated(collator(b))
    trainer.remove_callback(PrinterCallback)
    warm_up(trainer.model, len(tok))
    trainer.train()
    result = measured(marks.marks)
    result["defaults"] = {"bf16": sft_cfg.bf16, "gradient_checkpointing": sft_cfg.gradient_checkpointing,
                          "packing": sft_cfg.packing, "optim": str(sft_cfg.optim)}
    result["heldout_loss"] = heldout_loss(trainer.model, tok, args.heldout, cfg.data)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runner", choices=["traind", "traind-plain", "traind-grouped", "traind-packed", "traind-full-logits",
                                      "traind-fp32", "traind-bf16-peft", "traind-unfused", "traind-full-last-block", "trainer", "trainer-glen", "trainer-bf16", "sft"])
    p.add_argument("--base", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--heldout", type=Path, required=True)
    p.add_argument("--quant", choices=["none", "nf4"], default="none")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    os.environ.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1",
                      TOKENIZERS_PARALLELISM="false")
    logging.basicConfig(level=logging.ERROR)
    import warnings

    import torch
    import transformers

    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    root = args.out.parent / f".{args.out.stem}"
    root.mkdir(parents=True, exist_ok=True)
    runs = {"traind": lambda: run_traind(args, root, True, True),
            "traind-plain": lambda: run_traind(args, root, False, False, label_only=False, dtype="float32"),
            "traind-grouped": lambda: run_traind(args, root, True, False, label_only=False, dtype="float32"),
            "traind-packed": lambda: run_traind(args, root, False, True, label_only=False, dtype="float32"),
            "traind-full-logits": lambda: run_traind(args, root, True, True, label_only=False, dtype="float32"),
            "traind-fp32": lambda: run_traind(args, root, True, True, dtype="float32"),
            "traind-bf16-peft": lambda: run_traind(args, root, True, True, precision_levers=False),
            "traind-unfused": lambda: run_traind(args, root, True, True, fused=False),
            "traind-full-last-block": lambda: run_traind(args, root, True, True, last_block=False),
            "trainer": lambda: run_trainer(args, root, False), "trainer-glen": lambda: run_trainer(args, root, True),
            "trainer-bf16": lambda: run_trainer(args, root, False, as_traind=True),
            "sft": lambda: run_sft(args, root)}
    result = runs[args.runner]()
    import resource

    # the process's peak resident memory over the whole run (loading included): what nf4 saves, or not
    result.update(runner=args.runner, threads=torch.get_num_threads(),
                  peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
