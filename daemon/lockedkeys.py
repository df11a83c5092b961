"""Keys that shape the adapter are locked once training has begun.

    changes = check(cfg)        # [(key, recorded, now)]; empty when all agree or nothing recorded
    record(cfg)                 # remember the current values (first start); the history is kept
    approve(cfg, now)           # accept the config's values (daemon must be stopped): an Approval

The recorded values live in `status/locked_keys.json`, with a history of what
changed: each approval and each consolidation. Approving a change of
`base_model`, `lora.r` or `lora.target_modules` (the adapter's shape) moves
`adapters/` and `checkpoints/` into `archive/<stamp>/` and training starts a
new adapter. It starts on the base in use: after consolidations that is the
newest generation's (`adapters/start.json` tells the trainer, and keeps the
dataset entries of the files merged into it); `from_config_base`, a changed
`base_model` or no consolidation start it on `base_model` (generation 0).
The step history starts a new series (daemon.status). Approving any other
locked key archives only `checkpoints/` (a mid-file position is meaningless
with another batch size or length), so the file in progress restarts from its
beginning on the adapter kept so far. Nothing is deleted.
"""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon import adapters, atomic
from daemon.config import Config, locked_values
from daemon.errors import TraindError
from daemon.history_db import HISTORY_FILE, HistoryDB

log = logging.getLogger(__name__)

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


def _history(cfg: Config) -> list:
    try:
        history = atomic.read_json(_path(cfg)).get("history", [])
    except (FileNotFoundError, ValueError, AttributeError):
        return []
    return history if isinstance(history, list) else []


def record(cfg: Config, now: float | None = None, history: list | None = None) -> None:
    """Remember the config's locked values; the history recorded so far stays unless `history` replaces it
    (the start after an approval records again, and must not forget the approval nor the consolidations)."""
    now = time.time() if now is None else now
    history = _history(cfg) if history is None else history
    atomic.write_json(_path(cfg), {"values": locked_values(cfg), "recorded_at": now, "history": history})


@dataclass(frozen=True)
class Approval:
    """What `approve` did."""

    changes: list[tuple[str, Any, Any]]
    archived: list[str]  # folders moved to archive/<stamp>/
    new_adapter: bool  # a shape key changed: training starts a fresh adapter
    continues_on: dict[str, Any] | None  # {"generation", "base_path"} of the consolidated base it starts on
    series: int | None  # the step history's new series (None: the same one goes on, or there is no history yet)
    history_error: str | None = None  # the history could not be written (the approval stands)


def approve(cfg: Config, now: float | None = None, from_config_base: bool = False) -> Approval:
    """Accept the config's locked values. The caller holds the daemon lock (the daemon is stopped).

    A new adapter starts on the consolidated base in use unless `from_config_base` or `base_model` changed;
    that base must still be there (refused before anything moves)."""
    now = time.time() if now is None else now
    changes = check(cfg)
    if not changes:
        return Approval([], [], False, None, None)
    keys = {k for k, _, _ in changes}
    shape_changed = bool(keys & set(SHAPE_KEYS))
    carried = None
    if shape_changed and "base_model" not in keys and not from_config_base:
        try:
            carried = adapters.carry_over(cfg.path("adapters"), adapters.config_base(cfg))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise TraindError(f"config approve: the adapter store {cfg.path('adapters')} cannot be read ({e!r}), so the "
                              "base training is on is not known. Repair it, or approve with --from-config-base to start "
                              f"the new adapter on base_model ({cfg.base_model}, generation 0)") from e
        if carried is not None and not Path(carried["base_path"]).is_dir():
            raise TraindError(f"config approve: training is on generation {carried['generation']}'s base "
                              f"{carried['base_path']}, which is gone: a fresh adapter cannot start on it. Put it back, "
                              f"or approve with --from-config-base to start on base_model ({cfg.base_model}, generation 0)")
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    archive = cfg.root / "archive" / stamp
    moved = []
    for name in (("adapters", "checkpoints") if shape_changed else ("checkpoints",)):
        src = cfg.path(name)
        if src.exists() and any(src.iterdir()):
            archive.mkdir(parents=True, exist_ok=True)
            shutil.move(str(src), str(archive / name))
            atomic.fsync_dir(archive)
            atomic.fsync_dir(src.parent)
            moved.append(str(archive / name))
    continues_on = {"generation": carried["generation"], "base_path": carried["base_path"]} if carried else None
    if carried is not None:  # the trainer reads it while adapters/ has no version yet
        adapters.write_start(cfg.path("adapters"), {**carried, "approved_at": now, "archived": moved})
    history = _history(cfg)
    entry: dict[str, Any] = {"at": now, "changes": [[k, o, n] for k, o, n in changes], "archived": moved,
                             "by_pid": os.getpid()}
    if shape_changed:
        entry["continues_on"] = continues_on
    history.append(entry)
    record(cfg, now, history)  # the commit point: the daemon starts with the new values from here
    series, error = _history_db(cfg, changes, shape_changed, continues_on, now)
    return Approval(changes, moved, shape_changed, continues_on, series, error)


def _history_db(cfg: Config, changes: list, new_adapter: bool, continues_on: dict | None,
                now: float) -> tuple[int | None, str | None]:
    """Say the approval in history.db (an event) and, for a new adapter, start a new series of steps: its
    global steps start at 0 again. (series id or None, an error that kept it from being written or None)"""
    path = cfg.path("status") / HISTORY_FILE
    if not path.exists():  # nothing trained yet: no steps to set apart
        return None, None
    said = "; ".join(f"{k}: {o!r} -> {n!r}" for k, o, n in changes)
    on = (f"generation {continues_on['generation']}'s base {continues_on['base_path']}" if continues_on
          else f"base_model {cfg.base_model}")
    try:
        db = HistoryDB(path)
        try:
            series = db.start_series(f"config approve: {said}", now) if new_adapter else None
            db.event("config_approved", f"config approve: {said}" + (f"; a fresh adapter on {on} (series {series} of "
                     "the step history)" if new_adapter else "; the adapter is kept"), t=now)
        finally:
            db.close()
    except (sqlite3.Error, OSError) as e:
        log.error("history.db was not updated for the approval: %s", e)
        return None, str(e)
    return series, None


def note_consolidation(cfg: Config, base: str, generation: int, now: float) -> None:
    """Record that training moved to a consolidated base. `base_model` in the config keeps naming generation 0's
    base (the lineage's root, what the locked-key check compares); the base in use is the adapter's."""
    try:
        raw = atomic.read_json(_path(cfg))
    except (FileNotFoundError, ValueError):
        return
    raw.setdefault("history", []).append({"at": now, "consolidation": {"generation": generation, "base_in_use": base}})
    atomic.write_json(_path(cfg), raw)
