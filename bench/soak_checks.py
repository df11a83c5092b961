"""The checks of the kill -9 soak (bench/soak.py): what must hold in an instance once its run is over.

    from bench.soak_checks import check_seed, check_progress_kept
    violations = check_seed(d, workload, reference, models_dir) + check_progress_kept(d, workload, kills)

Each returns a list of violations, each a sentence naming what and where; an
empty list: the promise held (docs/RELIABILITY.md lists them).
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from daemon import adapters
from daemon.jobqueue import ERROR_SUFFIX
from daemon.sample_ledger import check_ledger
from bench.harness import write_instance
from bench.harness import Daemon

TOL = 1e-5
_TOKENIZERS: dict[str, Any] = {}


def check_seed(d: Daemon, w: Any, ref: dict[str, Any], models_dir: Path) -> list[str]:
    """Every violation of the promise in a stopped instance (see the module docstring)."""
    v: list[str] = []
    queue, root = d.cfg.path("queue"), d.cfg.root
    left = [str(p.relative_to(root)) for p in d.cfg.path("inbox").rglob("*") if p.is_file()]
    left += [str(e.path.relative_to(root)) for e in d.queue.pending() + d.queue.processing()]
    if left:
        v.append(f"files not finished: {left}")
    files = [p for p in (queue / "done").glob("*") if p.is_file()] + \
            [p for p in (queue / "failed").glob("*") if p.is_file() and not p.name.endswith((ERROR_SUFFIX, ERROR_SUFFIX + ".prev"))]
    for name, text in w.files.items():
        homes = [str(p.relative_to(queue)) for p in files if p.read_bytes() == text.encode()]
        if len(homes) != 1:
            v.append(f"{name} is byte-identical in {len(homes)} places of done/ and failed/: {homes}")
    if len(files) != len(w.files):
        v.append(f"{len(files)} files in done/ and failed/ for {len(w.files)} dropped")
    done = {e.original_name: e.job_id for e in d.queue.done()}
    failed = {e.original_name: e.job_id for e in d.queue.failed()}
    if sorted(done) != sorted(w.good) or sorted(failed) != [w.broken]:
        v.append(f"done {sorted(done)}, failed {sorted(failed)}; expected done {sorted(w.good)}, failed [{w.broken}]")
    if w.broken in failed and (d.queue.read_error(failed[w.broken]) or {}).get("reason") != "invalid_data":
        v.append(f"{w.broken} failed for {(d.queue.read_error(failed[w.broken]) or {}).get('reason')}, not invalid_data")

    # The final adapter's lineage and the sample ledgers
    adapters_dir = d.cfg.path("adapters")
    cur = adapters.read_current(adapters_dir)
    if cur is None:
        return v + ["no adapter published"]
    trained = cur.trained_jobs
    if sorted(trained) != sorted(done.values()) or len(set(trained)) != len(trained):
        v.append(f"adapter trained_jobs {trained} != done {sorted(done.values())}")
    got = ledgers(adapters_dir)
    for name in w.good:
        entry, want = got.get(name), ref["ledgers"].get(name)
        if entry is None:
            v.append(f"{name}: no version in the lineage")
            continue
        if entry.get("twice"):
            v.append(f"{name}: published twice in the lineage")
        db = d.history()
        try:
            rec = db.job(done.get(name, "")) or {}
        finally:
            db.close()
        lines = train_lines_of(w, name, w.files[name], models_dir, rec.get("format") or "text")
        for p in check_ledger(entry["ledger"], lines, w.settings["training"]["epochs_per_file"], entry["steps"]):
            v.append(f"{name} ledger: {p}")
        if entry["ledger"] != want["ledger"]:
            v.append(f"{name} ledger differs from the uninterrupted run's")
        if name == w.skipped_line[0] and any(a <= w.skipped_line[1] <= b for e in entry["ledger"]["epochs"]
                                              for a, b in e["lines"]):
            v.append(f"{name}: its bad line {w.skipped_line[1]} was trained")

    diff = adapter_diff(adapter_tensors(adapters_dir), ref["adapter"])
    if not diff <= TOL:
        v.append(f"final adapter differs from the uninterrupted run's by {diff:.3e} (> {TOL})")

    v += check_history(d, trained)
    debris = temp_debris(root)
    if debris:
        v.append(f"temp debris after a clean stop: {debris}")
    ckpts = [p.name for p in d.cfg.path("checkpoints").iterdir() if p.is_dir()] if d.cfg.path("checkpoints").exists() else []
    if ckpts:
        v.append(f"checkpoint folders left after their files were published: {ckpts}")
    return v


def check_history(d: Daemon, trained: list[str]) -> list[str]:
    """Each kept job's steps once, 1..total, global steps contiguous across the lineage."""
    v = []
    db = d.history()
    try:
        g = 0
        for job_id in trained:
            rec = db.job(job_id) or {}
            total = rec.get("total_steps") or 0
            rows = db.steps(job_id)
            if rec.get("state") != "done":
                v.append(f"history: {job_id} is {rec.get('state')}, not done")
            if [r["step"] for r in rows] != list(range(1, total + 1)):
                v.append(f"history: {job_id} steps {[r['step'] for r in rows]} of {total}")
            if [r["global_step"] for r in rows] != list(range(g + 1, g + total + 1)):
                v.append(f"history: {job_id} global steps {[r['global_step'] for r in rows]} after {g}")
            g += total
    finally:
        db.close()
    return v


