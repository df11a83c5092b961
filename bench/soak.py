"""Random kill -9 soak: SIGKILL the real daemon (its whole process tree, or only the trainer
child) at uniformly random times, restart, repeat, over many seeds; check the promise after each.

    .venv/bin/python -m bench.soak --seeds 50 --kills-per-seed 20 --out bench/results/soak-<stamp>.json
    .venv/bin/python -m bench.soak --seeds 1 --kills-per-seed 3          # a quick look (tests/test_soak.py)
    .venv/bin/python -m bench.soak --first-seed 7 --seeds 1 -v           # replay one seed (the kills are seeded too)
    .venv/bin/python -m bench.soak --first-seed 25 --seeds 25 ...        # a second process on another core, then
    .venv/bin/python -m bench.soak --merge a.json b.json --out all.json  # one summary of both

A seed makes a workload (three files of 40-60 records of the bundled examples,
one with an invalid line that is skipped, and one broken file that must fail;
2 epochs per file, 20-30 steps each, a checkpoint every 1 or 2 steps) and the times and targets of its kills.
The uninterrupted run of each workload is the reference (run once, cached in
`--work/refs/` by the workload's hash). Let R be the reference's time from
start to the trainer's `ready`, and H its time per file after that (the rest
of its wall time over the number of good files). Each kill picks an origin at
random: `start` (1 in 3: the last start or kill) with a time uniform over
[0, R + H], or `ready` (2 in 3: the moment the trainer started since the last
kill says ready) with a time uniform over [0, H]. The trainer's start-up
(imports, model load: R is most of a run on the tiny model) would otherwise
take most kills, and a horizon of the whole run would leave the rest on an
idle daemon after the first few; so they land anywhere: start-up, intake,
status and history writes, steps, checkpoint writes, adapter publication,
idle. Each kill records whether work was left (`busy`) and what it interrupted. Where a kill landed is
read from what it left: temp files and folders of an interrupted write
(`witness` per kill: what appeared between just before and just after it; a
write that was in flight but left nothing, such as a rename, is not seen). A group kill is `os.killpg` of the daemon's process group
and of each of its descendants' groups (the trainer runs in its own session),
as a supervisor's cgroup kill does; a trainer kill is SIGKILL to the child alone.

After the last kill the daemon runs to the end and stops cleanly; then
(bench/soak_checks.py): every input file is in exactly one of done/ and failed/,
byte-identical to what was dropped, the broken one failed as invalid_data;
nothing left in inbox/, pending/, processing/; the final adapter's lineage
lists each done file once and each version's sample ledger (daemon.sample_ledger)
holds every train line of its file exactly once per epoch, in the reference's
steps (same digest); the final adapter equals the reference within 1e-5; the
history has each kept step once; no temp file or folder is left anywhere in
the instance, and no checkpoint folder outlives its published file; and no
kill lost more than the steps since the file's last checkpoint
(`check_progress_kept`: the next start of a file resumed from the checkpoint
that must have existed when the kill came, judged by the steps the history had
recorded then).

The engine is importable (`run_soak`), so tests/test_soak.py runs a short
variant; bench/mutants.py runs it against seeded protocol bugs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import random
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

for _k, _v in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false"),
               ("HF_HUB_DISABLE_PROGRESS_BARS", "1")):
    os.environ.setdefault(_k, _v)

import psutil  # noqa: E402

from bench.soak_checks import (adapter_tensors, check_progress_kept, check_seed, ledgers,  # noqa: E402,F401
                               progress_at_kill, temp_debris)
from daemon import adapters  # noqa: E402
from bench.harness import lines_of, write_instance  # noqa: E402
from bench.harness import Daemon  # noqa: E402

log = logging.getLogger("soak")

SOURCES = ("text.jsonl", "alpaca.jsonl", "chat.jsonl", "prompt_completion.jsonl")
BAD_LINE = '{"text": "cut off in the mid\n'  # a truncated JSON object: one bad line
SETTLE_TIMEOUT = 300.0


# ---------------------------------------------------------------- the workload of a seed


@dataclass(frozen=True)
class Workload:
    seed: int
    files: dict[str, str]  # name -> text, dropped in this order
    broken: str  # the file that must fail (invalid_data)
    skipped_line: tuple[str, int]  # (file, line) of the one bad line a good file carries
    settings: dict[str, Any]  # config overrides over tests.conftest.FAST

    @property
    def key(self) -> str:
        blob = json.dumps([self.files, self.settings], sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @property
    def good(self) -> list[str]:
        return [n for n in self.files if n != self.broken]


def make_workload(seed: int, ranks: int = 1) -> Workload:
    """Three good files (40-60 records of a random bundled format; one with a bad line) and a broken one;
    trained by `ranks` trainer processes (distributed.nproc_per_node)."""
    rng = random.Random(f"traind-soak-workload:{seed}")
    files: list[tuple[str, str]] = []
    for i in range(3):
        src = rng.choice(SOURCES)
        lines = lines_of(src).splitlines(keepends=True)
        n = rng.randint(40, 60)
        at = rng.randrange(len(lines) - n)
        files.append((f"{src.removesuffix('.jsonl')}", "".join(lines[at:at + n])))
    bad_file = rng.randrange(3)
    lines = files[bad_file][1].splitlines(keepends=True)
    bad_at = rng.randrange(1, len(lines))
    lines.insert(bad_at, BAD_LINE)
    files[bad_file] = (files[bad_file][0], "".join(lines))
    good_lines = lines_of("text.jsonl", 4).splitlines(keepends=True)
    broken_text = "".join(x for pair in zip(good_lines, [BAD_LINE] * 4) for x in pair)  # half bad: refused
    broken_at = rng.randrange(4)
    named: dict[str, str] = {}
    k = 0
    for i in range(4):
        if i == broken_at:
            named[f"{i:02d}_broken.jsonl"] = broken_text
        else:
            stem, text = files[k]
            named[f"{i:02d}_{stem}.jsonl"] = text
            if k == bad_file:
                skipped = (f"{i:02d}_{stem}.jsonl", bad_at + 1)
            k += 1
    settings = {
        "data": {"bad_line_policy": "skip"},
        "model": {"compute_dtype": "float32"},
        "lora": {"dropout": 0.05},  # the restored RNG state matters
        "training": {"epochs_per_file": 2, "checkpoint_every_steps": rng.choice([1, 2]), "keep_checkpoints": 2,
                     "seed": 1000 + seed, "warmup_steps": 1},
        "activity": {"every_steps": 2},
        # A file must never fail for being killed under: the soak kills the trainer many times per file.
        "service": {"max_crashes_per_file": 1_000_000, "restart_backoff_seconds": 0.05,
                    "status_interval_seconds": 0.25},
    }
    if ranks > 1:  # the reference then runs with as many ranks (dropout is drawn per rank)
        settings["distributed"] = {"nproc_per_node": ranks}
    return Workload(seed, named, f"{broken_at:02d}_broken.jsonl", skipped, settings)


# ---------------------------------------------------------------- driving the daemon


def private_tmp(inst: Path) -> dict[str, str]:
    """A TMPDIR of the daemon's own, so the temp folders it makes there (the trainer's socket folder)
    are counted with the instance's debris. Short, in the system's temp folder: a unix socket's path
    must fit 107 bytes. Its path is kept in the instance (`tmpdir.txt`)."""
    tmp = tempfile.mkdtemp(prefix="soak-")
    (inst / "tmpdir.txt").write_text(tmp)
    return {"TMPDIR": tmp}


def drop_private_tmp(inst: Path) -> None:
    if (inst / "tmpdir.txt").is_file():
        shutil.rmtree((inst / "tmpdir.txt").read_text(), ignore_errors=True)


def settled(d: Daemon, w: Workload) -> bool:
    """Every file reached done/ or failed/ and this very process says idle."""
    c = d.queue.counts()
    inbox = [p for p in d.cfg.path("inbox").rglob("*") if p.is_file()]
    st = d.status() or {}
    return (not inbox and c["pending"] == 0 and c["processing"] == 0 and c["done"] + c["failed"] >= len(w.files)
            and st.get("status") == "idle" and st.get("pid") == d.proc.pid)


def run_to_settled(d: Daemon, w: Workload, timeout: float = SETTLE_TIMEOUT) -> float:
    t0 = time.monotonic()
    while not settled(d, w):
        if d.proc.poll() is not None:
            raise SoakError(f"daemon exited ({d.proc.returncode}) before settling")
        if time.monotonic() - t0 > timeout:
            raise SoakError(f"not settled in {timeout:.0f} s; queue {d.queue.counts()}")
        time.sleep(0.05)
    return time.monotonic() - t0


class SoakError(Exception):
    """The run did not get where it must (a hang, a daemon that exits by itself)."""


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def trainer_of(d: Daemon) -> psutil.Process | None:
    """The trainer process; with several ranks one of them at random (not torch's launcher)."""
    found = []
    for p in descendants(d.proc.pid):
        try:
            if p.cmdline()[-3:-1] == ["daemon.train", "--config"]:
                found.append(p)
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return random.choice(found) if found else None


def readies(d: Daemon) -> int:
    """How many times a trainer said `ready` to this instance's service so far (its log)."""
    return sum(p.read_text(errors="replace").count("trainer ready on")
               for p in d.cfg.path("logs").glob("daemon_*.log"))


def kill_group(d: Daemon) -> None:
    """SIGKILL the daemon's process group and every descendant's group; wait until all are gone."""
    procs = descendants(d.proc.pid)
    os.killpg(d.proc.pid, signal.SIGKILL)
    for p in procs:
        try:
            os.killpg(os.getpgid(p.pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    d.proc.wait(30)
    _, alive = psutil.wait_procs(procs, timeout=30)
    if alive:
        raise SoakError(f"processes outlived the kill: {alive}")


def kill_trainer(p: psutil.Process) -> None:
    try:
        p.send_signal(signal.SIGKILL)
        p.wait(30)
    except psutil.NoSuchProcess:
        pass


def witness(debris: list[str], d: Daemon, total: int) -> list[str]:
    """What a kill interrupted, from the debris it left (and an intake half done)."""
    kinds = set()
    for rel in debris:
        top, name = rel.split("/", 1)[0], rel.rsplit("/", 1)[-1]
        if top == "checkpoints":
            kinds.add("checkpoint write" if ".step_" in rel else "checkpoint pointer write")
        elif top == "adapters":
            kinds.add("adapter publication" if name.startswith(".v") else "adapter pointer write")
        elif top == "status":
            kinds.add("status write" if "training_status" in name else f"status/{name.split('.')[1]} write")
        elif top == "queue":
            kinds.add("queue write")
        elif top == "tmp":
            continue  # the live service's socket folder: not a write in flight
        else:
            kinds.add(f"{top} write")
    inbox = [p for p in d.cfg.path("inbox").rglob("*") if p.is_file()]
    if 0 < len(inbox) < total:  # some files taken, some not: the kill came mid-intake
        kinds.add("intake")
    return sorted(kinds)


# ---------------------------------------------------------------- the reference


def reference(w: Workload, work: Path, models_dir: Path) -> dict[str, Any]:
    """The uninterrupted run of `w` (cached): its wall time, adapter file and ledgers."""
    ref_dir = work / "refs" / w.key
    meta = ref_dir / "ref.json"
    if meta.is_file():
        return json.loads(meta.read_text())
    work.mkdir(parents=True, exist_ok=True)
    inst = Path(tempfile.mkdtemp(prefix=f"ref-{w.seed}-", dir=work))
    d = Daemon(write_instance(inst, models_dir, **w.settings), env=private_tmp(inst))
    try:
        for name, text in w.files.items():
            d.drop(name, text)
        t0 = time.monotonic()
        d.start(new_session=True)
        while not readies(d):
            if time.monotonic() - t0 > SETTLE_TIMEOUT or d.proc.poll() is not None:
                raise SoakError(f"the reference's trainer never got ready (exit {d.proc.poll()})\n{d.log_tail()}")
            time.sleep(0.01)
        ready = time.monotonic() - t0
        run_to_settled(d, w)
        wall = time.monotonic() - t0
        if d.stop() != 0:
            raise SoakError("the reference run did not stop cleanly")
        ref_dir.mkdir(parents=True, exist_ok=True)
        cur = adapters.read_current(d.cfg.path("adapters"))
        shutil.copy(cur.path / "adapter_model.safetensors", ref_dir / "adapter_model.safetensors")
        out = {"seed": w.seed, "key": w.key, "wall_seconds": wall, "ready_seconds": ready, "adapter": str(ref_dir / "adapter_model.safetensors"),
               "ledgers": ledgers(d.cfg.path("adapters")), "done": sorted(e.original_name for e in d.queue.done()),
               "failed": sorted(e.original_name for e in d.queue.failed())}
        meta.write_text(json.dumps(out, indent=1))
        return out
    finally:
        d.close()
        drop_private_tmp(inst)
        shutil.rmtree(inst, ignore_errors=True)


# ---------------------------------------------------------------- one seed


@dataclass
class SeedResult:
    seed: int
    workload: str
    kills: list[dict] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    ref_wall_seconds: float = 0.0
    wall_seconds: float = 0.0


def soak_seed(seed: int, kills: int, work: Path, models_dir: Path, keep: bool = False, ranks: int = 1) -> SeedResult:
    w = make_workload(seed, ranks)
    ref = reference(w, work, models_dir)
    # H: the reference's time per file once its trainer was ready
    per_file = (ref["wall_seconds"] - ref["ready_seconds"]) / len(w.good)
    horizons = {"start": ref["ready_seconds"] + per_file, "ready": per_file}
    rng = random.Random(f"traind-soak-kills:{seed}")
    res = SeedResult(seed, w.key, ref_wall_seconds=ref["wall_seconds"])
    t_seed = time.monotonic()
    inst = Path(tempfile.mkdtemp(prefix=f"seed-{seed}-", dir=work))
    d = Daemon(write_instance(inst, models_dir, **w.settings), env=private_tmp(inst))
    try:
        for name, text in w.files.items():
            d.drop(name, text)
        d.start(new_session=True)
        since, seen_ready = time.monotonic(), 0
        while len(res.kills) < kills:
            origin, target = rng.choice(["start", "ready", "ready"]), rng.choice(["group", "trainer"])
            at = rng.uniform(0, horizons[origin])
            if origin == "ready":  # from the moment the trainer started after the last kill is ready
                since = wait_ready(d, seen_ready)
            while time.monotonic() - since < at:
                if d.proc.poll() is not None:
                    raise SoakError(f"daemon exited by itself ({d.proc.returncode})")
                time.sleep(0.005)
            res.kills.append({"origin": origin, **kill_once(d, w, target, time.monotonic() - since)})
            since, seen_ready = time.monotonic(), readies(d)
            if d.proc.poll() is not None:
                d.start(new_session=True)
        run_to_settled(d, w)
        if (code := d.stop()) != 0:
            res.violations.append(f"the clean stop exited {code}")
        res.violations += check_seed(d, w, ref, models_dir)
        res.violations += check_progress_kept(d, w, res.kills)
    except SoakError as e:
        res.violations.append(f"{type(e).__name__}: {e}")
    finally:
        d.close()
        res.wall_seconds = time.monotonic() - t_seed
        if res.violations:
            res.violations.append(f"instance kept at {inst}")
            log.error("seed %d: %d violation(s): %s\n%s", seed, len(res.violations), res.violations, d.log_tail(30))
        elif not keep:
            drop_private_tmp(inst)
            shutil.rmtree(inst, ignore_errors=True)
    return res


def wait_ready(d: Daemon, seen: int, timeout: float = 60.0) -> float:
    """Wait until a trainer started after the last kill says ready; the moment it was seen."""
    t0 = time.monotonic()
    while readies(d) <= seen:
        if d.proc.poll() is not None:
            raise SoakError(f"daemon exited by itself ({d.proc.returncode})")
        if time.monotonic() - t0 > timeout:
            raise SoakError(f"no trainer ready in {timeout:.0f} s")
        time.sleep(0.01)
    return time.monotonic()


def kill_once(d: Daemon, w: Workload, target: str, after: float) -> dict[str, Any]:
    """One SIGKILL (the trainer alone if it runs, else the whole tree); what it interrupted."""
    st = d.status() or {}
    busy = not settled(d, w)
    before = set(temp_debris(d.cfg.root))  # what earlier kills left: not this one's
    trainer = trainer_of(d) if target == "trainer" else None
    if trainer is not None:
        kill_trainer(trainer)
        hit = "trainer"
    else:
        kill_group(d)
        hit = "group"
    debris = [x for x in temp_debris(d.cfg.root) if x not in before]
    return {"target": target, "hit": hit, "t": time.time(), "recorded": progress_at_kill(d), "after": round(after, 3), "busy": busy, "status": st.get("status"),
            "detail": st.get("detail"), "step": st.get("current_step"), "witness": witness(debris, d, len(w.files))}


# ---------------------------------------------------------------- many seeds


def run_soak(seeds: list[int], kills_per_seed: int, work: Path, models_dir: Path | None = None,
             progress: Callable[[SeedResult], None] = lambda r: None, keep: bool = False,
             stop_on_violation: bool = False, ranks: int = 1) -> dict[str, Any]:
    """Soak every seed in turn; the summary (`violations` 0 when the promise held everywhere)."""
    work.mkdir(parents=True, exist_ok=True)
    models_dir = models_dir or build_models(work)
    t0 = time.monotonic()
    results = []
    for seed in seeds:
        r = soak_seed(seed, kills_per_seed, work, models_dir, keep, ranks)
        results.append(r)
        progress(r)
        if stop_on_violation and r.violations:
            break
    return summarise(results, time.monotonic() - t0, kills_per_seed)


def build_models(work: Path) -> Path:
    """The embedded tiny model, built once per work folder (torch: in this process, one thread)."""
    import torch

    from daemon.train.tinymodel import ensure_embedded

    folder = work / "models"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ensure_embedded(folder)
    finally:
        torch.set_num_threads(threads)
    return folder


def summarise(results: list[SeedResult], wall: float, kills_per_seed: int) -> dict[str, Any]:
    kills = [k for r in results for k in r.kills]
    witnessed: dict[str, int] = {}
    for k in kills:
        for what in k["witness"]:
            witnessed[what] = witnessed.get(what, 0) + 1
    return {
        "seeds": len(results), "kills_per_seed": kills_per_seed, "kills": len(kills),
        "kills_group": sum(k["hit"] == "group" for k in kills), "kills_trainer": sum(k["hit"] == "trainer" for k in kills),
        "kills_while_busy": sum(k["busy"] for k in kills), "kills_by_status": _count(k["status"] for k in kills),
        "kills_by_detail": _count((k.get("detail") or "").split(" (")[0].split(";")[0] for k in kills),
        "kills_by_origin": _count(k.get("origin") for k in kills),
        "interrupted_writes": dict(sorted(witnessed.items())),
        "violations": sum(len(r.violations) for r in results),
        "seeds_with_violations": [r.seed for r in results if r.violations],
        "wall_seconds": round(wall, 1), "reference_seconds": round(sum(r.ref_wall_seconds for r in results), 1),
        "per_seed": [asdict(r) for r in results],
    }


def merge(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One summary of runs made side by side: their seeds together; wall time the longest run's."""
    seeds = [SeedResult(**r) for run in runs for r in run["per_seed"]]
    out = summarise(sorted(seeds, key=lambda r: r.seed), max(run["wall_seconds"] for run in runs),
                    runs[0]["kills_per_seed"])
    out.update(merged_from=[{k: run.get(k) for k in ("stamp", "command", "seeds", "kills", "wall_seconds", "finished")}
                            for run in runs], versions=runs[0].get("versions"),
               finished=all(run.get("finished") for run in runs))
    return out


def _count(items: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for x in items:
        out[str(x)] = out.get(str(x), 0) + 1
    return out


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for mod in ("torch", "transformers", "peft", "bitsandbytes", "safetensors"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception as e:  # a missing library is a fact to report, not a reason to stop
            out[mod] = f"unavailable ({type(e).__name__})"
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=50, help="how many seeds (default 50)")
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--kills-per-seed", type=int, default=20)
    ap.add_argument("--work", type=Path, default=None, help="work folder (default: a temp folder; refs are cached there)")
    ap.add_argument("--out", type=Path, default=None, help="results JSON (default bench/results/soak-<stamp>.json)")
    ap.add_argument("--keep", action="store_true", help="keep every seed's instance")
    ap.add_argument("--refs-only", action="store_true", help="only run (and cache in --work) the seeds' references")
    ap.add_argument("--stop-on-violation", action="store_true", help="stop after the first seed with a violation")
    ap.add_argument("--merge", type=Path, nargs="+", default=None,
                    help="merge the results of runs side by side into --out (wall time: the longest run's)")
    ap.add_argument("--ranks", type=int, default=1, help="trainer ranks (distributed.nproc_per_node); a trainer kill "
                    "then hits one rank at random")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(message)s")
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    if args.merge:
        merged = merge([json.loads(p.read_text()) for p in args.merge])
        (args.out or REPO / "bench" / "results" / f"soak-{stamp}.json").write_text(json.dumps(merged, indent=1))
        print(json.dumps({k: v for k, v in merged.items() if k != "per_seed"}, indent=1))
        return 1 if merged["violations"] else 0
    work = args.work or Path(tempfile.mkdtemp(prefix="traind-soak-"))
    out = args.out or REPO / "bench" / "results" / f"soak-{stamp}.json"
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    done = {"kills": 0, "violations": 0}
    t0 = time.monotonic()

    results: list[SeedResult] = []

    def progress(r: SeedResult) -> None:  # the results so far are on disk after every seed
        results.append(r)
        partial = summarise(results, time.monotonic() - t0, args.kills_per_seed)
        partial.update(stamp=stamp, finished=False, versions=versions())
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(partial, indent=1))
        done["kills"] += len(r.kills)
        done["violations"] += len(r.violations)
        log.info("seed %d: %d kills (%s), %d violation(s), %.0f s; total %d kills, %d violations, %.0f s",
                 r.seed, len(r.kills), _count(k["hit"] for k in r.kills), len(r.violations), r.wall_seconds,
                 done["kills"], done["violations"], time.monotonic() - t0)

    if args.refs_only:
        models = build_models(work)
        for seed in seeds:
            ref = reference(make_workload(seed, args.ranks), work, models)
            log.info("seed %d: reference in %.1f s", seed, ref["wall_seconds"])
        return 0
    summary = run_soak(seeds, args.kills_per_seed, work, progress=progress, keep=args.keep,
                       stop_on_violation=args.stop_on_violation, ranks=args.ranks)
    summary.update(stamp=stamp, finished=True, command=" ".join(["python -m bench.soak", *(argv or sys.argv[1:])]),
                   versions=versions(), mutant=os.environ.get("TRAIND_MUTANT"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1))
    log.info("%d kills over %d seeds, %d violation(s), %.0f s (%.0f s of it reference runs): %s",
             summary["kills"], summary["seeds"], summary["violations"], summary["wall_seconds"],
             summary["reference_seconds"], out)
    return 1 if summary["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
