"""The trainer child: loads the model once, trains the files the service sends, keeps the adapter.

    TRAIND_CONNECT=/tmp/traind-x/trainer.sock TRAIND_AUTHKEY=<hex> \\
        python -m daemon.train --config status/running_config.json

The service (daemon/child.py) starts it so; the messages both ways are the
contract in docs/internals.md. TRAIND_CONNECT is a unix socket path, or an
abstract address written with a leading "@" (an environment variable cannot
hold the NUL byte that starts an abstract address).

Here: the session kept between files (model, adapter version, pause state),
the adapter versions (load current, publish the next) and the message
handling. Process set-up is daemon.train.process; the training itself is
`daemon.train.loop.train_file`, which only sees a `report` and a `control` callback.
"""

from __future__ import annotations

import argparse
import collections
import gc
import logging
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from daemon import adapters, atomic, control, protocol
from daemon.atomic import sweep_temps
from daemon.config import Config, load_config
from daemon.diskspace import DiskFull, disk_full_from, require_space
from daemon.errors import DataError, GuardTripped, TraindError
from daemon.logs import setup_logging
from daemon.train import checkpoint as ckpt
from daemon.train import consolidate, levers, preflight, process
from daemon.train.activity import ActivityProbe, Grid
from daemon.train.model import (ModelError, capabilities, choose_device, load_adapter, load_for_training, lora_state,
                                publish_adapter, resolve_base, set_lora_state)
from daemon.train.ranks import Ranks
from daemon.train.tboard import Board
from daemon.train.threads import ThreadGovernor, start_threads

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- the session


@dataclass
class Session:
    """What the child keeps between files: the loaded model, the current adapter, the pause state."""

    cfg: Config
    conn: Connection | None  # rank 0's line to the service (None on the other ranks)
    lm: Any  # daemon.train.model.LoadedModel
    version: int | None  # current adapter version (None: nothing published yet)
    manifest: dict[str, Any]
    probe: ActivityProbe | None  # per-layer LoRA activity of lm (keeps ‖W₀‖ across files); rank 0's
    governor: ThreadGovernor | None = None  # trims the CPU threads while other processes want the cores (auto)
    paused: bool = False
    exit_code: int | None = None  # set once the child must leave
    backlog: collections.deque = field(default_factory=collections.deque)
    rollback_to: int | None = None  # a rollback asked for while a file trains, done once the loop has let go
    eval_set: list | None = None  # eval.file's examples (tokenised once), scored before and after every file
    eval_cache: tuple[int | None, float] | None = None  # (adapter version, its eval-set loss)
    board: Any = None  # daemon.train.tboard.Board when tensorboard.enabled
    ranks: Ranks = field(default_factory=Ranks)  # this process among the trainer's ranks (one by default)

    def send(self, msg: protocol.Message) -> None:
        if self.conn is None:  # not rank 0: rank 0 reports for every rank
            return
        if self.board is not None:
            self.board.report(msg)
        try:
            self.conn.send(msg.to_wire())
        except (OSError, EOFError, ValueError) as e:  # the service is gone; PDEATHSIG will end us
            log.warning("cannot send %s: %s", msg.TYPE, e)

    def receive(self) -> protocol.Message | None:
        """The service's next message (blocking); None for one that is not the protocol's (logged)."""
        raw = self.conn.recv()
        try:
            return protocol.decode(raw, protocol.TO_TRAINER)
        except protocol.ProtocolError as e:
            log.error("ignoring a message from the service: %s", e)
            return None

    @property
    def trained_jobs(self) -> list[str]:
        return list(self.manifest.get("trained_jobs", []))

    def checkpoints(self, job_id: str) -> Path:
        return self.cfg.path("checkpoints") / job_id


