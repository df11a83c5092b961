"""GET /api/events: Server-Sent Events with the live status, so the page never polls it.

Each client's generator stats the status file (and the control folder) every
POLL_SECONDS with an asyncio sleep; when either changed, or every
RECHECK_SECONDS regardless (a daemon that died changes nothing on disk, yet the
page must learn it is now stale), it rebuilds the status and sends it if
anything but the clock moved. A comment line every HEARTBEAT_SECONDS keeps
proxies from closing an idle stream; `retry:` tells EventSource-style clients
when to reconnect, and every reconnect starts with the full current status.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from typing import AsyncIterator

import anyio
from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import StreamingResponse

from daemon import control
from daemon.status import STATUS_FILE
from monitor.deps import MonitorState, ReadAuth, StateDep
from monitor.status_api import current_status

log = logging.getLogger(__name__)
router = APIRouter(tags=["status"], dependencies=[ReadAuth])

POLL_SECONDS = 0.5
RECHECK_SECONDS = 1.0
HEARTBEAT_SECONDS = 15.0
RETRY_MS = 3000
MAX_CLIENTS = 64  # each holds a connection and a task; a runaway tab loop must not exhaust the monitor
_VOLATILE = ("now", "age_seconds")


def _disk_key(state: MonitorState) -> tuple:
    key = []
    for path in (state.cfg.path("status") / STATUS_FILE, control.control_dir(state.cfg), control.requests_dir(state.cfg)):
        try:
            st = os.stat(path)
            key.append((st.st_mtime_ns, st.st_size, st.st_ino))
        except FileNotFoundError:
            key.append(None)
    return tuple(key)


def _frame(event: str, data: str, event_id: int) -> str:
    return f"id: {event_id}\nevent: {event}\ndata: {data}\n\n"


async def status_stream(request: Request, state: MonitorState) -> AsyncIterator[str]:
    state.sse_clients += 1  # counted here, not in the handler: a generator that never starts never ends either
    sent_id, last_sent, last_key, last_check, last_beat = 0, None, None, 0.0, time.monotonic()
    try:
        yield f"retry: {RETRY_MS}\n\n"
        while not state.closing and not await request.is_disconnected():
            key, mono = _disk_key(state), time.monotonic()
            if key != last_key or mono - last_check >= RECHECK_SECONDS:
                last_key, last_check = key, mono
                status = await anyio.to_thread.run_sync(current_status, state)
                body = status.model_dump(mode="json")
                comparable = json.dumps({k: v for k, v in body.items() if k not in _VOLATILE}, sort_keys=True)
                if comparable != last_sent:
                    last_sent, sent_id = comparable, sent_id + 1
                    yield _frame("status", json.dumps(body), sent_id)
                    last_beat = mono
            if mono - last_beat >= HEARTBEAT_SECONDS:
                yield ": keepalive\n\n"
                last_beat = mono
            await asyncio.sleep(POLL_SECONDS)
    except asyncio.CancelledError:
        log.debug("SSE client went away")
        raise
    finally:
        state.sse_clients -= 1


@router.get("/api/events", summary="Server-Sent Events: `status` events whenever the status changes",
            response_class=StreamingResponse, responses={200: {"content": {"text/event-stream": {}}}})
async def events(request: Request, state: StateDep) -> StreamingResponse:
    if state.sse_clients >= MAX_CLIENTS:
        raise HTTPException(503, f"too many live connections (max {MAX_CLIENTS}); close some dashboard tabs")
    return StreamingResponse(
        status_stream(request, state), media_type="text/event-stream",
        # no-transform/X-Accel-Buffering: a reverse proxy must not sit on the stream
        headers={"Cache-Control": "no-cache, no-transform", "X-Accel-Buffering": "no"},
    )
