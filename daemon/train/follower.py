"""The other ranks (under torchrun): each does its share of every step of the file rank 0 trains.

    follow(sess)          # until rank 0 says exit: train orders, LoRA syncs, reloads (daemon.protocol's rank orders)

Rank 0 alone talks to the service and decides; it broadcasts what the others do.
A node other than rank 0's gets a copy of the file (`share_file`).
"""

from __future__ import annotations

import dataclasses
import gc
import logging
from pathlib import Path
from typing import Any

from daemon import protocol
from daemon.errors import DataError, GuardTripped
from daemon.train.model import load_for_training
from daemon.train.session import Session, prepare_ranks

log = logging.getLogger(__name__)


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
                sess.lm = None  # the old base goes before the new one loads
                gc.collect()
                sess.lm = load_for_training(sess.cfg, seed=sess.cfg.training.seed, base=Path(base))
                prepare_ranks(sess.lm, sess.ranks)
            case protocol.Exit():
                return 0


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
    path = sess.ranks.share_file(Path(job.path), job.sha256, sess.cfg.path("checkpoints") / ".incoming")
    return dataclasses.replace(job, path=str(path))


def ranks_lora(sess: Session) -> list[Any]:
    return [p for p in sess.lm.model.parameters() if p.requires_grad] if sess.ranks.many else []