def load_session(cfg: Config, conn: Connection | None, threads: int, ranks: Ranks | None = None) -> Session:
    """Load base + current adapter (or a fresh LoRA seeded from training.seed) and say `ready`.

    With several ranks, rank 0 reads the adapter folder and the others get its base and weights."""
    ranks = ranks or Ranks()
    t0 = time.monotonic()
    current = adapters.read_current(cfg.path("adapters")) if ranks.main else None
    # A store `config approve` emptied (another adapter shape) may name the consolidated base it goes on from.
    start = None
    if ranks.main and current is None:
        start = adapters.read_start(cfg.path("adapters"), adapters.config_base(cfg))
    head = current.manifest if current is not None else dict(start or {})
    # After a consolidation the adapter's manifest names the base it continues (the config's is generation 0's).
    base = Path(head["base_path"]) if head.get("base_path") else None
    base = ranks.broadcast(base)
    if base is not None and not base.is_dir():
        raise TraindError(f"rank {ranks.rank}: the base {base} (a consolidated generation) is not on this machine; "
                          "every node needs the base it continues")
    if base is None:  # generation 0: the configured base, converted from a GGUF on first use (minutes for a large one)
        def loading(text: str) -> None:
            log.info("base model: %s", text)
            if conn is not None:
                conn.send(protocol.Loading(detail=text).to_wire())

        base_path = resolve_base(cfg, loading)
    else:
        base_path = base
    # model.quantization auto stays what the current adapter was trained with (its manifest says)
    recorded = current.manifest.get("quantization") if current is not None else None
    lm = load_for_training(cfg, seed=cfg.training.seed, base=base_path, recorded_quantization=ranks.broadcast(recorded))
    if current is not None:
        load_adapter(lm.model, current.path)
        log.info("adapter v%d loaded from %s", current.version, current.path)
        if swept := ckpt.sweep_published(cfg.path("checkpoints"), set(current.trained_jobs)):
            log.info("removed the checkpoints of %d file(s) adapter v%d already learnt", swept, current.version)
    probe = prepare_ranks(lm, ranks)
    governor, threads_lever = levers.thread_governor(cfg, threads, ranks.local_world_size)
    speed = levers.at_start(lm, cfg, threads_lever)  # every rank: the probes are collectives where the base is sharded
    sess = Session(cfg, conn, lm, current.version if current else None, head, probe, governor, ranks=ranks)
    if not ranks.main:
        return sess
    sess.eval_set, eval_error = load_eval_set(cfg, lm)
    if ranks.sharded and sess.eval_set:  # scoring it would be a collective rank 0 runs alone, between files
        sess.eval_set, eval_error = None, "eval.file is not scored with distributed.strategy 'fsdp'"
        log.warning("%s", eval_error)
    sess.board = Board.open(cfg)
    trainable, total = lm.param_counts()
    sess.send(protocol.Ready(
        device=lm.device, compute_dtype=str(lm.dtype).removeprefix("torch."), quantization=lm.quantization,
        base_model=str(base) if base else cfg.base_model, adapter_version=sess.version, trainable_params=trainable,
        total_params=total, load_seconds=time.monotonic() - t0, world_size=ranks.world_size,
        strategy=ranks.strategy, backend=ranks.backend, nnodes=ranks.nnodes,
        eval_set_examples=len(sess.eval_set) if sess.eval_set else 0, eval_set_error=eval_error,
        generation=adapters.generation(sess.manifest), notes=list(lm.notes), levers=speed))
    return sess


def prepare_ranks(lm: Any, ranks: Ranks) -> ActivityProbe | None:
    """Every rank on rank 0's weights, the base sharded for fsdp; rank 0's activity probe (‖W₀‖ measured
    before sharding, while each rank still holds whole weights)."""
    ranks.same_base(lm.model)
    ranks.sync_lora(lm.model)
    probe = ActivityProbe(lm.model) if ranks.main else None
    if ranks.sharded:
        from daemon.train.sharding import shard_base

        if probe is not None:
            probe.base_norms()
        shard_base(lm, ranks)
    return probe


# ---------------------------------------------------------------- control between steps


def load_eval_set(cfg: Config, lm: Any) -> tuple[list | None, str | None]:
    """eval.file's first eval.max_examples examples, tokenised; (None, why) when it cannot be used."""
    path = cfg.eval_file
    if path is None:
        return None, None
    import dataclasses

    from daemon.train.data import train_examples
    from daemon.validate import validate_file

    try:
        report = validate_file(path, cfg.data, 0)
        if not report.accepted or report.format is None:
            raise ValueError(report.reason or "not a training file")
        data = dataclasses.replace(cfg.data, eval_fraction=0.0)
        examples = sorted(train_examples(path, report.format, lm.tokenizer, data, cfg.training.seed, 0), key=lambda e: e.line)
    except (OSError, ValueError) as e:
        log.error("eval.file %s is not used: %s", path, e)
        return None, f"eval.file {path}: {e}"
    if not examples:
        return None, f"eval.file {path}: no example keeps a token to score"
    log.info("eval set: %d examples of %s", min(len(examples), cfg.eval.max_examples), path)
    return examples[:cfg.eval.max_examples], None


def eval_set_loss(sess: Session, cached: bool = True) -> float | None:
    """The eval set's loss under the live adapter (cached per published version: a file's `before` is
    usually the previous file's `after`). A diagnostic: a failure is logged and never fails a file."""
    if not sess.eval_set:
        return None
    if cached and sess.eval_cache is not None and sess.eval_cache[0] == sess.version and sess.version is not None:
        return sess.eval_cache[1]
    from daemon.train.step import evaluate, fast_paths

    try:
        if sess.lm.fast is None:
            sess.lm.fast = fast_paths(sess.lm)
        loss = evaluate(sess.lm, sess.eval_set, sess.cfg.training.micro_batch_size, sess.lm.fast, sess.cfg.data.packing)
    except Exception:
        log.warning("the eval set was not scored", exc_info=True)
        return None
    return loss


