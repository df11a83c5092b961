"""How the service stops: warmly (the trainer checkpoints the step it reached, then exits), or at once.

    stop = Stopping(stop_timeout_seconds=300)
    stop.signal()                           # from the signal handler: only a count (huey, rq)
    stop.look(now, sup, tracker, db, cfg)   # each tick: a signal, or `touch .stop`, begins it; a second signal is now
    stop.begin(now, "requested by cli", sup, tracker, db)   # trainctl stop, the dashboard
    stop.finish(now, sup)                    # the trainer gone, or past the deadline (killed): `exit_now`

A warm stop asks a trainer in the middle of a file for `stop` (it checkpoints at
the step it reached), an idle one for `shutdown`, and kills one still loading
(it has nothing to save). If the trainer has not gone within
`service.stop_timeout_seconds` it is killed: the file resumes from its last
checkpoint. A second signal stops at once, without a checkpoint.
"""

from __future__ import annotations

import logging
from typing import Any

from daemon import control, protocol

log = logging.getLogger(__name__)


class Stopping:
    def __init__(self, stop_timeout_seconds: float) -> None:
        self.timeout = stop_timeout_seconds
        self.why: str | None = None  # why a warm stop was asked for (None: not stopping)
        self.deadline = 0.0
        self.exit_now = False  # the loop ends after this tick
        self.signals = 0

    def signal(self) -> None:
        self.signals += 1

    def look(self, now: float, sup: Any, tracker: Any, db: Any, cfg: Any) -> None:
        if self.signals >= 2 and not self.exit_now:
            log.warning("second stop signal: stopping now without a checkpoint (resumes from the last one)")
            sup.kill()
            self.exit_now = True
        elif self.signals == 1 and self.why is None:
            log.info("stop signal: checkpointing, then exiting (send it again to stop at once)")
            self.begin(now, "signal", sup, tracker, db)
        if control.emergency_stop_requested(cfg):
            control.emergency_stop_path(cfg).unlink(missing_ok=True)
            if self.why is None:
                log.warning(".stop found: emergency stop (checkpoint, then exit)")
                self.begin(now, ".stop file", sup, tracker, db)

    def begin(self, now: float, why: str, sup: Any, tracker: Any, db: Any) -> None:
        self.why = why
        self.deadline = now + self.timeout
        db.event("stopping", f"stopping ({why})", t=now)
        if sup.child is None:
            self.exit_now = True
        elif tracker.job and sup.connected:
            sup.send(protocol.Stop())
        else:
            sup.exit()

    def finish(self, now: float, sup: Any) -> None:
        if self.why is None:
            return
        if sup.child is None:
            self.exit_now = True
        elif now > self.deadline:
            log.error("trainer did not stop within %.0f s; killing it (it resumes from its last checkpoint)", self.timeout)
            sup.kill()
            self.exit_now = True

    def child_gone(self) -> None:
        """The trainer exited: when it was asked to, the service leaves too."""
        self.exit_now = self.exit_now or self.why is not None
