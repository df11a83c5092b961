"""The dataset ledger: which file contents the adapter's lineage has already learnt.

    from daemon.dataset import DatasetLedger
    ledger = DatasetLedger(cfg.path("adapters"), db)
    earlier = ledger.earlier(sha256)     # the ledger entry of the file with these bytes, or None

The trainer child writes the ledger into every adapter manifest (`dataset`: the
parent's entries plus the file the version learnt), so it moves with the
adapter: a rollback to an older version brings back that version's ledger, and
a consolidated base carries its own into the next generation. Service side,
standard library only; the manifest is read again only when the current
version changes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from daemon import adapters
from daemon.status import HistoryDB


class DatasetLedger:
    def __init__(self, adapters_dir: Path, db: HistoryDB) -> None:
        self.adapters_dir, self.db = adapters_dir, db
        self._version: int | None = None
        self._by_sha: dict[str, dict[str, Any]] = {}

    def learnt(self) -> dict[str, dict[str, Any]]:
        """sha256 -> the first ledger entry with that content, for the current version."""
        current = adapters.peek_current(self.adapters_dir)
        version = current.version if current is not None else None
        if version != self._version or current is None:
            self._version, self._by_sha = version, self._build(current) if current is not None else {}
        return self._by_sha

    def earlier(self, sha256: str | None) -> dict[str, Any] | None:
        return self.learnt().get(sha256) if sha256 else None

    def _build(self, current: adapters.AdapterVersion) -> dict[str, dict[str, Any]]:
        entries = current.dataset
        if "dataset" not in current.manifest:
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