def control_for(sess: Session, job_id: str):  # noqa: ANN201 - returns daemon.train.loop.ControlFn
    """The loop's control callback: drain messages; block while paused; answer continue/stop/skip."""

    def control() -> str:
        if sess.governor is not None:
            sess.governor.tick()
        while sess.paused or sess.conn.poll():
            try:
                msg = sess.receive()
            except (EOFError, OSError):  # the service went away: keep what we have and leave
                sess.exit_code = 0
                return "stop"
            if msg is None:
                continue
            verdict = on_message_in_job(sess, msg, job_id)
            if verdict != "continue":
                return verdict
        return "continue"

    return control


def on_message_in_job(sess: Session, msg: protocol.Message, job_id: str) -> str:
    """What a message means while a file trains: the loop's verdict (continue, stop, skip)."""
    match msg:
        case protocol.Pause() | protocol.Resume():
            set_paused(sess, isinstance(msg, protocol.Pause), job_id)
        case protocol.Stop() | protocol.Shutdown():
            sess.exit_code = 0
            return "stop"
        case protocol.Skip(job_id=target) if target in (None, job_id):
            return "skip"
        case protocol.Consolidate():  # the service sends it between files; should one cross a file, it runs after it
            sess.backlog.append(msg)
        case protocol.Rollback(version=to):  # the file's progress goes; it starts again on the version rolled back to
            why = adapters.rollback_refusal(sess.cfg.path("adapters"), to, adapters.generation(sess.manifest))
            if why is not None:  # refused before the file is touched: it trains on from this step, checkpoints and all
                log.warning("rollback to v%d refused: %s", to, why)
                sess.send(protocol.RollbackRefused(version=to, job_id=None, message=why))
                return "continue"
            sess.rollback_to = to
            return "skip"
        case protocol.Train(job=job):
            log.warning("train %s arrived while %s trains; it runs next", job.job_id, job_id)
            sess.backlog.append(msg)
        case _:
            log.warning("ignoring %r while training %s", msg.TYPE, job_id)
    return "continue"


def wait_for_space_for(sess: Session, job_id: str):  # noqa: ANN201 - returns daemon.train.loop.WaitForSpaceFn
    """Say `disk_full` and hold, as paused, until the service says `resume` (space is back); the verdict.

    Not a failure and not a crash: the file stays in processing/, the model stays
    loaded, and the write is made again from scratch after the resume."""
    control = control_for(sess, job_id)

    def wait(full: DiskFull) -> str:
        log.warning("%s: %s; holding until the service says space is back", job_id, full)
        sess.send(protocol.DiskFullReport(job_id=job_id, **full.to_dict()))
        sess.paused = True
        return control()

    return wait


def set_paused(sess: Session, paused: bool, job_id: str | None) -> None:
    sess.paused = paused
    sess.send(protocol.Paused(job_id=job_id) if paused else protocol.Resumed(job_id=job_id))


# ---------------------------------------------------------------- one file


def handle_train(sess: Session, msg: protocol.Train) -> None:
    """Train one file and answer done / skipped / failed / stopped."""
    job = msg.job
    if job.job_id in sess.trained_jobs:
        answer_already_trained(sess, job.job_id)
        return
    ranks = sess.ranks
    ranks.broadcast(protocol.TrainOrder(job=job, global_step=int(sess.manifest.get("global_step", 0))).to_wire())
    _handle_train(sess, share_file(sess, job))
    # However the file ended (done, skip, failure, a rollback in its middle), every rank goes on from rank 0's
    # weights. Not after an error rank 0 met alone: that ends the group (the others wait in a collective).
    ranks.sync_tensors(ranks_lora(sess))


def follow_train(sess: Session, order: protocol.TrainOrder) -> None:
    """Another rank's part of a file rank 0 trains: its share of each step; rank 0 reports and decides."""
    from daemon.train.loop import train_file  # imports torch: only after threads.start_threads

    job = share_file(sess, order.job)
    try:
        train_file(sess.lm, sess.cfg, job, global_step=order.global_step,
                   ckpt_folder=sess.checkpoints(job.job_id), report=lambda m: None, control=lambda: "continue",
                   ranks=sess.ranks)
    except (DataError, GuardTripped) as e:  # met alike by rank 0, which reports it
        log.info("%s: %s", job.job_id, e)
    sess.ranks.sync_tensors(ranks_lora(sess))  # after it every rank of this node is done with the file
    if job.path != order.job.path and sess.ranks.local_rank == 0:  # the copy rank 0 sent this node
        Path(job.path).unlink(missing_ok=True)


