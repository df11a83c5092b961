"""Shared per-app state and the `Annotated` dependencies routers use."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader

from daemon.config import Config
from daemon.jobqueue import JobQueue
from monitor import auth
from monitor.gpu import GpuProbe
from monitor.history_index import HistoryIndex
from monitor.host import ProcessSampler
from monitor.settings import MonitorSettings


@dataclass
class MonitorState:
    cfg: Config
    settings: MonitorSettings
    token: str
    queue: JobQueue
    gpu: GpuProbe
    procs: ProcessSampler
    history: HistoryIndex = field(default_factory=HistoryIndex)
    started_at: float = field(default_factory=time.time)
    sse_clients: int = 0
    closing: bool = False  # set on shutdown so live streams end instead of holding it up


def get_state(request: Request) -> MonitorState:
    return request.app.state.monitor


StateDep = Annotated[MonitorState, Depends(get_state)]

# Declared so /docs shows an "Authorize" box; the check itself also accepts a Bearer header.
_api_key = APIKeyHeader(name=auth.HEADER, auto_error=False, description="contents of status/monitor_token")


def require_token(request: Request, state: StateDep, _key: Annotated[str | None, Security(_api_key)] = None) -> None:
    """For every state-changing endpoint."""
    auth.check(request, state.token)


def require_read_token(request: Request, state: StateDep, _key: Annotated[str | None, Security(_api_key)] = None) -> None:
    """For reads: only when bound off loopback, where anyone on the network could ask."""
    if state.settings.token_for_reads:
        auth.check(request, state.token)


ReadAuth = Depends(require_read_token)
WriteAuth = Depends(require_token)
