"""Single-instance guard: a kernel lock (`flock`) on `status/daemon.lock`.

    fd = acquire(lock_path)        # raises AlreadyRunningError(pid) if another process holds it
    fd = take(path, wait=60)       # any exclusive lock within `wait` seconds: the fd, or None
    holder_pid(lock_path)          # the pid holding it, or None when nobody does

The lock dies with the process that holds it, so a stale pid left in the file
by a crashed daemon never blocks a new start. The pid written inside is only
for messages.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from daemon.errors import AlreadyRunningError


def _read_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None


def take(path: str | Path, wait: float, poll: float = 0.05) -> int | None:
    """Open `path` and take an exclusive kernel lock on it within `wait` seconds: the fd, or None."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                return None
            time.sleep(poll)  # flock has no timeout of its own


def acquire(path: str | Path, wait: float = 2.0) -> int:
    """Take the lock or raise; returns the open fd, which must stay open while running.

    Retries for `wait` seconds: a status check (`holder_pid`, the launch script's
    `flock -n`) holds the lock for a moment and must not make a start fail.
    """
    fd = take(path, wait)
    if fd is None:
        raise AlreadyRunningError(_read_pid(Path(path)), str(path))
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    os.fsync(fd)
    return fd


def holder_pid(path: str | Path) -> int | None:
    """Pid of the live holder, or None when the lock is free (whatever the file says)."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read_pid(path) or -1
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
