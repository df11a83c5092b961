"""The inbox scanner: which inbox files are complete, and may be taken now.

    scanner = InboxScanner(cfg.path("inbox"), settle_seconds=1.0, ignore_suffixes=(".tmp", ".part"))
    for path, priority in scanner.ready(now=time.time()):
        scanner.taken(path, now)
        ...  # daemon.intake.take_file: validate, then JobQueue.admit / reject

A writer may still be appending, so a file is ready only once its size and
mtime have held still for `settle_seconds` across scans, unless it came by a
rename from another name in the inbox (written as NAME.part, then renamed, as
`trainctl queue add` and the monitor's upload do): the rename says it is
complete, and it is taken at once (the inbox watcher tells `renamed_in`).
Whatever the timing, a file that a process still holds open for writing is
not taken (daemon.service.openfiles reads it from /proc; the watcher's close-after-write
event has it looked at again at once). A name taken in the last
RECREATED_WINDOW_SECONDS that appears again (`echo line >> inbox/x.jsonl` in
a loop) is an appender at work: it must hold still `recreated_settle_seconds`.
Names ending in an ignored suffix (a writer's temp name) and hidden files are
never taken; anything that is not a regular file (a FIFO, a device, a link to
one, a folder inside high/ or low/) is named once in the log and left alone.
`inbox/high/` and `inbox/low/` set the priority; anything else is normal.
Time is a parameter, so tests never sleep.

Taking one (validate, queue or refuse) is daemon.intake's `take_file`.
"""

from __future__ import annotations

import logging
import stat
import threading
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from daemon.service.openfiles import OpenForWriting, open_for_writing
from daemon.states import Priority

log = logging.getLogger(__name__)

# A name taken this recently that appears again is being appended to (`>>` in a loop), not dropped anew.
RECREATED_WINDOW_SECONDS = 600.0


@dataclass
class _Seen:
    size: int
    mtime_ns: int
    stable_since: float
    held_checked: float | None = None  # when a writer was last found holding it open (None: not held)


