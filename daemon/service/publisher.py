"""The status file's one writer: what it says follows the facts; it is written atomically, and said even on a full disk.

    pub = StatusPublisher(status, StatusWriter(cfg.path("status")), interval_seconds=2.0)
    pub.refresh(facts, disk)            # status, detail and why it is held, from the facts (daemon/service/state.py)
    pub.write(now, on_error=...)        # at least every interval, at once when something changed

The status object is shared: the tracker fills in the figures of the file in
training; what the status *is* (idle, training, paused, ...) is set here only,
from the facts, and a change the table of daemon/states.py does not allow is
logged loudly (a bug, not a reason to stop). A write that fails is the caller's
to judge (`on_error`: True when it held for a full or unwritable disk); then the
room kept beside the status (StatusWriter's reserve) is released and the held
status written into it, so a disk filled to its last byte still shows why
training stopped.
"""

from __future__ import annotations

import logging
from typing import Callable

from daemon.schema import DiskFullStatus, TrainingStatus
from daemon.service import state
from daemon.states import SERVICE_TRANSITIONS, ServiceStatus, check_transition
from daemon.status import StatusWriter

log = logging.getLogger(__name__)


class StatusPublisher:
    def __init__(self, status: TrainingStatus, writer: StatusWriter, interval_seconds: float,
                 on_paused: Callable[[], None] = lambda: None) -> None:
        self.status, self.writer, self.interval = status, writer, interval_seconds
        self.on_paused = on_paused  # a pause began: the ETA is measured afresh after it
        self.dirty = True  # changed since it was last written
        self.last_write = 0.0

    def refresh(self, facts: state.Facts, disk: DiskFullStatus | None) -> None:
        status, detail = state.derive(facts)
        self.show(status, detail)
        self.held(facts, disk)

    def held(self, facts: state.Facts, disk: DiskFullStatus | None) -> None:
        """Why training is held (the person, a full or unwritable disk), whatever the status says now."""
        held = (state.pause_reason(facts), disk)
        if held != (self.status.pause_reason, self.status.disk_full):
            self.status.pause_reason, self.status.disk_full = held
            self.dirty = True

    def show(self, status: ServiceStatus, detail: str) -> None:
        s = self.status
        if status is not s.status:
            try:
                check_transition(SERVICE_TRANSITIONS, s.status, status)
            except ValueError as e:  # a bug, not a reason to stop training: say it loudly
                log.error("status %s (allowed anyway)", e)
            log.info("status %s -> %s", s.status.value, status.value)
            if status is ServiceStatus.PAUSED:  # no throughput while held, and no time left to tell
                s.eta_seconds = s.tokens_per_sec = None
                self.on_paused()
            s.status = status
            self.dirty = True
        if detail != s.detail:
            s.detail = detail
            self.dirty = True

    def write(self, now: float, force: bool = False, on_error: Callable[[Exception], bool] = lambda e: False) -> None:
        """Write when due (every interval), changed, or forced. A failed write the caller holds for (a full or
        unwritable disk) is written once more into the room kept for it; any other error is raised."""
        if not (force or self.dirty or now - self.last_write >= self.interval):
            return
        try:
            self.writer.write(self.status, now)
        except Exception as e:  # the previous status file stays whole (atomic write)
            self.last_write = now  # tried again at the next interval, not at every tick
            if not on_error(e):
                raise
            if not self.writer.release_reserve():
                return
            try:  # held now: say why, in the room kept for it
                self.writer.write(self.status, now)
            except Exception as again:
                log.debug("the held status could not be written either: %s", again)
                return
        self.last_write = now
        self.dirty = False
