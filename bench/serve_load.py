"""traind serve beside a training daemon: how much serving slows training, and how fast a new version is served.

    .venv/bin/python bench/serve_load.py                                   # the embedded model
    .venv/bin/python bench/serve_load.py --model smollm2 --models /tmp/i28-models --files 4

One instance, the real daemon and `traind serve` as processes. Files of the same size and work (the bundled chat
examples, each with its own system line so none is a duplicate) train one after another; on every second file an
OpenAI client sends one chat request per second (max_tokens tokens each, ignore_eos, so every request costs the
same) until the file's version is being served. Per file: training tokens/s from its step log (steps 2 to the
end), with and without the load, paired in order (1 vs 2, 3 vs 4); requests sent, failed and their latency; and
for each publication the time from `current.json` being replaced to the first response that names the new
version (the loaded files) and to `traind serve` having loaded it by itself (`status/serve.json`, every file).
Writes bench/results/serve-load-<stamp>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from stamped import write_result  # noqa: E402 - bench/ is on the path


def instance(work: Path, model: str, models: Path | None, epochs: int) -> Path:
    from harness import write_instance

    if model == "smollm2":
        raw = json.loads((REPO / "instances" / "smollm2" / "config.json").read_text())
        raw.pop("_comment", None)
        raw["training"]["epochs_per_file"] = epochs
        if models is not None:
            raw["paths"]["models"] = str(models)
        raw["serve"]["enabled"] = False  # started here, on a free port
        work.mkdir(parents=True, exist_ok=True)
        (work / "config.json").write_text(json.dumps(raw, indent=2))
        return work / "config.json"
    return write_instance(work, models, data={"max_length": 128}, training={"epochs_per_file": epochs, "cpu_threads": 0},
                          model={"quantization": "auto"})


def data_file(k: int, lines: int) -> str:
    src = (REPO / "examples" / "chat.jsonl").read_text(encoding="utf-8").splitlines()[:lines]
    out = []
    for line in src:
        rec = json.loads(line)
        rec["messages"] = [{"role": "system", "content": f"Session {k}."}] + [m for m in rec["messages"] if m["role"] != "system"]
        out.append(json.dumps(rec))
    return "\n".join(out) + "\n"


def tokens_per_sec(step_log: Path) -> float | None:
    steps = [json.loads(line) for line in step_log.read_text().splitlines() if line.strip()]
    steps = [s for s in steps if s.get("type") == "step"]
    if len(steps) < 3:
        return None
    tokens = sum(s["tokens"] for s in steps[1:])
    return tokens / (steps[-1]["elapsed"] - steps[0]["elapsed"])


class Load:
    """One chat request per second from an OpenAI client until stopped; records each one."""

    def __init__(self, client: Any, max_tokens: int, rate: float) -> None:
        self.client, self.max_tokens, self.period = client, max_tokens, 1.0 / rate
        self.records: list[dict[str, Any]] = []
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []

    def one(self) -> None:
        sent = time.time()
        try:
            r = self.client.chat.completions.create(
                model="traind", messages=[{"role": "user", "content": "Tell me something about your day."}],
                max_tokens=self.max_tokens, temperature=0, extra_body={"ignore_eos": True})
            self.records.append({"sent": sent, "received": time.time(), "model": r.model, "ok": True,
                                 "tokens": r.usage.completion_tokens})
        except Exception as e:  # noqa: BLE001 - every failure is a figure here
            self.records.append({"sent": sent, "received": time.time(), "ok": False, "error": repr(e)[:300]})

    def run(self) -> None:
        next_at = time.monotonic()
        while not self.stop.is_set():
            t = threading.Thread(target=self.one, daemon=True)
            t.start()
            self.threads.append(t)
            next_at += self.period
            self.stop.wait(max(0.0, next_at - time.monotonic()))

    def __enter__(self) -> "Load":
        self.runner = threading.Thread(target=self.run, daemon=True)
        self.runner.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.runner.join()
        for t in self.threads:
            t.join(300)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=["embedded", "smollm2"], default="embedded")
    ap.add_argument("--models", type=Path, help="a models cache (for smollm2: one that holds the converted GGUF)")
    ap.add_argument("--files", type=int, default=4, help="files trained, every second one under load (even)")
    ap.add_argument("--lines", type=int, default=64, help="lines of examples/chat.jsonl per file")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--rate", type=float, default=1.0, help="requests per second under load")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args()

    from harness import Daemon

    from daemon import adapters
    from tests.serve_helpers import ServeProcess

    work = Path(tempfile.mkdtemp(prefix="serve-load-"))
    config = instance(work / "inst", args.model, args.models, args.epochs)
    daemon = Daemon(config, env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}).start()
    store = daemon.cfg.path("adapters")
    files: list[dict[str, Any]] = []
    t0 = time.time()
    try:
        with ServeProcess(config, ready_timeout=600) as serve:
            client = serve.client(max_retries=0, timeout=600)
            for k in range(1, args.files + 1):
                loaded = k % 2 == 0
                name = f"session{k}.jsonl"
                daemon.drop(name, data_file(k, args.lines))
                load = Load(client, args.max_tokens, args.rate) if loaded else None
                if load:
                    load.__enter__()
                try:
                    daemon.wait_counts(done=k, timeout=3600)
                    current = adapters.read_current(store)
                    published = (store / adapters.CURRENT).stat().st_mtime
                    deadline = time.time() + 60
                    while load and time.time() < deadline and not any(
                            r.get("model") == f"traind:v{current.version}" for r in load.records):
                        time.sleep(0.2)
                finally:
                    if load:
                        load.__exit__(None, None, None)
                follow = None
                deadline = time.time() + 30  # serve.json is rewritten every 2 s
                while follow is None and time.time() < deadline:
                    swaps = json.loads((daemon.cfg.path("status") / "serve.json").read_text()).get("swaps", [])
                    follow = next((w["lag_seconds"] for w in swaps if w["version"] == current.version), None)
                    time.sleep(0.5)
                row: dict[str, Any] = {"file": name, "version": current.version, "under_load": loaded,
                                       "train_tokens_per_sec": tokens_per_sec(current.path / adapters.STEP_LOG),
                                       "steps": current.manifest.steps, "serve_loaded_it_after_s": follow}
                if load:
                    ok = [r for r in load.records if r["ok"]]
                    first = min((r["received"] for r in ok if r["model"] == f"traind:v{current.version}"), default=None)
                    lat = sorted(r["received"] - r["sent"] for r in ok)
                    row.update({"requests": len(load.records), "failed": len(load.records) - len(ok),
                                "errors": [r["error"] for r in load.records if not r["ok"]][:5],
                                "latency_median_s": statistics.median(lat) if lat else None,
                                "latency_max_s": lat[-1] if lat else None,
                                "first_answer_of_new_version_after_s": None if first is None else round(first - published, 3),
                                "versions_answering": sorted({r["model"] for r in ok})})
                files.append(row)
                print(json.dumps(row), flush=True)
    finally:
        daemon.stop(600)
        daemon.close()
    pairs = [(files[i]["train_tokens_per_sec"], files[i + 1]["train_tokens_per_sec"]) for i in range(0, len(files) - 1, 2)]
    slowdowns = [round(1 - loaded / quiet, 4) for quiet, loaded in pairs if quiet and loaded]
    result = {"model": args.model, "rate_per_s": args.rate, "max_tokens": args.max_tokens, "lines": args.lines,
              "epochs": args.epochs, "files": files, "training_slowdown_by_pair": slowdowns,
              "loadavg_end": os.getloadavg(), "cpus": os.cpu_count(), "seconds": round(time.time() - t0, 1),
              "serve_config": json.loads(config.read_text()).get("serve", {})}
    print(json.dumps({"training_slowdown_by_pair": slowdowns}))
    write_result(args.out, "serve-load", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
