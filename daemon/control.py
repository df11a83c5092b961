"""Control requests: written by `trainctl` and the monitor, consumed by the service.

    set_desired_state(cfg, DesiredState.PAUSED, by="cli")   # pause/resume: a desired state
    request(cfg, ControlAction.SKIP, by="monitor")            # skip/stop: one-shot requests

Both are plain files under `status/control/`, so the CLI works when the
monitor is down and nothing needs the daemon to be up to accept a request.
`touch .stop` in the instance folder is the emergency stop. Standard library only.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from daemon import atomic
from daemon.config import Config
from daemon.states import ControlAction, DesiredState, Priority

EMERGENCY_STOP_NAME = ".stop"

log = logging.getLogger(__name__)


def control_dir(cfg: Config) -> Path:
    return cfg.path("status") / "control"


def requests_dir(cfg: Config) -> Path:
    return control_dir(cfg) / "requests"


def emergency_stop_path(cfg: Config) -> Path:
    return cfg.root / EMERGENCY_STOP_NAME


def set_desired_state(cfg: Config, state: DesiredState, by: str = "cli", now: float | None = None) -> None:
    now = time.time() if now is None else now
    atomic.write_json(control_dir(cfg) / "desired_state.json", {"state": state.value, "by": by, "at": now})


def read_desired_state(cfg: Config) -> DesiredState:
    """RUNNING unless a valid file says PAUSED (a damaged file must not freeze training)."""
    return read_desired(cfg)[0]


def read_desired(cfg: Config) -> tuple[DesiredState, str | None]:
    """The desired state and who set it (`cli`, `monitor`, `guard`, `forgetting`...)."""
    try:
        raw = atomic.read_json(control_dir(cfg) / "desired_state.json")
        return DesiredState(raw["state"]), str(raw.get("by")) if raw.get("by") is not None else None
    except (FileNotFoundError, ValueError, KeyError, TypeError, AttributeError):
        return DesiredState.RUNNING, None


def pins_path(cfg: Config) -> Path:
    return control_dir(cfg) / "pins.json"


def read_pins(cfg: Config) -> set[int]:
    """Adapter versions the user pinned (retention never removes them); a damaged file pins nothing new."""
    try:
        return {int(v) for v in atomic.read_json(pins_path(cfg)).get("versions", [])}
    except (FileNotFoundError, ValueError, TypeError, AttributeError):
        return set()


def set_pin(cfg: Config, version: int, pinned: bool, by: str = "cli") -> set[int]:
    pins = read_pins(cfg)
    pins = pins | {version} if pinned else pins - {version}
    atomic.write_json(pins_path(cfg), {"versions": sorted(pins), "by": by, "at": time.time()})
    return pins


@dataclass(frozen=True)
class ControlRequest:
    path: Path
    action: ControlAction
    by: str
    at: float
    job_id: str | None
    priority: str | None
    version: int | None = None  # rollback: the adapter version
    description: str | None = None  # consolidate: what was trained (required)
    force: bool = False  # consolidate: even while a probe is over its limit


def request(cfg: Config, action: ControlAction, by: str = "cli", job_id: str | None = None,
            priority: str | None = None, now: float | None = None, version: int | None = None,
            description: str | None = None, force: bool = False) -> Path:
    """Leave a one-shot request for the service; returns its file (gone once the service acted).

    `job_id` names the queue file for retry/remove (and, optionally, guards a
    skip so it cannot hit a file that started after the request was made).
    """
    now = time.time() if now is None else now
    name = f"{now:017.6f}-{uuid.uuid4().hex[:8]}-{action.value}.json"
    path = requests_dir(cfg) / name
    atomic.write_json(path, {"action": action.value, "by": by, "at": now, "job_id": job_id, "priority": priority,
                             "version": version, "description": description, "force": force})
    return path


def pending_requests(cfg: Config) -> list[ControlRequest]:
    """Requests in the order they were made; unreadable ones are dropped with the file."""
    out = []
    try:
        names = sorted(n for n in os.listdir(requests_dir(cfg)) if n.endswith(".json") and not n.startswith("."))
    except FileNotFoundError:
        return []
    for name in names:
        path = requests_dir(cfg) / name
        try:
            out.append(_parse_request(path, atomic.read_json(path)))
        except (ValueError, KeyError, TypeError, AttributeError, FileNotFoundError) as e:
            log.warning("dropping unusable control request %s: %s", name, e)
            atomic.remove_file(path)
    return out


def _parse_request(path: Path, raw: dict) -> ControlRequest:
    """A request whose every field is usable, or ValueError/KeyError/TypeError."""
    action = ControlAction(raw["action"])
    job_id, priority = raw.get("job_id"), raw.get("priority")
    if job_id is not None and not isinstance(job_id, str):
        raise TypeError(f"job_id must be a string, got {job_id!r}")
    if priority is not None:
        Priority(priority)
    if action in (ControlAction.RETRY, ControlAction.REMOVE) and not job_id:
        raise ValueError(f"{action.value} needs a job_id")
    version = raw.get("version")
    with_version = (ControlAction.ROLLBACK, ControlAction.ACCEPT, ControlAction.REJECT)
    if action in with_version and (not isinstance(version, int) or isinstance(version, bool) or version < 1):
        raise ValueError(f"{action.value} needs an adapter version >= 1, got {version!r}")
    description = raw.get("description")
    if action is ControlAction.CONSOLIDATE and (not isinstance(description, str) or not description.strip()):
        raise ValueError("consolidate needs a description of what was trained")
    return ControlRequest(path, action, str(raw.get("by", "?")), float(raw.get("at", 0)), job_id, priority,
                          version if action in with_version else None,
                          description if action is ControlAction.CONSOLIDATE else None,
                          raw.get("force") is True and action is ControlAction.CONSOLIDATE)


def consume(req: ControlRequest) -> None:
    atomic.remove_file(req.path)


def emergency_stop_requested(cfg: Config) -> bool:
    return emergency_stop_path(cfg).exists()
