"""The service's disk pause: trip on a full disk or low free space, end it once space is back.

    guard = DiskGuard([cfg.path("queue"), cfg.path("status"), ...], min_free=cfg.service.min_free_bytes,
                      check_seconds=cfg.service.disk_check_seconds)
    guard.trip(DiskFull(folder, free, "checkpoint", "No space left on device"), now)   # a write failed
    guard.check(now)      # "tripped" (free space fell below min_free), "cleared" (write again), or None
    guard.full            # the DiskFull that holds training, or None

A pause that began with a failed write ends once every watched folder is at
or above the threshold and either space came back in the folder that was
full (MARGIN more free than when it failed) or the retry time has passed:
`check_seconds`, doubling with each failure in a row up to MAX_BACKOFF_SECONDS,
so a disk that stays full is tried a few times an hour, not in a loop. A
folder that cannot be written at all (kind "unwritable") ends its pause once
it can be written again. Time is a parameter (`now`), so tests never sleep.
Standard library only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from daemon.diskspace import UNWRITABLE, DiskFull, free_bytes, writable
from daemon.schema import DiskFullStatus, iso
from daemon.states import PauseReason

MAX_BACKOFF_SECONDS = 300.0
MARGIN_BYTES = 1 << 20  # freed space that ends a pause before its retry time
FORGET_SECONDS = 60.0  # a failure this long after the last pause ended starts the backoff again


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB' (binary units, as the dashboard shows them)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


class DiskGuard:
    def __init__(self, folders: list[Path], min_free: int, check_seconds: float,
                 free: Callable[[Path], int] = free_bytes, can_write: Callable[[Path], bool] = writable) -> None:
        self.folders = list(folders)
        self.min_free = min_free
        self.check_seconds = check_seconds
        self.free = free
        self.can_write = can_write
        self.full: DiskFull | None = None
        self.since = 0.0
        self.strikes = 0  # failures in a row: the retry time doubles with each
        self.retry_at = 0.0
        self.cleared_at = float("-inf")
        self._free_at_trip = 0

    def lowest(self) -> tuple[Path, int] | None:
        """The first watched folder with less than `min_free` bytes free (None without a threshold)."""
        if self.min_free <= 0:
            return None
        for folder in self.folders:
            n = self.free(folder)
            if n < self.min_free:
                return folder, n
        return None

    def trip(self, full: DiskFull, now: float) -> bool:
        """Hold training for `full`; True when this begins a pause (False: it was held already)."""
        began = self.full is None
        self.full = full
        if not began:  # more writes refused during the same pause: the retry time stands
            return False
        self.since = now
        if now - self.cleared_at > FORGET_SECONDS:
            self.strikes = 0
        self.strikes += 1
        self._free_at_trip = full.free_bytes
        self.retry_at = now + min(self.check_seconds * 2 ** (self.strikes - 1), MAX_BACKOFF_SECONDS)
        return True

    def check(self, now: float) -> str | None:
        """Measure free space: 'tripped' when it fell below the threshold, 'cleared' when the pause may end."""
        if self.full is None:
            low = self.lowest()
            if low is None:
                return None
            folder, n = low
            self.trip(DiskFull(folder, n, "threshold", f"{human_bytes(n)} free, below service.min_free_bytes "
                                                       f"= {human_bytes(self.min_free)}"), now)
            return "tripped"
        self.full.free_bytes = self.free(Path(self.full.folder))
        if self.full.kind == UNWRITABLE:  # over once it can be written again, not when a retry time passes
            if not self.can_write(Path(self.full.folder)) or self.lowest() is not None:
                return None
            self.full, self.cleared_at = None, now
            return "cleared"
        low = self.lowest()
        if low is not None:  # still short: show where
            if self.full.site == "threshold":
                self.full.folder, self.full.free_bytes = str(low[0]), low[1]
            return None
        freed = self.full.free_bytes >= self._free_at_trip + MARGIN_BYTES
        if now >= self.retry_at or freed:
            self.full, self.cleared_at = None, now
            return "cleared"
        return None

    def reason(self) -> PauseReason | None:
        """The pause reason the status shows for this hold (None when not held)."""
        if self.full is None:
            return None
        return PauseReason.UNWRITABLE if self.full.kind == UNWRITABLE else PauseReason.DISK_FULL

    def status(self) -> DiskFullStatus | None:
        f = self.full
        if f is None:
            return None
        return DiskFullStatus(folder=f.folder, free_bytes=f.free_bytes, min_free_bytes=self.min_free, site=f.site,
                              message=f.message, since=iso(self.since), kind=f.kind)

    def detail(self) -> str:
        """One line for the status detail, the CLI and the events."""
        f = self.full
        if f is None:
            return ""
        if f.kind == UNWRITABLE:
            return (f"paused: {f.folder} cannot be written ({f.message}); the {f.site} write failed; resumes by "
                    "itself once it can be written again")
        need = f" (needs {human_bytes(self.min_free)})" if self.min_free else ""
        what = "free space is low" if f.site == "threshold" else f"the {f.site} write failed: {f.message}"
        return (f"paused: disk full: {f.folder} has {human_bytes(f.free_bytes)} free{need}; {what}; "
                "resumes by itself once space is back")
