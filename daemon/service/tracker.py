"""What happens to the file in training: its progress, its outcome, its records.

    tracker = JobTracker(cfg, queue, db, status)
    tracker.begin(job)                   # the service handed `job` to the child
    tracker.on_message(msg, now)         # a typed job message (daemon.protocol): started, step, ... done
    tracker.crashed(how, now)            # the child died while training it

The one place that turns the trainer's reports into queue moves (done/ or
failed/), job records and events in the history, and the live figures of the
status. Messages about another file than the current one are late answers
(a skip that crossed the file's end) and are ignored: the folders already say
what happened to that file.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable

from daemon import activity_summary, adapters, forgetting_view, protocol
from daemon.protocol import Job
from daemon.service import rank_status
from daemon.config import Config
from daemon.diskspace import DiskFull, disk_full_from
from daemon.errors import QueueError
from daemon.service.finished import FinishedWatch, check_finished
from daemon.intake import record_job
from daemon.jobqueue import JobQueue, QueueEntry, original_name
from daemon.schema import LayerActivitySummary, TrainingStatus
from daemon.states import FailReason, JobState, Priority
from daemon.history_db import HistoryDB
from daemon.validate import validate_file

log = logging.getLogger(__name__)

SKIPPED_MESSAGE = "skipped by request; the adapter was restored to its state before this file"
JOB_MESSAGES = (protocol.Started, protocol.Step, protocol.StepsAgain, protocol.Eval, protocol.Activity,
                protocol.Checkpoint, protocol.Done, protocol.Failed, protocol.Skipped)  # what the tracker handles
JOB_ENDS = (protocol.Done, protocol.Failed, protocol.Skipped)


class JobTracker:
    def __init__(self, cfg: Config, queue: JobQueue, db: HistoryDB, status: TrainingStatus) -> None:
        self.cfg, self.queue, self.db, self.status = cfg, queue, db, status
        self.job: Job | None = None
        self.started = False  # the trainer said `started` for the file in training (its data is read)
        self._rate: tuple[float, int] | None = None  # (time, step) of the first step seen this run
        self.on_disk_full: Callable[[DiskFull], None] | None = None  # the service's disk pause
        # Queue moves a full disk refused: (JobQueue method, job_id, args), made again once space is back,
        # so a file done or failed while the disk was full ends where it should, and is never trained again.
        self.deferred: list[tuple[str, str, tuple]] = []
        self.finished_watch = FinishedWatch(every_seconds=cfg.intake.scan_interval_seconds)
        self.vanished: dict[str, str] = {}  # job_id -> why: its file left processing/ by another hand than ours
        self.status.forgetting = self.last_forgetting()  # what the last scoring found, said again after a restart

    # -- life of the current file ------------------------------------------------------
    def begin(self, job: Job) -> None:
        self.job = job
        self.clear_fields()
        self.status.current_file, self.status.job_id = job.original_name, job.job_id

    def end(self) -> None:
        self.job = None
        self.clear_fields()

    def on_message(self, msg: protocol.Message, now: float) -> bool:
        """Apply a job message; True when it ended the file (done, failed, skipped)."""
        job_id = getattr(msg, "job_id", None)
        if self.job is None or job_id != self.job.job_id:
            log.info("ignoring %s about %s: not the file in training", msg.TYPE, job_id)
            return False
        ends = isinstance(msg, JOB_ENDS)
        try:
            self._apply(msg, now)
        finally:  # even if recording it failed: the child has left the file
            if ends:
                self.end()
        return ends

    def _apply(self, msg: protocol.Message, now: float) -> None:
        match msg:
            case protocol.Started():
                self._on_started(msg, now)
            case protocol.Step():
                self._on_step(msg, now)
            case protocol.StepsAgain():
                # the step reports a resumed checkpoint kept (since the one before it): recorded again, as they
                # were (only the missing ones), in case this service or an earlier one died before recording them
                self.db.record_missed_steps(msg.job_id, msg.steps, now)
            case protocol.Eval():
                self.status.eval_loss = msg.eval_loss
                if msg.preference is not None:  # step 0: the file's start; later: its last eval
                    key = "before" if msg.step == 0 else "held_out"
                    self.status.preference = {**(self.status.preference or {}), key: msg.preference}
                self.db.record_eval(msg.job_id, msg.step, msg.global_step, msg.eval_loss, now, msg.preference)
            case protocol.Activity():
                self._on_activity(msg, now)
            case protocol.Checkpoint():
                log.debug("checkpoint of %s at step %s", msg.job_id, msg.step)
            case protocol.Done():
                self.finish(msg.job_id, now, msg)
            case protocol.Failed():
                self._on_failed(msg, now)
            case protocol.Skipped():
                self._on_skipped(msg, now)
            case _:
                raise TypeError(f"not a job message: {msg.TYPE}")

    def _on_started(self, msg: protocol.Started, now: float) -> None:
        self.started = True
        job_id, resumed = msg.job_id, msg.resumed_from_step
        self.status.total_steps = msg.total_steps
        self.status.current_step = resumed
        self._rate = None
        self.db.forget_steps_after(job_id, resumed)  # they are trained again; keep what the adapter keeps
        self.db.upsert_job(job_id, total_steps=self.status.total_steps, started_at=now, state=JobState.PROCESSING.value)
        note = f" (resumed from step {resumed})" if resumed else ""
        self.db.event("job_started", f"training {self.job.original_name}{note}", job_id, t=now)

    def _on_step(self, msg: protocol.Step, now: float) -> None:
        st = self.status
        st.current_step, st.total_steps = msg.step, msg.total_steps or st.total_steps
        st.global_step, st.epoch = msg.global_step, msg.epoch
        st.loss, st.lr, st.tokens_per_sec = msg.loss, msg.lr, msg.tokens_per_sec
        if msg.world_size:
            st.world_size = msg.world_size
        st.ranks, st.slowest_rank = rank_status.figures(msg.ranks)
        split = msg.micro_batch_split
        if split != st.micro_batch_split:
            if split > st.micro_batch_split:
                self.db.event("oom", f"out of memory at step {msg.step}: each micro-batch now runs in {split} "
                                     "pieces (the effective batch is unchanged)", msg.job_id, t=now)
            st.micro_batch_split = split
        if self._rate is None:
            self._rate = (now, st.current_step)
        t0, s0 = self._rate
        if st.current_step > s0 and now > t0:
            st.eta_seconds = (st.total_steps - st.current_step) * (now - t0) / (st.current_step - s0)
        if msg.reward_accuracy is not None:
            st.preference = {**(st.preference or {}), "reward_accuracy": msg.reward_accuracy,
                             "reward_margin": msg.reward_margin}
        self.db.record_step(msg.job_id, msg.step, st.global_step, st.epoch, st.loss, st.lr, msg.grad_norm,
                            st.tokens_per_sec, now, msg.reward_accuracy, msg.reward_margin)

    def _on_activity(self, msg: protocol.Activity, now: float) -> None:
        wire = msg.to_wire()
        self.status.layer_activity_summary = activity_summary.summary(wire, now)
        self.db.record_activity(msg.job_id, msg.step, msg.global_step, now, msg.final, msg.layers, msg.kinds,
                                activity_summary.per_layer(wire, activity_summary.HISTORY_MEASURES), msg.values)

    def _on_failed(self, msg: protocol.Failed, now: float) -> None:
        if msg.forgetting is not None:
            self.record_forgetting(msg.forgetting, "failed", now, None)
        if msg.job_id in self.vanished:  # it failed for want of its file (a new pass found it gone)
            self.fail(msg.job_id, FailReason.REMOVED, self.vanished.pop(msg.job_id), now)
            return
        reason = {"invalid_data": FailReason.INVALID_DATA, "guard": FailReason.GUARD,
                  "forgetting": FailReason.FORGETTING}.get(msg.reason,
                                                                                         FailReason.TRAINING_ERROR)
        self.status.last_error = msg.message
        self.fail(msg.job_id, reason, msg.message or "training failed", now, errors=msg.errors, traceback=msg.traceback)

    def _on_skipped(self, msg: protocol.Skipped, now: float) -> None:
        if msg.job_id in self.vanished:
            self.fail(msg.job_id, FailReason.REMOVED, self.vanished.pop(msg.job_id), now)
            return
        self.fail(msg.job_id, FailReason.SKIPPED, SKIPPED_MESSAGE, now, steps_discarded=msg.steps_discarded)

    def file_vanished(self, now: float) -> bool:
        """Whether the file in training has just been found gone from processing/ (deleted or moved by hand):
        then it must not train on, nor publish a version no queue entry stands for. True once per file."""
        job = self.job
        if job is None or job.job_id in self.vanished or Path(job.path).exists():
            return False
        message = (f"{job.original_name} was removed from queue/processing/ while it trained (not by traind); "
                   "training stopped and the adapter keeps nothing from it")
        self.vanished[job.job_id] = message
        log.warning("%s", message)
        self.db.event("job_removed", message, job.job_id, t=now)
        self.status.last_error = message
        return True

    def crashed(self, how: str, now: float, count: bool = True) -> None:
        """The child died while training the current file: count it, maybe give up on the file.

        `count=False`: it died while the disk was full, which is not the file's fault."""
        job_id = self.job.job_id
        self.end()
        published = self.published()
        if job_id in published["trained_jobs"]:  # it died after publishing: the file is learnt
            self.finish(job_id, now, None, published["version"])
            return
        if not count:
            log.info("%s stays in processing/ and resumes from its last checkpoint (the trainer died while the "
                     "disk was full: not counted against the file)", job_id)
            return
        crashes = self.db.add_crash(job_id)
        if crashes >= self.cfg.service.max_crashes_per_file:
            self.fail(job_id, FailReason.CRASHED, f"the trainer died {crashes} times on this file (last: {how})", now)
        else:
            log.info("%s stays in processing/ and resumes from its last checkpoint (crash %d of %d)",
                     job_id, crashes, self.cfg.service.max_crashes_per_file)

    # -- outcomes ------------------------------------------------------------------------
    def finish(self, job_id: str, now: float, msg: protocol.Done | None, version: int | None = None) -> None:
        """The file is learnt: to done/, with its record. `msg` None: the trainer died after it published
        `version` (the figures are taken from that version's manifest and step log)."""
        version = msg.adapter_version if msg is not None else version
        # The record first, the move to done/ last: whoever sees the file in done/ (a script, `trainctl`, a test)
        # then finds its record complete. A service killed in between leaves a file recorded done in processing/,
        # which the next start finishes without training it again (the published adapter learnt it).
        self._record_missed_steps(job_id, now)
        if msg is not None and msg.forgetting is not None:
            self.record_forgetting(msg.forgetting, "done", now, version)
        moved = (msg.activity_moved if msg is not None else None) or self._moved_from_manifest(job_id)
        ev = (msg.eval_set if msg is not None else None) or {}
        figures = {"steps": msg.steps, "final_loss": msg.final_loss, "eval_loss": msg.eval_loss} if msg else {}
        self.db.upsert_job(job_id, state=JobState.DONE.value, finished_at=now, adapter_version=version, **figures,
                           **({"eval_set_before": ev.get("before"), "eval_set_after": ev.get("after"),
                               "end_global_step": msg.global_step} if ev else {}),
                           **({"activity": activity_summary.file_moved(moved)} if moved else {}),
                           **({"replay": json.dumps(msg.replay)} if msg is not None and msg.replay else {}),
                           **({"preference": json.dumps(msg.preference)} if msg is not None and msg.preference else {}))
        again = (" (already trained before a restart; not trained again)"
                 if msg is None or msg.already_trained else "")
        self.db.event("job_done", f"done: {original_name(job_id)}{again}", job_id, t=now)
        try:
            entry = self._move("finish", job_id)
        except QueueError as e:
            why = self.vanished.pop(job_id, None)
            log.error("finished %s but cannot move it to done/: %s", job_id, why or e)
            if why:
                self.db.event("job_removed", f"{original_name(job_id)} finished before the removal was acted on: the "
                              f"adapter (v{version}) learnt it, but no copy of it is in done/", job_id, t=now)
        else:
            if entry is not None:
                self._check_finished(entry, now)
        if version is not None:
            self.status.adapter_version = version
        # A file trained through since: an old error no longer describes the daemon (the events keep it).
        self.status.last_error = None

    def on_held(self, msg: protocol.Held, now: float) -> None:
        """The forgetting gate held the file's version aside: its report is recorded (the file stays in training
        until `accept` or `reject`; the service pauses)."""
        self.record_forgetting(msg.forgetting, "held", now, msg.version)

    def record_forgetting(self, report: dict, outcome: str, now: float, version: int | None) -> None:
        """A forgetting report into the history and the status; `version`: the one the message published or held
        (the report, scored before it was published, may not know it). One that cannot be read is said in the
        events and the log: the file's outcome stands."""
        if isinstance(report, dict) and report.get("version") is None and version is not None:
            report = {**report, "version": version}
        try:
            self.db.record_forgetting(report, outcome, now)
        except (ValueError, TypeError) as e:
            job_id = report.get("job_id") if isinstance(report, dict) else None
            log.error("forgetting report of %s not recorded: %s", job_id, e)
            self.db.event("forgetting_report", f"not recorded: {e}", job_id, t=now)
            return
        self.status.forgetting = forgetting_view.summary(report, outcome)

    def last_forgetting(self) -> dict | None:
        """The status block of the newest forgetting report in the history."""
        row = self.db.conn.execute("SELECT job_id, outcome FROM forgetting_files ORDER BY t DESC LIMIT 1").fetchone()
        report = forgetting_view.report_of(self.db.conn, row[0]) if row else None
        return forgetting_view.summary(report, row[1]) if report else None

    def _check_finished(self, entry: QueueEntry, now: float) -> None:
        """The bytes again, before the file is recorded done: a writer that kept it open past the settle window
        (one traind cannot see) wrote on while it trained. And if a process holds it open still, it is watched."""
        record = self.db.job(entry.job_id) or {}
        changed = check_finished(entry.path, record.get("size"), record.get("sha256"), record.get("queued_at"))
        if changed is not None:
            message = (f"{entry.original_name} changed while it trained ({changed}): the adapter learnt from it as it "
                       "was being written; write files under a .part or .tmp name and rename them when complete")
            log.warning("%s", message)
            self.db.event("job_changed", message, entry.job_id, t=now)
            self.db.upsert_job(entry.job_id, changed=message)
        holder = self.finished_watch.add(entry.job_id, entry.path, now)
        if holder:
            log.warning("%s was still open for writing by %s when it finished: what it writes from now on is not "
                        "trained (said in the events if it does)", entry.original_name, holder)

    def watch_finished(self, now: float) -> None:
        """Say so when a file that finished while still open for writing was written to afterwards."""
        for change in self.finished_watch.changes(now):
            message = change.message(original_name(change.job_id))
            log.warning("%s", message)
            self.db.event("job_changed", message, change.job_id, t=now)
            self.db.upsert_job(change.job_id, changed=message)

    def fail(self, job_id: str, reason: FailReason, message: str, now: float, **details: Any) -> None:
        try:
            self._move("fail", job_id, reason, message, now, **details)
        except QueueError as e:
            if reason is not FailReason.REMOVED:  # a file removed by hand has no place to go: it is recorded only
                log.error("cannot move %s to failed/: %s", job_id, e)
        dropped, last_loss = self.db.discard_steps(job_id)
        self.status.layer_activity_summary = self.last_activity()  # its samples went with its steps
        trained = f" ({dropped} steps dropped from the step history, last loss {last_loss:.4g})" if dropped and last_loss is not None else ""
        self.db.upsert_job(job_id, state=JobState.FAILED.value, finished_at=now, reason=f"{reason.value}: {message}",
                           **({"steps": dropped, "final_loss": last_loss} if dropped else {}))
        self.db.event("job_failed", f"{reason.value}: {message}{trained}", job_id, t=now)
        log.warning("%s -> failed/ (%s: %s)", job_id, reason.value, message)

    def _move(self, op: str, job_id: str, *args: Any, **details: Any) -> QueueEntry | None:
        """`self.queue.<op>(job_id, ...)`; on a full disk the move is kept for later and None returned."""
        try:
            return getattr(self.queue, op)(job_id, *args, **details)
        except OSError as e:
            full = disk_full_from(e, self.queue.root, "queue")
            if full is None:
                raise
            self.deferred.append((op, job_id, (args, details)))
            log.warning("%s stays where it is until space is back (%s to follow): %s", job_id, op, full)
            if self.on_disk_full is not None:
                self.on_disk_full(full)
            return None

    def retry_deferred(self, now: float) -> None:
        """Make the moves a full disk refused, in order; stop at the first that fails again."""
        while self.deferred:
            op, job_id, (args, details) = self.deferred[0]
            try:
                getattr(self.queue, op)(job_id, *args, **details)
            except QueueError as e:  # moved meanwhile (by hand, or a restart): nothing left to do
                log.warning("deferred %s of %s dropped: %s", op, job_id, e)
            except OSError as e:
                full = disk_full_from(e, self.queue.root, "queue")
                if full is None:
                    raise
                if self.on_disk_full is not None:
                    self.on_disk_full(full)
                return
            else:
                log.info("%s: deferred %s done", job_id, op)
            self.deferred.pop(0)

    def pending_outcome(self, job_id: str) -> bool:
        """Whether a refused move still decides where this file goes (it must not be trained meanwhile)."""
        return any(j == job_id for _, j, _ in self.deferred)

    def reconcile(self, now: float) -> int:
        """Make the history agree with the folders after a crash; returns how many records were mended.

        The folders are the truth: a crash between a move to done/ or failed/ and
        the history update leaves a record saying `processing` (or none at all).
        """
        mended = 0
        for state, entries in ((JobState.DONE, self.queue.done()), (JobState.FAILED, self.queue.failed())):
            for entry in entries:
                record = self.db.job(entry.job_id)
                if record is not None and record.get("state") == state.value and record.get("sha256"):
                    continue
                self._mend(entry, state, record, now)
                mended += 1
        if mended:
            log.info("history mended for %d file(s) whose last move outran their record", mended)
        return mended

    def _mend(self, entry: QueueEntry, state: JobState, record: dict | None, now: float) -> None:
        if record is None or not record.get("sha256"):
            record_job(self.db, entry, Priority.NORMAL, validate_file(entry.path, self.cfg.data, 0), now, state)
        fields: dict[str, Any] = {"state": state.value}
        if state is JobState.FAILED:
            err = self.queue.read_error(entry.job_id) or {}
            fields["reason"] = f"{err.get('reason', 'unknown')}: {err.get('message', '')}"
        elif entry.job_id in self.published()["trained_jobs"]:
            fields["adapter_version"] = self.published()["version"]
        self.db.upsert_job(entry.job_id, finished_at=(record or {}).get("finished_at") or entry.mtime, **fields)

    # -- status ----------------------------------------------------------------------------
    def clear_fields(self) -> None:
        """Forget the previous file's figures, so none is shown as the next one's (or as a dead one's)."""
        st = self.status
        self.started = False
        st.current_file = st.job_id = None
        st.current_step = st.total_steps = 0
        st.epoch = 0.0
        st.loss = st.lr = st.tokens_per_sec = st.eta_seconds = st.eval_loss = st.preference = None
        st.ranks = st.slowest_rank = None
        self._rate = None

    def restart_rate(self) -> None:
        """Measure the ETA afresh from the next step (a pause must not count as slow training)."""
        self._rate = None

    def published(self) -> dict[str, Any]:
        return published_adapter(self.cfg)

    def last_activity(self) -> LayerActivitySummary | None:
        """The status block of the newest activity sample in the history (shown again after a restart)."""
        row = self.db.latest_activity()
        return activity_summary.summary({**row, "values": row["grid"]}, row["t"]) if row else None

    def _record_missed_steps(self, job_id: str, now: float) -> None:
        """Steps of a file this service (or one before it) never recorded, taken from the step log of the
        version the file published: a service that died while behind the trainer loses no step history."""
        current = adapters.peek_current(self.cfg.path("adapters"))
        if current is None or current.manifest.job_id != job_id:
            return
        have = self.db.steps_recorded_through(job_id)
        if have >= (current.manifest.steps or 0):
            return
        added = self.db.record_missed_steps(job_id, [m for m in adapters.read_step_log(current.path)
                                                     if m.get("step", 0) > have], now)
        if added:
            log.info("%s: %d step(s) recorded from adapter v%s's step log", job_id, added, current.version)

    def _moved_from_manifest(self, job_id: str) -> dict | None:
        """What a file moved, from the adapter it published (the child died before saying `done`)."""
        current = adapters.peek_current(self.cfg.path("adapters"))
        if current is None or current.manifest.job_id != job_id:
            return None
        return current.manifest.activity_moved


def published_adapter(cfg: Config) -> dict[str, Any]:
    """Version and trained jobs of the adapter the trainer published last (read-only: it owns adapters/)."""
    current = adapters.peek_current(cfg.path("adapters"))
    if current is None:
        return {"version": None, "trained_jobs": []}
    return {"version": current.version, "trained_jobs": current.trained_jobs}
