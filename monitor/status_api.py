"""GET /api/status and GET /api/health: the live snapshot and what the monitor makes of it."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Query, Response

from daemon import atomic, control
from daemon.diskspace import write_trouble
from daemon.status import read_status
from monitor.deps import MonitorState, ReadAuth, StateDep, WriteAuth
from monitor.liveness import assess
from monitor.models import Health, PendingRequest, Status

router = APIRouter(tags=["status"], dependencies=[ReadAuth])


def pending_requests(state: MonitorState) -> list[PendingRequest]:
    """One-shot requests still waiting for the daemon. Read only: unlike
    `control.pending_requests`, never deletes a file (the daemon owns that)."""
    folder = control.requests_dir(state.cfg)
    try:
        names = sorted(n for n in folder.iterdir() if n.suffix == ".json" and not n.name.startswith("."))
    except FileNotFoundError:
        return []
    out = []
    for path in names:
        try:
            raw = atomic.read_json(path)
            out.append(PendingRequest(action=str(raw["action"]), at=raw.get("at"), job_id=raw.get("job_id")))
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            continue  # consumed between listing and reading, or not ours to judge
    return out


def current_status(state: MonitorState, now: float | None = None) -> Status:
    now = time.time() if now is None else now
    raw: dict[str, Any] | None = read_status(state.cfg.path("status"))
    live = assess(raw, now, trouble=lambda: write_trouble(state.cfg.path("status")))
    body = dict(raw or {})
    body.update(
        stale=live.stale, stale_reason=live.reason, stale_cause=live.cause, age_seconds=live.age_seconds,
        daemon_alive=live.daemon_alive,
        requested_state=control.read_desired_state(state.cfg).value,
        pending_requests=pending_requests(state), now=now,
    )
    return Status.model_validate(body)


@router.get("/api/status", response_model=Status, summary="Live training status, with `stale` when the daemon is not responding")
def get_status(state: StateDep) -> Status:
    return current_status(state)


@router.get("/api/health", response_model=Health, summary="For scripts and supervisors")
def get_health(state: StateDep, response: Response,
               strict: Annotated[bool, Query(description="answer 503 unless the daemon is responding")] = False,
               deep: Annotated[bool, Query(description="run trainctl health's checks too (the newest checkpoint is "
                                                       "loaded in a subprocess: seconds)")] = False) -> Health:
    s = current_status(state)
    daemon = "absent" if s.status is None else ("not_responding" if s.stale else "running")
    if strict and s.stale:
        response.status_code = 503
    checks = code = None
    if deep:
        from daemon.health import exit_code, run_checks

        found = run_checks(state.cfg, deep=True)
        checks, code = [c.to_dict() for c in found], exit_code(found)
        if strict and code == 2:
            response.status_code = 503
    return Health(ok=True, daemon=daemon, status=s.status, stale=s.stale, stale_reason=s.stale_reason,
                  age_seconds=s.age_seconds, monitor_uptime_seconds=time.time() - state.started_at,
                  checks=checks, exit_code=code)


@router.get("/api/auth/check", dependencies=[WriteAuth], summary="200 when the token sent is the right one (the page asks before enabling controls)")
def check_token() -> dict[str, bool]:
    return {"ok": True}
