"""Seeded protocol bugs: the crash-point sweep and the kill -9 soak must catch every one.

    .venv/bin/python -m bench.mutants                                   # every mutant: sweep + soak
    .venv/bin/python -m bench.mutants --mutant done-before-publish      # one (TRAIND_MUTANT=NAME does the same)
    .venv/bin/python -m bench.mutants --only soak --seeds 4 --kills-per-seed 10

Each mutant is a small patch, `bench/mutants/<name>.patch`, applied with
`patch -p1` to a temporary copy of the source tree; the product code holds no
mutant branch and no switch. In that copy this runs
- the sweep: `pytest tests/test_fault_sweep.py -m "not slow"` (the default crash
  points: 6 of the service, 3 of the trainer, the named refused-file point);
  caught when a test fails;
- the soak: `python -m bench.soak --stop-on-violation` over `--seeds` seeds,
  against references made by the unpatched tree (cached in `--work/refs/`);
  caught when a seed reports a violation.
A mutant is caught when either catches it. Results: bench/results/mutants-<stamp>.json.

The mutants (what each breaks):
- done-before-publish: the trainer answers `done` (the service moves the file to
  done/) before the adapter version is published.
- position-apart-from-weights: the data position is written in its own commit
  (`position.json`) after the checkpoint folder with the weights, and read from there.
- delete-checkpoints-before-publish: the file's checkpoints are deleted before its
  adapter version is published.
- retrain-published-file: no check that the current adapter already learnt a job
  (a crash between publication and `done` trains the file again).
- pointer-before-folder: `current.json` is replaced before the version folder exists.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
MUTANTS = REPO / "bench" / "mutants"
SOURCES = ("daemon", "monitor", "web", "tests", "bench", "examples", "bin", "config.json", "pyproject.toml")
ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


def names() -> list[str]:
    return sorted(p.stem for p in MUTANTS.glob("*.patch"))


def mutated_copy(name: str, dest: Path) -> Path:
    """A copy of the source tree with the mutant's patch applied (refuses a patch that does not apply)."""
    for item in SOURCES:
        src = REPO / item
        if src.is_dir():
            shutil.copytree(src, dest / item, ignore=shutil.ignore_patterns("__pycache__", "results"))
        else:
            shutil.copy2(src, dest / item)
    patch = (MUTANTS / f"{name}.patch").read_text()
    subprocess.run(["patch", "-p1", "-s", "--no-backup-if-mismatch"], input=patch, text=True, cwd=dest, check=True)
    return dest


def run_sweep(tree: Path, timeout: float, select: str | None = None, marks: str = "not slow") -> dict[str, Any]:
    """The default crash points of tests/test_fault_sweep.py in the mutated tree (`select`: a pytest -k;
    `marks`: a pytest -m, "slow" for the numbered sweep)."""
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_fault_sweep.py",
                           "-m", marks, "--no-header", "-rf", *(["-k", select] if select else [])],
                          cwd=tree, env={**os.environ, **ENV}, capture_output=True, text=True, timeout=timeout)
    failed = sorted(set(re.findall(r"^FAILED (\S+)", proc.stdout, re.M)))
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|error)", proc.stdout.splitlines()[-1] if proc.stdout else "")}
    # caught: a test of the sweep failed (pytest's 1); 2-5 (interrupted, internal error, a bad -k, nothing
    # selected) mean the sweep did not run, which must not pass for a catch
    return {"caught": proc.returncode == 1 and bool(failed), "exit": proc.returncode, "failed": failed, "counts": counts,
            "seconds": round(time.monotonic() - t0, 1),
            "first_failure": _first_assertion(proc.stdout)}


def _first_assertion(out: str) -> str | None:
    m = re.search(r"^E\s+(.*)$", out, re.M)
    return m.group(1)[:400] if m else None


