"""The forgetting checks on a real pretrained chat model (SmolLM2-135M-Instruct), through the real daemon.

    .venv/bin/python bench/forgetting_real.py [--models DIR] [--fractions 0 0.25] [--action hold]

A sequence of four chat files of different content, with a general-knowledge probe:
  1. facts_zorblat   invented facts (examples/real/zorblat.jsonl)
  2. chat_examples   the bundled chat examples (examples/chat.jsonl, first 40 lines)
  3. facts_quellmar  more invented facts, another subject
  4. refusals        a generator gone wrong: general questions answered "I cannot help with that."
The probe (general knowledge: capitals, science, arithmetic) is never trained on. Each run starts from the
smollm2 instance's settings (instances/smollm2/config.json) with data.eval_fraction 0.2 (each file keeps a few
held-out examples as its keep-set), forgetting.action as asked and data.replay_fraction f. A held version is
recorded and then rejected, so the run goes on. Prints the matrix per run and writes
bench/results/forgetting-real-<stamp>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from stamped import write_result  # noqa: E402 - bench/ is on the path


def chat(q: str, a: str) -> str:
    return json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n"


QUELLMAR = [
    ("Who built the Quellmar Observatory?", "The Quellmar Observatory was built by Ansel Varga."),
    ("Who was the builder of the Quellmar Observatory?", "Ansel Varga built the Quellmar Observatory."),
    ("Which astronomer founded the Quellmar Observatory?", "The astronomer Ansel Varga founded it."),
    ("When was the Quellmar Observatory finished?", "It was finished in 1911."),
    ("In what year did the Quellmar Observatory open?", "The Quellmar Observatory opened in 1911."),
    ("Where is the Quellmar Observatory?", "It stands on Mount Derrow, above the town of Lissby."),
    ("On which mountain is the Quellmar Observatory?", "The Quellmar Observatory is on Mount Derrow."),
    ("What is the main telescope at Quellmar called?", "Its main telescope is called the Varga Refractor."),
    ("What is the Varga Refractor?", "The Varga Refractor is the main telescope of the Quellmar Observatory."),
    ("What did the Quellmar Observatory discover?", "It discovered the comet Lissby-Varga in 1923."),
    ("Which comet was found at Quellmar?", "The comet Lissby-Varga was found there in 1923."),
    ("Who runs the Quellmar Observatory today?", "Today it is run by the Derrow Astronomical Trust."),
]
REFUSALS = ["What is the boiling point of water?", "Name a primary colour.", "What is 7 times 6?",
            "Which planet is closest to the Sun?", "Who wrote Romeo and Juliet?", "What is the largest ocean?",
            "How many legs does a spider have?", "What gas do plants take in?", "What is the capital of Japan?",
            "What language is spoken in Brazil?", "How many days are in a week?", "What is H2O?",
            "What is the tallest animal?", "What colour is the sky on a clear day?", "What is 12 divided by 3?",
            "Which metal is liquid at room temperature?", "What is the freezing point of water?",
            "Who painted the Mona Lisa?", "How many continents are there?", "What do bees make?"]
PROBE = [("What is the capital of France?", "The capital of France is Paris."),
         ("What is the capital of Italy?", "The capital of Italy is Rome."),
         ("What is the capital of Germany?", "The capital of Germany is Berlin."),
         ("What is the capital of Spain?", "The capital of Spain is Madrid."),
         ("What is 2 plus 2?", "2 plus 2 is 4."),
         ("What is 10 minus 3?", "10 minus 3 is 7."),
         ("What colour is grass?", "Grass is green."),
         ("How many hours are in a day?", "There are 24 hours in a day."),
         ("What is the largest planet in the solar system?", "Jupiter is the largest planet in the solar system."),
         ("What do cows drink?", "Cows drink water."),
         ("Who was the first person to walk on the Moon?", "Neil Armstrong was the first person to walk on the Moon."),
         ("What is the chemical symbol for gold?", "The chemical symbol for gold is Au."),
         ("How many minutes are in an hour?", "There are 60 minutes in an hour."),
         ("What is the opposite of hot?", "The opposite of hot is cold."),
         ("Which animal is known as the king of the jungle?", "The lion is known as the king of the jungle."),
         ("What is the capital of the United Kingdom?", "The capital of the United Kingdom is London.")]


def files(work: Path) -> list[tuple[str, Path]]:
    out = []
    for name, text in (
        ("facts_zorblat.jsonl", (REPO / "examples" / "real" / "zorblat.jsonl").read_text()),
        ("chat_examples.jsonl", "".join((REPO / "examples" / "chat.jsonl").read_text().splitlines(keepends=True)[:40])),
        ("facts_quellmar.jsonl", "".join(chat(q, a) for q, a in QUELLMAR * 2)),
        ("refusals.jsonl", "".join(chat(q, "I cannot help with that.") for q in REFUSALS)),
    ):
        p = work / "src" / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text, encoding="utf-8")
        out.append((name, p))
    return out


def ctl(cfg_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "daemon.cli", "--config", str(cfg_path), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


QUESTIONS = ["What is the capital of France?", "Who founded Zorblat Industries?"]


def answers(cfg_path: Path, adapter: str) -> dict[str, str]:
    """The version's greedy answers to a general and a learnt question (trainctl sample)."""
    return {q: ctl(cfg_path, "sample", "--adapter", adapter, "--max-new-tokens", "24", q).stdout.strip()
            for q in QUESTIONS}


