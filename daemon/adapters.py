"""The adapter store: `adapters/v000N/` folders and the `current.json` pointer.

    from daemon import adapters
    cur = adapters.read_current(cfg.path("adapters"))      # AdapterVersion, or None before the first file
    cur = adapters.peek_current(cfg.path("adapters"))      # the same, None also when unreadable (readers)
    adapters.lineage(cfg.path("adapters"))                  # manifests from the first version to the current one
    cur.version, cur.path, cur.manifest.trained_jobs          # AdapterManifest: the one shape of manifest.json
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
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable

from daemon import atomic

CURRENT = "current.json"
MANIFEST = "manifest.json"
START = "start.json"  # in an emptied store: the consolidated base the first new version trains on
STEP_LOG = "steps.jsonl"  # the step reports of the file a version learnt (its training log), one JSON each


def version_dir_name(version: int) -> str:
    return f"v{version:04d}"


# Written even when null, as manifests always had them; the other fields only when they say something.
_ALWAYS = ("version", "parent_version", "generation", "base_model", "job_id", "original_name", "sha256", "steps",
           "global_step", "final_loss", "eval_loss", "created_at", "trained_jobs", "activity_moved")


@dataclass(frozen=True)
class AdapterManifest:
    """A version's `manifest.json`: what it continues, what it learnt, how. The one shape every reader and the one
    writer (the trainer) use; keys this traind does not know (a later one's) are kept in `extra` as they were.

    A version after a file has the file's `job_id`, `original_name`, `sha256`, its `steps` and losses and its
    sample `ledger`; the first of a generation has `consolidated_from` and `lineage`; a rollback `rollback_of`
    and `undone`. `dataset` is every file the lineage learnt (None in a manifest older than the dataset ledger).
    A START record (`trainctl config approve`'s `start.json`) reads as version 0."""

    version: int
    parent_version: int | None = None
    generation: int = 0  # of the base trained on: 0 is the config's base_model
    base_model: str | None = None
    base_path: str | None = None  # the consolidated base (generation 1 on); None: the config's base_model
    base_gguf: dict | None = None  # generation 0 on a GGUF base: {path, sha256, architecture, tensor_types, converted}
    quantization: str | None = None  # what the base was loaded with (model.quantization auto resolved, then kept)
    job_id: str | None = None
    original_name: str | None = None
    sha256: str | None = None
    steps: int | None = 0
    global_step: int = 0
    final_loss: float | None = None
    eval_loss: float | None = None
    created_at: str | None = None
    trained_jobs: list[str] = field(default_factory=list)
    activity_moved: dict | None = None
    ledger: dict | None = None  # the samples every step of the file consumed (daemon.sample_ledger)
    dataset: list[dict] | None = None
    eval_set: dict | None = None  # eval.file's loss before and after the file
    rollback_of: int | None = None
    undone: list[dict] = field(default_factory=list)
    consolidated_from: int | None = None
    lineage: str | None = None  # the consolidated base's lineage.json
    description: str | None = None
    forgetting: dict | None = None  # the forgetting report after its file (daemon.train.forgetting)
    held: bool = False  # the forgetting gate kept it aside: published, not current, until accepted or rejected
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> AdapterManifest:
        known = {f.name for f in fields(cls)} - {"extra"}
        args = {k: v for k, v in raw.items() if k in known}
        args["generation"] = int(raw.get("generation") or 0)
        args["global_step"] = int(raw.get("global_step") or 0)
        for key in ("trained_jobs", "undone"):
            args[key] = list(raw.get(key) or [])
        return cls(**args, extra={k: v for k, v in raw.items() if k not in known})

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)
               if f.name != "extra" and (f.name in _ALWAYS or getattr(self, f.name) not in (None, []))
               and not (f.name == "held" and not self.held)}
        return {**out, **self.extra}

    def learnt(self) -> list[dict[str, Any]]:
        """Every file this adapter's lineage learnt, oldest first: `sha256`, `job_id`, `original_name`, `version`
        (the adapter version it went into), `generation` (of the base it trained on). A manifest written before
        the dataset ledger existed knows only its own file's content."""
        if self.dataset is not None:
            return list(self.dataset)
        return [self.entry()] if self.sha256 else []

    def entry(self) -> dict[str, Any]:
        """The dataset-ledger line of the file this version learnt (its own fields)."""
        return {"sha256": self.sha256, "job_id": self.job_id, "original_name": self.original_name,
                "version": self.version, "generation": self.generation, "steps": self.steps}


