"""The service: intake, queue, control and status around a supervised trainer child.

    python -m daemon --config config.json      # runs Service(cfg, config_path).run()

It never imports torch. One loop, read top to bottom in `tick()`: take what
the child said, act on control requests, take complete files from the inbox,
hand the next file to the child, write the status. The loop waits on the
child's socket and a wake-up socket (watchdog events, signals) with a timeout,
and always rescans the folders: events are hints, the folders are the truth.

What it keeps are facts (a stop asked for, the trainer's state and answers,
the file in training, the person's desired state, a disk hold); the status
is derived from them in one place (daemon/service/state.py). The trainer's
messages are typed (daemon/protocol.py) and dispatched on their type; the
rollback and consolidation requests wait for their answers in their own
object (lineage_requests.py); the disk holds are DiskGuard's (diskguard.py).
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

from daemon import adapters, atomic, control, diskspace, lockedkeys, logs, protocol
from daemon.config import Config, resolved_dict
from daemon.dataset import DatasetLedger
from daemon.diskspace import DiskFull
from daemon.errors import LockedKeyError, QueueError
from daemon.intake import remove_file, retry_file, take_file
from daemon.jobqueue import ERROR_SUFFIX, JobQueue, original_name
from daemon.lock import acquire
from daemon.schema import TrainingStatus
from daemon.service import rank_status, state
from daemon.service.autogen import AutoGenerator
from daemon.service.child import TrainerProcess
from daemon.service.diskguard import DiskGuard
from daemon.service.dispatch import job_for, next_entry
from daemon.service.inbox import InboxScanner
from daemon.service.lineage_requests import LineageRequests
from daemon.service.notify import EVENT_OF, Notifier
from daemon.service.supervisor import Supervisor
from daemon.service.tracker import JOB_MESSAGES, JobTracker, published_adapter
from daemon.service.wakeup import Wakeup
from daemon.states import (SERVICE_TRANSITIONS, ControlAction, DesiredState, FailReason, JobState, Priority,
                           ServiceStatus, TrainerState, check_transition)
from daemon.status import HISTORY_FILE, STATUS_FILE, HistoryDB, StatusWriter

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
        self.wakeup = Wakeup()
        self.sup = Supervisor(cfg.path("status") / RUNNING_CONFIG, cfg.path("logs"), self.wakeup.wake,
                              cfg.service.restart_backoff_seconds, spawn=spawn)
        self.requests = LineageRequests(cfg)
        self.disk = DiskGuard([cfg.path(n) for n in WRITTEN_FOLDERS], cfg.service.min_free_bytes,
                              cfg.service.disk_check_seconds, roles={cfg.path(n): r for n, r in WRITTEN_FOLDERS.items()},
                              on_event=self._disk_event)
        self.db: HistoryDB | None = None
        self.tracker: JobTracker | None = None  # made with the db, at start-up
        self.deferred_skips: list[str] = []  # skips of files left by a dead child, told to the next one
        # facts the status is derived from (daemon/service/state.py)
        self.stopping: str | None = None  # why a warm stop (checkpoint, then exit) was asked for
        self.trainer_holds = False  # the trainer confirmed it holds between steps (paused, disk_full)
        self.restarting: str | None = None  # the trainer died; what the status says until the next one is up
        self.cannot_start: str | None = None  # it failed to start several times in a row: what the status says
        self.loading: str | None = None  # what the trainer said it is doing before `ready` (converting a GGUF)
        self.stop_deadline = 0.0
        self.exit_now = False
        self.signals = 0
        self.last_status_write = 0.0
        self._lock_fd: int | None = None
        self._locked_at = 0.0  # when run() took the instance lock
        self._dirty = True  # the status changed since it was last written
        self._intake_failures: dict[Path, tuple[int, int] | None] = {}  # path -> (size, mtime_ns) that failed
        self._log_drops = logs.DROPS["count"]

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
                self._show(ServiceStatus.ERROR, "refused to start: locked keys changed")
                self.status.last_error = str(err)
                self._write_status(force=True)
                log.error("%s", err)
                print(f"traind: {err}", file=sys.stderr)
                return EXIT_LOCKED_KEYS
            self.start()
            self._install_signals()
            while not self.exit_now:
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
                self._show(ServiceStatus.STOPPED, "stopped" + note)
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
        self._handle_signals(now)
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
        self._maybe_finish_stop(now)
        self._refresh_status()
        self._write_status()

    def _handle_signals(self, now: float) -> None:
        if self.signals >= 2 and not self.exit_now:
            log.warning("second stop signal: stopping now without a checkpoint (resumes from the last one)")
            self.sup.kill()
            self.exit_now = True
        elif self.signals == 1 and self.stopping is None:
            log.info("stop signal: checkpointing, then exiting (send it again to stop at once)")
            self._begin_stop(now, "signal")
        if control.emergency_stop_requested(self.cfg):
            control.emergency_stop_path(self.cfg).unlink(missing_ok=True)
            if self.stopping is None:
                log.warning(".stop found: emergency stop (checkpoint, then exit)")
                self._begin_stop(now, ".stop file")

    # -- the child ------------------------------------------------------------------
    def _start_child(self, now: float) -> None:
        self.sup.start(now)
        self.loading = None
        self.status.trainer_pid = self.sup.pid
        self.trainer_holds = False

    def _handle_child(self, now: float) -> None:
        messages, code = self.sup.poll(now)
        for msg in messages:
            self._on_message(msg, now)
        if code is not None:
            self._on_child_exit(code, now)
        if self.sup.due(now) and self.stopping is None:
            self._start_child(now)

    def _on_child_exit(self, code: int, now: float) -> None:
        self.status.trainer_pid = None
        self.trainer_holds = False
        self.requests.trainer_gone()  # unanswered: the next child gets them again
        if self.sup.refusal is not None:  # not a crash: the config cannot run here; nothing restarts it
            self.sup.state = TrainerState.REFUSED
            if self.tracker.job is not None:  # it stays in processing/ and resumes once the config is mended
                self.tracker.end()
            self.exit_now = self.exit_now or self.stopping is not None
            return
        if self.sup.state is TrainerState.EXITING or self.stopping is not None:
            self.sup.state = TrainerState.DOWN
            self.exit_now = self.exit_now or self.stopping is not None
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
            self.cannot_start = f"the trainer cannot start; retrying in {backoff:.0f} s"
            self.status.last_error = (f"trainer failed to start {self.sup.start_failures} times in a row ({how}): "
                                      f"{hint or self.sup.last_error_hint()}")
        else:
            self.restarting = f"trainer restarting ({how})"
            self.status.last_error = f"trainer child died ({how})"

    def _on_message(self, msg: protocol.Message, now: float) -> None:
        """What the trainer said: dispatched on its type."""
        if isinstance(msg, JOB_MESSAGES):
            self._on_job_message(msg, now)
            return
        match msg:
            case protocol.Loading():  # a long load before `ready` (a GGUF base converted on first use)
                self.loading = msg.detail
            case protocol.Ready():
                self._on_ready(msg, now)
            case protocol.ConfigRefused():
                self._on_config_refused(msg, now)
            case protocol.Paused():
                self.trainer_holds = True
            case protocol.Resumed():
                self.trainer_holds = False
            case protocol.DiskFullReport():  # it holds until `resume` (the resume ending the hold goes to it)
                self.sup.paused = self.trainer_holds = True
                self._hold_for_disk(DiskFull(msg.folder, msg.free_bytes, msg.site, msg.message, kind=msg.kind), now)
            case protocol.Stopped():
                self.sup.state = TrainerState.EXITING
                if msg.job_id:
                    self.db.event("job_stopped", f"stopped at step {msg.checkpoint_step}; resumes from there",
                                  msg.job_id, t=now)
            case protocol.RolledBack() | protocol.RollbackRefused() | protocol.Consolidated() | \
                    protocol.ConsolidationRefused():
                self._on_lineage_answer(msg, now)
            case _:
                log.warning("no handler for a %s message from the trainer", msg.TYPE)

    def _on_job_message(self, msg: protocol.Message, now: float) -> None:
        if isinstance(msg, protocol.Failed) and msg.reason == "guard":  # nothing starts until a person looks
            control.set_desired_state(self.cfg, DesiredState.PAUSED, by="guard")
            self.db.event("guard", f"paused by a guard: {msg.message}", msg.job_id, t=now)
        try:
            over = self.tracker.on_message(msg, now)
        finally:  # the file ended even if recording it failed
            if self.tracker.job is None:
                self._job_over()
        if isinstance(msg, protocol.Step) and not over:
            self.sup.on_step()
            if self.clock() - self.last_status_write >= 0.5:  # live enough for a person, cheap for the disk
                self._dirty = True

    def _on_ready(self, msg: protocol.Ready, now: float) -> None:
        self.sup.on_ready()
        self.restarting = self.cannot_start = None
        s = self.status
        s.device, s.compute_dtype, s.quantization, s.base_model = (msg.device, msg.compute_dtype, msg.quantization,
                                                                   msg.base_model)
        s.adapter_version = msg.adapter_version if msg.adapter_version is not None else s.adapter_version
        s.generation, self.loading = msg.generation, None
        s.settings_notes = [*self.cfg.tuned, *msg.notes]
        for note in s.settings_notes:
            log.info("setting: %s", note)
        s.world_size, s.distributed = rank_status.setup(msg)
        log.info("trainer ready on %s (%s, %s) in %.1f s", msg.device, msg.compute_dtype, msg.quantization,
                 msg.load_seconds)
        if s.distributed is not None:
            d = s.distributed
            log.info("trainer runs %d ranks (%s, %s, %d node(s))", s.world_size, d.strategy, d.backend, d.nnodes)
        if msg.eval_set_error:  # training goes on without it; say why where people look
            s.last_error = msg.eval_set_error
            self.db.event("eval_set", msg.eval_set_error, t=now)
        for job_id in self.deferred_skips:  # so it drops the checkpoints of files skipped while it was down
            self.sup.send(protocol.Skip(job_id=job_id))
        self.deferred_skips.clear()

    def _on_config_refused(self, msg: protocol.ConfigRefused, now: float) -> None:
        """The trainer found the config cannot run on this machine: hold the queue and say every reason."""
        self.sup.on_refused(msg.problems)
        listed = "; ".join(f"({i}) {p}" for i, p in enumerate(msg.problems, 1))
        message = f"the config cannot run on this machine: {listed}"
        log.error("%s; no file is trained until config.json is mended and the daemon restarted", message)
        self.db.event("config_refused", message, msg.job_id, t=now)
        self.status.last_error = message

    def _on_lineage_answer(self, msg: protocol.Message, now: float) -> None:
        """The trainer's answer to a rollback or a consolidation (daemon/service/lineage_requests.py)."""
        self.requests.answered(msg)
        match msg:
            case protocol.RolledBack():
                self.status.adapter_version = msg.version
                note = (f"; no longer in the adapter (not retrained; drop them again to train them): "
                        f"{', '.join(msg.undone)}" if msg.undone else "")
                self.db.event("rollback", f"rolled back to adapter v{msg.rollback_of} (published as v{msg.version})"
                              f"{note}{self._rollback_interrupted(msg.job_id, refused=False)}", t=now)
                log.info("rolled back to adapter v%s as v%s", msg.rollback_of, msg.version)
            case protocol.RollbackRefused():
                self.db.event("control_refused", f"rollback to v{msg.version}: {msg.message}"
                              f"{self._rollback_interrupted(msg.job_id, refused=True)}", t=now)
                log.warning("rollback refused: %s", msg.message)
            case protocol.Consolidated():
                self.status.base_model, self.status.adapter_version = msg.path, msg.adapter_version
                self.status.generation = msg.generation
                self.db.event("consolidated", f"adapter v{msg.consolidated_version} merged into generation "
                              f"{msg.generation}'s base {msg.path} ({msg.files} file(s); max |logit diff| "
                              f"{msg.max_logit_diff:.2e}; {msg.seconds:.1f} s); training goes on with a fresh "
                              f"adapter v{msg.adapter_version}: {msg.description}", t=now)
                lockedkeys.note_consolidation(self.cfg, msg.path, msg.generation, now)
                log.info("consolidated into %s (generation %s)", msg.path, msg.generation)
            case protocol.ConsolidationRefused():
                self.db.event("control_refused", f"consolidate: {msg.message}", t=now)
                self.status.last_error = f"consolidation refused: {msg.message}"
                log.warning("consolidation refused: %s", msg.message)

    def _rollback_interrupted(self, job_id: str | None, refused: bool) -> str:
        """The file a rollback interrupted stays in processing/ and trains again from its start: its steps go.
        (The trainer refuses before it interrupts; should a refusal come after, the file kept its checkpoints.)"""
        job = self.tracker.job
        if job is None or job_id != job.job_id:
            return ""
        if not refused:
            self.db.discard_steps(job.job_id)
        self.tracker.end()
        self._job_over()
        how = "resumes from its last checkpoint" if refused else "trains again from its start"
        return f"; {job.original_name} was interrupted and {how}"

    def _job_over(self) -> None:
        if self.sup.state is TrainerState.BUSY:
            self.sup.state = TrainerState.READY

    # -- control --------------------------------------------------------------------
    def _handle_control(self, now: float) -> None:
        desired = control.read_desired_state(self.cfg)
        if desired is not self.status.desired_state:
            log.info("desired state: %s", desired.value)
            self.status.desired_state = desired
            self.db.event("control", f"desired state {desired.value}", t=now)
        self._steer_trainer()
        self._drop_old_stops_and_skips(now)
        for req in control.pending_requests(self.cfg):
            control.consume(req)  # first: a request that cannot be carried out must not come back
            try:
                self._act(req, now)
            except QueueError as e:
                log.warning("request %s refused: %s", req.action.value, e)
                self.db.event("control_refused", f"{req.action.value}{f' {req.job_id}' if req.job_id else ''}: {e}",
                              req.job_id, t=now)

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
            self.requests.ask_consolidation(req.description or "", job_in_training=self.tracker.job is not None)
            self.db.event("consolidation", f"consolidation requested by {req.by}: {req.description} (at the next "
                          "boundary between files)", t=now)
        elif req.action is ControlAction.ROLLBACK:
            self.requests.ask_rollback(req.version)

    def _skip(self, job_id: str | None, now: float) -> None:
        job = self.tracker.job
        if job is not None:
            if job_id not in (None, job.job_id):
                raise QueueError(f"{job_id} is not the file in training ({job.job_id} is)")
            self.sup.send(protocol.Skip(job_id=job.job_id))
            return
        left = [e for e in self.queue.processing() if job_id in (None, e.job_id)]
        if not left:
            raise QueueError("no file is training")
        # Its trainer died: fail it here; the next child drops its checkpoints.
        self.tracker.fail(left[0].job_id, FailReason.SKIPPED, "skipped by request while the trainer was restarting; "
                          "the adapter keeps nothing from this file", now)
        self.deferred_skips.append(left[0].job_id)

    def _begin_stop(self, now: float, why: str) -> None:
        self.stopping = why
        self.stop_deadline = now + self.cfg.service.stop_timeout_seconds
        self.db.event("stopping", f"stopping ({why})", t=now)
        if self.sup.child is None:
            self.exit_now = True
        elif self.tracker.job and self.sup.connected:
            self.sup.send(protocol.Stop())
        else:
            self.sup.exit()

    def _maybe_finish_stop(self, now: float) -> None:
        if self.stopping is None:
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
                self.scanner.taken(path, now)
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

    def _auto_generate(self, now: float) -> None:
        """Data when idle (daemon/service/autogen.py): the request runs in its own thread; this only looks and starts it."""
        if not self.cfg.auto_generate.enabled:
            return
        counts = self.queue.counts()
        empty = counts["pending"] + counts["processing"] == 0 and not self.scanner.waiting() and self.tracker.job is None
        paused = self._want_paused() or self.stopping is not None
        before = self.status.auto_generate or {}
        self.autogen.tick(now, empty, paused)
        after = self.autogen.status()  # the request's thread changes it too: compared with what the status shows
        if after != before:
            self.status.auto_generate = after
            self._dirty = True
            if after.get("last_error") and after.get("last_error") != before.get("last_error"):
                self.db.event("auto_generate", f"generator ({after['source']}) failed: {after['last_error']}", t=now)

    def _dispatch(self, now: float) -> None:
        for msg in self.requests.due(self.sup.state, self.tracker.job is not None, self.stopping is not None):
            if self.sup.send(msg):
                self.requests.sent(msg)
        if self.requests.blocking or self.tracker.job or self.stopping is not None:
            return
        if self.sup.state is not TrainerState.READY or self._want_paused():
            return
        entry = next_entry(self.queue, self.tracker)
        if entry is None:
            return
        job = job_for(entry, now, self.cfg, self.queue, self.db, self.ledger, self.tracker)
        if job is None:  # refused on the spot; the next tick takes the next file
            self.wakeup.wake()
            return
        self.tracker.begin(job)
        self.sup.send(protocol.Train(job=job))
        self.sup.state = TrainerState.BUSY
        log.info("training %s", entry.job_id)

    # -- status ------------------------------------------------------------------------
    def facts(self) -> state.Facts:
        dc = self.cfg.distributed
        # Several machines: the group starts only once every node has joined; say what it waits for.
        joining = (f"; the group starts once all {dc.nnodes} nodes have joined at {dc.master_addr}:{dc.master_port} "
                   "(`traind worker --node-rank N` on each other node)") if dc.nnodes > 1 else ""
        return state.Facts(
            stopping=self.stopping, refusal="; ".join(self.sup.refusal) if self.sup.refusal is not None else None,
            trainer=self.sup.state, cannot_start=self.cannot_start if self.sup.cannot_start else None,
            restarting=self.restarting, joining=joining, loading=self.loading, job=self.tracker is not None and self.tracker.job is not None,
            started=self.tracker is not None and self.tracker.started, holds=self.trainer_holds,
            paused_by_user=self.status.desired_state is DesiredState.PAUSED, disk=self.disk.reason(),
            disk_detail=self.disk.detail(), consolidating=self.requests.consolidating)

    def _refresh_status(self) -> None:
        """The status, its detail and why it is held, as the facts say (daemon/service/state.py)."""
        facts = self.facts()
        status, detail = state.derive(facts)
        self._show(status, detail)
        held = (state.pause_reason(facts), self.disk.status())
        if held != (self.status.pause_reason, self.status.disk_full):
            self.status.pause_reason, self.status.disk_full = held
            self._dirty = True

    def _show(self, status: ServiceStatus, detail: str) -> None:
        if status is not self.status.status:
            try:
                check_transition(SERVICE_TRANSITIONS, self.status.status, status)
            except ValueError as e:  # a bug, not a reason to stop training: say it loudly
                log.error("status %s (allowed anyway)", e)
            log.info("status %s -> %s", self.status.status.value, status.value)
            if status is ServiceStatus.PAUSED:  # no throughput while held, and no time left to tell
                self.status.eta_seconds = self.status.tokens_per_sec = None
                if self.tracker is not None:
                    self.tracker.restart_rate()
            self.status.status = status
            self._dirty = True
        if detail != self.status.detail:
            self.status.detail = detail
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
            self._refresh_status()
            if not (self.disk.full is not None and self.writer.release_reserve()):
                return
            try:  # held now: say why, in the room kept for it
                self.writer.write(self.status, now)
            except Exception as again:
                log.debug("the held status could not be written either: %s", again)
                return
        self.last_status_write = now
        self._dirty = False

    # -- disk space ------------------------------------------------------------------------
    def _check_disk(self, now: float) -> None:
        """Free space below the threshold holds before a write fails; space back ends the hold."""
        if logs.DROPS["count"] != self._log_drops:  # the daemon log could not be written
            self._log_drops = logs.DROPS["count"]
            self._hold_for_disk(DiskFull(logs.DROPS["path"], None, "log", logs.DROPS["error"]), now)
        change = self.disk.tick(now)
        if change == "tripped":
            self._hold_for_disk(self.disk.full, now)
        elif change == "cleared":
            self.writer.ensure_reserve()
            self.db.flush()
            self._dirty = True
        elif self.disk.full is not None:
            self._dirty = self._dirty or self.disk.status() != self.status.disk_full

    def _disk_error(self, e: BaseException, folder: Path | None, site: str) -> bool:
        """Hold for disk when `e` is a write refused for the folder's sake (True); False for any other error."""
        full = self.disk.failed_write(e, folder, site, self.clock())
        if full is None:
            return False
        self._after_hold(full)
        return True

    def _hold_for_disk(self, full: DiskFull, now: float) -> None:
        """Hold training (the child pauses at its next step) until space is back; the file is not at fault."""
        self.disk.hold(full, now)
        self._after_hold(full)

    def _after_hold(self, full: DiskFull) -> None:
        self.status.last_error = self.disk.last_error()
        if self.tracker is not None and self.tracker.job and self.sup.connected:
            self.sup.pause()
        self._dirty = True

    def _disk_event(self, kind: str, message: str) -> None:
        if self.db is not None:
            job = self.tracker.job.job_id if self.tracker and self.tracker.job else None
            self.db.event(kind, message, job, t=self.clock())
