"""The RMSNorm's closed-form backward (daemon.train.norms) against transformers' own norm: time and memory.

    .venv/bin/python bench/norms.py                          # layers, then the 25M model's step (about 3 minutes)
    .venv/bin/python bench/norms.py --models 5m,25m --rounds 6

Two measures, each own / closed form interleaved in one run:
- layers: one norm's forward and backward over TOKENS x hidden activations (and over per-head
  queries, as Qwen3's query norm sees them), median of --reps, and the bytes each keeps for the
  backward beyond its input;
- step: traind's forward and backward (label-only loss, packed rows, width pieces, as the daemon
  runs them) over the length-grouped micro-batches of bench/perf.py's realistic file, the model's
  norms switched or not, --rounds rounds; the summed loss must be equal (the forward is the same).
Writes bench/results/norms-<stamp>.json. Uses the models and data of bench/perf.py (built in --work).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from stamped import write_result  # noqa: E402 - bench/ is on the path

TOKENS = 1024
# (label, shape of the activations): hidden sizes of the bench models and of common bases, and per-head queries
SHAPES = (("5M hidden", (TOKENS, 256)), ("25M hidden", (TOKENS, 512)), ("0.5B hidden", (TOKENS, 896)),
          ("7B hidden", (TOKENS, 4096)), ("25M queries", (TOKENS, 8, 64)))


def _norm(hidden: int, dtype: Any, switched: bool) -> Any:
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    from daemon.train.norms import fuse_rms_norms

    norm = Qwen3RMSNorm(hidden).to(dtype).requires_grad_(False)  # a frozen base's norm, as in LoRA training
    if switched:
        fuse_rms_norms(norm)
    return norm


def kept_bytes(norm: Any, x: Any) -> int:
    """Bytes the autograd graph keeps for the norm's backward, besides the input itself."""
    import torch

    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = norm(x)
    kept.pop(x.untyped_storage().data_ptr(), None)
    del out
    return sum(kept.values())


def layers(dtype: Any, reps: int) -> list[dict[str, Any]]:
    import torch

    rows = []
    for label, shape in SHAPES:
        gen = torch.Generator().manual_seed(len(shape) * 10_000 + shape[-1])
        x = torch.randn(shape, generator=gen).to(dtype).requires_grad_()
        g = torch.randn(shape, generator=gen).to(dtype)
        norms = {switched: _norm(shape[-1], dtype, switched) for switched in (False, True)}
        times: dict[bool, list[float]] = {False: [], True: []}
        for i in range(reps + 2):
            for switched in ((False, True) if i % 2 == 0 else (True, False)):
                t0 = time.perf_counter()
                norms[switched](x).backward(g)
                if i >= 2:
                    times[switched].append(time.perf_counter() - t0)
        own, ours = statistics.median(times[False]), statistics.median(times[True])
        rows.append({"label": label, "shape": list(shape), "own_ms": own * 1e3, "closed_form_ms": ours * 1e3,
                     "speedup": own / ours, "own_kept_bytes": kept_bytes(norms[False], x),
                     "closed_form_kept_bytes": kept_bytes(norms[True], x)})
        r = rows[-1]
        print(f"{label:<12} {str(tuple(shape)):<16} own {r['own_ms']:6.2f} ms  closed form {r['closed_form_ms']:6.2f} ms"
              f"  {r['speedup']:.2f}x  kept {r['own_kept_bytes'] / 2**20:.2f} -> {r['closed_form_kept_bytes'] / 2**20:.3f} MiB",
              flush=True)
    return rows


def step(base: Path, data: Path, work: Path, rounds: int, threads: int) -> dict[str, Any]:
    import perf_runs

    from daemon.train import batching
    from daemon.train.model import load_for_training
    from daemon.train.step import fast_paths, loss_sum

    ns = argparse.Namespace(base=base, max_length=1024, quant="none", device="cpu", batch=8, threads=threads)
    cfg = perf_runs.traind_config(ns, work / "norms-root", True, True)
    lm = load_for_training(cfg, seed=1)
    lm.fast = fast_paths(lm)
    switched = {m: vars(m)["forward"] for m in lm.model.modules() if isinstance(vars(m).get("forward"), functools.partial)}
    examples = perf_runs.examples(data, lm.tokenizer, cfg.data)
    groups = list(batching.micro_batches(examples, cfg.training.micro_batch_size, "grouped",
                                          cfg.data.shuffle_buffer, 1, 0))
    pad_id = lm.tokenizer.pad_token_id

    def run(on: bool) -> tuple[float, float]:
        for m, closed_form in switched.items():
            if on:
                m.forward = closed_form
            else:
                vars(m).pop("forward", None)
        total, t0 = 0.0, time.perf_counter()
        for mb in groups:
            for piece in batching.width_pieces(mb, True):
                loss, _ = loss_sum(lm.model, batching.collate(piece, pad_id, pack=True), lm.fast.label_only)
                loss.backward()
                total += loss.item()
        lm.model.zero_grad(set_to_none=True)
        return time.perf_counter() - t0, total

    run(True), run(False)  # warm-up
    times: dict[bool, list[float]] = {False: [], True: []}
    losses: dict[bool, float] = {}
    for i in range(rounds):
        for on in ((False, True) if i % 2 == 0 else (True, False)):
            seconds, losses[on] = run(on)
            times[on].append(seconds)
    ratios = [own / ours for own, ours in zip(times[False], times[True])]
    return {"dtype": str(lm.dtype), "norms_switched": len(switched), "micro_batches": len(groups),
            "own_s": times[False], "closed_form_s": times[True], "ratios": ratios,
            "median_ratio": statistics.median(ratios), "loss_own": losses[False], "loss_closed_form": losses[True]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="25m", help="models for the step measure ('' for none)")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--examples", type=int, default=None, help="the step's examples (default: bench/perf.py's per model)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", type=Path, default=Path("/tmp/traind-perf"))
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = p.parse_args()
    import torch

    from daemon.train.model import cpu_has_native_bf16

    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if cpu_has_native_bf16() else torch.float32  # what the daemon computes in on this CPU
    out: dict[str, Any] = {"torch": torch.__version__, "threads": args.threads, "dtype": str(dtype),
                           "layers": layers(dtype, args.reps), "step": {}}
    models = [m for m in args.models.split(",") if m]
    if models:
        from perf import prepare

        prep = prepare(args.work, models, ["realistic"], args.examples)
        for model in models:
            r = step(prep["bases"][model], prep["data"]["realistic"][model], args.work, args.rounds, args.threads)
            out["step"][model] = r
            print(f"{model} step ({r['micro_batches']} micro-batches, {r['norms_switched']} norms): own / closed form "
                  f"{r['median_ratio']:.3f}x (rounds {', '.join(f'{x:.3f}' for x in r['ratios'])}); summed loss "
                  f"{r['loss_own']:.6f} / {r['loss_closed_form']:.6f}", flush=True)
    write_result(args.out, "norms", out)


if __name__ == "__main__":
    main()
