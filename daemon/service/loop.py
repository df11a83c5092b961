"""The service: intake, queue, control and status around a supervised trainer child.

    python -m daemon --config config.json      # runs Service(cfg, config_path).run()

It never imports torch. One loop, read top to bottom in `tick()`: take what
the child said, act on control requests, take complete files from the inbox,
hand the next file to the child, write the status. The loop waits on the
child's socket and a wake-up socket (watchdog events, signals) with a timeout,
and always rescans the folders: events are hints, the folders are the truth.

What it keeps are facts (a stop asked for, the trainer's state and answers,
the file in training, the person's desired state, a disk hold); the status
is derived from them in one place (daemon/service/state.py) and written by
its one writer (publisher.py). The trainer's messages are typed
(daemon/protocol.py) and dispatched on their type, each on its own (one that
fails is logged; the rest of the batch, and the child's exit, still count);
the person's requests are the ControlDesk's (controls.py); rollback and
consolidation requests wait for their answers in their own object
(lineage_requests.py); the disk holds are DiskGuard's (diskguard.py).
`spawn` makes the trainer child: the real process, or a fake that speaks the
protocol in this process (tests/fake_trainer.py), so `tick()` is testable.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
import traceback
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any, Callable

from daemon import adapters, atomic, control, diskspace, lockedkeys, protocol
from daemon.config import Config, resolved_dict
from daemon.dataset_ledger import DatasetLedger
from daemon.diskspace import DiskFull
from daemon.errors import LockedKeyError
from daemon.intake import take_file
from daemon.jobqueue import ERROR_SUFFIX, JobQueue
from daemon.lock import acquire
from daemon.schema import TrainingStatus
from daemon.service import state
from daemon.service.autogen import AutoGenerator
from daemon.service.child import TrainerProcess
from daemon.service.controls import ControlDesk
from daemon.service.diskguard import DiskGuard
from daemon.service.dispatch import hand_next
from daemon.service.inbox import InboxScanner
from daemon.service.lineage_requests import LineageRequests, answer_said
from daemon.service.notify import Notifier, job_details
from daemon.service.publisher import StatusPublisher
from daemon.service.stopping import Stopping
from daemon.service.supervisor import Supervisor
from daemon.service.trainer_said import refusal_said, take_ready
from daemon.service.tracker import JOB_MESSAGES, JobTracker, published_adapter
from daemon.service.wakeup import Wakeup
from daemon.states import DesiredState, JobState, ServiceStatus, TrainerState
from daemon.history_db import HISTORY_FILE, HistoryDB
from daemon.status import STATUS_FILE, StatusWriter

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_LOCKED_KEYS = 2
EXIT_ALREADY_RUNNING = 3
RUNNING_CONFIG = "running_config.json"  # the validated config the trainer child is started with
WRITTEN_FOLDERS = {"queue": "queue", "status": "status", "adapters": "adapter", "checkpoints": "checkpoint",
                   "logs": "log"}  # watched for free space: folder -> what is written there


class Service:
    def __init__(self, cfg: Config, config_path: str | Path, clock: Callable[[], float] = time.time,
                 spawn: Callable[..., Any] = TrainerProcess) -> None:
        self.cfg = cfg
        self.clock = clock
        self.queue = JobQueue(cfg.path("queue"))
        self.scanner = InboxScanner(cfg.path("inbox"), cfg.intake.settle_seconds, tuple(cfg.intake.ignore_suffixes),
                                    recreated_settle_seconds=cfg.intake.recreated_settle_seconds,
                                    recheck_seconds=cfg.intake.scan_interval_seconds)
        self.status = TrainingStatus(pid=os.getpid(), write_interval_seconds=cfg.service.status_interval_seconds,
                                     base_model=cfg.base_model, quantization=cfg.model.quantization)
        self.writer = StatusWriter(cfg.path("status"))
        self.publisher = StatusPublisher(self.status, self.writer, cfg.service.status_interval_seconds,
                                         on_paused=lambda: self.tracker and self.tracker.restart_rate())
        self.wakeup = Wakeup()
        self.sup = Supervisor(cfg.path("status") / RUNNING_CONFIG, cfg.path("logs"), self.wakeup.wake,
                              cfg.service.restart_backoff_seconds, spawn=spawn)
        self.requests = LineageRequests(cfg)
        self.paused_for_forgetting = False  # the desired pause was set by the forgetting gate (pause_reason)
        self.disk = DiskGuard([cfg.path(n) for n in WRITTEN_FOLDERS], cfg.service.min_free_bytes,
                              cfg.service.disk_check_seconds, roles={cfg.path(n): r for n, r in WRITTEN_FOLDERS.items()},
                              on_event=self._disk_event, room_kept=self.writer.room_kept)
        self.db: HistoryDB | None = None
        self.tracker: JobTracker | None = None  # made with the db, at start-up
        self.controls: ControlDesk | None = None  # likewise
        # the facts the status is derived from (daemon/service/state.py) are these, the trainer's (self.sup),
        # the file in training (self.tracker), the person's desired state, the disk's hold and the requests'
        self.stop = Stopping(cfg.service.stop_timeout_seconds)  # warm or at once (daemon/service/stopping.py)
        self._lock_fd: int | None = None
        self._locked_at = 0.0  # when run() took the instance lock

    # -- life cycle -------------------------------------------------------------
    def run(self) -> int:
        # The handlers first: a stop that arrives while the service starts (systemd's stop right after its
        # start, stop_all.sh right after start_all.sh, a busy machine) is a warm stop like any other, never the
        # signal's default death with the trainer child started and its socket folder left behind.
        self._install_signals()
        self._locked_at = time.time()  # wall clock, as control requests are stamped
        self._lock_fd = acquire(self.cfg.path("status") / "daemon.lock", wait=2.0)
        try:
            changes = lockedkeys.check(self.cfg)
            if changes:
                err = LockedKeyError(changes)
                # Still a true picture of the instance: what is queued and which adapter exists.
                self.status.queue = self.queue.counts()
                self.status.adapter_version = published_adapter(self.cfg)["version"]
                self.status.last_error = str(err)
                self.publisher.show(ServiceStatus.ERROR, "refused to start: locked keys changed")
                self._write_status(force=True)
                log.error("%s", err)
                print(f"traind: {err}", file=sys.stderr)
                return EXIT_LOCKED_KEYS
            self.start()
            while not self.stop.exit_now:
                self._wait()
                self._guarded_tick()
            return EXIT_OK
        finally:
            self._shutdown()

    def start(self) -> None:
        """Folders, history, records mended, the inbox watched, the trainer started (`run` calls it)."""
        for name in ("inbox", "queue", "status", "adapters", "checkpoints", "logs"):
            self.cfg.path(name).mkdir(parents=True, exist_ok=True)
        self.queue.ensure()
        self.scanner.ensure()
        self._sweep_temps()
        if lockedkeys.recorded(self.cfg) is None or not lockedkeys.training_started(self.cfg):
            lockedkeys.record(self.cfg)
        # The child gets this snapshot, not config.json: an edit made while the daemon
        # runs must not reach a restarted child behind the locked-key check.
        atomic.write_json(self.cfg.path("status") / RUNNING_CONFIG, resolved_dict(self.cfg))
        self.writer.ensure_reserve()
        self.db = HistoryDB(self.cfg.path("status") / HISTORY_FILE)
        self.db.on_disk_full = lambda e: self._disk_error(e, self.cfg.path("status"), "history")
        self.tracker = JobTracker(self.cfg, self.queue, self.db, self.status)
        self.controls = ControlDesk(self.cfg, self.queue, self.db, self.tracker, self.requests, self.sup,
                                    lambda now, why: self.stop.begin(now, why, self.sup, self.tracker, self.db))
        self.ledger = DatasetLedger(self.cfg.path("adapters"), self.db, adapters.config_base(self.cfg))
        self.notifier = Notifier(self.cfg)
        self.autogen = AutoGenerator(self.cfg)
        self.status.auto_generate = self.autogen.status() if self.cfg.auto_generate.enabled else None
        self.db.on_event = self._notify
        self.tracker.on_disk_full = lambda full: self._hold_for_disk(full, self.clock())
        self.tracker.reconcile(self.clock())
        self.status.adapter_version = self.tracker.published()["version"]
        if (in_use := adapters.base_in_use(self.cfg.path("adapters"), adapters.config_base(self.cfg))) is not None:
            self.status.base_model, self.status.generation = in_use["base_path"], in_use["generation"]
        self.status.layer_activity_summary = self.tracker.last_activity()
        now = self.clock()
        self.status.started_at = now
        self.db.event("start", f"daemon started (pid {os.getpid()})", t=now)
        for entry in self.queue.processing():
            log.info("recovered %s from processing/: it resumes from its last checkpoint", entry.job_id)
        self.wakeup.watch(self.cfg.path("inbox"), on_renamed_in=self.scanner.renamed_in, on_closed=self.scanner.closed)
        self._start_child(now)
        self._refresh_status()
        self._write_status(force=True)

    def _notify(self, kind: str, message: str, job_id: str | None, t: float) -> None:
        """Webhooks of a history event, with the file's record (name, steps, losses, reason)."""
        self.notifier.event(kind, message, job_id, t, job_details(self.db, kind, job_id))

    def _sweep_temps(self) -> None:
        """Temp files of atomic writes a killed service left (the status file, the running config,
        the locked keys, failed/'s error files). Under the daemon lock we are their one writer;
        status/control/ is left alone (trainctl and the monitor write there at any time)."""
        status = self.cfg.path("status")
        swept = sum(atomic.sweep_temps(status, name) for name in (STATUS_FILE, RUNNING_CONFIG, lockedkeys.FILE))
        swept += atomic.sweep_temps(self.queue.folder(JobState.FAILED), "*" + ERROR_SUFFIX)
        if swept:
            log.info("removed %d temp file(s) of writes a killed daemon left", swept)

    def _shutdown(self) -> None:
        self.wakeup.close()
        self.sup.close()
        if self.db is not None:
            if self.status.status is not ServiceStatus.ERROR:
                left = self.queue.processing()
                note = f"; {left[0].original_name} resumes from its checkpoint at the next start" if left else ""
                self.publisher.show(ServiceStatus.STOPPED, "stopped" + note)
            self.status.trainer_pid = None
            self._write_status(force=True)
            self.db.event("stop", "daemon stopped")
            self.notifier.close()
            if self.db.held and not self.db.flush():  # the folders stay the truth; the next start mends job records
                log.error("%d history write(s) could not be made before exit (disk full) and are lost",
                          len(self.db.held) + self.db.held_dropped)
            self.db.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)

    # -- waiting ------------------------------------------------------------------
    def _wait(self) -> None:
        waitables: list[Any] = [self.wakeup]
        if self.sup.waitable() is not None:
            waitables.append(self.sup.waitable())
        timeout = min(self.cfg.intake.scan_interval_seconds, self.cfg.service.status_interval_seconds / 2)
        if self.scanner.waiting():
            timeout = min(timeout, max(self.cfg.intake.settle_seconds / 2, 0.05))
        timeout = min(timeout, self.sup.wait_timeout() or timeout)
        if self.wakeup in wait(waitables, timeout):
            self.wakeup.drain()

    def _install_signals(self) -> None:
        def on_signal(signum: int, frame: Any) -> None:  # only sets flags (huey, rq)
            self.stop.signal()
            self.wakeup.wake()
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    # -- the loop -------------------------------------------------------------------
    def _guarded_tick(self) -> None:
        """A tick that fails is logged and shown, and the daemon carries on (a full disk may pass)."""
        try:
            self.tick()
        except Exception as e:  # the service boundary: record, keep running
            if self._disk_error(e, None, "service"):
                return  # held for disk; the next tick writes nothing until space is back
            log.error("service loop error:\n%s", traceback.format_exc())
            self.status.last_error = f"service loop error: {e!r} (see the daemon log)"
            time.sleep(1.0)  # a persistent fault must not spin the loop
            try:
                self._write_status(force=True)
            except OSError:
                pass

    def tick(self) -> None:
        now = self.clock()
        self.stop.look(now, self.sup, self.tracker, self.db, self.cfg)
        self._handle_child(now)
        self._check_disk(now)
        self._handle_control(now)
        self._intake(now)
        self._auto_generate(now)
        if self.disk.full is None:
            self.tracker.retry_deferred(now)  # moves a full disk refused (done/, failed/)
        if self.tracker.file_vanished(now) and self.sup.connected:
            self.sup.send(protocol.Skip(job_id=self.tracker.job.job_id))
        self.tracker.watch_finished(now)
        self._dispatch(now)
        self.stop.finish(now, self.sup)
        self._refresh_status()
        self._write_status()

    # -- the child ------------------------------------------------------------------
    def _start_child(self, now: float) -> None:
        self.sup.start(now)
        self.status.trainer_pid = self.sup.pid

    def _handle_child(self, now: float) -> None:
        """Each message on its own: one whose handling fails is logged (a full disk held for), and the rest of
        the batch and the child's exit still count (else a reaped child would leave the service waiting)."""
        messages, code = self.sup.poll(now)
        try:
            for msg in messages:
                try:
                    self._on_message(msg, now)
                except Exception as e:
                    if not self._disk_error(e, None, "service"):
                        log.error("handling the trainer's %s message failed:\n%s", msg.TYPE, traceback.format_exc())
                        self.status.last_error = f"handling the trainer's {msg.TYPE} message failed: {e!r}"
        finally:
            if code is not None:
                self._on_child_exit(code, now)
        if self.sup.dropped_job_end(self.tracker.job):  # a `done`/`failed` that could not be read: a crash of it
            log.error("the trainer's last word on %s could not be read; ending the trainer (it restarts and "
                      "resumes)", self.tracker.job.job_id)
            self.sup.kill()
        if self.sup.due(now) and self.stop.why is None:
            self._start_child(now)

    def _on_child_exit(self, code: int, now: float) -> None:
        self.status.trainer_pid = None
        self.requests.trainer_gone()  # unanswered: the next child gets them again
        if self.sup.refusal is not None:  # not a crash: the config cannot run here; nothing restarts it
            self.sup.state = TrainerState.REFUSED
            if self.tracker.job is not None:  # it stays in processing/ and resumes once the config is mended
                self.tracker.end()
            self.stop.child_gone()
            return
        if self.sup.state is TrainerState.EXITING or self.stop.why is not None:
            self.sup.state = TrainerState.DOWN
            self.stop.child_gone()
            return
        how = f"signal {-code}" if code < 0 else f"exit code {code}"
        before_ready = self.sup.state is TrainerState.STARTING
        backoff = self.sup.crashed(now, before_ready, how)
        log.error("trainer child died (%s); restarting in %.1f s", how, backoff)
        job = self.tracker.job
        # A trainer that died loading says why in its log: the whole error goes to the event and the status.
        hint = self.sup.last_error_hint() if before_ready else None
        self.db.event("trainer_crash", f"trainer died ({how}); restarting in {backoff:.0f} s"
                      + (f": {hint}" if hint else ""), job.job_id if job else None, t=now)
        if job is not None:
            # A trainer that dies while the disk is full died of it, not of the file: not counted against it.
            self.tracker.crashed(how, now, count=self.disk.full is None and self.disk.lowest() is None
                                 and diskspace.free_bytes(self.cfg.path("checkpoints")) >= diskspace.NEARLY_FULL_BYTES)
        self.status.last_error = (f"trainer failed to start {self.sup.start_failures} times in a row ({how}): "
                                  f"{hint or self.sup.last_error_hint()}" if self.sup.cannot_start
                                  else f"trainer child died ({how})")

    def _on_message(self, msg: protocol.Message, now: float) -> None:
        """What the trainer said: what it says of itself is the supervisor's; the rest dispatched on its type."""
        if self.sup.on_message(msg):
            return
        match msg:
            case _ if isinstance(msg, JOB_MESSAGES):
                self._on_job_message(msg, now)
            case protocol.Ready():
                self._on_ready(msg, now)
            case protocol.ConfigRefused():
                self.status.last_error = refusal_said(msg)
                self.db.event("config_refused", self.status.last_error, msg.job_id, t=now)
            case protocol.DiskFullReport():  # it holds until `resume` (the resume ending the hold goes to it)
                self._hold_for_disk(DiskFull(msg.folder, msg.free_bytes, msg.site, msg.message, kind=msg.kind), now)
            case protocol.Stopped() if msg.job_id:
                self.db.event("job_stopped", f"stopped at step {msg.checkpoint_step}; resumes from there",
                              msg.job_id, t=now)
            case protocol.Stopped():
                pass
            case protocol.Held():
                self._on_held(msg, now)
            case protocol.HeldRefused():
                self.db.event("control_refused", f"accept/reject v{msg.version}: {msg.message}", t=now)
            case protocol.RolledBack() | protocol.RollbackRefused() | protocol.Consolidated() | \
                    protocol.ConsolidationRefused():
                self.requests.answered(msg)
                self._on_lineage_answer(msg, now)
            case _:
                log.warning("no handler for a %s message from the trainer", msg.TYPE)

    def _on_job_message(self, msg: protocol.Message, now: float) -> None:
        try:
            over = self.tracker.on_message(msg, now)
        finally:  # the file ended even if recording it failed
            if self.tracker.job is None:
                self.sup.job_over()
            if self.status.held and (self.tracker.job is None or self.tracker.job.job_id != self.status.held["job_id"]):
                self.status.held = None  # accepted, rejected or skipped: decided
        if isinstance(msg, protocol.Failed) and msg.reason == "guard":  # nothing starts until a person looks
            self.db.event("guard", f"paused by a guard: {msg.message}", msg.job_id, t=now)
            control.set_desired_state(self.cfg, DesiredState.PAUSED, by="guard")
        if isinstance(msg, (protocol.Done, protocol.Failed)):
            self._forgetting_said(msg, now)
        if isinstance(msg, protocol.Step) and not over:
            self.sup.on_step()
            if self.clock() - self.publisher.last_write >= 0.5:  # live enough for a person, cheap for the disk
                self.publisher.dirty = True

    def _on_held(self, msg: protocol.Held, now: float) -> None:
        """The forgetting gate held the file's version: the file stays in processing/ and nothing trains until
        `trainctl adapters accept|reject` (said again by a restarted trainer: not a second event)."""
        if self.tracker.job is None or self.tracker.job.job_id != msg.job_id:
            log.info("ignoring held about %s: not the file in training", msg.job_id)
            return
        again = (self.status.held or {}).get("version") == msg.version or any(  # a restarted service: said before
            e["kind"] == "forgetting" and e["job_id"] == msg.job_id for e in self.db.events(limit=200))
        self.status.held = {"version": msg.version, "job_id": msg.job_id, "file": self.tracker.job.original_name,
                            "message": msg.message}
        self.tracker.on_held(msg, now)  # its report into the history now, not only once it is decided
        if not again:
            self.db.event("forgetting", msg.message, msg.job_id, t=now)
            log.warning("%s", msg.message)
        self.publisher.dirty = True

    def _forgetting_said(self, msg: protocol.Done | protocol.Failed, now: float) -> None:
        """A tripped forgetting gate is an event (and a webhook) whatever it did; a rollback it made pauses."""
        gate = (msg.forgetting or {}).get("gate") or {}
        if isinstance(msg, protocol.Failed) and msg.reason == "forgetting":
            if gate.get("action") == "rollback":  # a rejected held version resumes (the person decided)
                self.db.event("forgetting", f"paused by the forgetting gate: {msg.message}", msg.job_id, t=now)
                control.set_desired_state(self.cfg, DesiredState.PAUSED, by="forgetting")
        elif isinstance(msg, protocol.Done) and gate.get("tripped") and gate.get("action") == "warn":
            self.db.event("forgetting", f"{msg.adapter_version and f'adapter v{msg.adapter_version}: '}"
                                        f"{gate.get('message')}", msg.job_id, t=now)
        intruders = (msg.forgetting or {}).get("intruders") or {}
        if isinstance(msg, protocol.Done) and intruders.get("over"):  # activity.intruders: a warning only
            self.db.event("forgetting", f"adapter v{msg.adapter_version}: {intruders.get('message')}", msg.job_id, t=now)

    def _on_ready(self, msg: protocol.Ready, now: float) -> None:
        self.sup.on_ready()  # ...and it sends what was owed to this trainer (skips while it was down)
        take_ready(self.status, msg, self.cfg.tuned)
        if msg.eval_set_error:  # training goes on without it; say why where people look
            self.db.event("eval_set", msg.eval_set_error, t=now)

    def _on_lineage_answer(self, msg: protocol.Message, now: float) -> None:
        """The trainer's answer to a rollback or a consolidation: the status, the event, the locked keys' record."""
        s = self.status
        match msg:
            case protocol.RolledBack():
                s.adapter_version = msg.version
            case protocol.Consolidated():
                s.base_model, s.adapter_version, s.generation = msg.path, msg.adapter_version, msg.generation
                lockedkeys.note_consolidation(self.cfg, msg.path, msg.generation, now)
            case protocol.ConsolidationRefused():
                s.last_error = f"consolidation refused: {msg.message}"
        kind, said = answer_said(msg)
        interrupted = (self._rollback_interrupted(msg.job_id, refused=isinstance(msg, protocol.RollbackRefused))
                       if isinstance(msg, (protocol.RolledBack, protocol.RollbackRefused)) else "")
        self.db.event(kind, said + interrupted, t=now)
        (log.warning if kind == "control_refused" else log.info)("%s", said)

    def _rollback_interrupted(self, job_id: str | None, refused: bool) -> str:
        """The file a rollback interrupted stays in processing/ and trains again from its start: its steps go.
        (The trainer refuses before it interrupts; should a refusal come after, the file kept its checkpoints.)"""
        job = self.tracker.job
        if job is None or job_id != job.job_id:
            return ""
        if not refused:
            self.db.discard_steps(job.job_id)
        self.tracker.end()
        self.sup.job_over()
        how = "resumes from its last checkpoint" if refused else "trains again from its start"
        return f"; {job.original_name} was interrupted and {how}"

    # -- control --------------------------------------------------------------------
    def _handle_control(self, now: float) -> None:
        desired, by = control.read_desired(self.cfg)
        self.paused_for_forgetting = desired is DesiredState.PAUSED and by == "forgetting"
        if desired is not self.status.desired_state:
            log.info("desired state: %s", desired.value)
            self.status.desired_state = desired
            self.db.event("control", f"desired state {desired.value}", t=now)
        self._steer_trainer()
        self.controls.take(now, self._locked_at)

    def _want_paused(self) -> bool:
        return self.status.desired_state is DesiredState.PAUSED or self.disk.full is not None

    def _steer_trainer(self) -> None:
        """Tell the trainer to hold or go on as the facts say (its own pause outlives a file: a skip while paused
        leaves it paused, so whether it was told is tracked apart from the job)."""
        if not self.sup.connected or self.sup.state is TrainerState.EXITING:
            return
        if self._want_paused() and self.tracker.job:
            self.sup.pause()
        elif not self._want_paused():
            self.sup.resume()

    # -- intake and dispatch -------------------------------------------------------------
    def _intake(self, now: float) -> None:
        if self.disk.full is not None:
            return  # files wait in the inbox, untouched, until space is back
        take = lambda path, prio: take_file(path, prio, now, self.cfg, self.queue, self.db, self.ledger)  # noqa: E731
        failed = self.scanner.take_ready(now, take, lambda e: self._disk_error(e, self.cfg.path("queue"), "intake"))
        if failed:
            self.status.last_error = failed

    def _auto_generate(self, now: float) -> None:
        """Data when idle (daemon/service/autogen.py): the request runs in its own thread; this only looks and starts it."""
        if not self.cfg.auto_generate.enabled:
            return
        counts = self.queue.counts()
        empty = counts["pending"] + counts["processing"] == 0 and not self.scanner.waiting() and self.tracker.job is None
        if self.autogen.follow(now, empty, self._want_paused() or self.stop.why is not None, self.status, self.db):
            self.publisher.dirty = True

    def _dispatch(self, now: float) -> None:
        for msg in self.requests.due(self.sup.state, self.tracker.job is not None, self.stop.why is not None,
                                     self.disk.full is not None):
            if self.sup.send(msg):
                self.requests.sent(msg)
        if (self.requests.blocking or self.tracker.job or self.stop.why is not None or self._want_paused()
                or self.sup.state is not TrainerState.READY):
            return
        if hand_next(now, self.sup, self.tracker, self.cfg, self.queue, self.db, self.ledger) == "refused":
            self.wakeup.wake()  # refused on the spot: the next tick takes the next file

    # -- status ------------------------------------------------------------------------
    def facts(self) -> state.Facts:
        job = self.tracker is not None and self.tracker.job is not None
        return state.Facts(
            stopping=self.stop.why, refused=self.sup.refusal is not None, trainer=self.sup.state,
            cannot_start=self.sup.said if self.sup.cannot_start else None,
            restarting=None if self.sup.cannot_start else self.sup.said, joining=state.joining(self.cfg.distributed), loading=self.sup.loading,
            job=job, started=job and self.tracker.started, holds=self.sup.holds,
            paused_by_user=self.status.desired_state is DesiredState.PAUSED, disk=self.disk.reason(),
            disk_detail=self.disk.detail(), lineage=self.requests.doing(),
            held=(self.status.held or {}).get("message") if job else None,
            paused_for_forgetting=self.paused_for_forgetting)

    def _refresh_status(self) -> None:
        self.publisher.refresh(self.facts(), self.disk.status())

    def _write_status(self, force: bool = False) -> None:
        if self.db is not None:
            self.status.queue = self.queue.counts()
        self.publisher.write(self.clock(), force, on_error=self._status_write_failed)

    def _status_write_failed(self, e: Exception) -> bool:
        """A status write refused for the folder's sake: held for (True), the hold said before the retry."""
        if not self._disk_error(e, self.cfg.path("status"), "status"):
            return False
        if self.status.status in (ServiceStatus.STOPPED, ServiceStatus.ERROR):  # said for good: only why it is held
            self.publisher.held(self.facts(), self.disk.status())
        else:  # paused for the disk, and the status says so
            self._refresh_status()
        return True

    # -- disk space ------------------------------------------------------------------------
    def _check_disk(self, now: float) -> None:
        """Free space below the threshold holds before a write fails; space back ends the hold."""
        change = self.disk.tick(now)
        if change == "tripped":
            self._after_hold()
        elif change == "cleared":
            self.writer.ensure_reserve()
            self.db.flush()
            self.publisher.dirty = True

    def _disk_error(self, e: BaseException, folder: Path | None, site: str) -> bool:
        """Hold for disk when `e` is a write refused for the folder's sake (True); False for any other error."""
        if self.disk.failed_write(e, folder, site, self.clock()) is None:
            return False
        self._after_hold()
        return True

    def _hold_for_disk(self, full: DiskFull, now: float) -> None:
        """Hold training (the child pauses at its next step) until space is back; the file is not at fault."""
        self.disk.hold(full, now)
        self._after_hold()

    def _after_hold(self) -> None:
        self.status.last_error = self.disk.last_error()
        self._steer_trainer()
        self.publisher.dirty = True

    def _disk_event(self, kind: str, message: str) -> None:
        if self.db is not None:
            self.db.event(kind, message, self.tracker.job.job_id if self.tracker.job else None, t=self.clock())