def check_progress_kept(d: Daemon, w: Any, kills: list[dict]) -> list[str]:
    """No kill loses more than the steps since the last checkpoint. A file whose history had step s
    recorded at a kill had its checkpoint of every*floor((s-1)/every) written before step s was reported,
    so the next start of that file must resume from there or later (or find it already published)."""
    every = w.settings["training"]["checkpoint_every_steps"]
    db = d.history()
    try:
        started = [(e["t"], e["job_id"], e["message"]) for e in db.events(limit=1_000_000)
                   if e["kind"] == "job_started"]
    finally:
        db.close()
    v = []
    for k in kills:
        for job_id, s in (k.get("recorded") or {}).items():
            floor = every * ((s - 1) // every)
            after = sorted((t, msg) for t, j, msg in started if j == job_id and t > k["t"])
            if not after:
                continue  # never started again: its adapter was already published
            m = re.search(r"resumed from step (\d+)", after[0][1])
            resumed = int(m.group(1)) if m else 0
            if resumed < floor:
                v.append(f"{job_id}: step {s} was recorded before a kill, yet it resumed from step {resumed} "
                         f"(checkpoints every {every}: step {floor} or later expected)")
    return v


def progress_at_kill(d: Daemon) -> dict[str, int]:
    """job_id -> the highest step the history recorded for each file in processing/ (read after a kill)."""
    out: dict[str, int] = {}
    if not (d.cfg.path("status") / "history.db").is_file():
        return out  # killed before the service made its history: nothing recorded, nothing to keep
    db = d.history()
    try:
        for e in d.queue.processing():
            rows = db.steps(e.job_id)
            if rows:
                out[e.job_id] = max(r["step"] for r in rows)
    finally:
        db.close()
    return out


def temp_debris(root: Path) -> list[str]:
    """Temp files and folders of interrupted writes anywhere in an instance (relative paths), and
    whatever is in its TMPDIR (`tmp/`)."""
    out = []
    # os.walk, not rglob: the daemon may be running and removing folders while we look (before a kill)
    for folder, dirs, files in os.walk(root, onerror=lambda e: None):
        for name in dirs + files:
            if name.endswith((".tmp", ".part")) or ".old-" in name:
                out.append(str((Path(folder) / name).relative_to(root)))
    tmp = Path((root / "tmpdir.txt").read_text()) if (root / "tmpdir.txt").is_file() else None
    for p in tmp.iterdir() if tmp and tmp.is_dir() else ():
        if not p.name.startswith("torchinductor_"):  # torch's compile cache, made at import whatever happens
            out.append(f"tmp/{p.name}")
    return sorted(out)


def adapter_tensors(adapters_dir: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    cur = adapters.read_current(adapters_dir)
    return load_file(str(cur.path / "adapter_model.safetensors"))


def adapter_diff(got: dict[str, Any], ref_file: str) -> float:
    from safetensors.torch import load_file

    want = load_file(ref_file)
    if got.keys() != want.keys():
        return float("inf")
    return max(float((got[k] - want[k]).abs().max()) for k in want)


def ledgers(adapters_dir: Path) -> dict[str, dict]:
    """original name -> (version, job_id, steps, ledger) for each version in the current adapter's lineage."""
    out: dict[str, dict] = {}
    for m in adapters.lineage(adapters_dir):
        name = m.original_name
        if name in out:
            out[name]["twice"] = True
        out.setdefault(name, {"version": m.version, "job_id": m.job_id, "steps": m.steps, "ledger": m.ledger})
    return out


def train_lines_of(w: Any, name: str, text: str, models_dir: Path, fmt: str) -> list[int]:
    """The lines of a file that must train once per epoch (the trainer's own plan of it)."""
    from daemon.config import load_config
    from daemon.train.data import train_lines
    from daemon.train.loop import job_seed
    from daemon.train.model import resolve_base
    from daemon.validate import DataFormat
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(write_instance(Path(tmp), models_dir, **w.settings))
        tok = _tokenizer(str(resolve_base(cfg)), AutoTokenizer)
        path = Path(tmp) / name
        path.write_text(text, encoding="utf-8")
        seed = job_seed(cfg.training.seed, hashlib.sha256(text.encode()).hexdigest())
        return train_lines(path, DataFormat(fmt), tok, cfg.data, seed)


def _tokenizer(path: str, auto: Any) -> Any:
    if path not in _TOKENIZERS:
        _TOKENIZERS[path] = auto.from_pretrained(path)
    return _TOKENIZERS[path]
