"""The service: intake, queue, control and status around a supervised trainer child.

    python -m daemon --config config.json      # runs Service(cfg, config_path).run()

It never imports torch. One loop, read top to bottom in `tick()`: take what
the child said, act on control requests, take complete files from the inbox,
hand the next file to the child, write the status. The loop waits on the
child's socket and a wake-up socket (watchdog events, signals) with a timeout,
and always rescans the folders: events are hints, the folders are the truth.
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

from daemon import atomic, control, lockedkeys
from daemon.config import Config, resolved_dict
from daemon.errors import LockedKeyError, QueueError
from daemon.intake import InboxScanner, record_job, remove_file, retry_file, take_file
from daemon.jobqueue import ERROR_SUFFIX, JobQueue, QueueEntry
from daemon.lock import acquire
from daemon.schema import TrainingStatus
from daemon.states import (SERVICE_TRANSITIONS, ControlAction, DesiredState, FailReason, JobState, Priority,
                           ServiceStatus, TrainerState, check_transition)
from daemon.status import HISTORY_FILE, STATUS_FILE, HistoryDB, StatusWriter
from daemon.supervisor import Supervisor
from daemon.tracker import ActiveJob, JobTracker, published_adapter
from daemon.validate import validate_file
from daemon.wakeup import Wakeup

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_LOCKED_KEYS = 2
EXIT_ALREADY_RUNNING = 3
RUNNING_CONFIG = "running_config.json"  # the validated config the trainer child is started with
JOB_MESSAGES = {"started", "step", "steps_again", "eval", "activity", "checkpoint", "done", "failed", "skipped"}




class Service:
    def __init__(self, cfg: Config, config_path: str | Path, clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.clock = clock
        self.queue = JobQueue(cfg.path("queue"))
        self.scanner = InboxScanner(cfg.path("inbox"), cfg.intake.settle_seconds, tuple(cfg.intake.ignore_suffixes))
        self.status = TrainingStatus(pid=os.getpid(), write_interval_seconds=cfg.service.status_interval_seconds,
                                     base_model=cfg.base_model, quantization=cfg.model.quantization)
        self.writer = StatusWriter(cfg.path("status"))
        self.wakeup = Wakeup()
        self.sup = Supervisor(cfg.path("status") / RUNNING_CONFIG, cfg.path("logs"), self.wakeup.wake,
                              cfg.service.restart_backoff_seconds)
        self.db: HistoryDB | None = None
        self.tracker: JobTracker | None = None  # made with the db, at start-up
        self.deferred_skips: list[str] = []  # skips of files left by a dead child, told to the next one
        self.stop_requested = False  # warm stop: checkpoint, then exit
        self.stop_deadline = 0.0
        self.exit_now = False
        self.signals = 0
        self.last_status_write = 0.0
        self._lock_fd: int | None = None
        self._locked_at = 0.0  # when run() took the instance lock
        self._dirty = True  # the status changed since it was last written
        self._intake_failures: dict[Path, tuple[int, int]] = {}  # path -> (size, mtime_ns) that failed

    # -- life cycle -------------------------------------------------------------
    def run(self) -> int:
        self._locked_at = time.time()  # wall clock, as control requests are stamped
        self._lock_fd = acquire(self.cfg.path("status") / "daemon.lock", wait=2.0)
        try:
            changes = lockedkeys.check(self.cfg)
            if changes:
                err = LockedKeyError(changes)
                # Still a true picture of the instance: what is queued and which adapter exists.
                self.status.queue = self.queue.counts()
                self.status.adapter_version = published_adapter(self.cfg)["version"]
                self._set(ServiceStatus.ERROR, last_error=str(err), detail="refused to start: locked keys changed")
                self._write_status(force=True)
                log.error("%s", err)
                print(f"traind: {err}", file=sys.stderr)
                return EXIT_LOCKED_KEYS
            self._startup()
            while not self.exit_now:
                self._wait()
                self._guarded_tick()
            return EXIT_OK
        finally:
            self._shutdown()

    def _startup(self) -> None:
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
        self.db = HistoryDB(self.cfg.path("status") / HISTORY_FILE)
        self.tracker = JobTracker(self.cfg, self.queue, self.db, self.status)
        self.tracker.reconcile(self.clock())
        self.status.adapter_version = self.tracker.published()["version"]
        self.status.layer_activity_summary = self.tracker.last_activity()
        now = self.clock()
        self.status.started_at = now
        self.db.event("start", f"daemon started (pid {os.getpid()})", t=now)
        for entry in self.queue.processing():
            log.info("recovered %s from processing/: it resumes from its last checkpoint", entry.job_id)
        self._install_signals()
        self.wakeup.watch(self.cfg.path("inbox"))
        self._start_child(now)
        self._write_status(force=True)

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
                self._set(ServiceStatus.STOPPED, detail="stopped" + note)
            self.status.trainer_pid = None
            self._write_status(force=True)
            self.db.event("stop", "daemon stopped")
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
            self.signals += 1
            self.wakeup.wake()
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    # -- the loop -------------------------------------------------------------------
    def _guarded_tick(self) -> None:
        """A tick that fails is logged and shown, and the daemon carries on (a full disk may pass)."""
        try:
            self.tick()
        except Exception as e:  # the service boundary: record, keep running
            log.error("service loop error:\n%s", traceback.format_exc())
            self.status.last_error = f"service loop error: {e!r} (see the daemon log)"
            time.sleep(1.0)  # a persistent fault must not spin the loop
            try:
                self._write_status(force=True)
            except OSError:
                pass

    def tick(self) -> None:
        now = self.clock()
        self._handle_signals(now)
        self._handle_child(now)
        self._handle_control(now)
        self._intake(now)
        self._dispatch(now)
        self._maybe_finish_stop(now)
        self._write_status()

    def _handle_signals(self, now: float) -> None:
        if self.signals >= 2 and not self.exit_now:
            log.warning("second stop signal: stopping now without a checkpoint (resumes from the last one)")
            self.sup.kill()
            self.exit_now = True
        elif self.signals == 1 and not self.stop_requested:
            log.info("stop signal: checkpointing, then exiting (send it again to stop at once)")
            self._begin_stop(now, "signal")
        if control.emergency_stop_requested(self.cfg):
            control.emergency_stop_path(self.cfg).unlink(missing_ok=True)
            if not self.stop_requested:
                log.warning(".stop found: emergency stop (checkpoint, then exit)")
                self._begin_stop(now, ".stop file")

    # -- the child ------------------------------------------------------------------
    def _start_child(self, now: float) -> None:
        self.sup.start(now)
        self.status.trainer_pid = self.sup.pid
        if self.status.status is not ServiceStatus.ERROR:
            self._set(ServiceStatus.IDLE, detail="loading model")

    def _handle_child(self, now: float) -> None:
        messages, code = self.sup.poll(now)
        for msg in messages:
            self._on_message(msg, now)
        if code is not None:
            self._on_child_exit(code, now)
        if self.sup.due(now) and not self.stop_requested:
            self._start_child(now)

    def _on_child_exit(self, code: int, now: float) -> None:
        self.status.trainer_pid = None
        if self.sup.state is TrainerState.EXITING or self.stop_requested:
            self.sup.state = TrainerState.DOWN
            self.exit_now = self.exit_now or self.stop_requested
            return
        how = f"signal {-code}" if code < 0 else f"exit code {code}"
        before_ready = self.sup.state is TrainerState.STARTING
        backoff = self.sup.crashed(now, before_ready)
        log.error("trainer child died (%s); restarting in %.1f s", how, backoff)
        job = self.tracker.job
        self.db.event("trainer_crash", f"trainer died ({how}); restarting in {backoff:.0f} s",
                      job.job_id if job else None, t=now)
        if job is not None:
            self.tracker.crashed(how, now)
        if self.sup.cannot_start:
            hint = self.sup.last_error_hint()
            self._set(ServiceStatus.ERROR, detail=f"the trainer cannot start; retrying in {backoff:.0f} s",
                      last_error=f"trainer failed to start {self.sup.start_failures} times in a row ({how}): {hint}")
        else:
            self._set(ServiceStatus.IDLE, detail=f"trainer restarting ({how})", last_error=f"trainer child died ({how})")

    def _on_message(self, msg: dict[str, Any], now: float) -> None:
        kind = msg.get("type")
        if kind in JOB_MESSAGES:
            if self.tracker.on_message(msg, now):
                self._job_over()
            elif kind in ("started", "step"):
                self._on_progress(kind)
            return
        handler = getattr(self, f"_msg_{kind}", None)
        if handler is None:
            log.warning("unknown message from trainer: %r", kind)
        else:
            handler(msg, now)

    def _on_progress(self, kind: str) -> None:
        if kind == "step":
            self.sup.on_step()
            if self.clock() - self.last_status_write >= 0.5:  # live enough for a person, cheap for the disk
                self._dirty = True
        elif self.status.status is not ServiceStatus.PAUSED and not self.stop_requested:
            self._set(ServiceStatus.TRAINING, detail="training")

    def _msg_ready(self, msg: dict, now: float) -> None:
        self.sup.on_ready()
        for key in ("device", "compute_dtype", "quantization", "base_model", "adapter_version"):
            if msg.get(key) is not None:
                setattr(self.status, key, msg[key])
        log.info("trainer ready on %s (%s, %s) in %.1f s", msg.get("device"), msg.get("compute_dtype"),
                 msg.get("quantization"), msg.get("load_seconds") or 0)
        for job_id in self.deferred_skips:  # so it drops the checkpoints of files skipped while it was down
            self.sup.send({"type": "skip", "job_id": job_id})
        self.deferred_skips.clear()
        if not self.stop_requested:
            self._set(ServiceStatus.IDLE, detail="waiting for files")

    def _msg_paused(self, msg: dict, now: float) -> None:
        if self.tracker.job is not None and not self.stop_requested:
            self._set(ServiceStatus.PAUSED, detail="paused; the model stays loaded")

    def _msg_resumed(self, msg: dict, now: float) -> None:
        if self.tracker.job is not None and not self.stop_requested:
            self._set(ServiceStatus.TRAINING, detail="training")

    def _msg_stopped(self, msg: dict, now: float) -> None:
        self.sup.state = TrainerState.EXITING
        if msg.get("job_id"):
            step = msg.get("checkpoint_step")
            self.db.event("job_stopped", f"stopped at step {step}; resumes from there", msg["job_id"], t=now)

    def _job_over(self) -> None:
        if self.sup.state is TrainerState.BUSY:
            self.sup.state = TrainerState.READY
        if not self.stop_requested:
            self._set(ServiceStatus.IDLE, detail="waiting for files")

    # -- control --------------------------------------------------------------------
    def _handle_control(self, now: float) -> None:
        desired = control.read_desired_state(self.cfg)
        if desired is not self.status.desired_state:
            log.info("desired state: %s", desired.value)
            self.status.desired_state = desired
            self.db.event("control", f"desired state {desired.value}", t=now)
        self._converge_pause(desired)
        self._drop_old_stops_and_skips(now)
        for req in control.pending_requests(self.cfg):
            control.consume(req)  # first: a request that cannot be carried out must not come back
            try:
                self._act(req, now)
            except QueueError as e:
                log.warning("request %s refused: %s", req.action.value, e)
                self.db.event("control_refused", f"{req.action.value} {req.job_id or ''}: {e}", req.job_id, t=now)

    def _drop_old_stops_and_skips(self, now: float) -> None:
        """A stop or skip made while no daemon ran (trainctl and the monitor refuse them
        then, but one can race a crash) must not stop or skip this run as it starts."""
        for req in control.pending_requests(self.cfg):
            if req.action in (ControlAction.STOP, ControlAction.SKIP) and req.at < self._locked_at:
                control.consume(req)
                log.warning("dropped a %s request from %s made while the daemon was not running",
                            req.action.value, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(req.at)))
                self.db.event("control_refused", f"{req.action.value} by {req.by}: made while the daemon was not running",
                              req.job_id, t=now)

    def _converge_pause(self, desired: DesiredState) -> None:
        """Bring the child and the status in line with the desired state.

        The child's own pause outlives a file (a skip while paused leaves it
        paused), so whether it is paused is tracked apart from the job.
        """
        want_paused = desired is DesiredState.PAUSED
        if self.sup.connected and self.sup.state is not TrainerState.EXITING:
            if want_paused and self.tracker.job:
                self.sup.pause()
            elif not want_paused:
                self.sup.resume()
        if self.tracker.job or self.stop_requested or self.status.status is ServiceStatus.ERROR:
            return
        if want_paused and self.status.status is ServiceStatus.IDLE:
            self._set(ServiceStatus.PAUSED, detail="paused; no file is started")
        elif not want_paused and self.status.status is ServiceStatus.PAUSED:
            self._set(ServiceStatus.IDLE, detail="waiting for files")

    def _act(self, req: control.ControlRequest, now: float) -> None:
        log.info("control request %s from %s", req.action.value, req.by)
        self.db.event("control", f"{req.action.value} requested by {req.by}", req.job_id, t=now)
        if req.action is ControlAction.STOP:
            self._begin_stop(now, f"requested by {req.by}")
        elif req.action is ControlAction.SKIP:
            self._skip(req.job_id, now)
        elif req.action is ControlAction.RETRY:
            prio = Priority(req.priority or Priority.NORMAL.value)
            retry_file(self.queue.find(req.job_id), prio, now, self.cfg, self.queue, self.db)
        elif req.action is ControlAction.REMOVE:
            remove_file(self.queue.find(req.job_id), now, self.queue, self.db)

    def _skip(self, job_id: str | None, now: float) -> None:
        job = self.tracker.job
        if job is not None:
            if job_id not in (None, job.job_id):
                raise QueueError(f"{job_id} is not the file in training ({job.job_id} is)")
            self.sup.send({"type": "skip", "job_id": job.job_id})
            return
        left = [e for e in self.queue.processing() if job_id in (None, e.job_id)]
        if not left:
            raise QueueError("no file is training")
        # Its trainer died: fail it here; the next child drops its checkpoints.
        self.tracker.fail(left[0].job_id, FailReason.SKIPPED, "skipped by request while the trainer was restarting; "
                          "the adapter keeps nothing from this file", now)
        self.deferred_skips.append(left[0].job_id)

    def _begin_stop(self, now: float, why: str) -> None:
        self.stop_requested = True
        self.stop_deadline = now + self.cfg.service.stop_timeout_seconds
        self._set(ServiceStatus.STOPPING, detail=f"stopping ({why})")
        self.db.event("stopping", f"stopping ({why})", t=now)
        if self.sup.child is None:
            self.exit_now = True
        elif self.tracker.job and self.sup.connected:
            self.sup.send({"type": "stop"})
        else:
            self.sup.exit()

    def _maybe_finish_stop(self, now: float) -> None:
        if not self.stop_requested:
            return
        if self.sup.child is None:
            self.exit_now = True
        elif now > self.stop_deadline:
            log.error("trainer did not stop within %.0f s; killing it (it resumes from its last checkpoint)",
                      self.cfg.service.stop_timeout_seconds)
            self.sup.kill()
            self.exit_now = True

    # -- intake and dispatch -------------------------------------------------------------
    def _intake(self, now: float) -> None:
        for path, prio in self.scanner.ready(now):
            self.scanner.forget(path)
            ident = None
            try:
                st = path.stat()
                ident = (st.st_size, st.st_mtime_ns)
                if self._intake_failures.get(path) == ident:
                    continue  # failed before and unchanged since: once in the log is enough
                take_file(path, prio, now, self.cfg, self.queue, self.db)
                self._intake_failures.pop(path, None)
            except FileNotFoundError:
                continue  # taken away by its writer
            except Exception:  # a job boundary: record, keep the file, keep running
                log.error("could not take %s from the inbox:\n%s", path, traceback.format_exc())
                self.status.last_error = f"intake of {path.name} failed; see the daemon log"
                self._intake_failures[path] = ident

    def _dispatch(self, now: float) -> None:
        if self.tracker.job or self.stop_requested or self.sup.state is not TrainerState.READY:
            return
        if self.status.desired_state is DesiredState.PAUSED:
            return
        leftovers = self.queue.processing()  # a crash or stop left it mid-way: resume it first
        entry = leftovers[0] if leftovers else None
        if entry is None:
            nxt = self.queue.next_pending()
            if nxt is None:
                return
            entry = self.queue.start(nxt)
        job = self._active_job(entry, now)
        if job is None:  # refused on the spot; the next tick takes the next file
            self.wakeup.wake()
            return
        self.tracker.begin(job)
        self.sup.send(job.message())
        self.sup.state = TrainerState.BUSY
        self._set(ServiceStatus.TRAINING, detail="preparing data")
        log.info("training %s", entry.job_id)

    def _active_job(self, entry: QueueEntry, now: float) -> ActiveJob | None:
        """The job to send, or None when the file cannot be trained as it was queued
        (then it is failed here, with its reason, before the trainer sees it)."""
        record = self.db.job(entry.job_id) or {}
        if not record.get("format") or not record.get("sha256"):  # a crash between admit and its record
            report = validate_file(entry.path, self.cfg.data, 0)
            if not report.accepted:
                self.tracker.fail(entry.job_id, FailReason.INVALID_DATA, report.reason or "invalid data", now,
                                  errors=[e.to_dict() for e in report.errors])
                return None
            record_job(self.db, entry, Priority.NORMAL, report, now, JobState.PROCESSING)
            record = self.db.job(entry.job_id)
        elif record.get("size") is not None and entry.size != record["size"]:
            # Written to after the settle window let it in: what would train is not what was checked.
            self.tracker.fail(entry.job_id, FailReason.INVALID_DATA,
                              f"the file changed after it was queued ({record['size']} -> {entry.size} bytes); write "
                              "it under a .part or .tmp name and rename it when complete, then `trainctl queue retry`", now)
            return None
        return ActiveJob(entry.job_id, str(entry.path), entry.original_name, record["sha256"], record["format"],
                         record["n_records"])

    # -- status ------------------------------------------------------------------------
    def _set(self, status: ServiceStatus, detail: str | None = None, last_error: str | None = None) -> None:
        if status is not self.status.status:
            try:
                check_transition(SERVICE_TRANSITIONS, self.status.status, status)
            except ValueError as e:  # a bug, not a reason to stop training: say it loudly
                log.error("status %s (allowed anyway)", e)
            log.info("status %s -> %s", self.status.status.value, status.value)
        self.status.status = status
        if detail is not None:
            self.status.detail = detail
        if last_error is not None:
            self.status.last_error = last_error
        self._dirty = True

    def _write_status(self, force: bool = False) -> None:
        now = self.clock()
        due = now - self.last_status_write >= self.cfg.service.status_interval_seconds
        if not (force or due or self._dirty):
            return
        if self.db is not None:
            self.status.queue = self.queue.counts()
        self.writer.write(self.status, now)
        self.last_status_write = now
        self._dirty = False
