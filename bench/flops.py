"""Useful work: a model's training FLOPs per real token, and this machine's practical matmul peak.

    from bench.flops import matmul_peak, model_flops_per_token
    efficiency = tokens_per_second * model_flops_per_token(base, data) / matmul_peak(threads, dtype="bfloat16")

perf (its FLOPs section) and compile use them.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


def matmul_peak(threads: int, n: int = 1536, reps: int = 6, dtype: str = "float32") -> float:
    """FLOP/s of a square `dtype` matmul on `threads` threads: the best of `reps` (this machine's practical peak)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n, dtype=getattr(torch, dtype)), torch.randn(n, n, dtype=getattr(torch, dtype))
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(reps))
    torch.set_num_threads(before)
    return 2 * n ** 3 / best


def _timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def model_flops_per_token(base: Path, data: Path, r: int = 8) -> float:
    """Training FLOPs per real token for a frozen base with LoRA r on every linear layer of the blocks:
    4 x the linear weights (forward + the backward to the inputs; no weight gradients), attention
    (3 x 4 x context x width per layer, causal: a token at position t attends to t + 1 keys, averaged over
    the tokens, so a long example weighs by its length: the mean of L(L+1)/2 over the mean of L), and the LoRA
    factors (forward, and the backward to the factors and the inputs: 3 x 2 x r x (in + out)). The LM head
    counts only at the positions that have a label: nobody needs the prompt's logits, so their FLOPs are
    not useful work (counting them would credit traind with work it rightly skips)."""
    cfg = json.loads((base / "config.json").read_text())
    d, layers, inter, vocab = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"], cfg["vocab_size"]
    head_dim = cfg.get("head_dim") or d // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * head_dim, cfg["num_key_value_heads"] * head_dim
    shapes = [(d, q), (d, kv), (d, kv), (q, d), (d, inter), (d, inter), (inter, d)]  # q k v o gate up down
    context, labelled = _token_stats(base, data)
    linear = layers * sum(i * o for i, o in shapes) + d * vocab * labelled  # and the LM head where labels are
    lora = layers * sum(2 * r * (i + o) for i, o in shapes)
    attention = layers * 3 * 4 * context * q
    return 4 * linear + 3 * lora + attention


def _token_stats(base: Path, data: Path) -> tuple[float, float]:
    """(keys a token attends to, on average over the tokens; the fraction of tokens that are a next-token target)."""
    from transformers import AutoTokenizer

    from daemon.config import DataConfig
    from daemon.train.data import IGNORE, train_examples
    from daemon.validate import DataFormat

    tok = AutoTokenizer.from_pretrained(base)
    exs = list(train_examples(data, DataFormat.PROMPT_COMPLETION, tok, DataConfig(max_length=1024, eval_fraction=0.0), 0, 0))
    tokens = sum(len(ex.input_ids) for ex in exs)
    targets = sum(sum(1 for t in ex.labels[1:] if t != IGNORE) for ex in exs)
    keys = sum(len(ex.input_ids) * (len(ex.input_ids) + 1) / 2 for ex in exs)
    return keys / tokens, targets / tokens
