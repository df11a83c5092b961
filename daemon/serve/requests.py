"""The OpenAI request bodies `traind serve` takes, read into one typed request, every refusal shaped as OpenAI's.

    from daemon.serve.requests import parse_chat, parse_completion, ApiError
    req = parse_chat(body, limits)       # GenRequest, or raises ApiError(400, "messages[1].content must be ...", param=...)

Standard library only: the HTTP layer turns an ApiError into `{"error": {"message", "type", "param", "code"}}`
with its status, as OpenAI's API does, so the official clients raise their usual exceptions
(BadRequestError, NotFoundError, RateLimitError, ...).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_STOP = 4  # as OpenAI's API
MAX_STOP_CHARS = 256


class ApiError(Exception):
    """A refusal with its HTTP status, OpenAI's error `type`, the offending `param` and a `code`."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def bad(param: str, message: str, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


@dataclass(frozen=True)
class Limits:
    max_tokens: int
    default_max_tokens: int


@dataclass(frozen=True)
class GenRequest:
    """One generation: the model asked for, the prompt (chat turns or text) and the sampling settings."""

    model: str
    kind: str  # "chat" or "completion"
    messages: tuple[tuple[str, str], ...] = ()  # chat: (role, content)
    prompt: str = ""  # completion
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stream: bool = False
    include_usage: bool = False
    user: str | None = None
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens whatever the model says (benchmarks)
    extra: dict[str, Any] = field(default_factory=dict)


def _number(body: dict[str, Any], key: str, default: float, lo: float, hi: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad(key, f"{key} must be a number, got {_shown(value)}")
    if not lo <= value <= hi:
        raise bad(key, f"{key} must be between {lo:g} and {hi:g}, got {value:g}")
    return float(value)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _common(body: Any, kind: str, limits: Limits) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise bad("", f"the request body must be a JSON object, got {type(body).__name__}")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model", "model is required: traind (the current version), traind:base or traind:vN (see GET /v1/models)")
    n = body.get("n", 1)
    if n != 1:
        raise bad("n", f"n must be 1 (one answer per request), got {_shown(n)}")
    for unsupported in ("logprobs", "top_logprobs", "tools", "functions", "logit_bias", "response_format", "suffix", "echo", "best_of"):
        value = body.get(unsupported)
        plain_text = unsupported == "response_format" and isinstance(value, dict) and set(value) == {"type"} \
            and value.get("type") == "text"  # OpenAI's default, which some clients always send
        if value not in (None, False, [], {}) and not plain_text:
            raise bad(unsupported, f"{unsupported} is not supported by traind serve")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    param = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    if max_tokens is None:
        max_tokens = limits.default_max_tokens
    elif isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise bad(param, f"{param} must be a positive integer, got {_shown(max_tokens)}")
    elif max_tokens > limits.max_tokens:
        raise bad(param, f"{param} is too large: {max_tokens}; this server generates at most {limits.max_tokens} tokens "
                         "per request (serve.max_tokens)", code="max_tokens_too_large")
    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = tuple(stop)
    else:
        raise bad("stop", f"stop must be a string or a list of strings, got {_shown(stop)}")
    if len(stops) > MAX_STOP or any(not s or len(s) > MAX_STOP_CHARS for s in stops):
        raise bad("stop", f"stop takes at most {MAX_STOP} non-empty strings of at most {MAX_STOP_CHARS} characters")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise bad("seed", f"seed must be an integer, got {_shown(seed)}")
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise bad("stream", f"stream must be true or false, got {_shown(stream)}")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise bad("stream_options", "stream_options must be an object")
    user = body.get("user")
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise bad("ignore_eos", f"ignore_eos must be true or false, got {_shown(ignore_eos)}")
    return {
        "model": model, "kind": kind, "max_tokens": max_tokens, "stop": stops,
        "temperature": _number(body, "temperature", 1.0, 0.0, 2.0),
        "top_p": _number(body, "top_p", 1.0, 0.0, 1.0) or 1.0,
        "presence_penalty": _number(body, "presence_penalty", 0.0, -2.0, 2.0),
        "frequency_penalty": _number(body, "frequency_penalty", 0.0, -2.0, 2.0),
        "seed": seed, "stream": bool(stream), "include_usage": bool(options.get("include_usage")),
        "user": user if isinstance(user, str) else None, "ignore_eos": ignore_eos,
    }


def _content(value: Any, where: str) -> str:
    """A message's content: a string, or OpenAI's list of parts of which only text parts are taken."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for i, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise bad(f"{where}[{i}]", f"{where}[{i}] must be a text part ({{\"type\": \"text\", \"text\": ...}}); "
                                           f"got {_shown(kind)}: this model reads text only")
            texts.append(part["text"])
        return "".join(texts)
    raise bad(where, f"{where} must be a string or a list of text parts, got {type(value).__name__}")


def parse_chat(body: Any, limits: Limits) -> GenRequest:
    common = _common(body, "chat", limits)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "messages must be a non-empty list of {\"role\": ..., \"content\": ...} objects")
    turns = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(where, f"{where} must be an object with role and content, got {type(m).__name__}")
        role = m.get("role")
        if role not in ROLES:
            raise bad(f"{where}.role", f"{where}.role must be one of {', '.join(ROLES)}, got {_shown(role)}")
        if "content" not in m or m["content"] is None:
            raise bad(f"{where}.content", f"{where}.content is missing")
        turns.append(("system" if role == "developer" else role, _content(m["content"], f"{where}.content")))
    return GenRequest(messages=tuple(turns), **common)


def parse_completion(body: Any, limits: Limits) -> GenRequest:
    common = _common(body, "completion", limits)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise bad("prompt", "prompt must be a string (or a list of one string; token ids are not taken)")
    return GenRequest(prompt=prompt, **common)
