"""One health report of an instance, for people and scripts: `trainctl health`, `/api/health?deep=true`.

    from daemon.health import run_checks, exit_code
    checks = run_checks(cfg, deep=False)     # [Check(name, level, detail)]
    sys.exit(exit_code(checks))              # 0 healthy, 1 warnings only, 2 a problem

Read-only, standard library only (the deep checkpoint check loads it in a
subprocess, so the caller never imports torch). Each check says what it saw.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from daemon import adapters, lockedkeys
from daemon.config import Config
from daemon.diskspace import free_bytes, write_trouble
from daemon.jobqueue import DUPLICATE_SUFFIX, ERROR_SUFFIX, JobQueue
from daemon.lock import holder_pid
from daemon.states import JobState
from daemon.status import read_status

Level = Literal["ok", "warning", "problem"]
FOLDERS = ("inbox", "queue", "status", "adapters", "checkpoints", "logs")


@dataclass(frozen=True)
class Check:
    name: str
    level: Level
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def exit_code(checks: list[Check]) -> int:
    levels = {c.level for c in checks}
    return 2 if "problem" in levels else 1 if "warning" in levels else 0


def run_checks(cfg: Config, deep: bool = False, now: float | None = None) -> list[Check]:
    now = time.time() if now is None else now
    alive = holder_pid(cfg.path("status") / "daemon.lock")
    return [_config(cfg), _daemon(cfg, alive, now), _queue(cfg, alive), _disk(cfg), _adapter(cfg),
            _checkpoint(cfg, deep)]


def _config(cfg: Config) -> Check:
    changed = lockedkeys.check(cfg)
    if changed:
        keys = ", ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in changed)
        return Check("config", "problem", f"locked keys changed since training began ({keys}); the daemon refuses to "
                                          "start until `trainctl config approve` or the old values are back")
    return Check("config", "ok", "valid; locked keys as recorded")


def _age(iso: str | None, now: float) -> float | None:
    try:
        return now - datetime.fromisoformat(str(iso).replace("Z", "+00:00")).timestamp()
    except (TypeError, ValueError):
        return None


def _daemon(cfg: Config, alive: int | None, now: float) -> Check:
    st = read_status(cfg.path("status")) or {}
    if alive is None:
        if st.get("status") == "stopped":
            return Check("daemon", "warning", "not running (stopped cleanly); start it with bin/start_all.sh")
        return Check("daemon", "problem", "not running" + (f" (its last status: {st.get('status')})" if st else ""))
    age = _age(st.get("updated_at"), now)
    limit = 3 * float(st.get("write_interval_seconds") or cfg.service.status_interval_seconds) + 5
    interval = float(st.get("write_interval_seconds") or cfg.service.status_interval_seconds)
    if age is None or age > 3 * interval:  # late: when its folder shows why, that is the answer
        why = write_trouble(cfg.path("status"))
        if why is not None:
            return Check("daemon", "problem", f"pid {alive} runs but cannot write its status: {why[1]}")
    if age is None or age > limit:
        return Check("daemon", "problem", f"pid {alive} holds the lock but its status is "
                                          f"{'missing' if age is None else f'{age:.0f} s old'} (limit {limit:.0f} s): not responding")
    what = f"pid {alive}, status {st.get('status')} ({age:.1f} s old)"
    if st.get("status") == "error" or (st.get("status") == "paused" and st.get("pause_reason") in ("disk_full", "unwritable")):
        return Check("daemon", "problem", f"{what}: {st.get('last_error') or st.get('detail')}")
    if st.get("status") in ("training", "idle", "paused") and st.get("trainer_pid") is None and st.get("status") != "paused":
        return Check("daemon", "warning", f"{what}; no trainer process right now (starting or restarting)")
    return Check("daemon", "ok", what)


def _queue(cfg: Config, alive: int | None) -> Check:
    q = JobQueue(cfg.path("queue"))
    notes, level = [], "ok"
    processing = q.processing()
    if len(processing) > 1:
        level = "problem"
        notes.append(f"{len(processing)} files in processing/ (one at most): {', '.join(e.job_id for e in processing)}")
    elif processing and alive is None:
        level = "warning"
        notes.append(f"{processing[0].job_id} is in processing/ with no daemon running: it resumes at the next start")
    orphans = []
    for state, suffix in ((JobState.FAILED, ERROR_SUFFIX), (JobState.DONE, DUPLICATE_SUFFIX)):
        folder = q.folder(state)
        orphans += [n.name for n in folder.glob("*" + suffix) if not (folder / n.name[:-len(suffix)]).is_file()]
    if orphans:
        level = "problem" if level == "problem" else "warning"
        notes.append(f"notes without their file (swept at the next start): {', '.join(sorted(orphans)[:5])}")
    c = q.counts()
    summary = f"{c['pending']} pending, {c['processing']} processing, {c['done']} done, {c['failed']} failed"
    return Check("queue", level, "; ".join([summary, *notes]))  # type: ignore[arg-type]


def _disk(cfg: Config) -> Check:
    need = cfg.service.min_free_bytes
    low = []
    for name in FOLDERS:
        folder = cfg.path(name)
        probe = folder if folder.exists() else cfg.root
        free = free_bytes(probe)
        if free < max(need, 1):
            low.append(f"{name}/ {free / 2**20:.0f} MiB free")
    if low:
        return Check("disk", "problem", f"below service.min_free_bytes ({need / 2**20:.0f} MiB): {', '.join(low)}")
    return Check("disk", "ok", f"every runtime folder above {need / 2**20:.0f} MiB free "
                               f"({free_bytes(cfg.path('status') if cfg.path('status').exists() else cfg.root) / 2**30:.1f} GiB where the status is)")


def _adapter(cfg: Config) -> Check:
    folder = cfg.path("adapters")
    if not (folder / adapters.CURRENT).exists():
        return Check("adapter", "ok", "none yet (the first is published when the first file is done)")
    try:
        cur = adapters.read_current(folder)
    except (OSError, ValueError, KeyError, TypeError) as e:
        return Check("adapter", "problem", f"{folder / adapters.CURRENT} does not lead to a readable version: {e}")
    missing = [n for n in ("adapter_model.safetensors", "adapter_config.json") if not (cur.path / n).is_file()]
    if missing:
        return Check("adapter", "problem", f"v{cur.version} lacks {', '.join(missing)}")
    return Check("adapter", "ok", f"v{cur.version} ({cur.manifest.original_name or 'no file'}; generation "
                                  f"{cur.manifest.generation})")


def step_dirs(folder: Path) -> list[Path]:
    """A job's published checkpoint folders, newest first (the layout of daemon/train/checkpoint.py, which the
    service side does not import)."""
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit()),
                  key=lambda p: p.name, reverse=True)


def safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor names and shapes from a safetensors header (no weights read)."""
    import struct

    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {k: v["shape"] for k, v in header.items() if k != "__metadata__"}


