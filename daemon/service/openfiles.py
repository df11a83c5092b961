"""Which processes hold a file open for writing (Linux /proc). Standard library only.

    found = open_for_writing([inbox / "a.jsonl"])
    found.writers[path]     # [Writer(pid=4242, name="python3")] while a process may still write to it
    found.blind             # some processes could not be looked into (other users' when not root)
    found.supported         # False where there is no /proc: nothing can be told

A writer that keeps a file open and pauses longer than the settle window
would have the file taken half-written. The kernel knows better than any
timing rule: every open file of every process is a link under
`/proc/PID/fd/`, and `/proc/PID/fdinfo/FD` gives the open flags, so a file
open with O_WRONLY or O_RDWR is one a process may still write to. Links are
matched by name first (cheap), then by device and inode (a file renamed
while open, a bind-mounted folder). Processes of other users cannot be
looked into unless we are root: then `blind` says a writer may be missed,
and the caller falls back to its timing rule.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

# TRAIND_PROC_DIR points the look elsewhere: an empty folder makes traind blind to writers, as on a platform
# without /proc, so that the timing rules behind this check can be tested on their own.
PROC = Path(os.environ.get("TRAIND_PROC_DIR") or "/proc")
_WRITE_MODES = (os.O_WRONLY, os.O_RDWR)


@dataclass(frozen=True)
class Writer:
    pid: int
    name: str  # the process' command name (/proc/PID/comm), "" when it could not be read

    def __str__(self) -> str:
        return f"pid {self.pid}" + (f" ({self.name})" if self.name else "")


@dataclass
class OpenForWriting:
    writers: dict[Path, list[Writer]] = field(default_factory=dict)
    blind: bool = False
    supported: bool = True


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _flags(pid: str, fd: str, proc: Path) -> int | None:
    try:
        with open(proc / pid / "fdinfo" / fd, encoding="ascii") as f:
            for line in f:
                if line.startswith("flags:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        return None
    return None


def _command(pid: str, proc: Path) -> str:
    try:
        return (proc / pid / "comm").read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return ""


def open_for_writing(paths: Iterable[Path], proc: Path = PROC) -> OpenForWriting:
    """The processes that hold each of `paths` open for writing (paths no process writes are left out)."""
    wanted: dict[tuple[int, int], Path] = {}
    for p in paths:
        ident = _identity(Path(p))
        if ident is not None:
            wanted[ident] = Path(p)
    found = OpenForWriting(supported=proc.is_dir())
    if not wanted or not found.supported:
        return found
    names = {p.name for p in wanted.values()}
    try:
        pids = [e for e in os.listdir(proc) if e.isdigit()]
    except OSError:
        return OpenForWriting(supported=False)
    for pid in pids:
        fd_dir = proc / pid / "fd"
        try:
            fds = os.listdir(fd_dir)
        except PermissionError:
            found.blind = True
            continue
        except OSError:  # the process ended meanwhile
            continue
        for fd in fds:
            link = fd_dir / fd
            try:
                target = os.readlink(link)
            except OSError:
                continue
            # The link reads the file's current path (", (deleted)" appended once unlinked): match by name first.
            if os.path.basename(target.removesuffix(" (deleted)")) not in names:
                continue
            path = wanted.get(_identity(link) or (-1, -1))
            flags = _flags(pid, fd, proc) if path is not None else None
            if path is None or flags is None or (flags & os.O_ACCMODE) not in _WRITE_MODES:
                continue
            writer = Writer(int(pid), _command(pid, proc))
            if writer not in found.writers.setdefault(path, []):
                found.writers[path].append(writer)
    return found