def share_file(sess: Session, job: protocol.Job) -> protocol.Job:
    """The job with the path this rank reads its file from (a copy sent by rank 0 on another node)."""
    import dataclasses

    path = sess.ranks.share_file(Path(job.path), job.sha256, sess.cfg.path("checkpoints") / ".incoming")
    return dataclasses.replace(job, path=str(path))


def ranks_lora(sess: Session) -> list[Any]:
    return [p for p in sess.lm.model.parameters() if p.requires_grad] if sess.ranks.many else []


def _handle_train(sess: Session, job: protocol.Job) -> None:
    from daemon.train.loop import train_file

    before = lora_state(sess.lm.model)  # CPU copy: skip and failure put these weights back
    eval_before = eval_set_loss(sess)
    wait = wait_for_space_for(sess, job.job_id)
    while True:
        try:
            outcome = train_file(sess.lm, sess.cfg, job, global_step=int(sess.manifest.get("global_step", 0)),
                                 ckpt_folder=sess.checkpoints(job.job_id), report=sess.send,
                                 control=control_for(sess, job.job_id), activity=sess.probe, wait_for_space=wait,
                                 ranks=sess.ranks)
            break
        except Exception as e:  # a job boundary: record it with the job, stay alive for the next one
            if sess.ranks.many and not isinstance(e, (DataError, GuardTripped)):
                # Met by this rank alone: the others wait in a collective for it. The group ends and the
                # service restarts it from the last checkpoint (one crash of the file).
                log.exception("%s: rank 0 failed alone; ending the group", job.job_id)
                raise
            restore(sess, before)
            if isinstance(e, ModelError):  # the config's fault, not the file's: it stays, the queue is held
                log.error("%s: the config cannot run here: %s", job.job_id, e)
                sess.send(protocol.ConfigRefused(problems=[str(e)], job_id=job.job_id))
                sess.exit_code = preflight.EXIT_CONFIG
                return
            full = disk_full_from(e, sess.checkpoints(job.job_id), "trainer")
            if full is None:
                fail(sess, job.job_id, e)
                return
            # A write this file needed failed for lack of space where nothing waits for it: not the
            # file's fault. Once space is back it trains again from its last checkpoint.
            verdict = wait(full)
            if verdict != "continue":
                end_without_publishing(sess, job.job_id, verdict, ckpt.latest_step(sess.checkpoints(job.job_id)) or 0)
                return
    if outcome.status == "done":
        publish_when_space(sess, job, outcome, before, wait, eval_before)
    elif outcome.status == "skipped":
        end_without_publishing(sess, job.job_id, "skip", outcome.steps, before)
    else:
        end_without_publishing(sess, job.job_id, "stop", outcome.checkpoint_step)


def end_without_publishing(sess: Session, job_id: str, verdict: str, steps: int | None,
                           before: dict[str, Any] | None = None) -> None:
    """Answer `skipped` (adapter restored, checkpoints dropped) or `stopped` (the last checkpoint stays);
    a skip that a rollback asked for rolls back instead (the file stays, to train again on the old version)."""
    if verdict == "skip" and sess.rollback_to is not None:
        if before is not None:
            restore(sess, before)
        rollback(sess, job_id)
        return
    if verdict == "skip":
        if before is not None:
            restore(sess, before)
        ckpt.delete_checkpoints(sess.checkpoints(job_id))
        sess.send(protocol.Skipped(job_id=job_id, steps_discarded=steps or 0))
    else:
        sess.send(protocol.Stopped(job_id=job_id, checkpoint_step=steps))
        sess.exit_code = 0


def publish_when_space(sess: Session, job: protocol.Job, outcome: Any, before: dict[str, Any],
                       wait: Any, eval_before: float | None = None) -> None:
    """Publish the file's adapter; on a full disk hold (the trained weights stay in memory) and try again."""
    moved = moved_by_file(sess, before)
    adapters_dir = sess.cfg.path("adapters")
    while True:
        try:
            require_space(adapters_dir, sess.cfg.service.min_free_bytes, "adapter")
            publish(sess, job, outcome, moved=moved, eval_before=eval_before)
            return
        except Exception as e:
            full = disk_full_from(e, adapters_dir, "adapter", writing_unnamed=True)
            if full is None:
                raise
            log.warning("%s: adapter v%d not published: %s", job.job_id, (sess.version or 0) + 1, full)
            verdict = wait(full)
            if verdict == "skip":
                end_without_publishing(sess, job.job_id, "skip", outcome.steps, before)
                return
            if verdict == "stop":  # its last checkpoint stays: the next start trains the rest again
                end_without_publishing(sess, job.job_id, "stop", ckpt.latest_step(sess.checkpoints(job.job_id)))
                return


