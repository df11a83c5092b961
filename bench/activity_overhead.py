"""What per-layer LoRA activity costs the training: the embedded model and a ~25M-parameter one.

    .venv/bin/python bench/activity_overhead.py                      # both models, 3 interleaved pairs each
    .venv/bin/python bench/activity_overhead.py --models 25m --pairs 5 --json out.json

Per model, one process, one loaded base, one data file; every run starts from
the same LoRA weights and trains the same steps with daemon.train.loop.train_file:

  off        no activity probe
  default    the probe with the default config (every 50 steps, at most every 10 s, and the file's last step)
  every-50   every 50 steps without the time floor (the default's worst case on fast steps)
  every-1    every step (how much one sample costs, made visible)

Runs are interleaved (off, default, every-50, every-1, off, ...). Three figures:
  in-run     the seconds spent inside the probe (grad norms + sample) during a run,
             over that run's time: the feature's own cost, exact and noise-free
  A/B        the median over the pairs of (run time / the pair's `off` time) - 1;
             on shared cores its noise is a few percent, so it only resolves `every-1`
  implied    one sample's cost measured on its own (median of 30) over the median
             step time, / 50: what the default interval costs on long files
Figures are for reading, never asserted.
"""

from __future__ import annotations

import argparse
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
DATA = REPO / "examples" / "chat.jsonl"
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MODES = {"off": None, "default": (50, 10.0), "every-50": (50, 0.0), "every-1": (1, 0.0)}


