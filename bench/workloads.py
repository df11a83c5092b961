"""Models and data sets the benchmarks share: built locally, deterministic, nothing downloaded.

    from bench.workloads import build_model, write_dataset
    base = build_model("18m", root / "m18", tokenizer_from=ensure_embedded(root / "models"))
    path = write_dataset(root / "real.jsonl", "realistic", n=2000, seed=0)

Models are Qwen3-architecture causal LMs with random weights and the embedded
model's tokenizer (1,024 tokens): speed does not depend on what the weights
know. `5m-v152k` is the 5m body with Qwen's 151,936-entry vocabulary (embedding
and LM head sized as in a real Qwen base; the text still uses the first 1,024
ids): there the LM head, not the body, is most of the compute, as in the
small real models users fine-tune. Data sets are prompt/completion JSONL:
  realistic  prompt and completion lengths each lognormal (median 80 words), kept within 16-500 words
  fixed      every example 100 words (50 of prompt, 50 of completion): padding plays no part
Words come from the bundled examples' vocabulary, so the tokenizer sees text it knows.
"""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# hidden, layers, intermediate, heads, kv heads[, vocabulary]: about 5M, 18M and 25M parameters with the
# tokenizer's 1,024-token vocabulary; 5m-v152k: the 5m body with a Qwen-sized vocabulary (78M in embedding + head)
SIZES = {
    "5m": (256, 6, 768, 4, 2),
    "18m": (384, 10, 1152, 6, 2),
    "25m": (512, 8, 1536, 8, 4),
    "5m-v152k": (256, 6, 768, 4, 2, 151_936),
}
WORDS_MEDIAN, WORDS_SIGMA, WORDS_MIN, WORDS_MAX = 80, 0.9, 16, 500


def build_model(size: str, dest: Path, tokenizer_from: Path) -> Path:
    """A Qwen3 of `size` (SIZES) with random weights (seed 0) and the tokenizer of `tokenizer_from`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3Config

    if (dest / "config.json").is_file():
        return dest
    hidden, layers, inter, heads, kv, *vocab = SIZES[size]
    tok = AutoTokenizer.from_pretrained(tokenizer_from)
    config = Qwen3Config(vocab_size=vocab[0] if vocab else len(tok), hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, head_dim=hidden // heads,
                         max_position_embeddings=4096, tie_word_embeddings=False, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, bos_token_id=None)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(dest)
    tok.save_pretrained(dest)
    return dest


def vocabulary() -> list[str]:
    words: set[str] = set()
    for path in sorted((REPO / "examples").glob("*.jsonl")):
        words.update(re.findall(r"[A-Za-z]{2,}", path.read_text(encoding="utf-8")))
    return sorted(words)


def _words(rng: random.Random, vocab: list[str], n: int) -> str:
    return " ".join(rng.choice(vocab) for _ in range(n))


def _lognormal_words(rng: random.Random) -> int:
    while True:
        n = int(rng.lognormvariate(math.log(WORDS_MEDIAN), WORDS_SIGMA))
        if WORDS_MIN <= n <= WORDS_MAX:
            return n


def write_dataset(path: Path, kind: str, n: int, seed: int = 0) -> Path:
    """`n` prompt/completion records of `kind` (realistic or fixed) into `path`."""
    rng, vocab = random.Random(seed), vocabulary()
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            p, c = (_lognormal_words(rng), _lognormal_words(rng)) if kind == "realistic" else (50, 50)
            f.write(json.dumps({"prompt": _words(rng, vocab, p) + "\n", "completion": _words(rng, vocab, c)}) + "\n")
    return path