def moved_by_file(sess: Session, before: dict[str, Any]) -> Grid | None:
    """What the file moved; None when it cannot be measured (a diagnostic never keeps a file from done/)."""
    try:
        return sess.probe.moved_since(before)
    except Exception:
        log.warning("what the file moved was not measured", exc_info=True)
        return None


def restore(sess: Session, before: dict[str, Any]) -> None:
    """Put the LoRA weights back to their state before the file (skip, failure)."""
    set_lora_state(sess.lm.model, before)
    sess.probe.forget_previous()  # the last sample's weights are gone: no `change` against them


def publish(sess: Session, job: protocol.Job, outcome: Any, moved: Grid | None,
            eval_before: float | None = None) -> None:
    """Publish the next adapter version, drop the job's checkpoints, answer done.

    What the file moved (per module ‖ΔW after − ΔW before‖, from the weights before
    the file, so a resume in between counts nothing twice) goes into the manifest,
    which survives a crash between publication and the `done` answer.
    """
    version = (sess.version or 0) + 1
    manifest = {
        "version": version, "parent_version": sess.version, **generation_fields(sess),
        "job_id": job.job_id, "original_name": job.original_name, "sha256": job.sha256,
        "steps": outcome.steps, "global_step": outcome.global_step, "final_loss": outcome.final_loss,
        "eval_loss": outcome.eval_loss, "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "trained_jobs": sess.trained_jobs + [job.job_id],
        "activity_moved": moved.to_dict() if moved is not None else None,
        "ledger": outcome.ledger,
    }
    eval_after = eval_set_loss(sess, cached=False) if sess.eval_set else None
    if eval_after is not None or eval_before is not None:
        manifest["eval_set"] = {"file": str(sess.cfg.eval_file), "examples": len(sess.eval_set or []),
                                "before": eval_before, "after": eval_after}
    # The dataset ledger: what the lineage has learnt, by content (the service refuses a second copy).
    # (before the first version, the files merged into the base a START record carried over)
    before = adapters.AdapterVersion(sess.version or 0, sess.cfg.path("adapters"), sess.manifest).dataset
    manifest["dataset"] = before + [adapters.dataset_entry(manifest)]
    steps_log = ckpt.read_step_log(sess.checkpoints(job.job_id) / ckpt.StepLog.NAME)
    published = publish_adapter(sess.cfg.path("adapters"), sess.lm.model, manifest, steps_log)
    sess.version, sess.manifest = version, manifest
    if sess.board is not None:
        sess.board.flush()
    if eval_after is not None:
        sess.eval_cache = (version, eval_after)
    ckpt.delete_checkpoints(sess.checkpoints(job.job_id))
    prune_versions(sess)
    log.info("%s done in %d steps: adapter v%d", job.job_id, outcome.steps, version)
    sess.send(protocol.Done(job_id=job.job_id, steps=outcome.steps, final_loss=outcome.final_loss,
                            eval_loss=outcome.eval_loss, adapter_version=version, adapter_path=str(published.path),
                            already_trained=False, activity_moved=manifest["activity_moved"],
                            eval_set=manifest.get("eval_set"), global_step=outcome.global_step))


def generation_fields(sess: Session) -> dict[str, Any]:
    """The base a new version continues: the config's (generation 0) or a consolidated one."""
    m = sess.manifest
    quant = {"quantization": sess.lm.quantization}  # as loaded (auto resolved): auto keeps it for this adapter
    if m.get("base_path"):
        return {"base_model": m["base_path"], "base_path": m["base_path"], "generation": m.get("generation", 0), **quant}
    from daemon.train.convert import source_of

    gguf = source_of(sess.lm.base_path)  # a GGUF base: the file's hash, not only the folder it was converted to
    return {"base_model": sess.cfg.base_model, "generation": m.get("generation", 0), **quant,
            **({"base_gguf": gguf} if gguf else {})}


def prune_versions(sess: Session) -> None:
    """Retention (adapters.keep_last): never the current version nor a pinned one. A failure to prune is
    logged and left for the next publication: it never holds a file back from done/."""
    try:
        protected = control.read_pins(sess.cfg) | fed_consolidations(sess.cfg)
        removed = adapters.prune(sess.cfg.path("adapters"), sess.cfg.adapters.keep_last, protected)
    except OSError:
        log.warning("old adapter versions were not pruned", exc_info=True)
        return
    if removed:
        log.info("retention (adapters.keep_last = %d): removed adapter version(s) %s", sess.cfg.adapters.keep_last,
                 ", ".join(f"v{v}" for v in removed))