def run_soak(tree: Path, work: Path, seeds: int, kills: int, timeout: float) -> dict[str, Any]:
    """bench.soak in the mutated tree, stopping at the first seed with a violation."""
    out = work / f"soak-{tree.name}.json"
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "bench.soak", "--seeds", str(seeds), "--kills-per-seed", str(kills),
                           "--work", str(work), "--out", str(out), "--stop-on-violation"], cwd=tree,
                          env={**os.environ, **ENV}, capture_output=True, text=True, timeout=timeout)
    res = json.loads(out.read_text()) if out.is_file() else {}
    violations = [v for r in res.get("per_seed", []) for v in r["violations"] if not v.startswith("instance kept")]
    return {"caught": bool(res.get("violations")), "exit": proc.returncode, "seeds_run": res.get("seeds"),
            "kills": res.get("kills"), "violations": violations[:5], "seconds": round(time.monotonic() - t0, 1),
            "stderr_tail": None if out.is_file() else proc.stderr[-1500:]}


def _commit() -> str | None:
    """The commit the tree is (TRAIND_COMMIT when it runs from a copy without .git)."""
    proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return os.environ.get("TRAIND_COMMIT") or proc.stdout.strip() or None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.mutants", description=__doc__.split("\n\n")[0])
    ap.add_argument("--mutant", action="append", default=None,
                    help=f"a mutant (repeatable; default $TRAIND_MUTANT or all: {', '.join(names())})")
    ap.add_argument("--only", choices=("sweep", "soak"), default=None, help="run only this harness")
    ap.add_argument("--sweep-k", default=None, help="only the sweep's tests this pytest -k selects")
    ap.add_argument("--sweep-m", default="not slow", help="the sweep's tests this pytest -m selects ('slow': numbered points)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--kills-per-seed", type=int, default=10)
    ap.add_argument("--work", type=Path, default=None, help="work folder (the soak's references are cached there)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    chosen = args.mutant or ([os.environ["TRAIND_MUTANT"]] if os.environ.get("TRAIND_MUTANT") else names())
    unknown = sorted(set(chosen) - set(names()))
    if unknown:
        ap.error(f"unknown mutant(s) {unknown}; known: {names()}")
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    work = args.work or Path(tempfile.mkdtemp(prefix="traind-mutants-"))
    work.mkdir(parents=True, exist_ok=True)
    out = args.out or REPO / "bench" / "results" / f"mutants-{stamp}.json"
    if args.only != "sweep":  # the references come from the unpatched tree
        subprocess.run([sys.executable, "-m", "bench.soak", "--refs-only", "--seeds", str(args.seeds), "--work", str(work)],
                       cwd=REPO, env={**os.environ, **ENV}, check=True, capture_output=True)
    results: dict[str, Any] = {}
    for name in chosen:
        tree = mutated_copy(name, work / name)
        row: dict[str, Any] = {}
        if args.only != "soak":
            row["sweep"] = run_sweep(tree, timeout=1800, select=args.sweep_k, marks=args.sweep_m)
        if args.only != "sweep":
            row["soak"] = run_soak(tree, work, args.seeds, args.kills_per_seed, timeout=3600)
        row["caught"] = any(h["caught"] for h in row.values())
        results[name] = row
        print(f"{name}: {'CAUGHT' if row['caught'] else 'NOT caught'} "
              + "; ".join(f"{h}: {'caught' if r['caught'] else 'missed'} in {r['seconds']} s" for h, r in row.items()
                          if isinstance(r, dict)), flush=True)
        shutil.rmtree(tree, ignore_errors=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"stamp": stamp, "commit": _commit(), "command": " ".join(["python -m bench.mutants", *(argv or sys.argv[1:])]),
                                   "sweep_k": args.sweep_k, "sweep_m": args.sweep_m, "seeds": args.seeds,
                                   "kills_per_seed": args.kills_per_seed, "mutants": results}, indent=1))
    caught = sum(r["caught"] for r in results.values())
    print(f"{caught} of {len(results)} mutants caught: {out}")
    return 0 if caught == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
