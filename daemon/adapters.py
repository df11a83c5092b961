"""The adapter store: `adapters/v000N/` folders and the `current.json` pointer.

    from daemon import adapters
    cur = adapters.read_current(cfg.path("adapters"))      # AdapterVersion, or None before the first file
    cur = adapters.peek_current(cfg.path("adapters"))      # the same, None also when unreadable (readers)
    adapters.lineage(cfg.path("adapters"))                  # manifests from the first version to the current one
    cur.version, cur.path, cur.manifest["trained_jobs"]
    adapters.publish(cfg.path("adapters"), manifest, write_weights)   # the trainer child only
    adapters.rollback_refusal(cfg.path("adapters"), 3)     # why a rollback to v3 cannot be made, or None
    adapters.nothing_learnt(cur)                            # why consolidating cur would add nothing, or None
    adapters.base_in_use(cfg.path("adapters"), adapters.config_base(cfg))   # the consolidated base in use, or None

The trainer child is the one writer (it publishes a version after each file);
the service, the CLI and the monitor read. Standard library only: the torch
side passes its own `write_weights(folder)` to `publish`. Layout and manifest
fields: docs/internals.md. The one other writer is `trainctl config approve`
(daemon stopped, holding its lock): it moves the store to `archive/` and may
leave `start.json` in the emptied folder, the consolidated base a new adapter
starts on (`carry_over`, `write_start`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from daemon import atomic

CURRENT = "current.json"
MANIFEST = "manifest.json"
START = "start.json"  # in an emptied store: the consolidated base the first new version trains on
STEP_LOG = "steps.jsonl"  # the step reports of the file a version learnt (its training log), one JSON each


def version_dir_name(version: int) -> str:
    return f"v{version:04d}"


@dataclass(frozen=True)
class AdapterVersion:
    """The adapter `adapters/current.json` points at."""

    version: int
    path: Path
    manifest: dict[str, Any]

    @property
    def trained_jobs(self) -> list[str]:
        return list(self.manifest.get("trained_jobs", []))

    @property
    def dataset(self) -> list[dict[str, Any]]:
        """Every file this adapter's lineage learnt, oldest first: `sha256`, `job_id`, `original_name`,
        `version` (the adapter version it went into), `generation` (of the base it trained on).
        A manifest written before the dataset ledger existed knows only its own file's content."""
        if "dataset" in self.manifest:
            return list(self.manifest["dataset"])
        m = self.manifest
        return [{"sha256": m.get("sha256"), "job_id": m.get("job_id"), "original_name": m.get("original_name"),
                 "version": self.version, "generation": m.get("generation", 0)}] if m.get("sha256") else []


def dataset_entry(manifest: dict[str, Any]) -> dict[str, Any]:
    """The dataset-ledger line of the file a new version learns (its manifest's own fields)."""
    return {"sha256": manifest["sha256"], "job_id": manifest["job_id"], "original_name": manifest.get("original_name"),
            "version": manifest["version"], "generation": manifest.get("generation", 0), "steps": manifest.get("steps")}


def generation(manifest: dict[str, Any]) -> int:
    """The base generation a manifest (or a START record) trained on: 0 is the config's base_model."""
    return int(manifest.get("generation") or 0)


def read_current(adapters: Path) -> AdapterVersion | None:
    """The current adapter version, or None before the first file has been trained."""
    pointer = adapters / CURRENT
    if not pointer.is_file():
        return None
    cur = atomic.read_json(pointer)
    path = adapters / cur["path"]
    return AdapterVersion(int(cur["version"]), path, atomic.read_json(path / MANIFEST))


def lineage(adapters: Path) -> list[dict[str, Any]]:
    """The manifests of the current version and its ancestors (`parent_version`), oldest first: each
    holds the job it trained and that job's sample ledger (daemon.ledger). Empty before the first file."""
    current = read_current(adapters)
    chain: list[dict[str, Any]] = []
    manifest = current.manifest if current else None
    while manifest is not None:
        chain.append(manifest)
        parent = manifest.get("parent_version")
        manifest = atomic.read_json(adapters / version_dir_name(parent) / MANIFEST) if parent else None
    return chain[::-1]


