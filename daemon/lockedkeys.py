"""Keys that shape the adapter are locked once training has begun.

    changes = check(cfg)        # [(key, recorded, now)]; empty when all agree or nothing recorded
    record(cfg)                 # remember the current values (first start)
    approve(cfg, now)           # accept the config's values (daemon must be stopped)

The recorded values live in `status/locked_keys.json`. Approving a change of
`base_model`, `lora.r` or `lora.target_modules` (the adapter's shape) moves
`adapters/` and `checkpoints/` into `archive/<stamp>/` and training starts a
new adapter; approving any other locked key archives only `checkpoints/`
(a mid-file position is meaningless with another batch size or length), so the
file in progress restarts from its beginning on the adapter kept so far.
Nothing is deleted.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

from daemon import atomic
from daemon.config import Config, locked_values

FILE = "locked_keys.json"
SHAPE_KEYS = ("base_model", "lora.r", "lora.target_modules")


def _path(cfg: Config) -> Path:
    return cfg.path("status") / FILE


def recorded(cfg: Config) -> dict[str, Any] | None:
    try:
        return atomic.read_json(_path(cfg))["values"]
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None


def training_started(cfg: Config) -> bool:
    """An adapter or a checkpoint exists: the locked keys now matter."""
    adapters, ckpts = cfg.path("adapters"), cfg.path("checkpoints")
    has_adapter = (adapters / "current.json").exists()
    has_ckpt = ckpts.is_dir() and any(p.is_dir() for p in ckpts.iterdir())
    return has_adapter or has_ckpt


def check(cfg: Config) -> list[tuple[str, Any, Any]]:
    old = recorded(cfg)
    if old is None or not training_started(cfg):
        return []
    new = locked_values(cfg)
    # A key locked by a later traind is missing from an older record: that traind trained with what is now
    # the key's default (there was no other choice), so only a value other than the default is a change.
    implicit = locked_values(Config())
    return [(k, old.get(k, implicit[k]), v) for k, v in new.items() if old.get(k, implicit[k]) != v]


def record(cfg: Config, now: float | None = None, history: list | None = None) -> None:
    now = time.time() if now is None else now
    atomic.write_json(_path(cfg), {"values": locked_values(cfg), "recorded_at": now, "history": history or []})


def approve(cfg: Config, now: float | None = None) -> list[str]:
    """Accept the config's locked values; returns what was archived. The caller holds the daemon lock."""
    now = time.time() if now is None else now
    changes = check(cfg)
    if not changes:
        return []
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    archive = cfg.root / "archive" / stamp
    moved = []
    shape_changed = any(k in SHAPE_KEYS for k, _, _ in changes)
    for name in (("adapters", "checkpoints") if shape_changed else ("checkpoints",)):
        src = cfg.path(name)
        if src.exists() and any(src.iterdir()):
            archive.mkdir(parents=True, exist_ok=True)
            shutil.move(str(src), str(archive / name))
            atomic.fsync_dir(archive)
            atomic.fsync_dir(src.parent)
            moved.append(str(archive / name))
    try:
        history = atomic.read_json(_path(cfg)).get("history", [])
    except (FileNotFoundError, ValueError, AttributeError):
        history = []
    history.append({"at": now, "changes": [[k, o, n] for k, o, n in changes], "archived": moved, "by_pid": os.getpid()})
    record(cfg, now, history)
    return moved


def note_consolidation(cfg: Config, base: str, generation: int, now: float) -> None:
    """Record that training moved to a consolidated base. `base_model` in the config keeps naming generation 0's
    base (the lineage's root, what the locked-key check compares); the base in use is the adapter's."""
    try:
        raw = atomic.read_json(_path(cfg))
    except (FileNotFoundError, ValueError):
        return
    raw.setdefault("history", []).append({"at": now, "consolidation": {"generation": generation, "base_in_use": base}})
    atomic.write_json(_path(cfg), raw)
