"""POST /api/control/{pause,resume,skip,stop} and retry/remove of queued files.

Same module as `trainctl` (`daemon.control`): pause/resume set the desired state,
the rest leave one-shot requests the daemon consumes. Nothing here waits for the
daemon; the page shows the daemon's real state from /api/status (`requested_state`
vs `status`, `pending_requests`) rather than guessing that a click worked.
Job ids are only ever compared with the names the queue lists, never joined
into a path.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Body, HTTPException
from pydantic import BaseModel, Field

from daemon import adapters, control
from daemon.lock import holder_pid
from daemon.states import ControlAction, DesiredState, Priority
from monitor.deps import MonitorState, StateDep, WriteAuth
from monitor.models import ControlResult

router = APIRouter(tags=["control"], dependencies=[WriteAuth])
BY = "monitor"


class SkipBody(BaseModel):
    job_id: str | None = None  # guard: skip only if this file is still the one training


class RetryBody(BaseModel):
    priority: Literal["high", "normal", "low"] = "normal"


class ConsolidateBody(BaseModel):
    description: str = Field(min_length=1, max_length=2000, description="what was trained (kept in lineage.json)")
    force: bool = Field(False, description="merge even while a probe is over forgetting.max_probe_increase")


class RollbackBody(BaseModel):
    version: int = Field(ge=1, description="the adapter version to make current again")


@router.post("/api/control/pause", response_model=ControlResult, summary="Pause between steps (model stays resident)")
def pause(state: StateDep) -> ControlResult:
    control.set_desired_state(state.cfg, DesiredState.PAUSED, by=BY)
    return ControlResult(action="pause", requested_state="paused")


@router.post("/api/control/resume", response_model=ControlResult, summary="Resume training")
def resume(state: StateDep) -> ControlResult:
    control.set_desired_state(state.cfg, DesiredState.RUNNING, by=BY)
    return ControlResult(action="resume", requested_state="running")


def _need_running_daemon(state: MonitorState, action: str) -> None:
    """Like trainctl: a stop or skip with no daemon to act on it would otherwise wait
    in status/control/ and hit the next start (the daemon drops such leftovers too)."""
    if holder_pid(state.cfg.path("status") / "daemon.lock") is None:
        raise HTTPException(409, f"{action}: the daemon is not running")


@router.post("/api/control/skip", response_model=ControlResult, summary="Abandon the file in training (it goes to failed/, reason skipped)",
             responses={409: {"description": "the daemon is not running"}})
def skip(state: StateDep, body: Annotated[SkipBody | None, Body()] = None) -> ControlResult:
    _need_running_daemon(state, "skip")
    path = control.request(state.cfg, ControlAction.SKIP, by=BY, job_id=body.job_id if body else None)
    return ControlResult(action="skip", requested_state=control.read_desired_state(state.cfg).value, request_id=path.name)


@router.post("/api/control/stop", response_model=ControlResult, summary="Checkpoint and stop the daemon; the file resumes at next start",
             responses={409: {"description": "the daemon is not running"}})
def stop(state: StateDep) -> ControlResult:
    _need_running_daemon(state, "stop")
    path = control.request(state.cfg, ControlAction.STOP, by=BY)
    return ControlResult(action="stop", requested_state=control.read_desired_state(state.cfg).value, request_id=path.name,
                         note="the daemon exits after checkpointing; start it again with bin/start_all.sh")


@router.post("/api/queue/{job_id}/retry", response_model=ControlResult, summary="Put a failed file back in line")
def retry(state: StateDep, job_id: str, body: Annotated[RetryBody | None, Body()] = None) -> ControlResult:
    if job_id not in {e.job_id for e in state.queue.failed()}:
        raise HTTPException(404, f"{job_id!r} is not in failed/")
    prio = Priority((body or RetryBody()).priority)
    path = control.request(state.cfg, ControlAction.RETRY, by=BY, job_id=job_id, priority=prio.value)
    return ControlResult(action="retry", requested_state=control.read_desired_state(state.cfg).value, request_id=path.name)


@router.post("/api/queue/{job_id}/remove", response_model=ControlResult, summary="Take a pending file out of line (moved to failed/, reason removed)")
def remove(state: StateDep, job_id: str) -> ControlResult:
    if job_id not in {e.job_id for e in state.queue.pending()}:
        raise HTTPException(404, f"{job_id!r} is not pending")
    path = control.request(state.cfg, ControlAction.REMOVE, by=BY, job_id=job_id)
    return ControlResult(action="remove", requested_state=control.read_desired_state(state.cfg).value, request_id=path.name)


@router.post("/api/control/consolidate", response_model=ControlResult,
             summary="Merge the adapter into a new base at the next boundary between files, then train on from it",
             responses={409: {"description": "the daemon is not running, or no adapter exists yet"},
                        422: {"description": "no description"}})
def consolidate(state: StateDep, body: ConsolidateBody) -> ControlResult:
    _need_running_daemon(state, "consolidate")
    if not body.description.strip():
        raise HTTPException(422, "consolidate: the description must say what was trained")
    if adapters.peek_current(state.cfg.path("adapters")) is None:
        raise HTTPException(409, "consolidate: no adapter has been published yet")
    path = control.request(state.cfg, ControlAction.CONSOLIDATE, by=BY, description=body.description.strip(),
                           force=body.force)
    return ControlResult(action="consolidate", requested_state=control.read_desired_state(state.cfg).value,
                         request_id=path.name, note="the events say when it is done (kind consolidated)")


@router.post("/api/control/rollback", response_model=ControlResult,
             summary="Make a kept adapter version current again (a file in training starts over on it)",
             responses={404: {"description": "no such kept version"},
                        409: {"description": "the daemon is not running, or the version is of another generation"}})
def rollback(state: StateDep, body: RollbackBody) -> ControlResult:
    _need_running_daemon(state, "rollback")
    folder = state.cfg.path("adapters")
    if body.version not in {v.version for v in adapters.versions(folder)}:
        raise HTTPException(404, f"rollback: adapter v{body.version} is not kept")
    if (why := adapters.rollback_refusal(folder, body.version)) is not None:
        raise HTTPException(409, f"rollback: {why}")
    path = control.request(state.cfg, ControlAction.ROLLBACK, by=BY, version=body.version)
    return ControlResult(action="rollback", requested_state=control.read_desired_state(state.cfg).value, request_id=path.name)


def _decide_held(state: StateDep, body: RollbackBody, action: ControlAction) -> ControlResult:
    _need_running_daemon(state, action.value)
    held = [v.version for v in adapters.held_versions(state.cfg.path("adapters"))]
    if body.version not in held:
        raise HTTPException(409, f"{action.value}: adapter v{body.version} is not held"
                                 + (f" (v{held[0]} is)" if held else " (no version is held)"))
    path = control.request(state.cfg, action, by=BY, version=body.version)
    return ControlResult(action=action.value, requested_state=control.read_desired_state(state.cfg).value,
                         request_id=path.name)


@router.post("/api/control/accept", response_model=ControlResult,
             summary="Make the version the forgetting gate holds current (its file is learnt); training resumes",
             responses={409: {"description": "the daemon is not running, or that version is not held"}})
def accept(state: StateDep, body: RollbackBody) -> ControlResult:
    return _decide_held(state, body, ControlAction.ACCEPT)


@router.post("/api/control/reject", response_model=ControlResult,
             summary="Drop the version the forgetting gate holds (its file fails, reason forgetting); training resumes",
             responses={409: {"description": "the daemon is not running, or that version is not held"}})
def reject(state: StateDep, body: RollbackBody) -> ControlResult:
    return _decide_held(state, body, ControlAction.REJECT)
