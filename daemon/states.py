"""States as `str` Enums, with the transitions allowed between them.

Standard library only: the service, the monitor and the CLI import this
without pulling in torch. Values serialise as plain strings, so the status
JSON stays readable and greppable.
"""

from __future__ import annotations

from enum import Enum


class ServiceStatus(str, Enum):
    """What `status/training_status.json` says the daemon is doing."""

    IDLE = "idle"  # no file in training (queue empty, or model loading)
    TRAINING = "training"
    PAUSED = "paused"  # model resident, waiting for resume
    STOPPING = "stopping"  # checkpointing before exit
    STOPPED = "stopped"  # exited cleanly; the file in progress resumes at next start
    ERROR = "error"  # the service could not go on (see last_error)


SERVICE_TRANSITIONS: dict[ServiceStatus, frozenset[ServiceStatus]] = {
    # STOPPED from anywhere: a second signal stops at once, without passing through STOPPING.
    ServiceStatus.IDLE: frozenset({ServiceStatus.TRAINING, ServiceStatus.PAUSED, ServiceStatus.STOPPING, ServiceStatus.STOPPED, ServiceStatus.ERROR}),
    ServiceStatus.TRAINING: frozenset({ServiceStatus.IDLE, ServiceStatus.PAUSED, ServiceStatus.STOPPING, ServiceStatus.STOPPED, ServiceStatus.ERROR}),
    ServiceStatus.PAUSED: frozenset({ServiceStatus.IDLE, ServiceStatus.TRAINING, ServiceStatus.STOPPING, ServiceStatus.STOPPED, ServiceStatus.ERROR}),
    ServiceStatus.STOPPING: frozenset({ServiceStatus.STOPPED, ServiceStatus.ERROR}),
    ServiceStatus.STOPPED: frozenset({ServiceStatus.IDLE}),  # a new start
    # ERROR to TRAINING or PAUSED: a trainer that came up in the end is handed a file (or held) in the same tick.
    ServiceStatus.ERROR: frozenset({ServiceStatus.IDLE, ServiceStatus.TRAINING, ServiceStatus.PAUSED,
                                    ServiceStatus.STOPPING, ServiceStatus.STOPPED}),
}


class TrainerState(str, Enum):
    """The service's view of its trainer child."""

    DOWN = "down"  # not running (before the first start, or after a crash until the restart)
    STARTING = "starting"  # spawned, loading the model
    READY = "ready"  # model loaded, no file
    BUSY = "busy"  # training a file (paused or not: see Service.child_paused)
    EXITING = "exiting"  # told to stop or shut down
    REFUSED = "refused"  # said the config cannot run on this machine: not restarted until the daemon is


class JobState(str, Enum):
    """Where a queued file is; each value is also the name of its folder under `queue/`."""

    PENDING = "pending"
    PROCESSING = "processing"
    DONE = "done"
    FAILED = "failed"


JOB_TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.PENDING: frozenset({JobState.PROCESSING, JobState.FAILED}),  # failed: removed by hand
    JobState.PROCESSING: frozenset({JobState.DONE, JobState.FAILED}),
    JobState.DONE: frozenset(),
    JobState.FAILED: frozenset({JobState.PENDING}),  # `trainctl queue retry`
}


class Priority(str, Enum):
    """Pending sub-folders, in the order they are served."""

    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"


PRIORITY_ORDER: tuple[Priority, ...] = (Priority.HIGH, Priority.NORMAL, Priority.LOW)


class DesiredState(str, Enum):
    """Pause/resume are a desired state the service converges to."""

    RUNNING = "running"
    PAUSED = "paused"


class PauseReason(str, Enum):
    """Why the status says `paused`: the person's desired state, a full disk, or a folder that cannot be written.

    The disk pause is the service's own and apart from the desired state: a
    `resume` while the disk is full is recorded, and training starts once
    space is back; a `pause` while the disk is full still holds afterwards.
    """

    USER = "user"  # trainctl pause / the dashboard (status/control/desired_state.json)
    FORGETTING = "forgetting"  # the forgetting gate held a version (accept or reject it) or rolled a file back
    DISK_FULL = "disk_full"  # a write failed for lack of space, or free space is below service.min_free_bytes
    UNWRITABLE = "unwritable"  # a runtime folder cannot be written (read-only, permissions): resumes once it can


class ControlAction(str, Enum):
    """One-shot requests, consumed once by the service (the only process that moves queue files)."""

    SKIP = "skip"  # the file in training -> failed/ (reason skipped)
    STOP = "stop"  # checkpoint and exit; the file resumes at the next start
    RETRY = "retry"  # failed/<job_id> -> pending/<priority>
    REMOVE = "remove"  # pending/<job_id> -> failed/ (reason removed)
    ROLLBACK = "rollback"  # adapter `version` becomes current again (as a new version), at the next step boundary
    CONSOLIDATE = "consolidate"  # merge the adapter into a new base (`description`), between files
    ACCEPT = "accept"  # the version the forgetting gate holds (`version`) becomes current; training resumes
    REJECT = "reject"  # the version the forgetting gate holds (`version`) is dropped, its file fails; training resumes


class FailReason(str, Enum):
    """Why a file ended in `queue/failed/` (the `reason` of its `.error.json`)."""

    INVALID_DATA = "invalid_data"  # validation refused it; `errors` has line numbers
    SKIPPED = "skipped"  # a person asked to skip it
    CRASHED = "crashed"  # the trainer died on it too often
    TRAINING_ERROR = "training_error"  # an exception while training it
    REMOVED = "removed"  # taken out of pending by `trainctl queue remove`
    GUARD = "guard"  # a guard stopped it: a non-finite loss or gradient, a loss spike (the daemon paused)
    FORGETTING = "forgetting"  # the forgetting gate rolled it back, or its held version was rejected


def check_transition(table: dict, old: Enum, new: Enum) -> None:
    """Raise ValueError when `old -> new` is not in `table` (a same-state write is allowed)."""
    if old == new or new in table[old]:
        return
    raise ValueError(f"transition {old.value!r} -> {new.value!r} is not allowed")