def rollback(sess: Session, interrupted: str | None) -> None:
    """Make adapter `sess.rollback_to` current again, as a new version (`rollback_of`), and answer `rolled_back`.

    The new version has the old one's weights, global step, trained jobs and ledger: the files trained
    after it are no longer in the lineage (listed as `undone`, not retrained: a copy dropped again trains).
    A file interrupted for it stays in processing/, loses its checkpoints (they continue a state that is
    gone) and trains again from its start on the rolled-back adapter. A refusal (adapters.rollback_refusal,
    asked again here, or a publication that fails: a full disk) changes nothing: not the adapter, and not the
    interrupted file's checkpoints, which are dropped only once the new version is published.
    """
    to, sess.rollback_to = sess.rollback_to, None
    folder = sess.cfg.path("adapters")
    why = adapters.rollback_refusal(folder, to, adapters.generation(sess.manifest))
    if why is not None:  # an interrupted file keeps its checkpoints: it resumes from them, on the adapter it had
        log.warning("rollback to v%d refused: %s", to, why)
        sess.send(protocol.RollbackRefused(version=to, job_id=interrupted, message=why))
        return
    target = next(v for v in adapters.versions(folder) if v.version == to)
    kept_weights = lora_state(sess.lm.model)  # put back if the rolled-back version cannot be published
    load_adapter(sess.lm.model, target.path)
    kept = {e["job_id"] for e in target.dataset}
    current_ledger = adapters.AdapterVersion(sess.version, folder, sess.manifest).dataset if sess.version else []
    undone = [e for e in current_ledger if e["job_id"] not in kept]
    version = (sess.version or 0) + 1
    m = target.manifest
    manifest = {
        "version": version, "parent_version": sess.version, "rollback_of": to, **generation_fields(sess),
        "job_id": None, "original_name": None, "sha256": None, "steps": 0, "global_step": m.get("global_step", 0),
        "final_loss": m.get("final_loss"), "eval_loss": m.get("eval_loss"),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "trained_jobs": list(m.get("trained_jobs", [])), "activity_moved": None,
        "dataset": target.dataset, "undone": undone,
    }
    try:
        require_space(folder, sess.cfg.service.min_free_bytes, "adapter")
        publish_adapter(folder, sess.lm.model, manifest)
    except Exception as e:  # nothing changed: the adapter it had, the checkpoints it had
        set_lora_state(sess.lm.model, kept_weights)
        log.error("rollback to v%d not made: adapter v%d could not be published: %s", to, version, e)
        sess.send(protocol.RollbackRefused(version=to, job_id=interrupted,
                                           message=f"adapter v{version} could not be published ({e}); nothing changed"))
        return
    sess.probe.forget_previous()
    if interrupted is not None:  # they continue a state that is gone now
        ckpt.delete_checkpoints(sess.checkpoints(interrupted))
    sess.version, sess.manifest = version, manifest
    prune_versions(sess)
    log.info("rolled back to adapter v%d as v%d; %d file(s) no longer in the adapter", to, version, len(undone))
    sess.send(protocol.RolledBack(version=version, rollback_of=to, job_id=interrupted,
                                  undone=[e.get("original_name") or e["job_id"] for e in undone]))


