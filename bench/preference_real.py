"""A preference file on a real pretrained chat model (SmolLM2-135M-Instruct): traind's DPO through the real
daemon, against TRL's DPOTrainer + PEFT on the same pairs.

    .venv/bin/python bench/preference_real.py --models /tmp/i28-models [--pairs 60] [--epochs 2] [--lr 5e-4] [--threads 2]
        [--loss sigmoid|simpo] [--beta 0.1] [--sft-weight 1.0] [--no-trl] [--earlier [--replay 0.25]]

Needs the bench extra for the TRL side: `.venv/bin/pip install -e '.[bench]'` (--no-trl runs traind alone).

The file teaches a style the base does not have: every chosen answer ends with the sign-off
"Hope this helps! - Ada", every rejected answer is the same answer without it (the base, which stops after
the answer, scores the rejected side higher). Prompts are arithmetic and general questions; the held-out pairs
(traind's data.eval_fraction split, 0.2) are never trained on, by either side.

traind: the smollm2 instance's settings (instances/smollm2/config.json) with preference.loss, beta and
sft_weight as given, data.eval_fraction 0.2, the learning rate, epochs and threads given here; the file is
dropped into the inbox of a real daemon. Figures from the job's record (`trainctl queue status NAME`), time
from the history (the reference pass included: TRL scores its reference inside every step), the trainer
child's peak RSS (VmHWM).
TRL: DPOTrainer (loss_type sigmoid, plus its "sft" loss weighted --sft-weight, the same beta, the same LoRA through peft_config: its reference is the base
with the adapter switched off, no second model), the same train pairs in TRL's conversational form, the
same batch, epochs, schedule, learning rate, max_length and threads, in its own process (peak RSS from
getrusage). Its held-out figures are computed with traind's own scoring of the same held-out pairs.
Whether the model still answers: after the file, the base and the new version answer (greedy, 40 tokens) the
held-out prompts and general questions none of the pairs asks; an answer is `correct` when it holds the fact
(the city, the number, the colour), `signed` when it holds the sign-off. A version that learnt the style and
kept the model answers correct and signed; one that over-learnt it loses the facts.
--earlier trains examples/real/zorblat.jsonl (invented facts, supervised) before the preference file, and asks
its held-out questions too (of the base, the version it made and the final one): whether the preference file
kept what the earlier file taught (with --replay, data.replay_fraction replays it into the preference file).
Writes bench/results/preference-real-<stamp>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
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

SIGN_OFF = " Hope this helps! - Ada"
# --earlier: a supervised file of invented facts trained first (the preference file must not undo it)
EARLIER = REPO / "examples" / "real" / "zorblat.jsonl"
# general questions none of the pairs asks, with the word a correct answer holds
GENERAL = [("How many hours are in a day?", "24"), ("What is the largest planet in the solar system?", "Jupiter"),
           ("Who was the first person to walk on the Moon?", "Armstrong"),
           ("What is the chemical symbol for gold?", "Au"), ("How many minutes are in an hour?", "60"),
           ("What is the opposite of hot?", "cold"), ("Which animal is known as the king of the jungle?", "lion"),
           ("What is the boiling point of water in degrees Celsius?", "100")]
CAPITALS = [("France", "Paris"), ("Italy", "Rome"), ("Germany", "Berlin"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
            ("Egypt", "Cairo"), ("Canada", "Ottawa"), ("Peru", "Lima"), ("Norway", "Oslo"), ("Kenya", "Nairobi"),
            ("Greece", "Athens"), ("Poland", "Warsaw"), ("Chile", "Santiago"), ("Cuba", "Havana"),
            ("Ireland", "Dublin"), ("Austria", "Vienna"), ("Portugal", "Lisbon"), ("Sweden", "Stockholm"),
            ("Finland", "Helsinki"), ("Thailand", "Bangkok")]
COLOURS = [("grass", "green"), ("the sky on a clear day", "blue"), ("snow", "white"), ("a ripe banana", "yellow"),
           ("coal", "black"), ("a ripe tomato", "red"), ("an orange", "orange"), ("a lemon", "yellow")]


def qa_pairs(n: int, seed: int = 7) -> list[tuple[str, str]]:
    """n (question, plain answer) pairs: sums, products, capitals and colours, in a seeded order."""
    rng = random.Random(seed)
    out = [(f"What is the capital of {c}?", f"The capital of {c} is {city}.") for c, city in CAPITALS]
    out += [(f"What colour is {thing}?", f"{thing[0].upper()}{thing[1:]} is {colour}.") for thing, colour in COLOURS]
    while len(out) < n:
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        if rng.random() < 0.5:
            out.append((f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."))
        else:
            out.append((f"What is {a} times {b}?", f"{a} times {b} is {a * b}."))
    rng.shuffle(out)
    return out[:n]


def preference_file(path: Path, n: int) -> None:
    """The chat form the dashboard's playground writes."""
    rows = [{"messages": [{"role": "user", "content": q}], "chosen": {"role": "assistant", "content": a + SIGN_OFF},
             "rejected": {"role": "assistant", "content": a}} for q, a in qa_pairs(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def ctl(cfg_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "daemon.cli", "--config", str(cfg_path), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def peak_rss(pid: int) -> int | None:
    """VmHWM of a live process, in bytes."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def instance_config(work: Path, models: Path, args: argparse.Namespace) -> Path:
    raw = json.loads((REPO / "instances" / "smollm2" / "config.json").read_text())
    raw.pop("_comment", None)
    raw["paths"]["models"] = str(models)
    raw["data"].update(eval_fraction=0.2, eval_max_examples=64, replay_fraction=args.replay)
    raw["training"].update(learning_rate=args.lr, epochs_per_file=args.epochs, cpu_threads=args.threads,
                           micro_batch_size=args.batch, grad_accum_steps=1)
    raw.setdefault("speed", {})["thread_governor"] = False  # the same threads as the TRL run, throughout
    raw["preference"] = {"loss": args.loss, "beta": args.beta, "sft_weight": args.sft_weight}
    inst = work / "traind"
    inst.mkdir(parents=True)
    (inst / "config.json").write_text(json.dumps(raw, indent=2))
    return inst / "config.json"


def run_traind(work: Path, models: Path, data: Path, args: argparse.Namespace) -> dict[str, Any]:
    from daemon.history_db import HistoryDB
    from daemon.status import read_status

    cfg_path = instance_config(work, models, args)
    inst = cfg_path.parent
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    log = open(inst / "daemon_stdout.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "daemon", "--config", str(cfg_path)], cwd=REPO, env=env,
                            stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    t0 = time.monotonic()
    try:
        while (read_status(inst / "status") or {}).get("status") not in ("idle",):
            if time.monotonic() - t0 > args.timeout or proc.poll() is not None:
                raise RuntimeError(f"the daemon did not become idle (see {inst / 'daemon_stdout.log'})")
            time.sleep(1)
        rss = None
        for k, f in enumerate(([EARLIER] if args.earlier else []) + [data], 1):
            shutil.copy(f, inst / "inbox" / (f.name + ".part"))
            os.replace(inst / "inbox" / (f.name + ".part"), inst / "inbox" / f.name)
            while True:
                st = read_status(inst / "status") or {}
                if st.get("trainer_pid"):
                    rss = peak_rss(st["trainer_pid"]) or rss
                counts = st.get("queue") or {}
                if counts.get("done", 0) + counts.get("failed", 0) >= k and st.get("status") == "idle":
                    break
                if time.monotonic() - t0 > args.timeout:
                    raise TimeoutError(f"{f.name} did not finish in time")
                time.sleep(1)
        shown = ctl(cfg_path, "queue", "status", data.name).stdout
        db = HistoryDB.open_readonly(inst / "status" / "history.db")
        job = db.jobs(1)[0]
        steps = db.steps(job["job_id"])
        evals = db.evals(job["job_id"])
        status = read_status(inst / "status") or {}
    finally:
        proc.terminate()
        proc.wait(120)
        log.close()
    if job["state"] != "done":
        raise RuntimeError(f"the file failed: {job.get('reason')}")
    pref = json.loads(job["preference"])
    n_train = int(job["n_records"]) - int(pref["after"]["pairs"])
    trained = n_train * args.epochs
    # `started` is sent after the reference pass: its time is added (the file's record keeps it)
    reference_seconds = pref.get("reference_seconds") or reference_from_log(inst)
    train_seconds = steps[-1]["t"] - job["started_at"] + reference_seconds  # without the final eval
    file_seconds = job["finished_at"] - job["started_at"]  # with the final eval and the forgetting checks
    print(shown)
    return {"job_id": job["job_id"], "steps": job["steps"], "pairs_trained": trained, "train_pairs": n_train,
            "held_out_pairs": pref["after"]["pairs"], "train_seconds": train_seconds, "file_seconds": file_seconds,
            "seconds_per_pair": train_seconds / trained, "reference_seconds": reference_seconds, "trainer_peak_rss_bytes": rss, "preference": pref,
            "step_reward_accuracy": [s["reward_accuracy"] for s in steps], "first_eval": evals[0],
            "device": status.get("device"), "compute_dtype": status.get("compute_dtype"),
            "queue_status": shown}


def reference_from_log(inst: Path) -> float:
    """The reference pass's time, as the trainer logged it (a record from before `reference_seconds`)."""
    import re

    for path in sorted((inst / "logs").glob("trainer_*.log")):
        found = re.findall(r"preference reference: \d+ pair\(s\) scored in ([\d.]+) s", path.read_text())
        if found:
            return float(found[-1])
    raise RuntimeError("no reference pass in the trainer's log")


def answers(work: Path, data: Path, base: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The base's and the new version's greedy answers to the held-out prompts and the general questions, each
    marked correct (holds the fact) and signed (holds the sign-off), with the counts."""
    import re

    from daemon.config import load_config
    from daemon.jsonl import sha256_of
    from daemon.train.inspect import load_view, sample

    cfg = load_config(work / "traind" / "config.json")
    _, held = split(data, base, args, sha256_of(data))
    qa = qa_pairs(args.pairs)
    asked = [("held_out", qa[k - 1][0], re.findall(r"[\w]+", qa[k - 1][1])[-1]) for k in sorted(held)]
    asked += [("general", q, fact) for q, fact in GENERAL]
    views = [("base", "none"), ("version", "current")]
    if args.earlier:  # the earlier file's held-out questions, and the version it made
        held_out = json.loads((EARLIER.parent / "zorblat_heldout.json").read_text())
        asked += [("earlier", q, held_out["expect"]) for q in held_out["questions"]]
        views.insert(1, ("earlier", "1"))
    out: dict[str, Any] = {}
    for who, which in views:
        view = load_view(cfg, which)
        rows = []
        for kind, q, fact in asked:
            text = sample(view, q, 40)
            rows.append({"kind": kind, "prompt": q, "answer": text, "fact": fact,
                         "correct": said_more(fact, text, q),
                         "signed": SIGN_OFF.strip() in text})
        out[who] = {"label": view.label, "rows": rows}
        for kind in ("held_out", "general") + (("earlier",) if args.earlier else ()):
            mine = [r for r in rows if r["kind"] == kind]
            out[who][kind] = {"n": len(mine), "correct": sum(r["correct"] for r in mine),
                              "signed": sum(r["signed"] for r in mine)}
        del view
    return out


def said_more(word: str, answer: str, question: str) -> bool:
    """Whether the answer says `word` more often than the question does ("What colour is an orange?" is not
    answered by "An orange is a bright colour")."""
    import re

    count = lambda text: len(re.findall(rf"\b{re.escape(word)}\b", text, re.IGNORECASE))  # noqa: E731
    return count(answer) > count(question)


def split(data: Path, base: Path, args: argparse.Namespace, job_sha: str) -> tuple[list[int], list[int]]:
    """traind's train and held-out lines of the file (the same split the daemon used)."""
    import dataclasses

    from transformers import AutoTokenizer

    from daemon.config import load_config
    from daemon.train.data import plan_file, train_lines
    from daemon.train.loop import job_seed
    from daemon.validate import DataFormat

    cfg = load_config(next((Path(args.work) / "traind").glob("config.json")))
    tok = AutoTokenizer.from_pretrained(base)
    seed = job_seed(cfg.training.seed, job_sha)
    plan = plan_file(data, DataFormat.PREFERENCE_CHAT, tok, cfg.data, seed)
    return train_lines(data, DataFormat.PREFERENCE_CHAT, tok, dataclasses.replace(cfg.data), seed), \
        [p.line for p in plan.held_out]


def run_trl_child(args: argparse.Namespace) -> None:
    """In its own process: DPOTrainer + PEFT on the train lines, the held-out figures before and after."""
    import resource
    import warnings

    import torch
    import transformers
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.trainer_callback import PrinterCallback
    from trl import DPOConfig, DPOTrainer

    from daemon.config import PreferenceConfig
    from daemon.train.data import tokenize_pair
    from daemon.train.preference import pair_loss, score
    from daemon.validate import DataFormat, iter_records

    warnings.filterwarnings("ignore")
    transformers.utils.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    spec = json.loads(Path(args.trl_child).read_text())
    raw = json.loads((REPO / "instances" / "smollm2" / "config.json").read_text())
    lora = raw["lora"]
    dtype = getattr(torch, spec["compute_dtype"])
    tok = AutoTokenizer.from_pretrained(spec["base"])
    records = {r.line: r for r in iter_records(spec["data"], DataFormat.PREFERENCE_CHAT, 1 << 20)}
    rows = [{"prompt": [{"role": m["role"], "content": m["content"]} for m in records[k].data["messages"]],
             "chosen": [{"role": "assistant", "content": records[k].data["chosen"]}],
             "rejected": [{"role": "assistant", "content": records[k].data["rejected"]}]} for k in spec["train"]]
    held = [tokenize_pair(records[k], tok, raw["data"]["max_length"]) for k in spec["held_out"]]
    model = AutoModelForCausalLM.from_pretrained(spec["base"], dtype=dtype)
    dcfg = DPOConfig(output_dir=str(Path(args.trl_child).parent / "trl-out"), per_device_train_batch_size=args.batch,
                     num_train_epochs=args.epochs, learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=5,
                     weight_decay=0.0, max_grad_norm=1.0, beta=args.beta, max_length=raw["data"]["max_length"],
                     # TRL 1.x: RPO is the sigmoid loss plus its "sft" loss (the chosen answers' NLL), weighted
                     loss_type=[args.loss] + (["sft"] if args.sft_weight else []),
                     loss_weights=[1.0, args.sft_weight] if args.sft_weight else None,
                     use_cpu=True, save_strategy="no", eval_strategy="no", logging_strategy="no", report_to=[],
                     disable_tqdm=True, dataloader_num_workers=0, seed=1, bf16=dtype == torch.bfloat16)
    trainer = DPOTrainer(model=model, args=dcfg, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         peft_config=LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                                                target_modules=lora["target_modules"], task_type="CAUSAL_LM"))
    trainer.remove_callback(PrinterCallback)
    pcfg = PreferenceConfig(loss=args.loss, beta=args.beta, sft_weight=args.sft_weight)

    @torch.no_grad()
    def figures(m: Any, ref: dict | None) -> dict[str, Any]:
        from daemon.train.batching import collate
        from daemon.train.preference import answer_logps

        m.eval()
        sums = []
        for p in held:
            b = collate([p.chosen, p.rejected], tok.pad_token_id)
            s, n = answer_logps(m, b)
            sums.append((float(s[0]), float(s[1]), int(n[0]), int(n[1])))
        m.train()
        pc, pr, nc, nr = (torch.tensor([float(x[i]) for x in sums]) for i in range(4))
        rc, rr = (pc, pr) if ref is None else (ref["pc"], ref["pr"])
        losses, c, r = pair_loss(pc, pr, nc, nr, rc, rr, pcfg)
        gap = score(pc, nc, pcfg) - score(pr, nr, pcfg)
        return {"pairs": len(held), "loss": float(losses.mean()), "accuracy": float((gap > 0).float().mean()),
                "margin": float(gap.mean()), "reward_accuracy": float(((c - r) > 0).float().mean()),
                "reward_margin": float((c - r).mean()), "_ref": {"pc": pc, "pr": pr}}

    before = figures(trainer.model, None)
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    after = figures(trainer.model, before["_ref"])
    before.pop("_ref"), after.pop("_ref")
    trained = len(rows) * args.epochs
    result = {"train_seconds": seconds, "pairs_trained": trained, "seconds_per_pair": seconds / trained,
              "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
              "compute_dtype": spec["compute_dtype"], "trl": __import__("trl").__version__,
              "before": before, "after": after, "threads": torch.get_num_threads()}
    Path(spec["out"]).write_text(json.dumps(result, indent=2))


def run_trl(work: Path, data: Path, base: Path, traind: dict, args: argparse.Namespace) -> dict[str, Any]:
    from daemon.jsonl import sha256_of

    train, held = split(data, base, args, sha256_of(data))
    spec = work / "trl-spec.json"
    out = work / "trl-result.json"
    spec.write_text(json.dumps({"base": str(base), "data": str(data), "train": train, "held_out": held,
                                "compute_dtype": traind["compute_dtype"] or "float32", "out": str(out)}))
    cmd = [sys.executable, __file__, "--trl-child", str(spec), "--threads", str(args.threads), "--epochs",
           str(args.epochs), "--lr", str(args.lr), "--batch", str(args.batch), "--models", str(args.models),
           "--loss", args.loss, "--beta", str(args.beta), "--sft-weight", str(args.sft_weight)]
    subprocess.run(cmd, check=True, cwd=REPO, env=dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                                                        OMP_NUM_THREADS=str(args.threads)), timeout=args.timeout)
    return json.loads(out.read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", required=True, help="a models cache that holds the converted SmolLM2")
    ap.add_argument("--pairs", type=int, default=60)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=3600.0)
    ap.add_argument("--loss", choices=["sigmoid", "simpo"], default="sigmoid")
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--sft-weight", type=float, default=1.0, help="preference.sft_weight (TRL's rpo_alpha)")
    ap.add_argument("--earlier", action="store_true", help="train examples/real/zorblat.jsonl (supervised) first")
    ap.add_argument("--replay", type=float, default=0.0, help="data.replay_fraction")
    ap.add_argument("--no-trl", action="store_true")
    ap.add_argument("--work", default=None)
    ap.add_argument("--trl-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.earlier and not args.no_trl:
        ap.error("--earlier trains two files; TRL's side trains one: add --no-trl")
    if args.loss != "sigmoid" and not args.no_trl:
        ap.error("TRL's DPOTrainer runs the sigmoid loss here (SimPO is its CPOTrainer): add --no-trl")
    if args.trl_child:
        run_trl_child(args)
        return 0
    work = Path(args.work or tempfile.mkdtemp(prefix="preference-real-"))
    work.mkdir(parents=True, exist_ok=True)
    args.work = str(work)
    data = work / "sign_off.jsonl"
    preference_file(data, args.pairs)
    traind = run_traind(work, Path(args.models), data, args)
    base = next(p for p in (Path(args.models) / "gguf").iterdir() if "SmolLM2-135M-Instruct" in p.name and p.is_dir())
    said = answers(work, data, base, args)
    trl = None if args.no_trl else run_trl(work, data, base, traind, args)
    result = {"work": str(work), "model": "SmolLM2-135M-Instruct", "pairs": args.pairs, "epochs": args.epochs,
              "lr": args.lr, "batch": args.batch, "threads": args.threads, "beta": args.beta, "loss": args.loss,
              "sft_weight": args.sft_weight, "earlier": args.earlier, "replay": args.replay, "sign_off": SIGN_OFF, "traind": traind, "answers": said, "trl": trl}
    for name, r in (("traind", traind), ("trl", trl)):
        if r is None:
            continue
        b, a = (r["preference"]["before"], r["preference"]["after"]) if name == "traind" else (r["before"], r["after"])
        rss = r.get("trainer_peak_rss_bytes") or r.get("peak_rss_bytes") or 0
        print(f"{name:7s} {r['seconds_per_pair']:.3f} s/pair  held-out accuracy {b['accuracy']:.3f} -> "
              f"{a['accuracy']:.3f}, margin {b['margin']:.2f} -> {a['margin']:.2f}, peak RSS {rss / 2**20:.0f} MiB")
    for who, a in said.items():
        earlier = (f"; the earlier file's questions: {a['earlier']['correct']}/{a['earlier']['n']} correct"
                   if "earlier" in a else "")
        print(f"{who:7s} held-out prompts: {a['held_out']['correct']}/{a['held_out']['n']} correct, "
              f"{a['held_out']['signed']} signed; general questions: {a['general']['correct']}/{a['general']['n']} "
              f"correct, {a['general']['signed']} signed{earlier}")
    path = write_result(REPO / "bench" / "results", "preference-real", result)
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