def peek_current(adapters: Path) -> AdapterVersion | None:
    """As read_current, for readers that must go on whatever they find: None when missing or unreadable."""
    try:
        return read_current(adapters)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def publish(adapters: Path, manifest: dict[str, Any], write_weights: Callable[[Path], None]) -> AdapterVersion:
    """Write `adapters/v000N/` (weights, config, manifest) in one rename, then point current.json at it.

    `manifest` must hold `version`; `write_weights(folder)` writes the adapter
    files into a temp folder. current.json is replaced last, so it is the commit
    point: a crash before it leaves the previous version current.
    """
    adapters.mkdir(parents=True, exist_ok=True)
    # A crash mid-publication leaves its temp (or moved-aside) folder, a full adapter each;
    # sweep them here (one trainer holds the lock) so they never pile up.
    for left in [*adapters.glob(".v*.tmp"), *adapters.glob(".v*.old-*")]:
        shutil.rmtree(left, ignore_errors=True)
    name = version_dir_name(manifest["version"])
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=adapters))
    try:
        write_weights(tmp)
        atomic.write_json(tmp / MANIFEST, manifest, site="adapter")
        tmp.chmod(0o755)  # mkdtemp makes 0700; readers (monitor) run as other tools
        atomic.publish_dir(tmp, adapters / name, site="adapter")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic.write_json(adapters / CURRENT, {"version": manifest["version"], "path": name}, site="adapter")
    return AdapterVersion(manifest["version"], adapters / name, manifest)


def versions(adapters: Path) -> list[AdapterVersion]:
    """Every published version folder whose manifest reads, oldest first."""
    out = []
    found = [f for f in adapters.glob("v[0-9][0-9][0-9][0-9]*") if f.name[1:].isdigit() and f.is_dir()]
    for folder in sorted(found, key=lambda f: int(f.name[1:])):
        try:
            manifest = atomic.read_json(folder / MANIFEST)
        except (OSError, ValueError):
            continue
        out.append(AdapterVersion(int(folder.name[1:]), folder, manifest))
    return out


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def prune(adapters: Path, keep_last: int, protected: set[int]) -> list[int]:
    """Remove versions beyond the newest `keep_last` (0: keep every one), except the current one and
    `protected` (pinned, fed a consolidation). Each goes by a rename aside, then a delete (a crash in
    between leaves a `.v*.old-*` folder that the next publication sweeps). Returns the versions removed.
    Only the trainer (the one writer of adapters/) calls it."""
    if keep_last <= 0:
        return []
    current = peek_current(adapters)
    every = [v.version for v in versions(adapters)]
    keep = set(every[-keep_last:]) | protected | ({current.version} if current else set())
    removed = []
    for version in every:
        if version in keep:
            continue
        folder = adapters / version_dir_name(version)
        aside = adapters / f".{folder.name}.old-{os.getpid()}"
        os.replace(folder, aside)
        shutil.rmtree(aside, ignore_errors=True)
        removed.append(version)
    if removed:
        atomic.fsync_dir(adapters)
    return removed


def read_step_log(path: Path) -> list[dict[str, Any]]:
    """The step reports in a step log (`path` is the log or the folder holding it); a line torn by a crash
    (only the last one can be: nothing after it was synced) and what follows it are left out."""
    path = path / STEP_LOG if path.is_dir() else path
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    out = []
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            break
    return out


# -- lineage rules: what a rollback, a consolidation and a new adapter may do ------------------------------
def config_base(cfg: Any) -> str:
    """The config's base_model as a START record names it (a folder resolved, or the embedded model's name):
    the same from config.json and from the trainer's running config, whose paths are absolute."""
    return str(cfg.base_model_path or cfg.base_model)


