"""The cost model of `batching.width_pieces`, measured: what one more forward and backward costs, in tokens.

    .venv/bin/python bench/pieces.py                     # the 5M and 25M models (about two minutes)
    .venv/bin/python bench/pieces.py --models 25m --reps 9

traind runs a micro-batch in pieces of similar length on the CPU when the padding that saves outweighs
the cost of one more forward and backward (daemon.train.batching). That trade is priced in token slots:
PIECE_OVERHEAD_TOKENS for a piece, ATTENTION_PAIR_TOKENS for an attended (query, key) pair of a causal
row. This times traind's forward and backward (label-only loss, packed rows, the model as the daemon
loads it: bf16 compute where the CPU has it) over packed batches of several shapes, fits
    seconds = overhead + per_token x slots + per_pair x rows x width^2 / 2
by least squares, and prints overhead / per_token and per_pair / per_token beside the constants in use.
Writes bench/results/pieces-<stamp>.json. Uses the models of bench/perf.py (built in --work on first use).
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

# (rows, width): lone short rows price the overhead, many short rows the per-token cost, long rows attention
SHAPES = ((1, 8), (1, 32), (1, 128), (1, 256), (1, 512), (1, 1024), (8, 128), (4, 256), (16, 64), (2, 512))


def timed(lm: Any, rows: int, width: int, reps: int) -> float:
    """Median seconds of a forward + backward of `rows` rows of `width` tokens (two warm-up runs first)."""
    import torch

    from daemon.train.batching import collate
    from daemon.train.data import Example
    from daemon.train.step import loss_sum

    gen = torch.Generator().manual_seed(rows * 10_000 + width)
    vocab = len(lm.tokenizer)
    batch = []
    for i in range(rows):
        ids = torch.randint(3, vocab, (width,), generator=gen).tolist()
        batch.append(Example(i, ids, ids))  # every token a label
    tensors = collate(batch, lm.tokenizer.pad_token_id, pack=True)
    times = []
    for _ in range(reps + 2):
        t0 = time.perf_counter()
        loss, _ = loss_sum(lm.model, tensors, lm.fast.label_only)
        loss.backward()
        times.append(time.perf_counter() - t0)
    lm.model.zero_grad(set_to_none=True)
    return statistics.median(times[2:])


def fit(points: list[dict[str, float]]) -> dict[str, float]:
    """Least squares of seconds = overhead + per_token x slots + per_pair x pairs."""
    import torch

    a = torch.tensor([[1.0, p["rows"] * p["width"], p["rows"] * p["width"] ** 2 / 2] for p in points], dtype=torch.float64)
    y = torch.tensor([[p["seconds"]] for p in points], dtype=torch.float64)
    overhead, per_token, per_pair = torch.linalg.lstsq(a, y).solution.flatten().tolist()
    return {"overhead_s": overhead, "per_token_s": per_token, "per_pair_s": per_pair,
            "overhead_tokens": overhead / per_token, "pair_tokens": per_pair / per_token}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="5m,25m")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", type=Path, default=Path("/tmp/traind-perf"))
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = p.parse_args()
    import torch

    import perf_runs
    from perf import prepare

    from daemon.train.batching import ATTENTION_PAIR_TOKENS, PIECE_OVERHEAD_TOKENS
    from daemon.train.model import load_for_training
    from daemon.train.step import fast_paths

    torch.set_num_threads(args.threads)
    models = args.models.split(",")
    prep = prepare(args.work, models, ["realistic"], None)
    out: dict[str, Any] = {"in_use": {"overhead_tokens": PIECE_OVERHEAD_TOKENS, "pair_tokens": ATTENTION_PAIR_TOKENS},
                           "torch": torch.__version__, "threads": args.threads, "models": {}}
    for model in models:
        ns = argparse.Namespace(base=prep["bases"][model], max_length=1024, quant="none", device="cpu", batch=8,
                                threads=args.threads)
        lm = load_for_training(perf_runs.traind_config(ns, args.work / "pieces-root", True, True), seed=1)
        lm.fast = fast_paths(lm)
        points = []
        for rows, width in SHAPES:
            points.append({"rows": rows, "width": width, "seconds": timed(lm, rows, width, args.reps)})
            print(f"{model} {rows:>2} x {width:<5} {points[-1]['seconds'] * 1e3:8.1f} ms", flush=True)
        fitted = fit(points)
        out["models"][model] = {"dtype": str(lm.dtype), "points": points, "fit": fitted}
        print(f"{model}: a piece costs {fitted['overhead_tokens']:.0f} tokens, an attended pair "
              f"1/{1 / fitted['pair_tokens']:.0f} of a token (in use: {PIECE_OVERHEAD_TOKENS:.0f}, "
              f"1/{1 / ATTENTION_PAIR_TOKENS:.0f})", flush=True)
    write_result(args.out, "pieces", out)


if __name__ == "__main__":
    main()
