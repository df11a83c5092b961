"""`create_app(cfg, engine, token)`: the HTTP face of `traind serve`, OpenAI's API shape.

    POST /v1/chat/completions    messages, with the tokenizer's chat template; stream or not
    POST /v1/completions         a raw prompt
    GET  /v1/models              traind, traind:base, traind:vN (kept versions)
    GET  /health                 no token: {"status": "ready" | "loading" | "error", ...}

Every /v1 call needs the instance's token (`status/monitor_token`, the monitor's) as `Authorization: Bearer`,
which is where OpenAI clients put their API key. Errors are OpenAI's shape, so its clients raise their usual
exceptions. The response's `model` names the version that answered (`traind:v7`), and so does the
`X-Traind-Model` header.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from daemon.config import Config
from daemon.serve.engine import Engine, Event
from daemon.serve.requests import ApiError, GenRequest, Limits, parse_chat, parse_completion

MAX_BODY_BYTES = 8 * 2**20  # a prompt of serve.max_prompt_tokens is far smaller


def create_app(cfg: Config, engine: Engine, token: str, loopback_only: bool = True) -> FastAPI:
    from monitor import auth
    from monitor.security import SecurityHeaders

    limits = Limits(cfg.serve.max_tokens, cfg.serve.default_max_tokens)
    app = FastAPI(title="traind serve", version="0.1.0", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(e.status_code, "invalid_request_error")
        return JSONResponse({"error": {"message": str(e.detail), "type": kind, "param": None, "code": None}},
                            status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, e: RequestValidationError) -> JSONResponse:
        return JSONResponse(ApiError(400, str(e)).body(), status_code=400)

    def authorise(request: Request) -> None:
        if not auth.token_matches(token, auth.presented_token(request)):
            raise ApiError(401, f"missing or wrong API key: send the token in status/{auth.TOKEN_FILE} as "
                                "`Authorization: Bearer <token>` (an OpenAI client's api_key)",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    @app.get("/health")
    def health() -> JSONResponse:
        snap = engine.snapshot()
        state = "ready" if snap["ready"] else ("error" if snap["error"] else "loading")
        return JSONResponse({"status": state, "error": snap["error"], "following": snap["following"],
                             "active": snap["active"], "waiting": snap["waiting"]},
                            status_code=200 if state != "error" else 503)

    @app.get("/v1/models")
    def models(request: Request) -> dict[str, Any]:
        authorise(request)
        return {"object": "list", "data": engine.host.listing()}

    @app.get("/v1/models/{name}")
    def model(name: str, request: Request) -> dict[str, Any]:
        authorise(request)
        for m in engine.host.listing():
            if m["id"] == name:
                return m
        raise ApiError(404, f"the model {name!r} does not exist", param="model", code="model_not_found")

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        authorise(request)
        return await _generate(engine, parse_chat(await _body(request), limits))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        authorise(request)
        return await _generate(engine, parse_completion(await _body(request), limits))

    app.add_middleware(SecurityHeaders, loopback_only=loopback_only)
    return app


async def _body(request: Request) -> Any:
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        raise ApiError(413, f"the request body is {len(raw)} bytes; at most {MAX_BODY_BYTES} are taken")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None


class _Channel:
    """Engine events into this request's event loop (the engine calls `put` from its own thread)."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Event] = asyncio.Queue()

    def put(self, event: Event) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    async def get(self) -> Event:
        return await self.queue.get()


async def _generate(engine: Engine, req: GenRequest) -> Any:
    channel = _Channel()
    job = engine.submit(req, channel.put)
    try:
        first = await channel.get()  # start or error: a refusal still gets its own status code
    except asyncio.CancelledError:
        engine.cancel(job)
        raise
    if first.kind == "error":
        raise first.error
    rid = ("chatcmpl-" if req.kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    headers = {"X-Traind-Model": first.model}
    if req.stream:
        return StreamingResponse(_stream(engine, job, channel, req, rid, created, first.model),
                                 media_type="text/event-stream", headers={**headers, "Cache-Control": "no-cache"})
    parts: list[str] = []
    try:
        while True:
            event = await channel.get()
            if event.kind == "delta":
                parts.append(event.text)
            elif event.kind == "error":
                raise event.error
            elif event.kind == "done":
                break
    except asyncio.CancelledError:
        engine.cancel(job)
        raise
    text = "".join(parts)
    fingerprint = _fingerprint(first.model)
    if req.kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": event.finish_reason}
        body = {"id": rid, "object": "chat.completion", "created": created, "model": first.model,
                "system_fingerprint": fingerprint, "choices": [choice], "usage": event.usage}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": event.finish_reason}
        body = {"id": rid, "object": "text_completion", "created": created, "model": first.model,
                "system_fingerprint": fingerprint, "choices": [choice], "usage": event.usage}
    return JSONResponse(body, headers=headers)


def _fingerprint(model: str) -> str:
    return "traind-" + model.split(":", 1)[-1]


async def _stream(engine: Engine, job: Any, channel: _Channel, req: GenRequest, rid: str, created: int,
                  model: str) -> AsyncIterator[bytes]:
    fingerprint = _fingerprint(model)

    def chunk(delta: dict[str, Any] | str | None, finish: str | None, usage: dict[str, int] | None = None,
              choices: bool = True) -> bytes:
        if req.kind == "chat":
            body: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                                    "system_fingerprint": fingerprint,
                                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}] if choices else []}
        else:
            body = {"id": rid, "object": "text_completion", "created": created, "model": model,
                    "system_fingerprint": fingerprint,
                    "choices": [{"index": 0, "text": delta, "logprobs": None, "finish_reason": finish}] if choices else []}
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n".encode()

    finished = False
    try:
        if req.kind == "chat":
            yield chunk({"role": "assistant", "content": ""}, None)
        while True:
            event = await channel.get()
            if event.kind == "delta":
                yield chunk({"content": event.text} if req.kind == "chat" else event.text, None)
            elif event.kind == "error":
                finished = True
                yield f"data: {json.dumps(event.error.body())}\n\n".encode()
                break
            elif event.kind == "done":
                finished = True
                yield chunk({} if req.kind == "chat" else "", event.finish_reason)
                if req.include_usage:
                    yield chunk(None, None, event.usage, choices=False)
                break
        yield b"data: [DONE]\n\n"
    finally:
        if not finished:  # the client went away (or the server is stopping): free the slot
            engine.cancel(job)