_LOAD = ("import sys, torch; from safetensors.torch import load_file; p = sys.argv[1]; load_file(p + '/adapter_model.safetensors'); "
         "torch.load(p + '/optimizer.pt', map_location='cpu', weights_only=True); "
         "torch.load(p + '/rng.pt', map_location='cpu', weights_only=False)")


def _checkpoint(cfg: Config, deep: bool) -> Check:
    q = JobQueue(cfg.path("queue"))
    processing = q.processing()
    if not processing:
        return Check("checkpoint", "ok", "no file in training")
    job = processing[0].job_id
    dirs = step_dirs(cfg.path("checkpoints") / job)
    if not dirs:
        return Check("checkpoint", "ok", f"{job}: none yet (it trains from its start)")
    newest = dirs[0]
    try:
        shapes = safetensors_shapes(newest / "adapter_model.safetensors")
        state = json.loads((newest / "state.json").read_text())
    except (OSError, ValueError, KeyError) as e:
        return Check("checkpoint", "warning", f"{newest} does not read ({e}); the resume falls back to an older one")
    cur = adapters.peek_current(cfg.path("adapters"))
    if cur is not None and (cur.path / "adapter_model.safetensors").is_file():
        theirs = safetensors_shapes(cur.path / "adapter_model.safetensors")
        if shapes != theirs:
            return Check("checkpoint", "problem", f"{newest.name} of {job} does not fit adapter v{cur.version} "
                                                  "(other tensors or shapes): it cannot be resumed onto it")
    detail = f"{job}: {newest.name} (step {state.get('step')}, {len(shapes)} LoRA tensors)"
    if deep:
        r = subprocess.run([sys.executable, "-c", _LOAD, str(newest)], capture_output=True, text=True, timeout=600,
                           env=dict(os.environ, HF_HUB_OFFLINE="1"))
        if r.returncode != 0:
            return Check("checkpoint", "problem", f"{detail} does not load: {r.stderr.strip().splitlines()[-1:]}")
        detail += ", loads"
    return Check("checkpoint", "ok", detail)
