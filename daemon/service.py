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

from daemon import adapters, atomic, control, diskspace, lockedkeys, logs, rank_status
from daemon.config import Config, resolved_dict
from daemon.diskguard import DiskGuard, human_bytes
from daemon.diskspace import DiskFull
from daemon.errors import LockedKeyError, QueueError
from daemon.intake import InboxScanner, finish_duplicate, record_job, remove_file, retry_file, take_file
from daemon.jobqueue import ERROR_SUFFIX, JobQueue, QueueEntry, original_name
from daemon.dataset import DatasetLedger
from daemon.autogen import AutoGenerator
from daemon.notify import EVENT_OF, Notifier
from daemon.lock import acquire
from daemon.schema import TrainingStatus
from daemon.states import (SERVICE_TRANSITIONS, ControlAction, DesiredState, FailReason, JobState, PauseReason,
                           Priority, ServiceStatus, TrainerState, check_transition)
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
WRITTEN_FOLDERS = ("queue", "status", "adapters", "checkpoints", "logs")  # watched for free space




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
        self.rollback_pending: int | None = None  # the adapter version a rollback request asks for, until answered
        self.rollback_sent = False
        self.consolidation_pending: str | None = None  # a consolidation's description, until the trainer answers
        self.consolidation_sent = False
        self.consolidation_of: int | None = None
        self.stop_requested = False  # warm stop: checkpoint, then exit
        self.stop_deadline = 0.0
        self.exit_now = False
        self.signals = 0
        self.last_status_write = 0.0
        self._lock_fd: int | None = None
        self._locked_at = 0.0  # when run() took the instance lock
        self._dirty = True  # the status changed since it was last written
        self._intake_failures: dict[Path, tuple[int, int]] = {}  # path -> (size, mtime_ns) that failed
        self._log_drops = logs.DROPS["count"]
        self.disk = DiskGuard([cfg.path(n) for n in WRITTEN_FOLDERS], cfg.service.min_free_bytes,
                              cfg.service.disk_check_seconds)

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
        self.db.on_disk_full = lambda e: self._disk_error(e, self.cfg.path("status"), "history")
        self.tracker = JobTracker(self.cfg, self.queue, self.db, self.status)
        self.ledger = DatasetLedger(self.cfg.path("adapters"), self.db)
        self.notifier = Notifier(self.cfg)
        self.autogen = AutoGenerator(self.cfg)
        self.status.auto_generate = self.autogen.status() if self.cfg.auto_generate.enabled else None
        self.db.on_event = self._notify
        self.tracker.on_disk_full = lambda full: self._disk_full(full, self.clock())
        self.tracker.reconcile(self.clock())
        self.status.adapter_version = self.tracker.published()["version"]
        current = adapters.peek_current(self.cfg.path("adapters"))
        if current is not None and current.manifest.get("base_path"):  # a consolidated base is in use
            self.status.base_model = current.manifest["base_path"]
            self.status.generation = int(current.manifest.get("generation", 0))
        self.status.layer_activity_summary = self.tracker.last_activity()
        now = self.clock()
        self.status.started_at = now
        self.db.event("start", f"daemon started (pid {os.getpid()})", t=now)
        for entry in self.queue.processing():
            log.info("recovered %s from processing/: it resumes from its last checkpoint", entry.job_id)
        self._install_signals()
        self.wakeup.watch(self.cfg.path("inbox"), on_renamed_in=self.scanner.renamed_in)
        self._start_child(now)
        self._write_status(force=True)

    def _notify(self, kind: str, message: str, job_id: str | None, t: float) -> None:
        """Webhooks of a history event, with the file's record (name, steps, losses, reason)."""
        details: dict[str, Any] = {}
        if job_id and kind in EVENT_OF:
            record = self.db.job(job_id) or {}
            details = {k: record.get(k) for k in ("original_name", "steps", "final_loss", "eval_loss", "reason",
                                                  "adapter_version", "eval_set_before", "eval_set_after")}
            details["file"] = details.pop("original_name") or original_name(job_id)
        self.notifier.event(kind, message, job_id, t, details)

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
            if self._disk_error(e, None, "service"):
                return  # paused for disk; the next tick writes nothing until space is back
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
        self._check_disk(now)
        self._handle_control(now)
        self._intake(now)
        self._auto_generate(now)
        if self.disk.full is None:
            self.tracker.retry_deferred(now)  # moves a full disk refused (done/, failed/)
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
            dc = self.cfg.distributed
            # Several machines: the group starts only once every node has joined; say what it waits for.
            joining = (f"; the group starts once all {dc.nnodes} nodes have joined at {dc.master_addr}:{dc.master_port} "
                       "(`traind worker --node-rank N` on each other node)") if dc.nnodes > 1 else ""
            self._set(ServiceStatus.IDLE, detail="loading model" + joining)

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
        self.rollback_sent = self.consolidation_sent = False  # unanswered: the next child gets them again
        if self.sup.state is TrainerState.EXITING or self.stop_requested:
            self.sup.state = TrainerState.DOWN
            self.exit_now = self.exit_now or self.stop_requested
            return
        how = f"signal {-code}" if code < 0 else f"exit code {code}"
        before_ready = self.sup.state is TrainerState.STARTING
        backoff = self.sup.crashed(now, before_ready)
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
        if self.sup.cannot_start:
            self._set(ServiceStatus.ERROR, detail=f"the trainer cannot start; retrying in {backoff:.0f} s",
                      last_error=f"trainer failed to start {self.sup.start_failures} times in a row ({how}): "
                                 f"{hint or self.sup.last_error_hint()}")
        else:
            self._set(ServiceStatus.IDLE, detail=f"trainer restarting ({how})", last_error=f"trainer child died ({how})")

    def _on_message(self, msg: dict[str, Any], now: float) -> None:
        kind = msg.get("type")
        if kind == "failed" and msg.get("reason") == "guard":  # a guard stopped the file: nothing starts until a person looks
            control.set_desired_state(self.cfg, DesiredState.PAUSED, by="guard")
            self.db.event("guard", f"paused by a guard: {msg.get('message')}", msg.get("job_id"), t=now)
        if kind in JOB_MESSAGES:
            try:
                over = self.tracker.on_message(msg, now)
            except Exception:
                if self.tracker.job is None:  # the file ended even though recording it failed
                    self._job_over()
                raise
            if over:
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

    def _msg_loading(self, msg: dict, now: float) -> None:
        """Progress of a long load before `ready` (a GGUF base converted on first use): said in the status."""
        self.status.detail = f"loading model: {msg.get('detail')}"
        self._dirty = True

    def _msg_ready(self, msg: dict, now: float) -> None:
        self.sup.on_ready()
        for key in ("device", "compute_dtype", "quantization", "base_model", "generation", "adapter_version"):
            if msg.get(key) is not None:
                setattr(self.status, key, msg[key])
        self.status.world_size, self.status.distributed = rank_status.setup(msg)
        self.status.settings_notes = [*self.cfg.tuned, *(msg.get("notes") or [])]
        for note in self.status.settings_notes:
            log.info("setting: %s", note)
        log.info("trainer ready on %s (%s, %s) in %.1f s", msg.get("device"), msg.get("compute_dtype"),
                 msg.get("quantization"), msg.get("load_seconds") or 0)
        if self.status.distributed is not None:
            d = self.status.distributed
            log.info("trainer runs %d ranks (%s, %s, %d node(s))", self.status.world_size, d.strategy, d.backend, d.nnodes)
        if msg.get("eval_set_error"):  # training goes on without it; say why where people look
            self.status.last_error = msg["eval_set_error"]
            self.db.event("eval_set", msg["eval_set_error"], t=now)
        for job_id in self.deferred_skips:  # so it drops the checkpoints of files skipped while it was down
            self.sup.send({"type": "skip", "job_id": job_id})
        self.deferred_skips.clear()
        if not self.stop_requested:
            self._set(ServiceStatus.IDLE, detail="waiting for files")

    def _msg_paused(self, msg: dict, now: float) -> None:
        if self.tracker.job is not None and not self.stop_requested:
            self._set(ServiceStatus.PAUSED, detail=self.disk.detail() or "paused; the model stays loaded")

    def _msg_disk_full(self, msg: dict, now: float) -> None:
        """The child could not write (checkpoint, adapter) for lack of space; it holds until `resume`."""
        self.sup.paused = True  # it paused itself: the resume that ends the disk pause goes to it
        self._disk_full(DiskFull(msg.get("folder") or self.cfg.path("checkpoints"), msg.get("free_bytes"),
                                 msg.get("site") or "trainer", msg.get("message") or "no space left"), now)
        if self.tracker.job is not None and not self.stop_requested:
            self._set(ServiceStatus.PAUSED, detail=self.disk.detail())

    def _msg_resumed(self, msg: dict, now: float) -> None:
        if self.tracker.job is not None and not self.stop_requested:
            self._set(ServiceStatus.TRAINING, detail="training")

    def _msg_stopped(self, msg: dict, now: float) -> None:
        self.sup.state = TrainerState.EXITING
        if msg.get("job_id"):
            step = msg.get("checkpoint_step")
            self.db.event("job_stopped", f"stopped at step {step}; resumes from there", msg["job_id"], t=now)

    def _msg_rolled_back(self, msg: dict, now: float) -> None:
        self.rollback_pending = None
        self.status.adapter_version = msg["version"]
        undone = msg.get("undone") or []
        note = (f"; no longer in the adapter (not retrained; drop them again to train them): {', '.join(undone)}"
                if undone else "")
        interrupted = self._rollback_interrupted(msg, now)
        self.db.event("rollback", f"rolled back to adapter v{msg['rollback_of']} (published as v{msg['version']})"
                      f"{note}{interrupted}", t=now)
        log.info("rolled back to adapter v%s as v%s", msg["rollback_of"], msg["version"])

    def _msg_consolidated(self, msg: dict, now: float) -> None:
        self.consolidation_pending = self.consolidation_of = None
        self.status.base_model = msg["path"]
        self.status.generation = int(msg["generation"])
        self.status.adapter_version = msg["adapter_version"]
        self.db.event("consolidated", f"adapter v{msg['consolidated_version']} merged into generation "
                      f"{msg['generation']}'s base {msg['path']} ({msg['files']} file(s); max |logit diff| "
                      f"{msg['max_logit_diff']:.2e}; {msg['seconds']:.1f} s); training goes on with a fresh adapter "
                      f"v{msg['adapter_version']}: {msg['description']}", t=now)
        lockedkeys.note_consolidation(self.cfg, msg["path"], msg["generation"], now)
        log.info("consolidated into %s (generation %s)", msg["path"], msg["generation"])
        self._set(self.status.status, detail="waiting for files")

    def _msg_consolidation_refused(self, msg: dict, now: float) -> None:
        self.consolidation_pending = self.consolidation_of = None
        self.db.event("control_refused", f"consolidate: {msg.get('message')}", t=now)
        self.status.last_error = f"consolidation refused: {msg.get('message')}"
        log.warning("consolidation refused: %s", msg.get("message"))
        self._set(self.status.status, detail="waiting for files")

    def _msg_rollback_refused(self, msg: dict, now: float) -> None:
        self.rollback_pending = None
        interrupted = self._rollback_interrupted(msg, now)
        self.db.event("control_refused", f"rollback to v{msg.get('version')}: {msg.get('message')}{interrupted}", t=now)
        log.warning("rollback refused: %s", msg.get("message"))

    def _rollback_interrupted(self, msg: dict, now: float) -> str:
        """The file a rollback interrupted stays in processing/ and trains again from its start: its steps go."""
        job = self.tracker.job
        if job is None or msg.get("job_id") != job.job_id:
            return ""
        self.db.discard_steps(job.job_id)
        self.tracker.end()
        self._job_over()
        return f"; {job.original_name} was interrupted and trains again from its start"

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
        disk = self.disk.full is not None
        want_paused = desired is DesiredState.PAUSED or disk  # the disk pause is apart from the desired state
        reason = PauseReason.DISK_FULL if disk else PauseReason.USER if want_paused else None
        if (reason, self.disk.status()) != (self.status.pause_reason, self.status.disk_full):
            self.status.pause_reason, self.status.disk_full = reason, self.disk.status()
            self._dirty = True
        if self.sup.connected and self.sup.state is not TrainerState.EXITING:
            if want_paused and self.tracker.job:
                self.sup.pause()
            elif not want_paused:
                self.sup.resume()
        if self.stop_requested or self.status.status is ServiceStatus.ERROR:
            return
        if self.status.status is ServiceStatus.PAUSED and want_paused:
            held = "the model stays loaded" if self.tracker.job else "no file is started"
            detail = self.disk.detail() or f"paused; {held}"
            if detail != self.status.detail:
                self._set(ServiceStatus.PAUSED, detail=detail)
        if self.tracker.job:
            return
        if want_paused and self.status.status is ServiceStatus.IDLE:
            self._set(ServiceStatus.PAUSED, detail=self.disk.detail() or "paused; no file is started")
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
        elif req.action is ControlAction.CONSOLIDATE:
            if self.consolidation_pending is not None:
                raise QueueError("a consolidation is already on its way")
            self.consolidation_pending = req.description
            self.consolidation_sent = False
            self.db.event("consolidation", f"consolidation requested by {req.by}: {req.description} (at the next "
                          "boundary between files)", t=now)
        elif req.action is ControlAction.ROLLBACK:
            kept = {v.version for v in adapters.versions(self.cfg.path("adapters"))}
            if req.version not in kept:
                raise QueueError(f"there is no adapter v{req.version} to roll back to (kept: "
                                 f"{', '.join(f'v{v}' for v in sorted(kept)) or 'none'})")
            self.rollback_pending = req.version
            self.rollback_sent = False

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
        if self.disk.full is not None:
            return  # files wait in the inbox, untouched, until space is back
        for path, prio in self.scanner.ready(now):
            self.scanner.forget(path)
            ident = None
            try:
                st = path.stat()
                ident = (st.st_size, st.st_mtime_ns)
                if self._intake_failures.get(path) == ident:
                    continue  # failed before and unchanged since: once in the log is enough
                take_file(path, prio, now, self.cfg, self.queue, self.db, self.ledger)
                self._intake_failures.pop(path, None)
            except FileNotFoundError:
                continue  # taken away by its writer
            except Exception as e:  # a job boundary: record, keep the file, keep running
                if self._disk_error(e, self.cfg.path("queue"), "intake"):
                    log.warning("%s stays in the inbox until space is back (not the file's fault)", path.name)
                    return
                log.error("could not take %s from the inbox:\n%s", path, traceback.format_exc())
                self.status.last_error = f"intake of {path.name} failed; see the daemon log"
                self._intake_failures[path] = ident

    def _send_rollback(self) -> None:
        """A rollback goes to the trainer once it is up; no new file starts until it answers."""
        if self.rollback_pending is None or self.rollback_sent or self.stop_requested:
            return
        if self.sup.state in (TrainerState.READY, TrainerState.BUSY) and self.sup.send(
                {"type": "rollback", "version": self.rollback_pending}):
            self.rollback_sent = True

    def _send_consolidation(self) -> None:
        """Between files: no file is in training when the trainer merges; none starts until it answers."""
        if self.consolidation_pending is None or self.consolidation_sent or self.stop_requested or self.tracker.job:
            return
        if self.consolidation_of is None:  # the version merged; kept if the trainer dies and gets it again
            current = adapters.peek_current(self.cfg.path("adapters"))
            self.consolidation_of = current.version if current else None
        if self.sup.state is TrainerState.READY and self.sup.send(
                {"type": "consolidate", "description": self.consolidation_pending,
                 "adapter_version": self.consolidation_of}):
            self.consolidation_sent = True
            self._set(self.status.status, detail="consolidating the adapter into a new base")

    def _auto_generate(self, now: float) -> None:
        """Data when idle (daemon/autogen.py): the request runs in its own thread; this only looks and starts it."""
        if not self.cfg.auto_generate.enabled:
            return
        counts = self.queue.counts()
        empty = counts["pending"] + counts["processing"] == 0 and not self.scanner.waiting() and self.tracker.job is None
        paused = self.status.desired_state is DesiredState.PAUSED or self.disk.full is not None or self.stop_requested
        before = self.status.auto_generate or {}
        self.autogen.tick(now, empty, paused)
        after = self.autogen.status()  # the request's thread changes it too: compared with what the status shows
        if after != before:
            self.status.auto_generate = after
            self._dirty = True
            if after.get("last_error") and after.get("last_error") != before.get("last_error"):
                self.db.event("auto_generate", f"generator ({after['source']}) failed: {after['last_error']}", t=now)

    def _dispatch(self, now: float) -> None:
        self._send_rollback()
        self._send_consolidation()
        if self.rollback_pending is not None or self.consolidation_pending is not None:
            return
        if self.tracker.job or self.stop_requested or self.sup.state is not TrainerState.READY:
            return
        if self.disk.full is not None:
            return
        if self.status.desired_state is DesiredState.PAUSED:
            return
        # a crash or stop left it mid-way: resume it first (not one whose move to done/ or failed/ waits for space)
        leftovers = [e for e in self.queue.processing() if not self.tracker.pending_outcome(e.job_id)]
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
        earlier = None if record.get("forced") else self.ledger.earlier(record["sha256"])
        if earlier is not None and earlier["job_id"] != entry.job_id:  # its twin trained while it waited
            finish_duplicate(entry, earlier, now, self.queue, self.db)
            return None
        return ActiveJob(entry.job_id, str(entry.path), entry.original_name, record["sha256"], record["format"],
                         record["n_records"], self.db.steps_recorded_through(entry.job_id))

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
        try:
            self.writer.write(self.status, now)
        except Exception as e:  # the previous status file stays whole (atomic write)
            self.last_status_write = now  # tried again at the next interval, not at every tick
            if not self._disk_error(e, self.cfg.path("status"), "status"):
                raise
            return
        self.last_status_write = now
        self._dirty = False

    # -- disk space ------------------------------------------------------------------------
    def _check_disk(self, now: float) -> None:
        """Free space below the threshold pauses before a write fails; space back ends the pause."""
        if logs.DROPS["count"] != self._log_drops:  # the daemon log could not be written
            self._log_drops = logs.DROPS["count"]
            self._disk_full(DiskFull(logs.DROPS["path"], None, "log", logs.DROPS["error"]), now)
        was = self.disk.full
        change = self.disk.check(now)
        if change == "tripped":
            self._disk_full(self.disk.full, now, tripped=True)
        elif change == "cleared":
            log.info("disk space is back (%s free in %s); resuming", human_bytes(was.free_bytes), was.folder)
            self.db.event("disk_ok", f"space is back: {human_bytes(was.free_bytes)} free in {was.folder}; resuming",
                          self.tracker.job.job_id if self.tracker.job else None, t=now)
            self.db.flush()
            self._dirty = True
        elif was is not None:
            self._dirty = self._dirty or self.disk.status() != self.status.disk_full

    def _disk_error(self, e: BaseException, folder: Path | None, site: str) -> bool:
        """Pause for disk when `e` is a full disk (True); False for any other error."""
        full = diskspace.disk_full_from(e, folder, site)
        if full is None:
            return False
        if full.site == "service":  # an error out of the loop: name the site by the folder it was writing
            roles = {"queue": "queue", "status": "status", "adapters": "adapter", "checkpoints": "checkpoint", "logs": "log"}
            full.site = next((role for name, role in roles.items() if Path(full.folder).is_relative_to(self.cfg.path(name))),
                             "service")
        self._disk_full(full, self.clock())
        return True

    def _disk_full(self, full: DiskFull, now: float, tripped: bool = False) -> None:
        """Hold training (the child pauses at its next step) until space is back; the file is not at fault."""
        began = tripped or self.disk.trip(full, now)
        job = self.tracker.job.job_id if self.tracker and self.tracker.job else None
        if began:
            log.warning("%s", self.disk.detail())
            if self.db is not None:
                self.db.event("disk_full", self.disk.detail(), job, t=now)
        else:
            log.info("still no space: %s (next try in %.0f s)", full, max(0.0, self.disk.retry_at - now))
        self.status.last_error = f"disk full: {full.site} in {full.folder}: {full.message}"
        if self.tracker and self.tracker.job and self.sup.connected:
            self.sup.pause()
        self._converge_pause(self.status.desired_state)
        self._dirty = True
