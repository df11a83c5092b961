"""Padding waste by batching policy and file size: no training, only the token slots each policy computes.

    .venv/bin/python bench/padding.py                          # realistic and fixed sets, 96 to 2,000 examples
    .venv/bin/python bench/padding.py --sizes 500,5000 --json out.json

Padding waste = 1 - real tokens / token slots computed, over one epoch of micro-batches of 8, for
  traind           length-grouped within the shuffle window (1,024), packed rows, each micro-batch run in
                   width pieces where the cost model says so (the defaults on the CPU: batching.width_pieces)
  traind-whole     the same, each micro-batch in one forward (the defaults on a GPU without flash attention)
  traind-grouped   length-grouped, one padded row per example
  traind-plain     arrival order, padded (traind before grouping and packing)
  trainer          transformers.Trainer's defaults: a random sampler, padded to each batch's longest
  trainer-glen     Trainer with group_by_length: its LengthGroupedSampler, padded
The examples are the prompt/completion records of bench/workloads.py tokenised by the embedded model's
tokenizer, as bench/perf.py trains them. Grouping can only sort what a window holds, so a file smaller
than the window (perf.py's one-epoch files of 96 and 160 examples) pads more than a long one. Figures
are for reading, never asserted.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

BATCH, WINDOW, SEED = 8, 1024, 1
POLICIES = ("traind", "traind-whole", "traind-grouped", "traind-plain", "trainer", "trainer-glen")


def tokenised(kind: str, n: int, work: Path) -> list:
    from bench.workloads import write_dataset
    from daemon.config import config_from_dict
    from daemon.train.data import train_examples
    from daemon.train.tinymodel import ensure_embedded
    from daemon.validate import DataFormat
    from transformers import AutoTokenizer

    path = write_dataset(work / f"{kind}-{n}.jsonl", kind, n, seed=0)
    tok = AutoTokenizer.from_pretrained(ensure_embedded(work / "models"))
    cfg = config_from_dict({"data": {"max_length": 1024, "eval_fraction": 0.0}}, work)
    return list(train_examples(path, DataFormat.PROMPT_COMPLETION, tok, cfg.data, 0, 0))


def slots_of(policy: str, examples: list) -> int:
    """Token slots one epoch computes under `policy` (rows x width per micro-batch, summed)."""
    import torch
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from daemon.train.batching import batches, collate, grouped_batches, width_pieces

    if policy in ("traind", "traind-whole", "traind-grouped"):
        mbs = list(grouped_batches(examples, BATCH, WINDOW, SEED, 0))
    elif policy == "traind-plain":
        mbs = list(batches(examples, BATCH))
    else:
        if policy == "trainer":
            order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(SEED)).tolist()
        else:
            lengths = [len(ex.input_ids) for ex in examples]
            order = list(LengthGroupedSampler(BATCH, lengths=lengths, generator=torch.Generator().manual_seed(SEED)))
        mbs = list(batches([examples[i] for i in order], BATCH))
    if policy == "traind":
        mbs = [p for mb in mbs for p in width_pieces(mb, packed=True)]
    return sum(collate(mb, 0, pack=policy in ("traind", "traind-whole"))["input_ids"].numel() for mb in mbs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="realistic,fixed")
    p.add_argument("--sizes", default="96,160,500,1000,2000", help="examples per file (one epoch each)")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.data.split(","):
            for n in (int(s) for s in args.sizes.split(",")):
                exs = tokenised(kind, n, Path(tmp))
                tokens = sum(len(ex.input_ids) for ex in exs)
                row = {"data": kind, "examples": n, "tokens": tokens,
                       "waste": {pol: 1 - tokens / slots_of(pol, exs) for pol in POLICIES}}
                rows.append(row)
                print(f"{kind:<9} {n:>5} examples  " + "  ".join(f"{k} {v:6.1%}" for k, v in row["waste"].items()), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"batch": BATCH, "window": WINDOW, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