class InboxScanner:
    def __init__(self, inbox: str | Path, settle_seconds: float, ignore_suffixes: tuple[str, ...] | list[str],
                 recreated_settle_seconds: float = 0.0, recheck_seconds: float = 2.0,
                 writers: Callable[[list[Path]], OpenForWriting] = open_for_writing) -> None:
        self.inbox = Path(inbox)
        self.settle_seconds = settle_seconds
        self.recreated_settle_seconds = recreated_settle_seconds
        self.recheck_seconds = recheck_seconds  # a file held open is looked at again this often (or when closed)
        self.ignore_suffixes = tuple(s.lower() for s in ignore_suffixes)
        self._writers = writers
        self._seen: dict[Path, _Seen] = {}
        self._told: set[Path] = set()  # stray folders and non-regular files already reported once
        self._told_held: dict[Path, tuple[int, ...]] = {}  # the writers already named in the log, per file
        self._told_blind = False
        self._taken: dict[Path, float] = {}  # names taken lately, and when
        self._first_scan = True  # files already waiting at start: their mtime tells how long they have held still
        self._renamed_in: set[Path] = set()  # told by the inbox watcher (another thread): complete by protocol
        self._closed: set[Path] = set()  # told by the inbox watcher: a writer closed it (look again at once)
        self._failures: dict[Path, tuple[int, int] | None] = {}  # path -> (size, mtime_ns) that could not be taken
        self._told_lock = threading.Lock()

    def ensure(self) -> None:
        for sub in ("", Priority.HIGH.value, Priority.LOW.value):
            (self.inbox / sub).mkdir(parents=True, exist_ok=True)

    def candidates(self) -> list[tuple[Path, Priority]]:
        """Every file that could be taken, with its priority, in name order."""
        out: list[tuple[Path, Priority]] = []
        folders = [(self.inbox, Priority.NORMAL)] + [(self.inbox / p.value, p) for p in Priority]
        for folder, prio in folders:
            try:
                entries = sorted(folder.iterdir())
            except FileNotFoundError:
                continue
            out.extend((p, prio) for p in entries if self._wanted(p, top=folder == self.inbox))
            if folder == self.inbox:
                self._report_stray_folders(entries)
        return out

    def _report_stray_folders(self, entries: list[Path]) -> None:
        """A folder such as inbox/urgent/ looks like a priority but is never read: say so once."""
        names = {p.value for p in Priority}
        for p in entries:
            if p.name not in names and not p.name.startswith(".") and p not in self._told and p.is_dir():
                self._told.add(p)
                log.warning("%s/ is not read: files go in inbox/ or in inbox/%s/", p,
                            "/, inbox/".join(sorted(names)))

    def _wanted(self, p: Path, top: bool) -> bool:
        name = p.name.lower()
        if name.startswith(".") or name.endswith(self.ignore_suffixes):
            return False
        if p.is_file():
            return True
        if not (top and p.is_dir()):  # folders of the inbox itself are reported as stray folders
            self._report_irregular(p)
        return False

    def _report_irregular(self, p: Path) -> None:
        """A FIFO, a device, a socket, a dangling link or a link to one of those: never read (reading a FIFO or
        /dev/zero would hang or never end), and named once."""
        if p in self._told:
            return
        try:
            mode = p.lstat().st_mode
        except FileNotFoundError:
            return
        self._told.add(p)
        if stat.S_ISLNK(mode):
            try:
                what = f"a link to {_kind(p.stat().st_mode)} ({p.resolve()})"
            except OSError:
                what = "a link to nothing (dangling)"
        else:
            what = _kind(mode)
        log.warning("%s is %s, not a regular file: it is not taken (only regular files are trained)", p, what)

    def renamed_in(self, path: Path) -> None:
        """A file was renamed to `path` from another name in the inbox (written as NAME.part, then renamed):
        its writer is done with it, so it is taken at once, without the settle window."""
        with self._told_lock:
            self._renamed_in.add(path)

    def closed(self, path: Path) -> None:
        """A writer closed `path` after writing (inotify's close-after-write): whether another one still
        holds it open is looked at again at the next scan, not after `recheck_seconds`."""
        with self._told_lock:
            self._closed.add(path)

    def ready(self, now: float) -> list[tuple[Path, Priority]]:
        """Files whose size and mtime have not changed for the settle window, and files renamed in, that no
        process holds open for writing."""
        with self._told_lock:
            renamed, self._renamed_in = self._renamed_in, set()
            closed, self._closed = self._closed, set()
        settled, alive = [], set()
        for path, prio in self.candidates():
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            alive.add(path)
            seen = self._seen.get(path)
            if seen is None or (seen.size, seen.mtime_ns) != (st.st_size, st.st_mtime_ns):
                # A file already waiting when the daemon starts has held still since its mtime: no need to
                # watch it for another window. Later arrivals are watched: on a network file system the
                # writer's clock, which sets the mtime, may run behind ours.
                since = min(now, st.st_mtime_ns / 1e9) if seen is None and self._first_scan else now
                seen = self._seen[path] = _Seen(st.st_size, st.st_mtime_ns, since)
            if path in closed:
                seen.held_checked = None
            if path in renamed or now - seen.stable_since >= self._settle_for(path, now):
                if seen.held_checked is None or now - seen.held_checked >= self.recheck_seconds:
                    settled.append((path, prio))
        self._seen = {p: s for p, s in self._seen.items() if p in alive}
        self._taken = {p: t for p, t in self._taken.items() if now - t < RECREATED_WINDOW_SECONDS}
        self._first_scan = False
        return self._not_held(settled, now)

    def _settle_for(self, path: Path, now: float) -> float:
        """The settle window of `path`: longer for a name taken lately (an appender), said once."""
        taken = self._taken.get(path)
        if taken is None or self.recreated_settle_seconds <= self.settle_seconds:
            return self.settle_seconds
        if path not in self._told:
            self._told.add(path)
            log.warning("%s is back %.0f s after it was taken: it is taken once it has held still for %g s (a "
                        "writer that appends should write %s.part and rename it when done)", path, now - taken,
                        self.recreated_settle_seconds, path.name)
        return self.recreated_settle_seconds

    def _not_held(self, settled: list[tuple[Path, Priority]], now: float) -> list[tuple[Path, Priority]]:
        """`settled` less the files a process still holds open for writing (named once in the log)."""
        if not settled:
            return []
        found = self._writers([p for p, _ in settled])
        if found.blind and not self._told_blind:
            self._told_blind = True
            log.info("the open files of other users' processes cannot be seen (not root): a file such a process "
                     "writes in place is taken once it holds still for intake.settle_seconds")
        ready = []
        for path, prio in settled:
            writers = found.writers.get(path)
            seen = self._seen[path]
            if not writers:
                seen.held_checked = None
                ready.append((path, prio))
                continue
            seen.held_checked = now
            pids = tuple(w.pid for w in writers)
            if self._told_held.get(path) != pids:
                self._told_held[path] = pids
                log.info("%s is open for writing by %s: it is taken once closed", path,
                         ", ".join(str(w) for w in writers))
        return ready

    def forget(self, path: Path) -> None:
        """Watch `path` afresh from the next scan (it is being taken, or taking it failed)."""
        self._seen.pop(path, None)
        self._told_held.pop(path, None)

    def taken(self, path: Path, now: float) -> None:
        """`path` left the inbox (queued or refused): a file that appears under its name soon is an appender's."""
        self.forget(path)
        self._told.discard(path)
        self._taken[path] = now

    def take_ready(self, now: float, take: Callable[[Path, Priority], object],
                   held_for_disk: Callable[[BaseException], bool]) -> str | None:
        """`take(path, priority)` each ready file (daemon.intake.take_file), each at its own boundary: one that
        fails stays in the inbox, logged once while it is unchanged; a full disk stops the round
        (`held_for_disk(e)`: the caller holds). The last failure's line for the status, or None."""
        said = None
        for path, prio in self.ready(now):
            self.forget(path)
            ident = None
            try:
                st = path.stat()
                ident = (st.st_size, st.st_mtime_ns)
                if self._failures.get(path) == ident:
                    continue  # failed before and unchanged since: once in the log is enough
                take(path, prio)
                self.taken(path, now)
                self._failures.pop(path, None)
            except FileNotFoundError:
                continue  # taken away by its writer
            except Exception as e:  # a job boundary: record, keep the file, keep running
                if held_for_disk(e):
                    log.warning("%s stays in the inbox until space is back (not the file's fault)", path.name)
                    return said
                log.error("could not take %s from the inbox:\n%s", path, traceback.format_exc())
                said = f"intake of {path.name} failed; see the daemon log"
                self._failures[path] = ident
        return said

    def waiting(self) -> int:
        """Files seen but not yet settled (for the status detail)."""
        return len(self._seen)

    def held_open(self) -> int:
        """Files that have held still but are still open for writing (looked at every `recheck_seconds`)."""
        return sum(1 for s in self._seen.values() if s.held_checked is not None)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return name
    return "not a regular file"
