"""The adapter store: `adapters/v000N/` folders and the `current.json` pointer.

    from daemon import adapters
    cur = adapters.read_current(cfg.path("adapters"))      # AdapterVersion, or None before the first file
    cur = adapters.peek_current(cfg.path("adapters"))      # the same, None also when unreadable (readers)
    adapters.lineage(cfg.path("adapters"))                  # manifests from the first version to the current one
    cur.version, cur.path, cur.manifest["trained_jobs"]
    adapters.publish(cfg.path("adapters"), manifest, write_weights)   # the trainer child only

The trainer child is the one writer (it publishes a version after each file);
the service, the CLI and the monitor read. Standard library only: the torch
side passes its own `write_weights(folder)` to `publish`. Layout and manifest
fields: docs/internals.md.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from daemon import atomic

CURRENT = "current.json"
MANIFEST = "manifest.json"


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
        atomic.write_json(tmp / MANIFEST, manifest)
        tmp.chmod(0o755)  # mkdtemp makes 0700; readers (monitor) run as other tools
        atomic.publish_dir(tmp, adapters / name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic.write_json(adapters / CURRENT, {"version": manifest["version"], "path": name})
    return AdapterVersion(manifest["version"], adapters / name, manifest)
