"""The trainer's session: what it keeps between files, how it loads, and what a message means mid-file.

    sess = load_session(cfg, conn, threads, ranks)     # base + current adapter loaded; `ready` said
    control = control_for(sess, job_id)                # the training loop's control callback
    wait = wait_for_space_for(sess, job_id)            # ...and its callback for a full disk

The model stays loaded across files; the current adapter version and its
manifest (daemon.adapters.AdapterManifest) say what the next version
continues. Messages that arrive while a file trains are answered between
steps (`on_message_in_job`): a pause blocks, stop and skip end the file, a
rollback is refused before the file is touched or ends it, the rest waits.
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from daemon import adapters, protocol
from daemon.config import Config
from daemon.diskspace import DiskFull
from daemon.errors import TraindError
from daemon.train import levers
from daemon.train import checkpoint as ckpt
from daemon.train.activity_probe import ActivityProbe
from daemon.train.forgetting import Scorer, load_probes
from daemon.train.model import load_adapter, load_for_training, resolve_base
from daemon.train.ranks import Ranks
from daemon.train.tboard import Board
from daemon.train.threads import ThreadGovernor

log = logging.getLogger(__name__)


@dataclass
class Session:
    """What the child keeps between files: the loaded model, the current adapter, the pause state."""

    cfg: Config
    conn: Connection | None  # rank 0's line to the service (None on the other ranks)
    lm: Any  # daemon.train.model.LoadedModel
    version: int | None  # current adapter version (None: nothing published yet)
    manifest: adapters.AdapterManifest  # the current version's (version 0 before the first: what it starts on)
    probe: ActivityProbe | None  # per-layer LoRA activity of lm (keeps ‖W₀‖ across files); rank 0's
    governor: ThreadGovernor | None = None  # trims the CPU threads while other processes want the cores (auto)
    paused: bool = False
    exit_code: int | None = None  # set once the child must leave
    backlog: collections.deque = field(default_factory=collections.deque)
    rollback_to: int | None = None  # a rollback asked for while a file trains, done once the loop has let go
    probes: list | None = None  # forgetting.probe_files and eval.file, tokenised once (daemon.train.forgetting)
    probe_rows: tuple[int | None, dict] | None = None  # (adapter version, the probes' rows under it)
    scorer: Scorer = field(default_factory=Scorer)  # scores sets, and knows what a scored token costs here
    keep_sets: dict = field(default_factory=dict)  # job_id -> its keep-set (ScoreSet, or None: it has none), read once
    forgetting_off: str | None = None  # why the forgetting checks do not run here (None: they do when enabled)
    board: Any = None  # daemon.train.tboard.Board when tensorboard.enabled
    ranks: Ranks = field(default_factory=Ranks)  # this process among the trainer's ranks (one by default)
    freezer: Any = None  # daemon.train.freezing.Freezer with lora.freeze_stalled (one process only)
    intruders: Any = None  # daemon.train.intruders.Intruders with activity.intruders (rank 0)

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
        return list(self.manifest.trained_jobs)

    def checkpoints(self, job_id: str) -> Path:
        return self.cfg.path("checkpoints") / job_id


def load_session(cfg: Config, conn: Connection | None, threads: int, ranks: Ranks | None = None) -> Session:
    """Load base + current adapter (or a fresh LoRA seeded from training.seed) and say `ready`.

    With several ranks, rank 0 reads the adapter folder and the others get its base and weights."""
    ranks = ranks or Ranks()
    t0 = time.monotonic()
    # The current version, or (a store `config approve` emptied for another adapter shape) the START record
    # naming the consolidated base it goes on from: its manifest names the base (the config's is generation 0's).
    current, head = (adapters.head(cfg.path("adapters"), adapters.config_base(cfg)) if ranks.main
                     else (None, adapters.AdapterManifest(version=0)))
    base = Path(head.base_path) if head.base_path else None
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
    recorded = current.manifest.quantization if current is not None else None
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
    if cfg.lora.freeze_stalled and probe is not None and not ranks.many:
        from daemon.train.freezing import Freezer

        sess.freezer = Freezer(lm.model, cfg.lora, probe)
    if cfg.activity.intruders and probe is not None:
        from daemon.train.intruders import Intruders

        sess.intruders = Intruders(probe, cfg.activity)
        probe.extra["intruders"] = sess.intruders.counts
    if not ranks.main:
        return sess
    sess.probes, problems = load_probes(cfg, lm.tokenizer)
    eval_error = "; ".join(problems) or None
    if ranks.sharded and (cfg.forgetting.enabled or sess.probes):  # scoring would be a collective rank 0 runs alone
        sess.probes, sess.forgetting_off = [], "the forgetting checks do not run with distributed.strategy 'fsdp'"
        eval_error = sess.forgetting_off
        log.warning("%s", eval_error)
    eval_probe = next((p for p in sess.probes if p.path == str(cfg.eval_file)), None) if cfg.eval_file else None
    sess.board = Board.open(cfg)
    trainable, total = lm.param_counts()
    sess.send(protocol.Ready(
        device=lm.device, compute_dtype=str(lm.dtype).removeprefix("torch."), quantization=lm.quantization,
        base_model=str(base) if base else cfg.base_model, adapter_version=sess.version, trainable_params=trainable,
        total_params=total, load_seconds=time.monotonic() - t0, world_size=ranks.world_size,
        strategy=ranks.strategy, backend=ranks.backend, nnodes=ranks.nnodes,
        eval_set_examples=len(eval_probe.examples) if eval_probe else 0, eval_set_error=eval_error,
        generation=sess.manifest.generation, notes=list(lm.notes), levers=speed))
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
            why = adapters.rollback_refusal(sess.cfg.path("adapters"), to, sess.manifest.generation)
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
