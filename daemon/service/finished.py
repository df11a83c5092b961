"""Files that changed under traind: checked when a file finishes, and watched after it where a writer remains.

    verdict = check_finished(path, queued_size, queued_sha256, queued_at)    # None, or what changed
    watch = FinishedWatch()
    watch.add(job_id, path, now)          # a file finished while a process still holds it open for writing
    for change in watch.changes(now):     # ... which then wrote to it: say so
        ...

The intake takes no file a process holds open for writing (daemon.service.openfiles),
and the service fails a file that changed while it waited in the queue. What
remains: a writer the kernel does not show us (another user's process when we
are not root, another machine on a network file system) that keeps the file
open and writes on while it trains, or after. At its end the file's bytes are
compared with what was queued; if a process still holds it open then, it is
watched until that process lets go, and a change is reported as what it is:
lines the adapter did not learn. Where the writers cannot be seen, a finished
file is watched for BLIND_WATCH_SECONDS. Standard library only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from daemon.jsonl import sha256_of
from daemon.service.openfiles import OpenForWriting, open_for_writing

log = logging.getLogger(__name__)

BLIND_WATCH_SECONDS = 3600.0  # where writers cannot be seen, a finished file is watched this long


@dataclass
class _Watched:
    job_id: str
    path: Path
    size: int
    mtime_ns: int
    until: float | None  # None: while a process holds it open for writing
    reported: bool = False


@dataclass(frozen=True)
class Change:
    job_id: str
    path: Path
    size_before: int
    size_now: int

    def message(self, name: str) -> str:
        grew = self.size_now - self.size_before
        what = f"grew by {grew} bytes" if grew > 0 else f"changed ({self.size_before} -> {self.size_now} bytes)"
        return (f"{name} {what} after it was trained: the adapter did not learn what was written after it finished "
                "(it was written in place while held open); drop the new lines as a file of their own, and write "
                "files under a .part name, renamed when complete")


def check_finished(path: Path, queued_size: int | None, queued_sha256: str | None, queued_at: float | None) -> str | None:
    """What changed in the file at `path` since it was queued (None: the same bytes). Hashed again only
    when its size differs or its mtime is later than its queueing, so an untouched file costs one stat."""
    try:
        st = path.stat()
    except OSError:
        return None
    if queued_size is not None and st.st_size != queued_size:
        return f"{queued_size} -> {st.st_size} bytes"
    if queued_sha256 and queued_at is not None and st.st_mtime > queued_at:
        try:
            if sha256_of(path) != queued_sha256:
                return f"same size ({st.st_size} bytes), other bytes"
        except OSError:
            return None
    return None


class FinishedWatch:
    def __init__(self, writers: Callable[[list[Path]], OpenForWriting] = open_for_writing,
                 every_seconds: float = 2.0) -> None:
        self._writers = writers
        self.every_seconds = every_seconds
        self._watched: dict[str, _Watched] = {}
        self._next = 0.0

    def add(self, job_id: str, path: Path, now: float) -> str | None:
        """Watch `path` if a process still holds it open for writing (or none can be seen); who holds it."""
        found = self._writers([path])
        writers = found.writers.get(path)
        if not writers and not found.blind and found.supported:
            return None
        try:
            st = path.stat()
        except OSError:
            return None
        until = None if writers else now + BLIND_WATCH_SECONDS
        self._watched[job_id] = _Watched(job_id, path, st.st_size, st.st_mtime_ns, until)
        return ", ".join(str(w) for w in writers) if writers else None

    def __len__(self) -> int:
        return len(self._watched)

    def changes(self, now: float) -> list[Change]:
        """Files that changed since they finished (each said once); watching ends once no writer is left."""
        if not self._watched or now < self._next:
            return []
        self._next = now + self.every_seconds
        found = self._writers([w.path for w in self._watched.values()])
        out = []
        for job_id, w in list(self._watched.items()):
            try:
                st = w.path.stat()
            except OSError:  # moved away or deleted: nothing more to tell
                del self._watched[job_id]
                continue
            if (st.st_size, st.st_mtime_ns) != (w.size, w.mtime_ns) and not w.reported:
                w.reported = True
                out.append(Change(job_id, w.path, w.size, st.st_size))
            held = bool(found.writers.get(w.path))
            if (w.until is None and not held) or (w.until is not None and now >= w.until):
                del self._watched[job_id]
        return out
