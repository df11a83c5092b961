"""The service's disk pause: trip on a full disk or low free space, end it once space is back.

    guard = DiskGuard([cfg.path("queue"), cfg.path("status"), ...], min_free=cfg.service.min_free_bytes,
                      check_seconds=cfg.service.disk_check_seconds)
    guard.trip(DiskFull(folder, free, "checkpoint", "No space left on device"), now)   # a write failed
    guard.check(now)      # "tripped" (free space fell below min_free), "cleared" (write again), or None
    guard.full            # the DiskFull that holds training, or None

What the service does about it goes through here too, so it is said once and
the same way: `failed_write(exc, folder, site, now)` recognises a write refused
for the folder's sake (daemon.diskspace) and holds; `hold(full, now)` holds for
a write the trainer reports; `tick(now)` measures and says when a hold begins
or ends (the log, and `on_event(kind, message)`: the history's events).

A pause that began with a failed write ends once every watched folder is at
or above the threshold and either space came back in the folder that was
full (MARGIN more free than when it failed) or the retry time has passed:
`check_seconds`, doubling with each failure in a row up to MAX_BACKOFF_SECONDS,
so a disk that stays full is tried a few times an hour, not in a loop. A pause
that spent the room kept for the status (to say it) also waits until that room
can be set aside again (`room_kept`): a disk still full to its last byte but for
that room would otherwise show "idle" until some write happened to fail again. A
folder that cannot be written at all (kind "unwritable") ends its pause once
it can be written again. Time is a parameter (`now`), so tests never sleep.
Standard library only.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from daemon import logs
from daemon.diskspace import UNWRITABLE, DiskFull, disk_full_from, free_bytes, human_bytes, writable
from daemon.schema import DiskFullStatus, iso
from daemon.states import PauseReason

MAX_BACKOFF_SECONDS = 300.0
MARGIN_BYTES = 1 << 20  # freed space that ends a pause before its retry time
FORGET_SECONDS = 60.0  # a failure this long after the last pause ended starts the backoff again

log = logging.getLogger(__name__)


class DiskGuard:
    def __init__(self, folders: list[Path], min_free: int, check_seconds: float,
                 free: Callable[[Path], int] = free_bytes, can_write: Callable[[Path], bool] = writable,
                 roles: dict[Path, str] | None = None,
                 on_event: Callable[[str, str], None] = lambda kind, message: None,
                 room_kept: Callable[[], bool] = lambda: True) -> None:
        # room_kept(): the room kept to say a pause (daemon.status) is set aside again, or was never spent; a
        # pause that spent it ends only once it is back, else the next write that fails could not be said
        self.room_kept = room_kept
        self.roles = roles or {}  # folder -> what is written there (names the site of an error out of the loop)
        self._log_drops = logs.DROPS["count"]  # log records dropped so far (the service's log, by daemon.logs)
        self.on_event = on_event
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
        if (now >= self.retry_at or freed) and self.room_kept():
            self.full, self.cleared_at = None, now
            return "cleared"
        return None

    # -- what the service does about it ----------------------------------------------------------
    def failed_write(self, exc: BaseException, folder: Path | None, site: str, now: float) -> DiskFull | None:
        """Hold for `exc` when it is a write refused for the folder's sake (full, or not writable at all); None
        for any other error (the caller's to handle). `site` "service": an error out of the loop, named by
        the folder it was writing."""
        full = disk_full_from(exc, folder, site)
        if full is None:
            return None
        if full.site == "service":
            full.site = next((role for root, role in self.roles.items() if Path(full.folder).is_relative_to(root)),
                             "service")
        self.hold(full, now)
        return full

    def hold(self, full: DiskFull, now: float) -> bool:
        """Hold training for `full`; said once, when the hold begins (True then). A write retried during the
        hold that fails again is not said again: a full disk must not flood the log it may share."""
        began = self.trip(full, now)
        if began:
            log.warning("%s", self.detail())
            self.on_event("unwritable" if full.kind == UNWRITABLE else "disk_full", self.detail())
        else:
            log.debug("still held: %s", full)
        return began

    def tick(self, now: float) -> str | None:
        """The periodic look: "tripped" when free space fell below the threshold, or the daemon's log dropped
        records (daemon.logs counts them: it could not be written), "cleared" when the hold is over (both said),
        None otherwise."""
        if logs.DROPS["count"] != self._log_drops:
            self._log_drops = logs.DROPS["count"]
            if self.hold(DiskFull(logs.DROPS["path"], None, "log", logs.DROPS["error"]), now):
                return "tripped"
        was = self.full
        change = self.check(now)
        if change == "tripped":
            log.warning("%s", self.detail())
            self.on_event("disk_full", self.detail())
        elif change == "cleared" and was is not None:
            back = (f"{was.folder} can be written again" if was.kind == UNWRITABLE
                    else f"space is back: {human_bytes(was.free_bytes)} free in {was.folder}")
            log.info("%s; resuming", back)
            self.on_event("disk_ok", f"{back}; resuming")
        return change

    def last_error(self) -> str | None:
        f = self.full
        if f is None:
            return None
        what = "cannot write" if f.kind == UNWRITABLE else "disk full"
        return f"{what}: {f.site} in {f.folder}: {f.message}"

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
