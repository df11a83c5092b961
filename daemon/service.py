"""The service: intake, queue, control, status and supervision of the trainer child.

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
from daemon.child import TrainerProcess
from daemon.config import Config
from daemon.errors import LockedKeyError, QueueError
from daemon.intake import InboxScanner, record_job, take_file
from daemon.jobqueue import JobQueue, original_name
from daemon.lock import acquire
from daemon.states import ControlAction, DesiredState, FailReason, JobState, Priority, ServiceStatus, TrainerState
from daemon.wakeup import Wakeup
from daemon.status import HISTORY_FILE, HistoryDB, StatusWriter, TrainingStatus
from daemon.validate import validate_file

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_LOCKED_KEYS = 2
EXIT_ALREADY_RUNNING = 3


class Service:
    def __init__(self, cfg: Config, config_path: str | Path, clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.config_path = Path(config_path).resolve()
        self.clock = clock
        self.queue = JobQueue(cfg.path("queue"))
        self.scanner = InboxScanner(cfg.path("inbox"), cfg.intake.settle_seconds, tuple(cfg.intake.ignore_suffixes))
        self.status = TrainingStatus(pid=os.getpid(), write_interval_seconds=cfg.service.status_interval_seconds,
                                     base_model=cfg.base_model, quantization=cfg.model.quantization)
        self.writer = StatusWriter(cfg.path("status"))
        self.db: HistoryDB | None = None
        self.child: TrainerProcess | None = None
        self.trainer_state = TrainerState.DOWN
        self.child_paused = False  # the child was told to pause and not yet to resume
        self.job: dict[str, Any] | None = None  # the file the child is working on
        self.crash_streak = 0
        self.restart_at = 0.0
        self.stop_requested = False  # warm stop: checkpoint, then exit
        self.stop_deadline = 0.0
        self.exit_now = False
        self.signals = 0
        self.last_status_write = 0.0
        self.wakeup = Wakeup()
        self._lock_fd: int | None = None
        self._rate: tuple[float, int] | None = None  # (time, step) of the first step seen this run
        self._dirty = True  # the status changed since it was last written

    # -- life cycle -------------------------------------------------------------
    def run(self) -> int:
        self._lock_fd = acquire(self.cfg.path("status") / "daemon.lock")
        try:
            changes = lockedkeys.check(self.cfg)
            if changes:
                err = LockedKeyError(changes)
                self._set(ServiceStatus.ERROR, last_error=str(err), detail="refused to start: locked keys changed")
                self._write_status(force=True)
                log.error("%s", err)
                print(f"traind: {err}", file=sys.stderr)
                return EXIT_LOCKED_KEYS
            self._startup()
            while not self.exit_now:
                self._wait()
                self.tick()
            return EXIT_OK
        finally:
            self._shutdown()

    def _startup(self) -> None:
        for name in ("inbox", "queue", "status", "adapters", "checkpoints", "logs"):
            self.cfg.path(name).mkdir(parents=True, exist_ok=True)
        self.queue.ensure()
        self.scanner.ensure()
        if lockedkeys.recorded(self.cfg) is None or not lockedkeys.training_started(self.cfg):
            lockedkeys.record(self.cfg)
        self.db = HistoryDB(self.cfg.path("status") / HISTORY_FILE)
        self.status.adapter_version = self._published_adapter_version()
        now = self.clock()
        self.status.started_at = now
        self.db.event("start", f"daemon started (pid {os.getpid()})", t=now)
        for entry in self.queue.processing():
            log.info("recovered %s from processing/: it resumes from its last checkpoint", entry.job_id)
        self._install_signals()
        self.wakeup.watch(self.cfg.path("inbox"))
        self._start_child(now)
        self._write_status(force=True)

    def _shutdown(self) -> None:
        self.wakeup.close()
        if self.child is not None:
            if self.child.exited() is None:
                self.child.send({"type": "shutdown"})
                if self.child.wait(10) is None:
                    self.child.kill()
            self.child.close()
        if self.db is not None:
            if self.status.status not in (ServiceStatus.ERROR,):
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
        if self.child is not None and self.child.connection is not None:
            waitables.append(self.child.connection)
        timeout = min(self.cfg.intake.scan_interval_seconds, self.cfg.service.status_interval_seconds / 2)
        if self.scanner.waiting():
            timeout = min(timeout, max(self.cfg.intake.settle_seconds / 2, 0.05))
        if self.trainer_state is TrainerState.STARTING:
            timeout = min(timeout, 0.5)  # the child may die before it connects
        if self.wakeup in wait(waitables, timeout):
            self.wakeup.drain()

    def _install_signals(self) -> None:
        def on_signal(signum: int, frame: Any) -> None:  # only sets flags (huey, rq)
            self.signals += 1
            self.wakeup.wake()
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    # -- the loop -------------------------------------------------------------------
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
            if self.child is not None:
                self.child.kill()
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
        self.child = TrainerProcess(self.config_path, self.cfg.path("logs"), wake=self.wakeup.wake)
        self.child.start()
        self.trainer_state = TrainerState.STARTING
        self.child_paused = False  # a new child starts running
        self.status.trainer_pid = self.child.pid
        self._set(self.status.status if self.job else ServiceStatus.IDLE, detail="loading model")

    def _handle_child(self, now: float) -> None:
        if self.child is None:
            if self.trainer_state is TrainerState.DOWN and not self.stop_requested and now >= self.restart_at:
                self._start_child(now)
            return
        for msg in self.child.receive():
            self._on_message(msg, now)
        code = self.child.exited()
        if code is not None:
            for msg in self.child.receive():  # what it said just before it went
                self._on_message(msg, now)
            self._on_child_exit(code, now)

    def _on_child_exit(self, code: int, now: float) -> None:
        expected = self.trainer_state is TrainerState.EXITING
        self.child.close()
        self.child = None
        self.status.trainer_pid = None
        self.trainer_state = TrainerState.DOWN
        if expected:
            return
        how = f"signal {-code}" if code < 0 else f"exit code {code}"
        log.error("trainer child died (%s)", how)
        self.status.last_error = f"trainer child died ({how})"
        self.crash_streak += 1
        backoff = min(self.cfg.service.restart_backoff_seconds * 2 ** (self.crash_streak - 1), 60.0)
        self.restart_at = now + backoff
        if self.job is not None:
            self._on_job_crash(self.job["job_id"], how, now)
        self.db.event("trainer_crash", f"trainer died ({how}); restarting in {backoff:.0f} s",
                      self.job["job_id"] if self.job else None, t=now)
        self.job = None
        self._set(ServiceStatus.IDLE, detail=f"trainer restarting ({how})")
        if self.stop_requested:
            self.exit_now = True

    def _on_job_crash(self, job_id: str, how: str, now: float) -> None:
        crashes = self.db.add_crash(job_id)
        if crashes >= self.cfg.service.max_crashes_per_file:
            msg = f"the trainer died {crashes} times on this file (last: {how})"
            self._fail(job_id, FailReason.CRASHED, msg, now)
        else:
            log.info("%s stays in processing/ and resumes from its last checkpoint (crash %d of %d)",
                     job_id, crashes, self.cfg.service.max_crashes_per_file)

    def _on_message(self, msg: dict[str, Any], now: float) -> None:
        kind = msg.get("type")
        handler = getattr(self, f"_msg_{kind}", None)
        if handler is None:
            log.warning("unknown message from trainer: %r", kind)
            return
        handler(msg, now)

    def _msg_ready(self, msg: dict, now: float) -> None:
        self.trainer_state = TrainerState.READY
        for key in ("device", "compute_dtype", "quantization", "base_model", "adapter_version"):
            if msg.get(key) is not None:
                setattr(self.status, key, msg[key])
        log.info("trainer ready on %s (%s, %s) in %.1f s", msg.get("device"), msg.get("compute_dtype"),
                 msg.get("quantization"), msg.get("load_seconds") or 0)
        self._set(ServiceStatus.IDLE, detail="waiting for files")

    def _msg_started(self, msg: dict, now: float) -> None:
        job_id = msg["job_id"]
        resumed = msg.get("resumed_from_step") or 0
        self.status.total_steps = msg.get("total_steps") or 0
        self.status.current_step = resumed
        self._rate = None
        self.db.forget_steps_after(job_id, resumed)
        self.db.upsert_job(job_id, total_steps=self.status.total_steps, started_at=now, state=JobState.PROCESSING.value)
        note = f" (resumed from step {resumed})" if resumed else ""
        self.db.event("job_started", f"training {self.status.current_file}{note}", job_id, t=now)
        self._set(ServiceStatus.TRAINING, detail=f"training{note}")

    def _msg_step(self, msg: dict, now: float) -> None:
        st = self.status
        st.current_step, st.total_steps = msg["step"], msg.get("total_steps") or st.total_steps
        st.global_step, st.epoch = msg.get("global_step", st.global_step), msg.get("epoch", st.epoch)
        st.loss, st.lr, st.tokens_per_sec = msg.get("loss"), msg.get("lr"), msg.get("tokens_per_sec")
        if self._rate is None:
            self._rate = (now, st.current_step)
        t0, s0 = self._rate
        if st.current_step > s0 and now > t0:
            st.eta_seconds = (st.total_steps - st.current_step) * (now - t0) / (st.current_step - s0)
        self.db.record_step(msg["job_id"], msg["step"], st.global_step, st.epoch, st.loss, st.lr,
                            msg.get("grad_norm"), st.tokens_per_sec, now)
        self.crash_streak = 0  # it trains again: restarts go back to the short backoff
        if now - self.last_status_write >= 0.5:  # live enough for a person, cheap for the disk
            self._dirty = True
        if st.status is ServiceStatus.IDLE:
            self._set(ServiceStatus.TRAINING, detail="training")

    def _msg_eval(self, msg: dict, now: float) -> None:
        self.status.eval_loss = msg["eval_loss"]
        self.db.record_eval(msg["job_id"], msg["step"], msg.get("global_step", self.status.global_step), msg["eval_loss"], now)

    def _msg_checkpoint(self, msg: dict, now: float) -> None:
        log.debug("checkpoint of %s at step %s", msg["job_id"], msg["step"])

    def _msg_paused(self, msg: dict, now: float) -> None:
        self._set(ServiceStatus.PAUSED, detail="paused; the model stays loaded")

    def _msg_resumed(self, msg: dict, now: float) -> None:
        self._set(ServiceStatus.TRAINING if self.job else ServiceStatus.IDLE, detail="training")

    def _msg_done(self, msg: dict, now: float) -> None:
        job_id = msg["job_id"]
        try:
            self.queue.finish(job_id)
        except QueueError as e:
            log.error("finished %s but cannot move it to done/: %s", job_id, e)
        self.db.upsert_job(job_id, state=JobState.DONE.value, finished_at=now, steps=msg.get("steps"),
                           final_loss=msg.get("final_loss"), eval_loss=msg.get("eval_loss"),
                           adapter_version=msg.get("adapter_version"))
        again = " (already trained before a restart; not trained again)" if msg.get("already_trained") else ""
        self.db.event("job_done", f"done: {original_name(job_id)}{again}", job_id, t=now)
        self.status.adapter_version = msg.get("adapter_version", self.status.adapter_version)
        self._job_over()

    def _msg_failed(self, msg: dict, now: float) -> None:
        reason = FailReason.INVALID_DATA if msg.get("reason") == "invalid_data" else FailReason.TRAINING_ERROR
        self.status.last_error = msg.get("message")
        self._fail(msg["job_id"], reason, msg.get("message") or "training failed", now,
                   errors=msg.get("errors") or [], traceback=msg.get("traceback"))
        self._job_over()

    def _msg_skipped(self, msg: dict, now: float) -> None:
        self._fail(msg["job_id"], FailReason.SKIPPED, "skipped by request; the adapter was restored to its state before this file",
                   now, steps_discarded=msg.get("steps_discarded"))
        self._job_over()

    def _msg_stopped(self, msg: dict, now: float) -> None:
        self.trainer_state = TrainerState.EXITING
        step = msg.get("checkpoint_step")
        if msg.get("job_id"):
            self.db.event("job_stopped", f"stopped at step {step}; resumes from there", msg["job_id"], t=now)

    def _job_over(self) -> None:
        self.job = None
        self.trainer_state = TrainerState.READY
        self._clear_progress()
        self.status.current_file = self.status.job_id = None
        if not self.stop_requested:
            self._set(ServiceStatus.IDLE, detail="waiting for files")

    def _fail(self, job_id: str, reason: FailReason, message: str, now: float, **details: Any) -> None:
        try:
            self.queue.fail(job_id, reason, message, now, **details)
        except QueueError as e:
            log.error("cannot move %s to failed/: %s", job_id, e)
        self.db.upsert_job(job_id, state=JobState.FAILED.value, finished_at=now, reason=f"{reason.value}: {message}")
        self.db.event("job_failed", f"{reason.value}: {message}", job_id, t=now)
        log.warning("%s -> failed/ (%s: %s)", job_id, reason.value, message)

    # -- control --------------------------------------------------------------------
    def _handle_control(self, now: float) -> None:
        desired = control.read_desired_state(self.cfg)
        if desired is not self.status.desired_state:
            log.info("desired state: %s", desired.value)
            self.status.desired_state = desired
            self.db.event("control", f"desired state {desired.value}", t=now)
        self._converge_pause(desired)
        for req in control.pending_requests(self.cfg):
            try:
                self._act(req, now)
            except QueueError as e:
                log.warning("request %s refused: %s", req.action.value, e)
                self.db.event("control_refused", f"{req.action.value} {req.job_id or ''}: {e}", req.job_id, t=now)
            control.consume(req)

    def _converge_pause(self, desired: DesiredState) -> None:
        """Bring the child and the status in line with the desired state.

        The child's own pause outlives a file (a skip while paused leaves it
        paused), so whether it is paused is tracked apart from the job.
        """
        connected = self.child is not None and self.child.connection is not None
        want_paused = desired is DesiredState.PAUSED
        if connected and self.trainer_state is not TrainerState.EXITING:
            if want_paused and self.job and not self.child_paused:
                self.child.send({"type": "pause"})
                self.child_paused = True
            elif not want_paused and self.child_paused:
                self.child.send({"type": "resume"})
                self.child_paused = False
        if self.job or self.stop_requested:
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
            if self.job and (req.job_id in (None, self.job["job_id"])):
                self.child.send({"type": "skip", "job_id": self.job["job_id"]})
            else:
                log.info("skip requested but no matching file is training")
        elif req.action is ControlAction.RETRY:
            prio = Priority(req.priority or Priority.NORMAL.value)
            entry = self.queue.retry(self.queue.find(req.job_id).job_id, prio, now)
            self.db.upsert_job(entry.job_id, state=JobState.PENDING.value, reason=None, priority=prio.value, crashes=0)
        elif req.action is ControlAction.REMOVE:
            entry = self.queue.find(req.job_id)
            if entry.state is not JobState.PENDING:
                raise QueueError(f"{entry.job_id} is {entry.state.value}; only pending files can be removed")
            self.queue.remove(entry.job_id, now)
            self.db.upsert_job(entry.job_id, state=JobState.FAILED.value, reason="removed")

    def _begin_stop(self, now: float, why: str) -> None:
        self.stop_requested = True
        self.stop_deadline = now + self.cfg.service.stop_timeout_seconds
        self._set(ServiceStatus.STOPPING, detail=f"stopping ({why})")
        self.db.event("stopping", f"stopping ({why})", t=now)
        if self.child is None or self.child.connection is None:
            if self.child is not None:  # still loading the model: nothing to checkpoint
                self.child.kill()
            self.exit_now = True
        elif self.job:
            self.child.send({"type": "stop"})
        else:
            self.child.send({"type": "shutdown"})
            self.trainer_state = TrainerState.EXITING

    def _maybe_finish_stop(self, now: float) -> None:
        if not self.stop_requested:
            return
        if self.child is None or self.child.exited() is not None:
            self.exit_now = True
        elif now > self.stop_deadline:
            log.error("trainer did not stop within %.0f s; killing it (it resumes from its last checkpoint)",
                      self.cfg.service.stop_timeout_seconds)
            self.child.kill()
            self.exit_now = True

    # -- intake and dispatch -------------------------------------------------------------
    def _intake(self, now: float) -> None:
        for path, prio in self.scanner.ready(now):
            self.scanner.forget(path)
            try:
                take_file(path, prio, now, self.cfg, self.queue, self.db)
            except Exception:  # a job boundary: record, keep the file, keep running
                log.error("could not take %s from the inbox:\n%s", path, traceback.format_exc())
                self.status.last_error = f"intake of {path.name} failed; see the daemon log"

    def _dispatch(self, now: float) -> None:
        if self.job or self.stop_requested or self.trainer_state is not TrainerState.READY:
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
        record = self.db.job(entry.job_id) or {}
        if not record.get("format") or not record.get("sha256"):  # a crash between admit and its record
            report = validate_file(entry.path, self.cfg.data, 0)
            record_job(self.db, entry, Priority.NORMAL, report, now, JobState.PROCESSING)
            record = self.db.job(entry.job_id)
        self.job = {"type": "train", "job_id": entry.job_id, "path": str(entry.path), "original_name": entry.original_name,
                    "sha256": record["sha256"], "format": record["format"], "n_records": record["n_records"]}
        self.child.send(self.job)
        self.trainer_state = TrainerState.BUSY
        self._clear_progress()
        self.status.current_file, self.status.job_id = entry.original_name, entry.job_id
        self._set(ServiceStatus.TRAINING, detail="preparing data")
        log.info("training %s", entry.job_id)

    # -- status ------------------------------------------------------------------------
    def _clear_progress(self) -> None:
        """Forget the figures of the previous file, so none is shown as the next one's."""
        st = self.status
        st.current_step = st.total_steps = 0
        st.epoch = 0.0
        st.loss = st.lr = st.tokens_per_sec = st.eta_seconds = st.eval_loss = None
        self._rate = None

    def _published_adapter_version(self) -> int | None:
        """The adapter version the trainer published last (read-only; the trainer owns adapters/)."""
        try:
            return int(atomic.read_json(self.cfg.path("adapters") / "current.json")["version"])
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return None

    def _set(self, status: ServiceStatus, detail: str | None = None, last_error: str | None = None) -> None:
        if status is not self.status.status:
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
        if self.status.status is not ServiceStatus.ERROR or self.db is not None:
            self.status.queue = self.queue.counts()
        self.writer.write(self.status, now)
        self.last_status_write = now
        self._dirty = False