@dataclass(frozen=True)
class AdapterVersion:
    """A published version: its number, its folder, its manifest."""

    version: int
    path: Path
    manifest: AdapterManifest

    @property
    def trained_jobs(self) -> list[str]:
        return list(self.manifest.trained_jobs)

    @property
    def dataset(self) -> list[dict[str, Any]]:
        return self.manifest.learnt()


def read_manifest(folder: Path) -> AdapterManifest:
    """`folder`'s manifest; one without its `version` (written by hand) has its folder's number."""
    raw = atomic.read_json(folder / MANIFEST)
    if "version" not in raw and folder.name[1:].isdigit():
        raw = {**raw, "version": int(folder.name[1:])}
    return AdapterManifest.from_dict(raw)


def read_current(adapters: Path) -> AdapterVersion | None:
    """The current adapter version, or None before the first file has been trained."""
    pointer = adapters / CURRENT
    if not pointer.is_file():
        return None
    cur = atomic.read_json(pointer)
    path = adapters / cur["path"]
    return AdapterVersion(int(cur["version"]), path, read_manifest(path))


def lineage(adapters: Path) -> list[AdapterManifest]:
    """The manifests of the current version and its ancestors (`parent_version`), oldest first: each
    holds the job it trained and that job's sample ledger (daemon.sample_ledger). Empty before the first file."""
    current = read_current(adapters)
    chain: list[AdapterManifest] = []
    manifest = current.manifest if current else None
    while manifest is not None:
        chain.append(manifest)
        parent = manifest.parent_version
        manifest = read_manifest(adapters / version_dir_name(parent)) if parent else None
    return chain[::-1]


def peek_current(adapters: Path) -> AdapterVersion | None:
    """As read_current, for readers that must go on whatever they find: None when missing or unreadable."""
    try:
        return read_current(adapters)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def publish(adapters: Path, manifest: AdapterManifest | dict[str, Any],
            write_weights: Callable[[Path], None], make_current: bool = True) -> AdapterVersion:
    """Write `adapters/v000N/` (weights, config, manifest) in one rename, then point current.json at it.

    `manifest` must hold `version`; `write_weights(folder)` writes the adapter
    files into a temp folder. current.json is replaced last, so it is the commit
    point: a crash before it leaves the previous version current. `make_current` False (a version the
    forgetting gate holds) leaves current.json as it was.
    """
    if isinstance(manifest, dict):  # (tests write a store by hand)
        manifest = AdapterManifest.from_dict(manifest)
    adapters.mkdir(parents=True, exist_ok=True)
    # A crash mid-publication leaves its temp (or moved-aside) folder, a full adapter each;
    # sweep them here (one trainer holds the lock) so they never pile up.
    for left in [*adapters.glob(".v*.tmp"), *adapters.glob(".v*.old-*")]:
        shutil.rmtree(left, ignore_errors=True)
    name = version_dir_name(manifest.version)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=adapters))
    try:
        write_weights(tmp)
        atomic.write_json(tmp / MANIFEST, manifest.to_dict(), site="adapter")
        tmp.chmod(0o755)  # mkdtemp makes 0700; readers (monitor) run as other tools
        atomic.publish_dir(tmp, adapters / name, site="adapter")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if make_current:
        atomic.write_json(adapters / CURRENT, {"version": manifest.version, "path": name}, site="adapter")
    return AdapterVersion(manifest.version, adapters / name, manifest)


def held_versions(adapters: Path) -> list[AdapterVersion]:
    """Versions the forgetting gate holds: published after the current one, not current, `held` in their
    manifest. At most one while the daemon runs (it pauses on the first)."""
    current = peek_current(adapters)
    floor = current.version if current else 0
    return [v for v in versions(adapters) if v.manifest.held and v.version > floor]


def accept_held(adapters: Path, version: int) -> AdapterVersion:
    """A held version becomes current: its manifest loses `held` (rewritten in place), then current.json
    points at it (the commit point)."""
    held = next(v for v in held_versions(adapters) if v.version == version)
    manifest = replace(held.manifest, held=False)
    atomic.write_json(held.path / MANIFEST, manifest.to_dict(), site="adapter")
    atomic.write_json(adapters / CURRENT, {"version": version, "path": held.path.name}, site="adapter")
    return AdapterVersion(version, held.path, manifest)