def build_25m(dest: Path, embedded: Path) -> Path:
    """A ~25M-parameter Qwen3 (8 layers, width 512) with the embedded tokenizer, random weights."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3Config

    tok = AutoTokenizer.from_pretrained(embedded)
    config = Qwen3Config(vocab_size=len(tok), hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=4, head_dim=64, max_position_embeddings=1024,
                         tie_word_embeddings=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(dest)
    tok.save_pretrained(dest)
    return dest


def make_config(root: Path, base: str, every: int, min_interval: float, quantization: str) -> Any:
    from daemon.config import config_from_dict

    return config_from_dict({
        "base_model": base, "paths": {"models": str(root / "models"), "checkpoints": str(root / "checkpoints")},
        "data": {"max_length": 256, "eval_fraction": 0.0},
        "model": {"quantization": quantization, "device": "cpu", "compute_dtype": "float32"},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ALL_LINEAR},
        "training": {"micro_batch_size": 4, "warmup_steps": 0, "schedule": "constant", "checkpoint_every_steps": 1_000_000},
        "activity": {"every_steps": every, "min_interval_seconds": min_interval},
    }, root)


def data_file(root: Path, steps: int) -> Path:
    """The first 4 x steps records of the bundled chat examples (repeated if needed): `steps` optimizer steps."""
    lines = DATA.read_text(encoding="utf-8").splitlines()
    out = root / "data.jsonl"
    out.write_text("\n".join((lines * (1 + 4 * steps // len(lines)))[:4 * steps]) + "\n", encoding="utf-8")
    return out


class Timed:
    """Counts the seconds spent in the probe's two entry points during a run."""

    def __init__(self, probe: Any) -> None:
        self.probe, self.seconds = probe, 0.0
        for name in ("sample", "grad_norms"):
            setattr(self, name, self._timed(getattr(probe, name)))

    def __getattr__(self, name: str) -> Any:  # everything else is the probe's own
        return getattr(self.probe, name)

    def _timed(self, fn: Any) -> Any:
        def call(*a: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.seconds += time.perf_counter() - t0
        return call


def one_run(lm: Any, cfg: Any, path: Path, start: dict, probe: Any, root: Path) -> tuple[float, list[float]]:
    """Train the file once from `start`; (seconds, step times)."""
    from daemon.train.loop import Job, train_file
    from daemon.train.model import set_lora_state

    set_lora_state(lm.model, start)
    if probe is not None:
        probe.forget_previous()
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    steps: list[float] = []
    t0 = time.perf_counter()
    train_file(lm, cfg, Job.for_file("bench", path, "chat", sha), global_step=0, ckpt_folder=root / "ck",
               report=lambda e: steps.append(time.perf_counter()) if e.TYPE == "step" else None,
               control=lambda: "continue", activity=probe)
    return time.perf_counter() - t0, [b - a for a, b in zip(steps, steps[1:])]


def sample_cost(probe: Any, n: int = 30) -> float:
    """Median seconds of one sample (grad norms + all measures), on the model as it stands."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        probe.sample(probe.grad_norms())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_model(name: str, base: str, root: Path, args: argparse.Namespace) -> dict[str, Any]:
    from daemon.train.activity_probe import ActivityProbe
    from daemon.train.model import load_for_training, lora_state

    cfgs = {m: make_config(root, base, *(v or (0, 0.0)), args.quantization) for m, v in MODES.items()}
    lm = load_for_training(cfgs["off"], seed=1)
    probe = ActivityProbe(lm.model)
    probe.base_norms()  # once per loaded base in the daemon too: not part of a run
    start, path = lora_state(lm.model), data_file(root, args.steps)
    one_run(lm, cfgs["off"], path, start, None, root)  # warm-up, not counted
    ratios: dict[str, list[float]] = {m: [] for m in MODES if m != "off"}
    inside: dict[str, list[float]] = {m: [] for m in ratios}
    step_times: list[float] = []
    for _ in range(args.pairs):
        off, st = one_run(lm, cfgs["off"], path, start, None, root)
        step_times += st
        for mode in ratios:
            timed = Timed(probe)
            t, _ = one_run(lm, cfgs[mode], path, start, timed, root)
            ratios[mode].append(t / off - 1)
            inside[mode].append(timed.seconds / t)
    # a 4-bit weight stores two values per byte: count the values, not the bytes
    params = sum(p.numel() * (2 if type(p).__name__ == "Params4bit" else 1) for p in lm.model.get_base_model().parameters())
    cost, step = sample_cost(probe), statistics.median(step_times)
    return {"model": name, "parameters": params, "lora_modules": len(probe.sites), "steps_per_run": args.steps,
            "median_step_ms": step * 1e3, "sample_ms": cost * 1e3, "implied_overhead_every_50": cost / (50 * step),
            "in_run": {m: statistics.median(v) for m, v in inside.items()},
            "overhead": {m: statistics.median(v) for m, v in ratios.items()},
            "overhead_runs": ratios}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="embedded,25m", help="comma-separated: embedded, 25m")
    parser.add_argument("--pairs", type=int, default=3, help="interleaved rounds of every mode")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps per run")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--quantization", default="nf4", choices=["nf4", "none"], help="the base as traind loads it")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    os.environ.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1")
    logging.basicConfig(level=logging.ERROR)
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()
    results = []
    with tempfile.TemporaryDirectory(prefix="traind-bench-") as tmp:
        root = Path(tmp)
        from daemon.train.tinymodel import ensure_embedded

        embedded = ensure_embedded(root / "models")
        bases = {"embedded": "embedded:tiny-qwen3", "25m": lambda: str(build_25m(root / "m25", embedded))}
        for name in args.models.split(","):
            base = bases[name] if isinstance(bases[name], str) else bases[name]()
            results.append(bench_model(name, base, root, args))
    print(f"\nper-layer LoRA activity overhead: {args.quantization} base, LoRA r=8 on all linear layers, "
          f"{args.threads} thread(s), {args.pairs} interleaved pairs, load {os.getloadavg()[0]:.2f}")
    modes = list(results[0]["overhead"])
    print(f"{'model':<10}{'params':>12}{'modules':>9}{'step ms':>9}{'sample ms':>11}{'implied/50':>12}"
          + "".join(f"{'in-run ' + m:>18}" for m in modes) + "".join(f"{'A/B ' + m:>15}" for m in modes))
    for r in results:
        print(f"{r['model']:<10}{r['parameters']:>12,}{r['lora_modules']:>9}{r['median_step_ms']:>9.1f}{r['sample_ms']:>11.2f}"
              f"{r['implied_overhead_every_50']:>11.3%} " + "".join(f"{r['in_run'][m]:>17.3%} " for m in modes)
              + "".join(f"{r['overhead'][m]:>14.2%} " for m in modes))
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=2))


if __name__ == "__main__":
    main()
