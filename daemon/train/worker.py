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

from daemon import adapters
from daemon.atomic import sweep_temps
from daemon.config import Config, load_config
from daemon.errors import DataError
from daemon.logs import setup_logging
from daemon.train import checkpoint as ckpt
from daemon.train import process
from daemon.train.activity import ActivityProbe, Grid
from daemon.train.model import load_adapter, load_for_training, lora_state, publish_adapter, set_lora_state
from daemon.train.threads import ThreadGovernor, start_threads

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- the session


@dataclass
class Session:
    """What the child keeps between files: the loaded model, the current adapter, the pause state."""

    cfg: Config
    conn: Connection
    lm: Any  # daemon.train.model.LoadedModel
    version: int | None  # current adapter version (None: nothing published yet)
    manifest: dict[str, Any]
    probe: ActivityProbe  # per-layer LoRA activity of lm (keeps ‖W₀‖ across files)
    governor: ThreadGovernor | None = None  # trims the CPU threads while other processes want the cores (auto)
    paused: bool = False
    exit_code: int | None = None  # set once the child must leave
    backlog: collections.deque = field(default_factory=collections.deque)

    def send(self, msg: dict[str, Any]) -> None:
        try:
            self.conn.send(msg)
        except (OSError, EOFError, ValueError) as e:  # the service is gone; PDEATHSIG will end us
            log.warning("cannot send %s: %s", msg.get("type"), e)

    @property
    def trained_jobs(self) -> list[str]:
        return list(self.manifest.get("trained_jobs", []))

    def checkpoints(self, job_id: str) -> Path:
        return self.cfg.path("checkpoints") / job_id


def load_session(cfg: Config, conn: Connection, threads: int) -> Session:
    """Load base + current adapter (or a fresh LoRA seeded from training.seed) and say `ready`."""
    t0 = time.monotonic()
    lm = load_for_training(cfg, seed=cfg.training.seed)
    current = adapters.read_current(cfg.path("adapters"))
    if current is not None:
        load_adapter(lm.model, current.path)
        log.info("adapter v%d loaded from %s", current.version, current.path)
        if swept := ckpt.sweep_published(cfg.path("checkpoints"), set(current.trained_jobs)):
            log.info("removed the checkpoints of %d file(s) adapter v%d already learnt", swept, current.version)
    sess = Session(cfg, conn, lm, current.version if current else None, current.manifest if current else {},
                   ActivityProbe(lm.model), ThreadGovernor(threads) if cfg.training.cpu_threads == 0 else None)
    trainable, total = lm.param_counts()
    sess.send({"type": "ready", "device": lm.device, "compute_dtype": str(lm.dtype).removeprefix("torch."),
               "quantization": lm.quantization, "base_model": cfg.base_model, "adapter_version": sess.version,
               "trainable_params": trainable, "total_params": total, "load_seconds": time.monotonic() - t0})
    return sess


# ---------------------------------------------------------------- control between steps


def control_for(sess: Session, job_id: str):  # noqa: ANN201 - returns daemon.train.loop.ControlFn
    """The loop's control callback: drain messages; block while paused; answer continue/stop/skip."""

    def control() -> str:
        if sess.governor is not None:
            sess.governor.tick()
        while sess.paused or sess.conn.poll():
            try:
                msg = sess.conn.recv()
            except (EOFError, OSError):  # the service went away: keep what we have and leave
                sess.exit_code = 0
                return "stop"
            verdict = on_message_in_job(sess, msg, job_id)
            if verdict != "continue":
                return verdict
        return "continue"

    return control


def on_message_in_job(sess: Session, msg: dict[str, Any], job_id: str) -> str:
    kind = msg.get("type")
    if kind in ("pause", "resume"):
        set_paused(sess, kind == "pause", job_id)
    elif kind in ("stop", "shutdown"):
        sess.exit_code = 0
        return "stop"
    elif kind == "skip" and msg.get("job_id") in (None, job_id):
        return "skip"
    elif kind == "train":
        log.warning("train %s arrived while %s trains; it runs next", msg.get("job_id"), job_id)
        sess.backlog.append(msg)
    else:
        log.warning("ignoring %r while training %s", kind, job_id)
    return "continue"


def set_paused(sess: Session, paused: bool, job_id: str | None) -> None:
    sess.paused = paused
    sess.send({"type": "paused" if paused else "resumed", "job_id": job_id})


# ---------------------------------------------------------------- one file


def handle_train(sess: Session, msg: dict[str, Any]) -> None:
    """Train one file and answer done / skipped / failed / stopped."""
    from daemon.train.loop import Job, train_file  # imports torch: only after threads.start_threads

    job = Job(msg["job_id"], Path(msg["path"]), msg["format"], msg["sha256"])
    if job.job_id in sess.trained_jobs:
        answer_already_trained(sess, job.job_id)
        return
    before = lora_state(sess.lm.model)  # CPU copy: skip and failure put these weights back
    try:
        outcome = train_file(sess.lm, sess.cfg, job, global_step=int(sess.manifest.get("global_step", 0)),
                             ckpt_folder=sess.checkpoints(job.job_id), report=sess.send,
                             control=control_for(sess, job.job_id), activity=sess.probe)
    except Exception as e:  # a job boundary: record it with the job, stay alive for the next one
        restore(sess, before)
        fail(sess, job.job_id, e)
        return
    if outcome.status == "done":
        publish(sess, job, msg, outcome, moved=moved_by_file(sess, before))
    elif outcome.status == "skipped":
        restore(sess, before)
        ckpt.delete_checkpoints(sess.checkpoints(job.job_id))
        sess.send({"type": "skipped", "job_id": job.job_id, "steps_discarded": outcome.steps})
    else:
        sess.send({"type": "stopped", "job_id": job.job_id, "checkpoint_step": outcome.checkpoint_step})
        sess.exit_code = 0


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


