"""The dashboard's playground: `traind serve` reached through the monitor, and the preference pairs it saves.

    GET  /api/serve                           is serve running for this instance? its URL, state, what it follows
    GET  /api/serve/models                    proxied to serve's GET /v1/models
    POST /api/serve/chat/completions          proxied to serve's POST /v1/chat/completions, streamed as it comes
    POST /api/playground/preference           {prompt | messages, chosen: {model, content}, rejected: {...}}
    GET  /api/playground/preferences          the day files, with their record counts
    GET  /api/playground/preferences/{file}   one of them, to download
    POST /api/playground/preferences/queue    {file, priority?}: a copy into the inbox, to train on

The browser talks to the monitor only (its CSP allows 'self'), and the token serve takes stays here: the proxy
finds serve in `status/serve.json` and sends the instance's token itself. Generating spends compute, so the
proxy needs the token as every state-changing endpoint does. Serve's answers pass through unchanged, errors
included (OpenAI's shape, their status); the proxy's own refusals have the same shape, so the page reads one.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from typing import Annotated, Any, AsyncIterator, Literal

import httpx
from fastapi import APIRouter, Body, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field

from daemon import diskspace
from daemon.serve_view import read_serve
from daemon.serve_view import url as serve_url
from daemon.states import Priority
from monitor import auth
from monitor.deps import MonitorState, ReadAuth, StateDep, WriteAuth
from monitor.models import UploadResult
from monitor.preferences import PreferenceError, PreferenceStore, preference_record
from monitor.upload import inbox_folder, insufficient_storage, publish

log = logging.getLogger(__name__)
router = APIRouter(tags=["playground"])

HEALTH_TIMEOUT_SECONDS = 2.0
MAX_BODY_BYTES = 8 * 2**20  # as serve's own limit
START_HINT = "start it with bin/start_all.sh (serve.enabled in config.json)"
_ANY_ADDRESS = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}


# -- where serve is ---------------------------------------------------------------------------------------------

def _base_url(host: str, port: int) -> str:
    host = _ANY_ADDRESS.get(host, host)  # bound to every address: reach it on loopback
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def serve_record(state: MonitorState) -> dict[str, Any]:
    """What serve.json says, checked against its process: running, state, url (None when not reachable), message."""
    cfg = state.cfg
    info = read_serve(cfg.path("status"))
    if info is None or not isinstance(info.get("port"), int):
        why = ("serve.enabled is false in config.json: set it to true and run bin/start_all.sh" if not cfg.serve.enabled
               else f"traind serve is not running for this instance: {START_HINT}")
        return {"running": False, "state": "not_started", "url": None, "enabled": cfg.serve.enabled, "message": why}
    out = {"running": False, "state": str(info.get("state", "unknown")), "url": None, "serve_url": serve_url(info),
           "pid": info.get("pid"), "enabled": cfg.serve.enabled, "following": info.get("following"),
           "device": info.get("device"), "started_at": info.get("started_at")}
    if out["state"] == "stopped":
        out["message"] = f"traind serve stopped; {START_HINT}"
    elif not info["running"]:  # read_serve: its pid alive, not a later process on that pid
        out["state"] = "gone"
        out["message"] = (f"traind serve (pid {info.get('pid')}) is gone without stopping cleanly "
                          f"(logs/serve_*.log says why); {START_HINT}")
    else:
        out.update(running=True, url=_base_url(str(info.get("host") or ""), info["port"]))
    return out


async def serve_status(state: MonitorState) -> dict[str, Any]:
    """serve_record, and when its process runs, what its /health answers now."""
    rec = serve_record(state)
    if not rec["running"]:
        return rec
    try:
        async with httpx.AsyncClient(timeout=HEALTH_TIMEOUT_SECONDS, verify=False) as client:  # plain http: no CA bundle to load
            r = await client.get(rec["url"] + "/health")
        health = r.json()
    except (httpx.HTTPError, ValueError) as e:
        rec.update(running=False, state="unreachable",
                   message=f"traind serve (pid {rec['pid']}) does not answer at {rec['url']}: {e or type(e).__name__}")
        return rec
    rec["state"] = str(health.get("status", "unknown"))
    rec["following"] = health.get("following", rec.get("following"))
    rec["message"] = {"ready": "traind serve is ready", "loading": "traind serve is loading the model"}.get(
        rec["state"], f"traind serve reports an error: {health.get('error')}")
    return rec


# -- the proxy --------------------------------------------------------------------------------------------------

def openai_error(status: int, message: str, code: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "traind_monitor", "param": None, "code": code}},
                        status_code=status)


async def _read_body(request: Request) -> bytes:
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise HTTPException(413, f"the request body is larger than {MAX_BODY_BYTES} bytes")
    return bytes(body)


def _timeout(state: MonitorState) -> httpx.Timeout:
    # a request may wait serve.queue_timeout_seconds for a slot, then generate max_tokens on a slow CPU
    return httpx.Timeout(connect=5.0, read=state.cfg.serve.queue_timeout_seconds + 600.0, write=30.0, pool=5.0)


async def proxy(state: MonitorState, method: str, path: str, body: bytes | None = None) -> Response:
    rec = serve_record(state)
    if not rec["running"]:
        return openai_error(503, rec["message"], "serve_not_running")
    token = auth.load_or_create_token(state.cfg.path("status"))  # the file serve read its token from
    # plain http to serve (TLS is never used): verify=False spares loading the CA bundle per request (20-37 ms,
    # on the monitor's event loop)
    client = httpx.AsyncClient(timeout=_timeout(state), verify=False)
    request = client.build_request(method, rec["url"] + path, content=body,
                                   headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        upstream = await client.send(request, stream=True)
    except httpx.HTTPError as e:
        await client.aclose()
        return openai_error(503, f"traind serve (pid {rec['pid']}) does not answer at {rec['url']}: "
                                 f"{e or type(e).__name__}; {START_HINT}", "serve_unreachable")
    if upstream.status_code == 401:  # serve refused *our* token: not the user's to fix by typing another
        await upstream.aclose()
        await client.aclose()
        return openai_error(502, f"traind serve refused the monitor's token (status/{auth.TOKEN_FILE} changed since "
                                 "it started?): restart it with bin/start_all.sh", "serve_token_refused")
    headers = {k: v for k, v in upstream.headers.items() if k.lower() == "x-traind-model"}
    if upstream.headers.get("content-type", "").startswith("text/event-stream"):
        return StreamingResponse(_relay(upstream, client), status_code=upstream.status_code,
                                 media_type="text/event-stream", headers={**headers, "Cache-Control": "no-cache"})
    try:
        content = await upstream.aread()
    except httpx.HTTPError as e:
        return openai_error(502, f"traind serve broke off its answer: {e or type(e).__name__}", "serve_broke_off")
    finally:
        await upstream.aclose()
        await client.aclose()
    return Response(content, status_code=upstream.status_code,
                    media_type=upstream.headers.get("content-type", "application/json"), headers=headers)


async def _relay(upstream: httpx.Response, client: httpx.AsyncClient) -> AsyncIterator[bytes]:
    """Serve's events as they come. When the page goes away, closing the upstream stream frees serve's slot."""
    try:
        async for chunk in upstream.aiter_raw():
            yield chunk
    except httpx.HTTPError as e:  # serve died mid-answer: say so in the stream, as serve says its own errors
        body = {"error": {"message": f"traind serve broke off the answer: {e or type(e).__name__}",
                          "type": "traind_monitor", "param": None, "code": "serve_broke_off"}}
        yield f"\n\ndata: {json.dumps(body)}\n\ndata: [DONE]\n\n".encode()
    finally:
        await upstream.aclose()
        await client.aclose()


@router.get("/api/serve", dependencies=[ReadAuth], summary="Whether `traind serve` runs for this instance, its URL and state")
async def serve_info(state: StateDep) -> dict[str, Any]:
    return await serve_status(state)


@router.get("/api/serve/models", dependencies=[WriteAuth], summary="Serve's GET /v1/models, through the monitor")
async def serve_models(state: StateDep) -> Response:
    return await proxy(state, "GET", "/v1/models")


@router.post("/api/serve/chat/completions", dependencies=[WriteAuth],
             summary="Serve's POST /v1/chat/completions through the monitor (streamed when the body says stream: true)")
async def serve_chat(state: StateDep, request: Request) -> Response:
    return await proxy(state, "POST", "/v1/chat/completions", await _read_body(request))


# -- preference pairs -------------------------------------------------------------------------------------------

class QueueBody(BaseModel):
    file: str = Field(max_length=255, description="a file GET /api/playground/preferences lists")
    priority: Literal["high", "normal", "low"] = "normal"


def _store(state: MonitorState) -> PreferenceStore:
    return PreferenceStore(state.cfg.path("preferences"))


def _write_failed(state: MonitorState, e: OSError, what: str) -> HTTPException:
    folder = state.cfg.path("preferences")
    if diskspace.is_disk_full(e):
        return HTTPException(507, f"{what}: not enough disk space in {folder} ({e.strerror or e}); nothing was written")
    return HTTPException(500, f"{what}: cannot write in {folder}: {e}")


@router.post("/api/playground/preference", dependencies=[WriteAuth], status_code=201,
             summary="Save one preference pair (the chosen answer and the rejected one) to the day's file")
def save_preference(state: StateDep, body: Annotated[Any, Body()] = None) -> dict[str, Any]:
    now = time.time()
    try:
        record = preference_record(body, now, state.cfg.data.max_line_bytes)
    except PreferenceError as e:
        raise HTTPException(400, str(e)) from None
    try:
        name, count = _store(state).append(record, now)
    except OSError as e:
        raise _write_failed(state, e, "the preference was not saved") from None
    log.info("playground: preference saved to %s (%s over %s)", name, record["meta"]["chosen_model"],
             record["meta"]["rejected_model"])
    return {"file": name, "records": count, "saved_at": record["meta"]["saved_at"]}


@router.get("/api/playground/preferences", dependencies=[ReadAuth], summary="The preference files, with their record counts")
def list_preferences(state: StateDep) -> dict[str, Any]:
    files = _store(state).files()
    return {"folder": str(state.cfg.path("preferences")), "total": sum(f.records for f in files),
            "files": [{"name": f.name, "records": f.records, "size": f.size, "mtime": f.mtime} for f in files]}


@router.get("/api/playground/preferences/{name}", dependencies=[ReadAuth], summary="Download one preference file")
def download_preferences(state: StateDep, name: str) -> FileResponse:
    path = _store(state).path_of(name)
    if path is None:
        raise HTTPException(404, f"{name!r} is not a preference file")
    return FileResponse(path, media_type="application/x-ndjson", filename=name)


@router.post("/api/playground/preferences/queue", dependencies=[WriteAuth], status_code=201, response_model=UploadResult,
             summary="Put a copy of a preference file into the inbox, to train on it")
def queue_preferences(state: StateDep, body: QueueBody) -> UploadResult:
    source = _store(state).path_of(body.file)
    if source is None:
        raise HTTPException(404, f"{body.file!r} is not a preference file")
    folder = inbox_folder(state, Priority(body.priority))
    folder.mkdir(parents=True, exist_ok=True)
    data = source.read_bytes()  # the whole file as it is now: an append renames a new file in, never writes into it
    min_free = state.cfg.service.min_free_bytes
    if min_free and diskspace.free_bytes(folder) < min_free + len(data):
        raise insufficient_storage(folder, f"the file and service.min_free_bytes = {min_free} would not fit")
    # hidden .part name first (the intake ignores it), then a no-clobber link to the final name: as an upload
    part = folder / f".{body.file}.{uuid.uuid4().hex[:8]}.part"
    try:
        with open(part, "xb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        written = publish(part, folder, body.file)
    except OSError as e:
        if not diskspace.is_disk_full(e):
            raise
        raise insufficient_storage(folder, e.strerror or str(e)) from None
    finally:
        if part.exists():
            part.unlink()
    log.info("playground: %s queued as %s (%d bytes, %s priority)", body.file, written, len(data), body.priority)
    return UploadResult(name=written, priority=body.priority, size=len(data))
