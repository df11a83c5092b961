"""The service's status, derived in one place from the facts the loop keeps.

    status, detail, pause_reason = derive(Facts(...))

The loop never sets `status` here and there: it keeps facts (a stop asked
for, the trainer's state, a file in training, whether the trainer confirmed
it holds, the person's desired state, a disk hold) and the status follows
from them, the same way every tick. So a pause is shown while the trainer
holds, not when someone remembered to say so, and no two places can
disagree. Standard library only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from daemon.states import PauseReason, ServiceStatus, TrainerState


@dataclass(frozen=True)
class Facts:
    stopping: str | None = None  # why a stop was asked for, once it was
    refused: bool = False  # the config cannot run on this machine (the trainer said so): held for good
    trainer: TrainerState = TrainerState.DOWN
    cannot_start: str | None = None  # the trainer failed to start several times in a row: what is said
    restarting: str | None = None  # the trainer died; it restarts after its backoff: what is said
    joining: str = ""  # several machines: what the trainer waits for before it is ready
    loading: str | None = None  # what the trainer said it is doing while it loads (converting a GGUF base)
    job: bool = False  # a file is in training
    started: bool = False  # ...and the trainer said `started` (its data is read)
    holds: bool = False  # the trainer confirmed it holds between steps (`paused`, `disk_full`)
    paused_by_user: bool = False  # the desired state is paused
    disk: PauseReason | None = None  # a disk hold (disk_full or unwritable)
    disk_detail: str = ""  # its line for the detail
    lineage: str | None = None  # a rollback or consolidation waits for its answer: what it is doing
    held: str | None = None  # the forgetting gate holds a version: what is said (accept or reject it)
    paused_for_forgetting: bool = False  # the desired pause is the forgetting gate's (a rollback it made)


def joining(dc: Any) -> str:
    """Several machines (`distributed.nnodes` > 1): the group starts only once every node has joined; what for."""
    if dc.nnodes <= 1:
        return ""
    return (f"; the group starts once all {dc.nnodes} nodes have joined at {dc.master_addr}:{dc.master_port} "
            "(`traind worker --node-rank N` on each other node)")


def pause_reason(f: Facts) -> PauseReason | None:
    """Why training is held, whatever the trainer has confirmed: the disk first (it is over by itself)."""
    if f.disk:
        return f.disk
    if f.held is not None or (f.paused_by_user and f.paused_for_forgetting):
        return PauseReason.FORGETTING
    return PauseReason.USER if f.paused_by_user else None


def derive(f: Facts) -> tuple[ServiceStatus, str]:
    """The status and its detail line."""
    if f.stopping is not None:
        return ServiceStatus.STOPPING, f"stopping ({f.stopping})"
    if f.refused:
        return ServiceStatus.ERROR, ("the config cannot run on this machine; nothing is trained (mend config.json, "
                                     "then restart: bin/stop_all.sh && bin/start_all.sh)")
    loading = "loading model" + (f": {f.loading}" if f.loading else "") + f.joining
    if f.cannot_start is not None and f.trainer in (TrainerState.DOWN, TrainerState.STARTING):
        # the next try may be loading already: say so, with why it is an error
        return ServiceStatus.ERROR, f.cannot_start + (f" ({loading})" if f.trainer is TrainerState.STARTING else "")
    held = pause_reason(f) is not None
    if f.job and f.held is not None:  # trained, its version held aside: nothing trains until it is decided
        return ServiceStatus.PAUSED, f.held
    if f.job:
        if f.holds and held:
            return ServiceStatus.PAUSED, f.disk_detail or "paused; the model stays loaded"
        return ServiceStatus.TRAINING, "training" if f.started else "preparing data"
    if held:
        return ServiceStatus.PAUSED, f.disk_detail or "paused; no file is started"
    if f.trainer is TrainerState.DOWN and f.restarting is not None:
        return ServiceStatus.IDLE, f.restarting
    if f.trainer is TrainerState.STARTING:
        return ServiceStatus.IDLE, loading
    if f.lineage is not None:
        return ServiceStatus.IDLE, f.lineage
    return ServiceStatus.IDLE, "waiting for files"