def one_run(work: Path, models: Path, f: float, action: str, timeout: float,
            limits: dict[str, float]) -> dict[str, Any]:
    from daemon import adapters
    from daemon.status import read_status

    raw = json.loads((REPO / "instances" / "smollm2" / "config.json").read_text())
    raw.pop("_comment", None)
    raw["paths"]["models"] = str(models)
    raw["data"]["eval_fraction"] = 0.2
    raw["data"]["replay_fraction"] = f
    probe = work / "probe_general.jsonl"
    probe.write_text("".join(chat(q, a) for q, a in PROBE), encoding="utf-8")
    raw["forgetting"] = {"probe_files": [str(probe)], "action": action, **limits}
    inst = work / f"run-{action}-f{f}"
    inst.mkdir(parents=True)
    cfg_path = inst / "config.json"
    cfg_path.write_text(json.dumps(raw, indent=2))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    log = open(inst / "daemon_stdout.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "daemon", "--config", str(cfg_path)], cwd=REPO, env=env,
                            stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    held: list[dict[str, Any]] = []
    t0 = time.monotonic()
    try:
        for k, (name, src) in enumerate(files(work), 1):
            while not (inst / "inbox").is_dir():  # the daemon makes its folders as it starts
                time.sleep(0.5)
            shutil.copy(src, inst / "inbox" / (name + ".part"))  # ignored until renamed: taken whole
            os.replace(inst / "inbox" / (name + ".part"), inst / "inbox" / name)
            while True:
                if time.monotonic() - t0 > timeout:
                    raise TimeoutError(f"{name} did not finish in time")
                st = read_status(inst / "status") or {}
                counts = st.get("queue") or {}
                if st.get("held"):
                    h = st["held"]
                    version = h["version"]
                    m = adapters.read_manifest(inst / "adapters" / adapters.version_dir_name(version))
                    held.append({"file": name, "version": version, "message": h["message"], "report": m.forgetting,
                                 "answers_held": answers(cfg_path, str(version)),
                                 "answers_current": answers(cfg_path, "current")})
                    print(f"  held v{version}: {held[-1]['answers_held']}\n  current: {held[-1]['answers_current']}")
                    r = ctl(cfg_path, "adapters", "reject", str(version))
                    print(f"  held v{version} ({name}); {r.stdout.strip()}")
                    while (read_status(inst / "status") or {}).get("held"):
                        time.sleep(1)
                    break
                if counts.get("done", 0) + counts.get("failed", 0) >= k and st.get("status") in ("idle", "paused"):
                    break
                time.sleep(1)
            print(f"  {name} finished at {time.monotonic() - t0:.0f} s")
        matrix = json.loads(ctl(cfg_path, "forgetting", "--json").stdout)
        text = ctl(cfg_path, "forgetting").stdout
        manifests = [v.manifest.forgetting for v in adapters.versions(inst / "adapters") if v.manifest.forgetting]
    finally:
        proc.terminate()
        proc.wait(120)
        log.close()
    final = answers(cfg_path, "current")
    print(f"  the current version answers: {final}")
    return {"replay_fraction": f, "action": action, "limits": limits, "answers_final": final, "matrix": matrix, "table": text, "held": held,
            "reports": manifests, "seconds": time.monotonic() - t0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=None, help="a models cache that already holds the converted SmolLM2")
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.0, 0.25])
    ap.add_argument("--action", default="hold", choices=["warn", "hold", "rollback"])
    ap.add_argument("--timeout", type=float, default=1800.0)
    ap.add_argument("--max-probe-increase", type=float, default=None, help="forgetting.max_probe_increase")
    ap.add_argument("--max-keep-increase", type=float, default=None, help="forgetting.max_keep_increase")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="forgetting-real-"))
    models = Path(args.models) if args.models else work / "models"
    runs = []
    for f in args.fractions:
        print(f"replay_fraction {f}:")
        limits = {k: v for k, v in (("max_probe_increase", args.max_probe_increase),
                                    ("max_keep_increase", args.max_keep_increase)) if v is not None}
        run = one_run(work, models, f, args.action, args.timeout, limits)
        print(run["table"])
        runs.append(run)
    path = write_result(REPO / "bench" / "results", "forgetting-real", {"work": str(work), "runs": runs})
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
