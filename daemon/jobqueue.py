"""The one module that moves queue files. Folders are the state.

    q = JobQueue(cfg.path("queue"))
    q.ensure()
    entry = q.admit(inbox_file, Priority.NORMAL, now=time.time())   # inbox -> pending/normal
    entry = q.start(q.next_pending())                                # pending -> processing
    q.finish(entry.job_id)                                           # processing -> done

Layout: `pending/{high,normal,low}/`, `processing/`, `done/`, `failed/` (each
failure has `<job_id>.error.json` beside it; a duplicate in done/, a file not
trained because its content was, has `<job_id>.duplicate.json`). A job id is the queue file name:
`<UTC stamp>-<seq>--<original name>`, so names sort into arrival order and two
files with the same original name never collide. Every move goes through
`daemon.atomic` (rename + fsync of both folders); the original bytes are never
rewritten.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon import atomic
from daemon.errors import QueueError
from daemon.states import PRIORITY_ORDER, FailReason, JobState, Priority

ERROR_SUFFIX = ".error.json"
DUPLICATE_SUFFIX = ".duplicate.json"  # beside a file in done/ that was not trained: its content was learnt before
_ID_RE = re.compile(r"^(\d{8}T\d{6}Z)-(\d{6})--(.+)$")
_MAX_NAME = 180  # keeps job ids well under the 255-byte name limit with the suffixes


@dataclass(frozen=True)
class QueueEntry:
    job_id: str
    state: JobState
    priority: Priority | None  # only for pending
    path: Path
    size: int
    mtime: float

    @property
    def original_name(self) -> str:
        return original_name(self.job_id)

    def to_dict(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id, "original_name": self.original_name, "state": self.state.value,
            "priority": self.priority.value if self.priority else None, "size": self.size, "mtime": self.mtime,
        }


def original_name(job_id: str) -> str:
    """The name the file had when it arrived."""
    m = _ID_RE.match(job_id)
    return m.group(3) if m else job_id


def _clean_name(name: str) -> str:
    name = Path(name).name.replace("\x00", "")
    name = re.sub(r"[\s/\\]+", "_", name).lstrip(".") or "unnamed.jsonl"
    return name[-_MAX_NAME:]


class JobQueue:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._seq: int | None = None

    # -- folders ---------------------------------------------------------
    def folder(self, state: JobState, priority: Priority | None = None) -> Path:
        if state is JobState.PENDING:
            return self.root / "pending" / (priority or Priority.NORMAL).value
        return self.root / state.value

    def ensure(self) -> None:
        for p in PRIORITY_ORDER:
            self.folder(JobState.PENDING, p).mkdir(parents=True, exist_ok=True)
        for s in (JobState.PROCESSING, JobState.DONE, JobState.FAILED):
            self.folder(s).mkdir(parents=True, exist_ok=True)
        self._drop_orphan_errors()

    def _drop_orphan_errors(self) -> None:
        """Remove `.error.json` files with no file beside them (called at start-up).

        reject/fail write the reason first, then move the file; a crash in between
        leaves a reason for a failure that never happened (the file is still in the
        inbox or processing/ and gets a fresh outcome), which would otherwise stay.
        """
        for state, suffix in ((JobState.FAILED, ERROR_SUFFIX), (JobState.DONE, DUPLICATE_SUFFIX)):
            folder = self.folder(state)
            for note in sorted(folder.glob("*" + suffix)):
                if not (folder / note.name[: -len(suffix)]).is_file():
                    atomic.remove_file(note)

    def _entries(self, state: JobState, priority: Priority | None = None) -> list[QueueEntry]:
        folder = self.folder(state, priority)
        out = []
        try:
            names = sorted(folder.iterdir())
        except FileNotFoundError:
            return []
        for p in names:
            # `.error.json` and the `.error.json.prev` a retry keeps are reasons, not queued files
            if p.name.startswith(".") or ERROR_SUFFIX in p.name or p.name.endswith(DUPLICATE_SUFFIX) or not p.is_file():
                continue
            st = p.stat()
            out.append(QueueEntry(p.name, state, priority, p, st.st_size, st.st_mtime))
        return out

    def pending(self) -> list[QueueEntry]:
        """Pending entries in run order: priority first, then arrival."""
        return [e for p in PRIORITY_ORDER for e in self._entries(JobState.PENDING, p)]

    def processing(self) -> list[QueueEntry]:
        return self._entries(JobState.PROCESSING)

    def done(self) -> list[QueueEntry]:
        return self._entries(JobState.DONE)

    def failed(self) -> list[QueueEntry]:
        return self._entries(JobState.FAILED)

    def next_pending(self) -> QueueEntry | None:
        for p in PRIORITY_ORDER:
            entries = self._entries(JobState.PENDING, p)
            if entries:
                return entries[0]
        return None

    def counts(self) -> dict[str, int]:
        out = {f"pending_{p.value}": len(self._entries(JobState.PENDING, p)) for p in PRIORITY_ORDER}
        out["pending"] = sum(out.values())
        for s in (JobState.PROCESSING, JobState.DONE, JobState.FAILED):
            out[s.value] = len(self._entries(s))
        return out

    def find(self, name: str) -> QueueEntry:
        """An entry by job id, or by original name when that is unambiguous."""
        every = self.pending() + self.processing() + self.done() + self.failed()
        hits = [e for e in every if e.job_id == name] or [e for e in every if e.original_name == name]
        if not hits:
            raise QueueError(f"no queued file named {name!r} (see `trainctl queue list`)")
        if len(hits) > 1:
            ids = ", ".join(e.job_id for e in hits)
            raise QueueError(f"{name!r} matches several files ({ids}); give the full job id")
        return hits[0]

    def read_duplicate(self, job_id: str) -> dict | None:
        """What a duplicate in done/ repeats (None for a file that was trained)."""
        try:
            return atomic.read_json(self.folder(JobState.DONE) / (job_id + DUPLICATE_SUFFIX))
        except (FileNotFoundError, ValueError):
            return None

    def read_error(self, job_id: str) -> dict | None:
        p = self.folder(JobState.FAILED) / (job_id + ERROR_SUFFIX)
        try:
            return atomic.read_json(p)
        except (FileNotFoundError, ValueError):
            return None

    # -- ids ---------------------------------------------------------------
    def new_job_id(self, name: str, now: float) -> str:
        if self._seq is None:
            self._seq = self._max_seq()
        self._seq += 1
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
        return f"{stamp}-{self._seq % 1_000_000:06d}--{_clean_name(name)}"

    def _max_seq(self) -> int:
        best = 0
        for p in self.root.rglob("*"):
            m = _ID_RE.match(p.name)
            if m:
                best = max(best, int(m.group(2)))
        return best

    # -- moves ---------------------------------------------------------------
    def admit(self, src: Path, priority: Priority, now: float, name: str | None = None) -> QueueEntry:
        """Move a complete, valid file into pending/<priority>/."""
        job_id = self.new_job_id(name or src.name, now)
        dst = self.folder(JobState.PENDING, priority) / job_id
        atomic.move_file(src, dst, site="intake")
        return self._entry(dst, JobState.PENDING, priority)

    def reject(self, src: Path, error: dict, now: float, name: str | None = None) -> QueueEntry:
        """Move a file that cannot be trained straight to failed/, with its reason."""
        job_id = self.new_job_id(name or src.name, now)
        self._write_error(job_id, error, now)
        dst = self.folder(JobState.FAILED) / job_id
        atomic.move_file(src, dst, site="intake")
        return self._entry(dst, JobState.FAILED, None)

    def start(self, entry: QueueEntry) -> QueueEntry:
        """pending -> processing."""
        if entry.state is not JobState.PENDING:
            raise QueueError(f"{entry.job_id} is {entry.state.value}, not pending")
        dst = self.folder(JobState.PROCESSING) / entry.job_id
        atomic.move_file(entry.path, dst, site="queue")
        return self._entry(dst, JobState.PROCESSING, None)

    def finish(self, job_id: str) -> QueueEntry:
        """processing -> done (a reason kept from before a retry goes: it no longer applies)."""
        src = self._require(JobState.PROCESSING, job_id)
        dst = self.folder(JobState.DONE) / job_id
        atomic.move_file(src, dst, site="queue")
        atomic.remove_file(self.folder(JobState.FAILED) / (job_id + ERROR_SUFFIX + ".prev"))
        return self._entry(dst, JobState.DONE, None)

    def finish_duplicate(self, job_id: str, earlier: dict[str, Any], message: str, now: float) -> QueueEntry:
        """pending or processing -> done without training, writing `<job_id>.duplicate.json` first."""
        src = self._locate(job_id, (JobState.PROCESSING, JobState.PENDING))
        body = {"job_id": job_id, "original_name": original_name(job_id), "message": message,
                "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)), "duplicate_of": earlier}
        atomic.write_json(self.folder(JobState.DONE) / (job_id + DUPLICATE_SUFFIX), body)
        dst = self.folder(JobState.DONE) / job_id
        atomic.move_file(src, dst)
        return self._entry(dst, JobState.DONE, None)

    def fail(self, job_id: str, reason: FailReason, message: str, now: float, **details: Any) -> QueueEntry:
        """processing or pending -> failed, writing `<job_id>.error.json` first."""
        src = self._locate(job_id, (JobState.PROCESSING, JobState.PENDING))
        self._write_error(job_id, {"reason": reason.value, "message": message, **details}, now)
        dst = self.folder(JobState.FAILED) / job_id
        atomic.move_file(src, dst, site="queue")
        return self._entry(dst, JobState.FAILED, None)

    def retry(self, job_id: str, priority: Priority, now: float) -> QueueEntry:
        """failed -> pending/<priority> (the reason file is kept as `.error.json.prev`)."""
        src = self._require(JobState.FAILED, job_id)
        dst = self.folder(JobState.PENDING, priority) / job_id
        atomic.move_file(src, dst, site="queue")
        err = self.folder(JobState.FAILED) / (job_id + ERROR_SUFFIX)
        if err.exists():
            prev = err.with_name(err.name + ".prev")
            atomic.remove_file(prev)
            atomic.move_file(err, prev, site="queue")
        return self._entry(dst, JobState.PENDING, priority)

    def refail(self, job_id: str, error: dict, now: float) -> QueueEntry:
        """A failed file stays failed with a new reason (a retry that fails validation again)."""
        path = self._require(JobState.FAILED, job_id)
        self._write_error(job_id, error, now)
        return self._entry(path, JobState.FAILED, None)

    def remove(self, job_id: str, now: float) -> QueueEntry:
        """Take a pending file out of line; it goes to failed/ with reason `removed` (nothing is deleted)."""
        self._require(JobState.PENDING, job_id)
        return self.fail(job_id, FailReason.REMOVED, "removed from the queue by request", now)

    # -- helpers ---------------------------------------------------------------
    def _write_error(self, job_id: str, error: dict, now: float) -> None:
        body = {"job_id": job_id, "original_name": original_name(job_id),
                "failed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)), **error}
        atomic.write_json(self.folder(JobState.FAILED) / (job_id + ERROR_SUFFIX), body, site="queue")

    def _require(self, state: JobState, job_id: str) -> Path:
        return self._locate(job_id, (state,))

    def _locate(self, job_id: str, states: tuple[JobState, ...]) -> Path:
        for state in states:
            prios = PRIORITY_ORDER if state is JobState.PENDING else (None,)
            for prio in prios:
                p = self.folder(state, prio) / job_id
                if p.is_file():
                    return p
        where = "/".join(s.value for s in states)
        raise QueueError(f"{job_id} is not in {where}")

    @staticmethod
    def _entry(path: Path, state: JobState, priority: Priority | None) -> QueueEntry:
        st = path.stat()
        return QueueEntry(path.name, state, priority, path, st.st_size, st.st_mtime)
