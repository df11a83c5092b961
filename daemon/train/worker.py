"""The trainer child: loads the model once, trains the files the service sends, keeps the adapter.

    TRAIND_CONNECT=/tmp/traind-x/trainer.sock TRAIND_AUTHKEY=<hex> \\
        python -m daemon.train --config status/running_config.json

The service (daemon/service/) starts it so; the messages both ways are the
contract in daemon/protocol.py (docs/internals.md). TRAIND_CONNECT is a unix socket path, or an
abstract address written with a leading "@" (an environment variable cannot
hold the NUL byte that starts an abstract address).

Here: rank 0's message handling, one file's training from start to answer
(done / skipped / failed / stopped) and the process's main. The session kept
between files is daemon.train.session; the versions it publishes, rolls back and
consolidates are daemon.train.lineage; the other ranks follow in
daemon.train.follower; process set-up is daemon.train.process; the training
itself is `daemon.train.loop.train_file`, which only sees a `report` and a
`control` callback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from typing import Any

from daemon import adapters, protocol
from daemon.atomic import sweep_temps
from daemon.config import Config, load_config
from daemon.diskspace import disk_full_from, require_space
from daemon.errors import DataError, GuardTripped
from daemon.jobqueue import JobQueue
from daemon.states import JobState
from daemon.logs import setup_logging
from daemon.train import checkpoint as ckpt
from daemon.train import preflight, process
from daemon.train.activity_probe import Grid
from daemon.train import forgetting
from daemon.train.follower import follow, ranks_lora, share_file
from daemon.train.replay import ReplaySource, sources_from
from daemon.train.lineage import (accept_held, answer_already_trained, consolidate_now, drop_held, held_for,
                                  publish, reject_held, rollback, send_held)
from daemon.train.model import ModelError, capabilities, choose_device, lora_state, set_lora_state
from daemon.train.ranks import Ranks
from daemon.train.session import Session, control_for, load_session, prepare_ranks, set_paused, wait_for_space_for
from daemon.train.threads import start_threads

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- one file


def handle_train(sess: Session, msg: protocol.Train) -> None:
    """Train one file and answer done / skipped / failed / stopped."""
    job = msg.job
    if job.job_id in sess.trained_jobs:
        answer_already_trained(sess, job.job_id)
        return
    if (held := held_for(sess, job.job_id)) is not None:  # trained, held by the forgetting gate: said again
        send_held(sess, held)
        return
    ranks = sess.ranks
    ranks.broadcast(protocol.TrainOrder(job=job, global_step=sess.manifest.global_step).to_wire())
    _handle_train(sess, share_file(sess, job))
    # However the file ended (done, skip, failure, a rollback in its middle), every rank goes on from rank 0's
    # weights. Not after an error rank 0 met alone: that ends the group (the others wait in a collective).
    ranks.sync_tensors(ranks_lora(sess))


def _handle_train(sess: Session, job: protocol.Job) -> None:
    from daemon.train.loop import train_file

    before = lora_state(sess.lm.model)  # CPU copy: skip and failure put these weights back
    probes_before = forgetting.probes_before(sess)  # the version before the file (the previous file's `after`)
    wait = wait_for_space_for(sess, job.job_id)
    while True:
        try:
            outcome = train_file(sess.lm, sess.cfg, job, global_step=sess.manifest.global_step,
                                 ckpt_folder=sess.checkpoints(job.job_id), report=sess.send,
                                 control=control_for(sess, job.job_id), activity=sess.probe, wait_for_space=wait,
                                 ranks=sess.ranks, replay_from=replay_sources(sess), freezer=freezer_for(sess))
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
        check = check_forgetting(sess, job, probes_before)
        action = check.report["gate"]["action"] if check is not None and check.tripped else None
        if action == "rollback":
            roll_back_for_forgetting(sess, job.job_id, before, check)
            return
        publish_when_space(sess, job, outcome, before, wait, probes_before, check, hold=action == "hold")
    elif outcome.status == "skipped":
        end_without_publishing(sess, job.job_id, "skip", outcome.steps, before)
    else:
        end_without_publishing(sess, job.job_id, "stop", outcome.checkpoint_step)


def freezer_for(sess: Session) -> Any:
    """The session's freezer (lora.freeze_stalled), set to start from the current version's frozen set."""
    if sess.freezer is not None:
        sess.freezer.carry = list(((sess.manifest.activity_moved or {}).get("freezing") or {}).get("frozen") or [])
    return sess.freezer


def check_forgetting(sess: Session, job: protocol.Job, probes_before: dict) -> forgetting.FileCheck | None:
    """The forgetting checks after the file, before its version becomes current (daemon.train.forgetting)."""
    steps_log = ckpt.read_step_log(sess.checkpoints(job.job_id) / ckpt.StepLog.NAME)
    return forgetting.check_file(sess, job, steps_log, probes_before)


def roll_back_for_forgetting(sess: Session, job_id: str, before: dict[str, Any], check: forgetting.FileCheck) -> None:
    """forgetting.action rollback: as a guard trip, the adapter goes back to before the file, the file fails
    (reason `forgetting`) and the service pauses."""
    restore(sess, before)
    ckpt.delete_checkpoints(sess.checkpoints(job_id))
    message = check.report["gate"]["message"]
    log.error("%s rolled back by the forgetting gate: %s; adapter back to v%s", job_id, message, sess.version)
    sess.send(protocol.Failed(job_id=job_id, reason="forgetting", forgetting=check.report,
                              message=f"{message}; the adapter is back to its state before this file "
                                      f"(v{sess.version}), and training is paused"))


def replay_sources(sess: Session) -> list[ReplaySource]:
    """The earlier files replay (data.replay_fraction) may take from: the current version's dataset ledger, with
    the bytes the queue keeps in done/ (rank 0 reads them; daemon.train.replay checks each against its sha256).
    Named even with replay off: a file that began with replay resumes with it. Paths only: nothing is read here."""
    return sources_from(sess.manifest.learnt(), JobQueue(sess.cfg.path("queue")).folder(JobState.DONE))


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
                       wait: Any, probes_before: dict | None = None, check: forgetting.FileCheck | None = None,
                       hold: bool = False) -> None:
    """Publish the file's adapter; on a full disk hold (the trained weights stay in memory) and try again.
    A version the forgetting gate holds is published aside, and the weights go back to before the file."""
    moved = moved_by_file(sess, before)
    adapters_dir = sess.cfg.path("adapters")
    while True:
        try:
            require_space(adapters_dir, sess.cfg.service.min_free_bytes, "adapter")
            publish(sess, job, outcome, moved=moved, probes_before=probes_before, check=check, hold=hold)
            if hold:
                restore(sess, before)
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
    if (held := held_for(sess, msg.job_id)) is not None:  # a skip of a held file drops its version, as reject does
        drop_held(sess, held)
        discarded = held.steps or discarded
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
            case protocol.Accept(version=v):
                accept_held(sess, v)
                sess.ranks.broadcast(protocol.SyncLora().to_wire())
                sess.ranks.sync_tensors(ranks_lora(sess))
            case protocol.Reject(version=v):
                reject_held(sess, v)
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