def read_start(adapters: Path, base: str) -> dict[str, Any] | None:
    """The START record (`base_path`, `generation`, `dataset`: the files merged into that base) that
    `trainctl config approve` left in an emptied store, if it grew from `base` (config_base: a base_model
    changed since starts a lineage of its own, on it); None when there is none. A damaged one raises:
    going back to generation 0's base without a word is what it is there to prevent."""
    try:
        record = atomic.read_json(adapters / START)
    except FileNotFoundError:
        return None
    return record if record.get("config_base") in (None, base) else None


def write_start(adapters: Path, record: dict[str, Any]) -> None:
    """`trainctl config approve` only, daemon stopped: the base the next adapter starts on."""
    adapters.mkdir(parents=True, exist_ok=True)
    atomic.write_json(adapters / START, record)


def _head(adapters: Path, base: str) -> tuple[AdapterVersion | None, dict[str, Any]]:
    """The current version and the manifest the next version continues (the START record before the first)."""
    current = read_current(adapters)
    return current, (current.manifest if current is not None else read_start(adapters, base) or {})


def base_in_use(adapters: Path, base: str) -> dict[str, Any] | None:
    """`{"base_path", "generation"}` of the consolidated base training continues; None: the config's base_model
    (`base`, config_base)."""
    try:
        _, m = _head(adapters, base)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return {"base_path": m["base_path"], "generation": generation(m)} if m.get("base_path") else None


def carry_over(adapters: Path, base: str) -> dict[str, Any] | None:
    """What a new adapter of another shape keeps of this store: the consolidated base in use and the dataset
    entries of the files merged into it (they are in the base's weights, so they stay learnt). Files learnt
    on that base by the adapter itself go with it. None at generation 0 (the new adapter starts on base_model).
    `base` (config_base) is the lineage's root, kept in the record."""
    current, m = _head(adapters, base)
    if not m.get("base_path"):
        return None
    gen = generation(m)
    dataset = current.dataset if current is not None else list(m.get("dataset", []))
    return {"base_path": m["base_path"], "generation": gen, "config_base": base,
            "dataset": [e for e in dataset if int(e.get("generation") or 0) < gen]}


def rollback_refusal(adapters: Path, version: int, here: int | None = None) -> str | None:
    """Why a rollback to `version` cannot be made (None: it can): the version is not kept, or it trained on
    another generation's base than the one in use (`here`; by default the current version's). Asked before
    anything is interrupted, by the CLI, the monitor, the service and the trainer alike."""
    kept = versions(adapters)
    target = next((v for v in kept if v.version == version), None)
    if target is None:
        return (f"there is no adapter v{version} to roll back to "
                f"(kept: {', '.join(f'v{v.version}' for v in kept) or 'none'}; see `trainctl adapters list`)")
    if here is None:
        current = peek_current(adapters)
        here = generation(current.manifest) if current is not None else 0
    there = generation(target.manifest)
    if there != here:
        return (f"adapter v{version} trained on generation {there}'s base, and training is on generation {here}'s: "
                "a rollback stays within a generation")
    return None


def nothing_learnt(current: AdapterVersion) -> str | None:
    """Why consolidating `current` would add nothing (None: a file trained on its base): no entry of its dataset
    ledger was learnt on its generation. So it is with the fresh adapter a consolidation publishes and with
    a rollback to it: the merge would be a copy of the base, a new generation that blocks every rollback
    before it and that traind never deletes."""
    gen = generation(current.manifest)
    if any(int(e.get("generation") or 0) == gen for e in current.dataset):
        return None
    m, v = current.manifest, current.version
    how = (f" (adapter v{v} is the fresh adapter published when v{m['consolidated_from']} was consolidated)"
           if m.get("consolidated_from") is not None else
           f" (adapter v{v} is a rollback to v{m['rollback_of']})" if m.get("rollback_of") is not None else "")
    return (f"no file has trained on generation {gen}'s base yet{how}; "
            "a new generation would be a copy of that base")