def publish(sess: Session, job: Any, msg: dict[str, Any], outcome: Any, moved: Grid | None) -> None:
    """Publish the next adapter version, drop the job's checkpoints, answer done.

    What the file moved (per module ‖ΔW after − ΔW before‖, from the weights before
    the file, so a resume in between counts nothing twice) goes into the manifest,
    which survives a crash between publication and the `done` answer.
    """
    version = (sess.version or 0) + 1
    manifest = {
        "version": version, "parent_version": sess.version, "base_model": sess.cfg.base_model,
        "job_id": job.job_id, "original_name": msg.get("original_name"), "sha256": job.sha256,
        "steps": outcome.steps, "global_step": outcome.global_step, "final_loss": outcome.final_loss,
        "eval_loss": outcome.eval_loss, "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "trained_jobs": sess.trained_jobs + [job.job_id],
        "activity_moved": moved.to_dict() if moved is not None else None,
        "ledger": outcome.ledger,
    }
    published = publish_adapter(sess.cfg.path("adapters"), sess.lm.model, manifest)
    sess.version, sess.manifest = version, manifest
    ckpt.delete_checkpoints(sess.checkpoints(job.job_id))
    log.info("%s done in %d steps: adapter v%d", job.job_id, outcome.steps, version)
    sess.send({"type": "done", "job_id": job.job_id, "steps": outcome.steps, "final_loss": outcome.final_loss,
               "eval_loss": outcome.eval_loss, "adapter_version": version, "adapter_path": str(published.path),
               "already_trained": False, "activity_moved": manifest["activity_moved"]})


def answer_already_trained(sess: Session, job_id: str) -> None:
    """The current adapter learnt this job (crash after publish): answer done without training."""
    ckpt.delete_checkpoints(sess.checkpoints(job_id))
    own = sess.manifest.get("job_id") == job_id  # the numbers are known only for the newest job
    log.info("%s is already in adapter v%s; not training it again", job_id, sess.version)
    sess.send({"type": "done", "job_id": job_id, "steps": sess.manifest.get("steps") if own else None,
               "final_loss": sess.manifest.get("final_loss") if own else None,
               "eval_loss": sess.manifest.get("eval_loss") if own else None, "adapter_version": sess.version,
               "adapter_path": str(sess.cfg.path("adapters") / adapters.version_dir_name(sess.version)),
               "already_trained": True, "activity_moved": sess.manifest.get("activity_moved") if own else None})


def fail(sess: Session, job_id: str, e: Exception) -> None:
    """Answer `failed`. Bad data drops the job's checkpoints; a training error keeps them for a retry."""
    invalid = isinstance(e, DataError)
    if invalid:
        ckpt.delete_checkpoints(sess.checkpoints(job_id))
    log.error("%s failed: %s", job_id, e, exc_info=not invalid)
    errors = [x.to_dict() if hasattr(x, "to_dict") else x for x in getattr(e, "errors", [])]
    sess.send({"type": "failed", "job_id": job_id, "reason": "invalid_data" if invalid else "training_error",
               "message": str(e) or type(e).__name__, "traceback": traceback.format_exc(), "errors": errors})


# ---------------------------------------------------------------- idle: wait for the next message


def handle_idle_skip(sess: Session, msg: dict[str, Any]) -> None:
    """A skip for a job not in training (e.g. after a crash): drop its checkpoints."""
    job_id = msg["job_id"]
    discarded = ckpt.latest_step(sess.checkpoints(job_id)) or 0
    ckpt.delete_checkpoints(sess.checkpoints(job_id))
    sess.send({"type": "skipped", "job_id": job_id, "steps_discarded": discarded})


def serve(sess: Session) -> int:
    """Answer messages until stop/shutdown (or the service goes away); the exit code."""
    while sess.exit_code is None:
        try:
            msg = sess.backlog.popleft() if sess.backlog else sess.conn.recv()
        except (EOFError, OSError):
            log.info("the service closed the connection; leaving")
            return 0
        kind = msg.get("type")
        if kind == "train":
            handle_train(sess, msg)
        elif kind in ("pause", "resume"):
            set_paused(sess, kind == "pause", None)
        elif kind == "skip":
            handle_idle_skip(sess, msg)
        elif kind == "stop":
            sess.send({"type": "stopped", "job_id": None, "checkpoint_step": None})
            sess.exit_code = 0
        elif kind == "shutdown":
            sess.exit_code = 0
        else:
            log.warning("ignoring unknown message %r", kind)
    return sess.exit_code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m daemon.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="the daemon's config.json")
    args = parser.parse_args(argv)
    process.die_with_parent()
    cfg = load_config(args.config)
    setup_logging(cfg.path("logs"), "trainer", cfg.service.log_level, also_stderr=False)
    threads = start_threads(cfg.training.cpu_threads)  # before quiet_hugging_face imports torch
    process.quiet_hugging_face()
    lock_fd = process.acquire_lock(cfg.path("checkpoints") / ".trainer.lock")
    if swept := ckpt.sweep_temp(cfg.path("checkpoints")) + sweep_temps(cfg.path("adapters"), adapters.CURRENT):
        log.info("removed %d unfinished checkpoint folder(s) and pointer temp file(s) a killed trainer left", swept)
    log.info("trainer pid %d started (config %s)", os.getpid(), args.config)
    conn = process.connect()
    try:
        code = serve(load_session(cfg, conn, threads))
    except BaseException:
        log.exception("trainer failed outside a job; the service restarts it")
        raise
    finally:
        conn.close()
        os.close(lock_fd)
    log.info("trainer exits with %d", code)
    return code


if __name__ == "__main__":
    sys.exit(main())
