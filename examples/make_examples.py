"""Regenerate the bundled example data (deterministic; no network).

    python examples/make_examples.py          # rewrites examples/*.jsonl

Small synthetic tasks a tiny model can visibly learn: arithmetic, capitals,
opposites, reversed words. One file per supported format.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Poland": "Warsaw", "Austria": "Vienna", "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki",
    "Denmark": "Copenhagen", "Ireland": "Dublin", "Greece": "Athens", "Hungary": "Budapest", "Japan": "Tokyo",
    "China": "Beijing", "India": "New Delhi", "Egypt": "Cairo", "Kenya": "Nairobi", "Peru": "Lima",
    "Chile": "Santiago", "Canada": "Ottawa", "Mexico": "Mexico City", "Cuba": "Havana", "Turkey": "Ankara",
}
OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "light": "dark", "early": "late", "happy": "sad",
    "open": "closed", "full": "empty", "high": "low", "old": "new", "strong": "weak", "rich": "poor",
    "wet": "dry", "loud": "quiet", "hard": "soft", "near": "far", "first": "last", "up": "down",
}
WORDS = ["apple", "river", "stone", "garden", "window", "candle", "planet", "forest", "silver", "rocket",
         "pencil", "market", "bridge", "orange", "winter", "summer", "castle", "dragon", "mirror", "butter"]


def qa_pairs(rng: random.Random, n: int) -> list[tuple[str, str]]:
    out = []
    for _ in range(n):
        kind = rng.randrange(4)
        if kind == 0:
            a, b = rng.randrange(1, 50), rng.randrange(1, 50)
            out.append((f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."))
        elif kind == 1:
            country = rng.choice(sorted(CAPITALS))
            out.append((f"What is the capital of {country}?", f"The capital of {country} is {CAPITALS[country]}."))
        elif kind == 2:
            word = rng.choice(sorted(OPPOSITES))
            out.append((f"What is the opposite of {word}?", f"The opposite of {word} is {OPPOSITES[word]}."))
        else:
            word = rng.choice(WORDS)
            out.append((f"Spell {word} backwards.", f"{word} backwards is {word[::-1]}."))
    return out


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def main() -> None:
    here = Path(__file__).parent
    rng = random.Random(20261122)
    chat = [{"messages": [{"role": "system", "content": "You answer in one short sentence."},
                          {"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in qa_pairs(rng, 240)]
    write_jsonl(here / "chat.jsonl", chat)
    write_jsonl(here / "prompt_completion.jsonl",
                [{"prompt": f"Q: {q}\nA:", "completion": f" {a}"} for q, a in qa_pairs(rng, 160)])
    write_jsonl(here / "alpaca.jsonl",
                [{"instruction": q, "input": "", "output": a} for q, a in qa_pairs(rng, 160)])
    write_jsonl(here / "text.jsonl", [{"text": f"{q} {a}"} for q, a in qa_pairs(rng, 160)])


if __name__ == "__main__":
    main()