def fed_consolidations(cfg: Config) -> set[int]:
    """Adapter versions merged into a consolidated base: kept whatever retention says."""
    out = set()
    for lineage in consolidate.consolidated_root(cfg).glob(f"*/{consolidate.LINEAGE}"):
        try:
            out.add(int(atomic.read_json(lineage)["adapter"]["version"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return out


def consolidate_now(sess: Session, msg: protocol.Consolidate) -> None:
    """Merge the current adapter into its base, then train on with a fresh adapter on the merged base.

    The fresh adapter's publication (its manifest names the new base and generation) is the commit point:
    a crash before it leaves the old generation in use (a complete folder in consolidated_models/ that
    nothing uses yet, never deleted); after it, the next child loads the new base.
    """
    folder = sess.cfg.path("adapters")
    current = adapters.peek_current(folder)
    if current is None:
        sess.send(protocol.ConsolidationRefused(message="nothing to consolidate: no adapter has been published yet"))
        return
    asked_for = msg.adapter_version
    if asked_for is not None and current.version != asked_for and current.manifest.get("consolidated_from") == asked_for:
        # done already: a trainer died after the switch, before its answer; the next one answers from the record
        lineage = atomic.read_json(Path(current.manifest["lineage"]))
        sess.send(protocol.Consolidated(
            generation=lineage["generation"], path=lineage["path"], adapter_version=current.version,
            consolidated_version=asked_for, max_logit_diff=lineage["verification"]["max_abs_logit_diff"],
            reload_logit_diff=lineage["verification"]["reloaded_max_abs_logit_diff"], seconds=0.0,
            files=len(lineage["files"]), description=lineage["description"]))
        return
    generation = adapters.generation(current.manifest)
    if (why := adapters.nothing_learnt(current)) is not None:  # a copy of the base would block every rollback before it
        log.warning("consolidation refused: %s", why)
        sess.send(protocol.ConsolidationRefused(message=why))
        return
    try:
        result = consolidate.consolidate(sess.cfg, current, sess.lm.base_path, msg.description, generation)
    except Exception as e:  # a refusal or a failed merge: everything stays as it was
        log.error("consolidation refused: %s", e, exc_info=not isinstance(e, consolidate.ConsolidationRefused))
        sess.send(protocol.ConsolidationRefused(message=str(e) or type(e).__name__))
        return
    old_lm = sess.lm
    sess.lm = None
    del old_lm
    gc.collect()
    sess.lm = load_for_training(sess.cfg, seed=sess.cfg.training.seed, base=result.path)
    sess.probe = ActivityProbe(sess.lm.model)
    version = current.version + 1
    m = current.manifest
    manifest = {
        "version": version, "parent_version": current.version, "base_model": str(result.path),
        "base_path": str(result.path), "generation": result.generation, "consolidated_from": current.version,
        "lineage": str(result.path / consolidate.LINEAGE), "description": result.lineage["description"],
        "job_id": None, "original_name": None, "sha256": None, "steps": 0, "global_step": m.get("global_step", 0),
        "final_loss": None, "eval_loss": None, "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "trained_jobs": list(m.get("trained_jobs", [])), "activity_moved": None, "dataset": current.dataset,
    }
    publish_adapter(folder, sess.lm.model, manifest)
    sess.version, sess.manifest = version, manifest
    prune_versions(sess)
    sess.send(protocol.Consolidated(
        generation=result.generation, path=str(result.path), adapter_version=version,
        consolidated_version=current.version, max_logit_diff=result.max_logit_diff,
        reload_logit_diff=result.reload_logit_diff, seconds=result.seconds, files=len(result.lineage["files"]),
        description=result.lineage["description"]))


def answer_already_trained(sess: Session, job_id: str) -> None:
    """The current adapter learnt this job (crash after publish): answer done without training."""
    ckpt.delete_checkpoints(sess.checkpoints(job_id))
    own = sess.manifest.get("job_id") == job_id  # the numbers are known only for the newest job
    log.info("%s is already in adapter v%s; not training it again", job_id, sess.version)
    sess.send(protocol.Done(job_id=job_id, steps=sess.manifest.get("steps") if own else None,
                            final_loss=sess.manifest.get("final_loss") if own else None,
                            eval_loss=sess.manifest.get("eval_loss") if own else None, adapter_version=sess.version,
                            adapter_path=str(sess.cfg.path("adapters") / adapters.version_dir_name(sess.version)),
                            already_trained=True,
                            activity_moved=sess.manifest.get("activity_moved") if own else None))


def fail(sess: Session, job_id: str, e: Exception) -> None:
    """Answer `failed`. Bad data drops the job's checkpoints; a training error keeps them for a retry."""
    invalid = isinstance(e, DataError)
    if invalid:
        ckpt.delete_checkpoints(sess.checkpoints(job_id))
    if isinstance(e, GuardTripped):  # the adapter is back where it was before the file (restore); the daemon pauses
        log.error("%s stopped by a guard: %s; adapter back to v%s", job_id, e, sess.version)
        sess.send(protocol.Failed(job_id=job_id, reason="guard", step=e.step, loss=e.loss,
                                  message=f"{e}; the adapter is back to its state before this file "
                                          f"(v{sess.version}), and training is paused"))
        return
    log.error("%s failed: %s", job_id, e, exc_info=not invalid)
    # every item a {line, field, reason} object: one of another shape would make the whole answer unreadable
    errors = [x.to_dict() if hasattr(x, "to_dict") else x if isinstance(x, dict) else {"reason": str(x)}
              for x in getattr(e, "errors", [])]
    sess.send(protocol.Failed(job_id=job_id, reason="invalid_data" if invalid else "training_error",
                              message=str(e) or type(e).__name__, traceback=traceback.format_exc(), errors=errors))


# ---------------------------------------------------------------- idle: wait for the next message


def handle_idle_skip(sess: Session, msg: protocol.Skip) -> None:
    """A skip for a job not in training (e.g. after a crash): drop its checkpoints."""
    if msg.job_id is None:  # "the file in training", and none is
        return
    discarded = ckpt.latest_step(sess.checkpoints(msg.job_id)) or 0
    ckpt.delete_checkpoints(sess.checkpoints(msg.job_id))
    sess.send(protocol.Skipped(job_id=msg.job_id, steps_discarded=discarded))


def serve(sess: Session) -> int:
    """Answer messages until stop/shutdown (or the service goes away); the exit code."""
    while sess.exit_code is None:
        try:
            msg = sess.backlog.popleft() if sess.backlog else sess.receive()
        except (EOFError, OSError):
            log.info("the service closed the connection; leaving")
            return 0
        match msg:
            case None:
                continue
            case protocol.Train():
                handle_train(sess, msg)
            case protocol.Pause() | protocol.Resume():
                set_paused(sess, isinstance(msg, protocol.Pause), None)
            case protocol.Skip():
                handle_idle_skip(sess, msg)
            case protocol.Rollback(version=to):
                sess.rollback_to = to
                rollback(sess, None)
                sess.ranks.broadcast(protocol.SyncLora().to_wire())
                sess.ranks.sync_tensors(ranks_lora(sess))
            case protocol.Consolidate():
                if sess.ranks.nnodes > 1:
                    sess.send(protocol.ConsolidationRefused(
                        message="not with several machines: the merged base would be on this machine only "
                                "(distributed.nnodes > 1); consolidate with nnodes 1"))
                    continue
                lm = sess.lm
                consolidate_now(sess, msg)
                if sess.lm is not lm and sess.ranks.many:  # a new base: the other ranks load it too
                    sess.ranks.broadcast(protocol.Reload(base=str(sess.lm.base_path)).to_wire())
                    sess.probe = prepare_ranks(sess.lm, sess.ranks)
            case protocol.Stop():
                sess.send(protocol.Stopped(job_id=None, checkpoint_step=None))
                sess.exit_code = 0
            case protocol.Shutdown():
                sess.exit_code = 0
    sess.ranks.broadcast(protocol.Exit().to_wire())
    return sess.exit_code


def follow(sess: Session) -> int:
    """The other ranks: do what rank 0 broadcasts (daemon.protocol's rank orders, not the service's) until exit."""
    while True:
        order = protocol.decode(sess.ranks.broadcast(), protocol.RANK)
        match order:
            case protocol.TrainOrder():
                follow_train(sess, order)
            case protocol.SyncLora():
                sess.ranks.sync_tensors(ranks_lora(sess))
            case protocol.Reload(base=base):
                old, sess.lm = sess.lm, None
                del old
                gc.collect()
                sess.lm = load_for_training(sess.cfg, seed=sess.cfg.training.seed, base=Path(base))
                prepare_ranks(sess.lm, sess.ranks)
            case protocol.Exit():
                return 0


def refuse_config(cfg: Config, problems: list[str], rank: int) -> int:
    """The config cannot run on this machine: say every reason (rank 0, to the service) and leave for good."""
    for p in problems:
        log.error("the config cannot run here: %s", p)
    if rank == 0:
        conn = process.connect()
        try:
            conn.send(protocol.ConfigRefused(problems=problems).to_wire())
        finally:
            conn.close()
    return preflight.EXIT_CONFIG


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m daemon.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="the daemon's config.json")
    args = parser.parse_args(argv)
    process.die_with_parent()
    cfg = load_config(args.config)
    rank = int(os.environ.get("RANK", "0"))  # under torchrun (daemon.train.launch); 0 for a plain child
    if "LOCAL_RANK" not in os.environ:  # a plain child: the service decides when it ends (torchrun handles its ranks)
        process.ignore_group_signals()
    setup_logging(cfg.path("logs"), "trainer" if rank == 0 else f"trainer_rank{rank}", cfg.service.log_level,
                  also_stderr=False, keep_days=cfg.service.log_keep_days, max_bytes=cfg.service.log_max_bytes)
    # before quiet_hugging_face imports torch; ranks on one machine share its cores
    threads = start_threads(cfg.training.cpu_threads, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    process.quiet_hugging_face()
    lock_fd = process.acquire_lock(cfg.path("checkpoints") / ".trainer.lock") if rank == 0 else None
    if rank == 0 and (swept := ckpt.sweep_temp(cfg.path("checkpoints")) + sweep_temps(cfg.path("adapters"), adapters.CURRENT)):
        log.info("removed %d unfinished checkpoint folder(s) and pointer temp file(s) a killed trainer left", swept)
    log.info("trainer pid %d started (config %s)", os.getpid(), args.config)
    caps = capabilities()
    if refused := preflight.problems(cfg, caps):  # before minutes of loading, and before any file fails for it
        return refuse_config(cfg, refused, rank)
    device = choose_device(cfg.model, caps)
    ranks = Ranks.from_env(cfg.distributed, device)
    if ranks.many:
        from daemon.train.sharding import check_fsdp

        check_fsdp(cfg, device)  # refused with the reason before minutes of loading
    conn = process.connect() if ranks.main else None
    try:
        sess = load_session(cfg, conn, threads, ranks)
        code = serve(sess) if ranks.main else follow(sess)
    except BaseException:
        log.exception("trainer failed outside a job; the service restarts it")
        raise
    finally:
        if conn is not None:
            conn.close()
        if lock_fd is not None:
            os.close(lock_fd)
    ranks.close()
    log.info("trainer exits with %d", code)
    return code


if __name__ == "__main__":
    sys.exit(main())
