"""The person's requests, as the service takes them: the desired state, and one-shot requests consumed once.

    desk = ControlDesk(cfg, queue, db, tracker, requests, supervisor, stop=service.begin_stop)
    desk.take(now, locked_at)          # each pending request consumed, then carried out (or refused, said once)

`trainctl` and the monitor write the requests (daemon/control.py); this is the
one place the service reads them. A request is consumed before it is carried
out, so one that cannot be carried out never comes back; a refusal is logged
and recorded as a `control_refused` event, with the reason the CLI shows. A
stop or skip made while no daemon ran is dropped at start: it must not stop or
skip the run that begins.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

from daemon import adapters, control, protocol
from daemon.config import Config
from daemon.errors import QueueError
from daemon.intake import remove_file, retry_file
from daemon.jobqueue import JobQueue
from daemon.service.lineage_requests import LineageRequests
from daemon.service.supervisor import Supervisor
from daemon.service.tracker import JobTracker
from daemon.states import ControlAction, DesiredState, FailReason, Priority
from daemon.history_db import HistoryDB

log = logging.getLogger(__name__)


class ControlDesk:
    def __init__(self, cfg: Config, queue: JobQueue, db: HistoryDB, tracker: JobTracker, requests: LineageRequests,
                 sup: Supervisor, stop: Callable[[float, str], None]) -> None:
        self.cfg, self.queue, self.db, self.tracker, self.requests, self.sup = cfg, queue, db, tracker, requests, sup
        self.stop = stop

    def take(self, now: float, locked_at: float) -> None:
        self._drop_old_stops_and_skips(now, locked_at)
        for req in control.pending_requests(self.cfg):
            control.consume(req)  # first: a request that cannot be carried out must not come back
            try:
                self._act(req, now)
            except QueueError as e:
                log.warning("request %s refused: %s", req.action.value, e)
                self.db.event("control_refused", f"{req.action.value}{f' {req.job_id}' if req.job_id else ''}: {e}",
                              req.job_id, t=now)

    def _drop_old_stops_and_skips(self, now: float, locked_at: float) -> None:
        """A stop or skip made while no daemon ran (trainctl and the monitor refuse them
        then, but one can race a crash) must not stop or skip this run as it starts."""
        for req in control.pending_requests(self.cfg):
            if req.action in (ControlAction.STOP, ControlAction.SKIP) and req.at < locked_at:
                control.consume(req)
                log.warning("dropped a %s request from %s made while the daemon was not running",
                            req.action.value, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(req.at)))
                self.db.event("control_refused", f"{req.action.value} by {req.by}: made while the daemon was not running",
                              req.job_id, t=now)

    def _act(self, req: control.ControlRequest, now: float) -> None:
        log.info("control request %s from %s", req.action.value, req.by)
        self.db.event("control", f"{req.action.value} requested by {req.by}", req.job_id, t=now)
        if req.action is ControlAction.STOP:
            self.stop(now, f"requested by {req.by}")
        elif req.action is ControlAction.SKIP:
            self.skip(req.job_id, now)
        elif req.action is ControlAction.RETRY:
            prio = Priority(req.priority or Priority.NORMAL.value)
            retry_file(self.queue.find(req.job_id), prio, now, self.cfg, self.queue, self.db)
        elif req.action is ControlAction.REMOVE:
            remove_file(self.queue.find(req.job_id), now, self.queue, self.db)
        elif req.action is ControlAction.CONSOLIDATE:
            self.requests.ask_consolidation(req.description or "", job_in_training=self.tracker.job is not None,
                                            force=req.force)
            self.db.event("consolidation", f"consolidation requested by {req.by}: {req.description} (at the next "
                          "boundary between files)", t=now)
        elif req.action is ControlAction.ROLLBACK:
            self.requests.ask_rollback(req.version)
        elif req.action in (ControlAction.ACCEPT, ControlAction.REJECT):
            self.decide_held(req, now)

    def decide_held(self, req: control.ControlRequest, now: float) -> None:
        """Accept or reject the version the forgetting gate holds: the trainer answers `done` or `failed` for
        its file, and training resumes (the person has looked)."""
        held = [v.version for v in adapters.held_versions(self.cfg.path("adapters"))]
        if req.version not in held:
            raise QueueError(f"adapter v{req.version} is not held"
                             + (f" (v{held[0]} is)" if held else " (no version is held)"))
        msg = protocol.Accept(version=req.version) if req.action is ControlAction.ACCEPT \
            else protocol.Reject(version=req.version)
        if not self.sup.send(msg):  # the trainer is down: the next one gets it once ready (it holds the file again)
            self.sup.owed.append(msg)
        control.set_desired_state(self.cfg, DesiredState.RUNNING, by=req.action.value)

    def skip(self, job_id: str | None, now: float) -> None:
        """The file in training ends at its next step (adapter restored); a file a dead trainer left in
        processing/ fails here, and a trainer drops its checkpoints (the next one, if none is up)."""
        job = self.tracker.job
        if job is not None:
            if job_id not in (None, job.job_id):
                raise QueueError(f"{job_id} is not the file in training ({job.job_id} is)")
            self.sup.send(protocol.Skip(job_id=job.job_id))
            return
        # not one whose move to done/ or failed/ waits for space: that move decides where it goes
        left = [e for e in self.queue.processing() if job_id in (None, e.job_id)
                and not self.tracker.pending_outcome(e.job_id)]
        if not left:
            raise QueueError("no file is training")
        self.tracker.fail(left[0].job_id, FailReason.SKIPPED, "skipped by request while the trainer was restarting; "
                          "the adapter keeps nothing from this file", now)
        self.sup.send_when_ready(protocol.Skip(job_id=left[0].job_id))