def drop_version(adapters: Path, version: int) -> None:
    """Remove a version's folder (a rejected held version): a rename aside, then a delete."""
    folder = adapters / version_dir_name(version)
    aside = adapters / f".{folder.name}.old-{os.getpid()}"
    os.replace(folder, aside)
    atomic.fsync_dir(adapters)
    shutil.rmtree(aside, ignore_errors=True)


def versions(adapters: Path) -> list[AdapterVersion]:
    """Every published version folder whose manifest reads, oldest first."""
    out = []
    found = [f for f in adapters.glob("v[0-9][0-9][0-9][0-9]*") if f.name[1:].isdigit() and f.is_dir()]
    for folder in sorted(found, key=lambda f: int(f.name[1:])):
        try:
            manifest = read_manifest(folder)
        except (OSError, ValueError, TypeError):
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


def head(adapters: Path, base: str) -> tuple[AdapterVersion | None, AdapterManifest]:
    """The current version and the manifest the next version continues: the current one's, else the START record
    (version 0) `config approve` left, else an empty one (version 0, generation 0)."""
    current = read_current(adapters)
    if current is not None:
        return current, current.manifest
    return None, AdapterManifest.from_dict({**(read_start(adapters, base) or {}), "version": 0})


def base_in_use(adapters: Path, base: str) -> dict[str, Any] | None:
    """`{"base_path", "generation"}` of the consolidated base training continues; None: the config's base_model
    (`base`, config_base)."""
    try:
        _, m = head(adapters, base)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return {"base_path": m.base_path, "generation": m.generation} if m.base_path else None


def carry_over(adapters: Path, base: str) -> dict[str, Any] | None:
    """What a new adapter of another shape keeps of this store: the consolidated base in use and the dataset
    entries of the files merged into it (they are in the base's weights, so they stay learnt). Files learnt
    on that base by the adapter itself go with it. None at generation 0 (the new adapter starts on base_model).
    `base` (config_base) is the lineage's root, kept in the record."""
    _, m = head(adapters, base)
    if not m.base_path:
        return None
    return {"base_path": m.base_path, "generation": m.generation, "config_base": base,
            "dataset": [e for e in m.learnt() if int(e.get("generation") or 0) < m.generation]}


def rollback_refusal(adapters: Path, version: int, here: int | None = None) -> str | None:
    """Why a rollback to `version` cannot be made (None: it can): the version is not kept, or it trained on
    another generation's base than the one in use (`here`; by default the current version's). Asked before
    anything is interrupted, by the CLI, the monitor, the service and the trainer alike."""
    kept = versions(adapters)
    target = next((v for v in kept if v.version == version), None)
    if target is None:
        return (f"there is no adapter v{version} to roll back to "
                f"(kept: {', '.join(f'v{v.version}' for v in kept) or 'none'}; see `trainctl adapters list`)")
    if target.manifest.held:
        return (f"adapter v{version} is held by the forgetting gate: `trainctl adapters accept {version}` makes it "
                f"current, `trainctl adapters reject {version}` drops it")
    if held_versions(adapters):
        held = held_versions(adapters)[0].version
        return f"adapter v{held} is held by the forgetting gate: accept or reject it first"
    if here is None:
        current = peek_current(adapters)
        here = current.manifest.generation if current is not None else 0
    there = target.manifest.generation
    if there != here:
        return (f"adapter v{version} trained on generation {there}'s base, and training is on generation {here}'s: "
                "a rollback stays within a generation")
    return None


def nothing_learnt(current: AdapterVersion) -> str | None:
    """Why consolidating `current` would add nothing (None: a file trained on its base): no entry of its dataset
    ledger was learnt on its generation. So it is with the fresh adapter a consolidation publishes and with
    a rollback to it: the merge would be a copy of the base, a new generation that blocks every rollback
    before it and that traind never deletes."""
    gen = current.manifest.generation
    if any(int(e.get("generation") or 0) == gen for e in current.dataset):
        return None
    m, v = current.manifest, current.version
    how = (f" (adapter v{v} is the fresh adapter published when v{m.consolidated_from} was consolidated)"
           if m.consolidated_from is not None else
           f" (adapter v{v} is a rollback to v{m.rollback_of})" if m.rollback_of is not None else "")
    return (f"no file has trained on generation {gen}'s base yet{how}; "
            "a new generation would be a copy of that base")
