"""Disk full, recognised in one place: what counts as "no space", and how much is free.

    from daemon import diskspace
    full = diskspace.disk_full_from(exc, folder, "checkpoint")   # DiskFull, or None for any other error
    diskspace.require_space(folder, min_free, "checkpoint")       # raises DiskFull below the threshold
    diskspace.free_bytes(folder)                                  # os.statvfs: bytes an unprivileged writer may use

A full disk shows up in several shapes: `OSError` with errno ENOSPC or EDQUOT;
a `RuntimeError` from `torch.save`, whose C++ writer reports "unexpected pos"
and keeps the OSError of the Python file it wrote to as `__context__` (when
given a path, not even that: then only the free space tells); safetensors'
`SafetensorError` with "No space left on device (os error 28)"; SQLite's
`OperationalError` "database or disk is full". None of them is the data's
fault, so none may fail a file. Standard library only.
"""

from __future__ import annotations

import errno
import os
import sqlite3
from pathlib import Path

from daemon.errors import TraindError

FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
UNWRITABLE_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM)
FULL, UNWRITABLE = "full", "unwritable"  # DiskFull.kind
FULL_TEXTS = (os.strerror(errno.ENOSPC), os.strerror(errno.EDQUOT), "os error 28", "os error 122",
              "database or disk is full")
# Free space under which a write that failed for a reason it does not name (torch.save given a
# path: "unexpected pos ...") is taken for a full disk: less than one small checkpoint file.
NEARLY_FULL_BYTES = 1 << 20


class DiskFull(TraindError):
    """A write could not be made for lack of space (or the free space is below the threshold), or (kind
    "unwritable") because the folder cannot be written at all."""

    def __init__(self, folder: str | os.PathLike, free: int | None, site: str, message: str, kind: str = FULL) -> None:
        self.folder = str(folder)
        self.free_bytes = free_bytes(folder) if free is None else free
        self.site = site
        self.message = message
        self.kind = kind
        if kind == UNWRITABLE:
            super().__init__(f"{self.folder} cannot be written at {site} ({message})")
        else:
            super().__init__(f"disk full at {site}: {self.folder} has {self.free_bytes} bytes free ({message})")

    def to_dict(self) -> dict:
        return {"site": self.site, "folder": self.folder, "free_bytes": self.free_bytes, "message": self.message,
                "kind": self.kind}


def writable(path: str | os.PathLike) -> bool:
    """Whether this process may create files in `path` (its nearest existing parent): not on a read-only
    filesystem, and allowed by permissions and attributes (an immutable folder refuses even root)."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        if os.statvfs(p).f_flag & os.ST_RDONLY:
            return False
    except OSError:
        return False
    return os.access(p, os.W_OK | os.X_OK)


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB' (binary units, as the dashboard shows them)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def free_bytes(path: str | os.PathLike) -> int:
    """Bytes free for an unprivileged writer on the filesystem of `path` (its nearest existing parent)."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        st = os.statvfs(p)
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize


def _chain(exc: BaseException) -> list[BaseException]:
    """`exc` and its causes and contexts (where torch keeps the OSError it turned into a RuntimeError)."""
    out: list[BaseException] = []
    while exc is not None and exc not in out and len(out) < 10:
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


def is_disk_full(exc: BaseException) -> bool:
    """Whether `exc` (or what it was raised from) says the disk or the quota is full."""
    for e in _chain(exc):
        if isinstance(e, DiskFull):
            return True
        if isinstance(e, OSError) and e.errno in FULL_ERRNOS:
            return True
        if isinstance(e, (sqlite3.OperationalError, RuntimeError, OSError)) or type(e).__name__ == "SafetensorError":
            if any(t in str(e) for t in FULL_TEXTS):
                return True
    return False


def folder_of(exc: BaseException) -> str | None:
    """The folder an OSError names (the destination of a rename), if any."""
    for e in _chain(exc):
        if isinstance(e, DiskFull):
            return e.folder
        if isinstance(e, OSError) and (e.filename2 or e.filename):
            return str(Path(os.fsdecode(e.filename2 or e.filename)).parent)
    return None


def disk_full_from(exc: BaseException, folder: str | os.PathLike | None, site: str,
                   writing_unnamed: bool = False) -> DiskFull | None:
    """A DiskFull for `exc` when it is one, else None.

    `writing_unnamed`: the error came from a writer that does not say why it failed
    (torch.save given a path); it counts as disk full when the folder is nearly full.
    """
    if isinstance(exc, DiskFull):
        return exc
    named = folder_of(exc)
    # The folder given is the one a person recognises; a temp file's folder inside it is gone by now.
    inside = named is not None and folder is not None and Path(named).is_relative_to(folder)
    where = str(folder) if inside or named is None and folder is not None else named
    if is_disk_full(exc):
        return DiskFull(where or ".", None, site, _message(exc))
    if where is not None and _unwritable_errno(exc) and not writable(where):
        return DiskFull(where, None, site, _message(exc), kind=UNWRITABLE)
    if writing_unnamed and where is not None and isinstance(exc, RuntimeError) and free_bytes(where) < NEARLY_FULL_BYTES:
        return DiskFull(where, None, site, _message(exc))
    return None


def _unwritable_errno(exc: BaseException) -> bool:
    return is_unwritable(exc)


def is_unwritable(exc: BaseException) -> bool:
    """Whether `exc` says a write was refused: a read-only filesystem or database, or no permission (whether the
    folder is really unwritable, and not one file, is for the caller to check: `writable`)."""
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in UNWRITABLE_ERRNOS:
            return True
        if isinstance(e, sqlite3.OperationalError) and "readonly database" in str(e):
            return True
    return False


def _message(exc: BaseException) -> str:
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in FULL_ERRNOS + UNWRITABLE_ERRNOS:
            return e.strerror or str(e)
    return str(exc) or type(exc).__name__


def require_space(folder: str | os.PathLike, min_free: int, site: str) -> None:
    """Raise DiskFull before a write when `folder` has less than `min_free` bytes free (0: no threshold)."""
    if min_free <= 0:
        return
    free = free_bytes(folder)
    if free < min_free:
        raise DiskFull(folder, free, site, f"{free} bytes free, below service.min_free_bytes = {min_free}")


# Room a status rewrite needs (the file is a few KiB, written beside itself before the rename).
STATUS_ROOM_BYTES = 64 * 1024


def write_trouble(folder: str | os.PathLike) -> tuple[str, str] | None:
    """Why a process could not write in `folder` now: (UNWRITABLE, why) or (FULL, why); None when nothing says so.

    For readers of a status that has gone stale while its daemon still runs (the CLI, the monitor): the
    daemon cannot say why itself when the reason is that it cannot write."""
    if not writable(folder):
        return UNWRITABLE, f"{folder} cannot be written (a read-only filesystem, or not permitted)"
    free = free_bytes(folder)
    if free < STATUS_ROOM_BYTES:
        return FULL, f"the disk of {folder} is full ({free} bytes free)"
    return None
