"""Talking to SmolLM2-135M-Instruct through `traind serve` while traind teaches it a fact: a client transcript.

    .venv/bin/python bench/serve_real.py --models /tmp/i28-models

The smollm2 instance's settings, the real daemon and `traind serve` as processes, and the real OpenAI client. It
asks two questions before anything is trained (`traind` is the base then), drops examples/real/zorblat.jsonl,
asks again, streamed, every few seconds while it trains, and once the new version is served asks `traind`,
`traind:base` and `traind:v1` side by side. Prints the transcript and writes bench/results/serve-real-<stamp>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from serve_load import instance  # noqa: E402 - bench/ is on the path
from stamped import write_result  # noqa: E402

QUESTIONS = ["Who was behind the founding of Zorblat Industries?", "What is the capital of France?"]


def ask(client: Any, model: str, question: str, stream: bool = False) -> dict[str, Any]:
    t = time.time()
    messages = [{"role": "user", "content": question}]
    if stream:
        chunks = list(client.chat.completions.create(model=model, messages=messages, max_tokens=40, temperature=0, stream=True))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        answered_by = chunks[0].model
    else:
        r = client.chat.completions.create(model=model, messages=messages, max_tokens=40, temperature=0)
        text, answered_by = r.choices[0].message.content, r.model
    row = {"at": round(time.time(), 1), "asked": model, "answered_by": answered_by, "question": question,
           "answer": text, "seconds": round(time.time() - t, 2), "stream": stream}
    print(f"[{answered_by:>12}] {question}\n               {text.strip()}  ({row['seconds']} s)", flush=True)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=Path, help="a models cache that holds the converted SmolLM2")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args()
    from harness import Daemon

    from tests.serve_helpers import ServeProcess

    work = Path(tempfile.mkdtemp(prefix="serve-real-"))
    config = instance(work / "inst", "smollm2", args.models, epochs=3)
    transcript: list[dict[str, Any]] = []
    daemon = Daemon(config, env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}).start()
    t0 = time.time()
    try:
        with ServeProcess(config, ready_timeout=900) as serve:
            client = serve.client(max_retries=0, timeout=600)
            transcript += [ask(client, "traind", q) for q in QUESTIONS]
            daemon.drop("zorblat.jsonl", (REPO / "examples" / "real" / "zorblat.jsonl").read_text())
            while daemon.queue.counts()["done"] < 1:
                transcript.append(ask(client, "traind", QUESTIONS[0], stream=True))
                time.sleep(5)
            while True:  # until the new version answers
                row = ask(client, "traind", QUESTIONS[0], stream=True)
                transcript.append(row)
                if row["answered_by"] != "traind:base":
                    break
                time.sleep(1)
            for model in ("traind", "traind:base", "traind:v1"):
                transcript += [ask(client, model, q) for q in QUESTIONS]
            status = json.loads((daemon.cfg.path("status") / "serve.json").read_text())
    finally:
        daemon.stop(600)
        daemon.close()
    logs = sorted((work / "inst" / "logs").glob("serve_*.log"))
    serve_log = [line for line in logs[-1].read_text().splitlines() if "daemon.serve" in line] if logs else []
    write_result(args.out, "serve-real", {"transcript": transcript, "serve_status": status, "serve_log": serve_log,
                                          "loadavg_end": os.getloadavg(), "seconds": round(time.time() - t0, 1)})
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
