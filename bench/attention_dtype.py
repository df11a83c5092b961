"""SDPA forward + backward on the CPU in bf16 against the same inputs upcast to fp32, by row length.

    .venv/bin/python bench/attention_dtype.py                    # the 5M and 25M models' head shapes (a minute)
    .venv/bin/python bench/attention_dtype.py --lengths 64,128,512 --reps 12

Why it exists: daemon.train.precision runs the attention of rows of up to
FP32_ROWS_UP_TO tokens in fp32 when the model computes in bf16 on the CPU, because
torch's CPU flash-attention kernel is slower in bf16 there. This measures that
crossover on this machine (causal, grouped-query heads as the models have them,
micro-batch 8 rows of the length, one thread). Writes bench/results/attention-dtype-<stamp>.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))  # also when run as `python -m bench.attention_dtype`

from stamped import write_result  # noqa: E402 - bench/ is on the path

SHAPES = {"5m": (4, 2, 64), "25m": (8, 4, 64)}  # (query heads, key/value heads, head dim): bench/workloads.py


def timed(q, k, v, upcast: bool, reps: int) -> float:
    """Median seconds of SDPA forward + backward (the first two runs are warm-up)."""
    import torch.nn.functional as F

    times = []
    for _ in range(reps + 2):
        t0 = time.perf_counter()
        args = (q.float(), k.float(), v.float()) if upcast else (q, k, v)
        out = F.scaled_dot_product_attention(*args, is_causal=True, enable_gqa=True).to(q.dtype)
        out.float().sum().backward()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[2:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="64,110,130,200,256,384,512,768,1024")
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--reps", type=int, default=6)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for model, (heads, kv_heads, dim) in SHAPES.items():
        for length in (int(x) for x in args.lengths.split(",")):
            q = torch.randn(args.rows, heads, length, dim, generator=gen).to(torch.bfloat16).requires_grad_()
            k, v = (torch.randn(args.rows, kv_heads, length, dim, generator=gen).to(torch.bfloat16).requires_grad_()
                    for _ in range(2))
            bf16, fp32 = timed(q, k, v, False, args.reps), timed(q, k, v, True, args.reps)
            rows.append({"model": model, "length": length, "bf16_ms": bf16 * 1e3, "fp32_ms": fp32 * 1e3,
                         "bf16_over_fp32": bf16 / fp32})
            print(f"{model} {length:5d} tokens: bf16 {bf16 * 1e3:7.2f} ms, upcast to fp32 {fp32 * 1e3:7.2f} ms, "
                  f"bf16/fp32 {bf16 / fp32:.2f}", flush=True)
    write_result(args.out, "attention-dtype", {"torch": torch.__version__, "threads": args.threads, "rows": args.rows,
                                                "results": rows})


if __name__ == "__main__":
    main()
