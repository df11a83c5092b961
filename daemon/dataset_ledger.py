"""The dataset ledger: which file contents the adapter's lineage has already learnt.

    from daemon.dataset_ledger import DatasetLedger
    ledger = DatasetLedger(cfg.path("adapters"), db, adapters.config_base(cfg))
    earlier = ledger.earlier(sha256)     # the ledger entry of the file with these bytes, or None

The trainer child writes the ledger into every adapter manifest (`dataset`: the
parent's entries plus the file the version learnt), so it moves with the
adapter: a rollback to an older version brings back that version's ledger, and
a consolidated base carries its own into the next generation (and into a new
adapter `config approve` starts on it: `adapters/start.json` holds the files
merged into the base until the first version is published). Service side,
standard library only; the manifest is read again only when the current
version changes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from daemon import adapters
from daemon.history_db import HistoryDB


class DatasetLedger:
    def __init__(self, adapters_dir: Path, db: HistoryDB, base: str | None = None) -> None:
        self.adapters_dir, self.db = adapters_dir, db
        self.base = base  # adapters.config_base: a START record of another base_model is not this lineage's
        self._version: int | None = None
        self._by_sha: dict[str, dict[str, Any]] = {}

    def learnt(self) -> dict[str, dict[str, Any]]:
        """sha256 -> the first ledger entry with that content, for the current version."""
        current = adapters.peek_current(self.adapters_dir)
        version = current.version if current is not None else None
        if version != self._version or current is None:
            self._version, self._by_sha = version, self._build(current) if current is not None else self._start()
        return self._by_sha

    def _start(self) -> dict[str, dict[str, Any]]:
        """Before the first version: the files merged into the base a new adapter starts on (START record)."""
        try:
            start = (adapters.read_start(self.adapters_dir, self.base) if self.base else None) or {}
        except (OSError, ValueError):
            return {}
        by_sha: dict[str, dict[str, Any]] = {}
        for e in start.get("dataset", []):
            by_sha.setdefault(e["sha256"], e)
        return by_sha

    def earlier(self, sha256: str | None) -> dict[str, Any] | None:
        return self.learnt().get(sha256) if sha256 else None

    def _build(self, current: adapters.AdapterVersion) -> dict[str, dict[str, Any]]:
        entries = current.dataset
        if current.manifest.dataset is None:
            # Written before the ledger existed: the history knows the content of the files it lists.
            known = {e["job_id"] for e in entries}
            for job_id in current.trained_jobs:
                record = self.db.job(job_id) if job_id not in known else None
                if record and record.get("sha256"):
                    entries.append({"sha256": record["sha256"], "job_id": job_id,
                                    "original_name": record.get("original_name"), "version": None, "generation": 0})
        by_sha: dict[str, dict[str, Any]] = {}
        for e in entries:
            by_sha.setdefault(e["sha256"], e)
        return by_sha


def duplicate_message(name: str, earlier: dict[str, Any]) -> str:
    learnt = f" (adapter v{earlier['version']})" if earlier.get("version") else ""
    return (f"{name} has the same content as {earlier.get('original_name') or earlier['job_id']}, which the adapter "
            f"has already learnt{learnt}; not trained again (`trainctl queue add --force FILE` trains it anyway)")
