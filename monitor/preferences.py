"""The playground's preference pairs: one JSONL file per UTC day in `paths.preferences`; the monitor is its one writer.

    record = preference_record(body, now=time.time())   # or PreferenceError(field, message)
    store = PreferenceStore(cfg.path("preferences"))
    name, count = store.append(record, now)              # "playground-2026-12-07.jsonl", its records now
    store.files()                                        # [PreferenceFile(name, records, size, mtime), ...]

A record is TRL's conversational preference form, which the trainer learns from:

    {"messages": [{"role": "user", "content": PROMPT}],
     "chosen": {"role": "assistant", "content": A}, "rejected": {"role": "assistant", "content": B},
     "meta": {"chosen_model": "traind:v3", "rejected_model": "traind:base", "saved_at": "2026-12-07T04:30:00Z"}}

An append rewrites the day's file whole (temp file, fsync, rename) under an exclusive lock on `.lock` in the
folder: a reader (the listing, the copy into the inbox, a user's `cp`) sees the file before or after a record,
never half of one, and a crash mid-write leaves the previous file as it was. A day's file is a few hundred
clicks, so the rewrite costs nothing a person could notice.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from daemon import atomic
from daemon.config import DataConfig
from daemon.validate import DataFormat, LineError, parse_line

PREFIX = "playground-"
NAME = re.compile(r"^playground-\d{4}-\d{2}-\d{2}\.jsonl$")
LOCK_FILE = ".lock"
ROLES = ("system", "user", "assistant")
MAX_TEXT_CHARS = 200_000  # one prompt or answer; a model's context is far smaller
MAX_TURNS = 200
MAX_MODEL_CHARS = 200


class PreferenceError(ValueError):
    """A refused record: `field` names what is wrong ("chosen.content", "messages[1].role")."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class PreferenceFile:
    name: str
    records: int
    size: int
    mtime: float


def _text(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise PreferenceError(field, f"must be a string, got {type(value).__name__}")
    if not value.strip():
        raise PreferenceError(field, "must not be empty")
    if len(value) > MAX_TEXT_CHARS:
        raise PreferenceError(field, f"is {len(value)} characters long; at most {MAX_TEXT_CHARS} are kept")
    return value


def _messages(body: dict[str, Any]) -> list[dict[str, str]]:
    prompt, messages = body.get("prompt"), body.get("messages")
    if prompt is not None and messages is not None:
        raise PreferenceError("prompt", "give the prompt or the messages, not both")
    if messages is None:
        if prompt is None:
            raise PreferenceError("prompt", "is missing (or give messages)")
        return [{"role": "user", "content": _text(prompt, "prompt")}]
    if not isinstance(messages, list) or not messages:
        raise PreferenceError("messages", "must be a non-empty list of {\"role\", \"content\"} objects")
    if len(messages) > MAX_TURNS:
        raise PreferenceError("messages", f"has {len(messages)} turns; at most {MAX_TURNS} are kept")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise PreferenceError(where, f"must be an object with role and content, got {type(m).__name__}")
        if m.get("role") not in ROLES:
            raise PreferenceError(f"{where}.role", f"must be one of {', '.join(ROLES)}, got {m.get('role')!r}")
        out.append({"role": m["role"], "content": _text(m.get("content"), f"{where}.content")})
    if out[-1]["role"] != "user":
        raise PreferenceError(f"messages[{len(out) - 1}].role", "the last turn must be the user's: the answers reply to it")
    return out


def _answer(body: dict[str, Any], side: str) -> tuple[str, str]:
    value = body.get(side)
    if not isinstance(value, dict):
        raise PreferenceError(side, "must be an object {\"model\": ..., \"content\": ...}")
    model = value.get("model")
    if not isinstance(model, str) or not model.strip() or len(model) > MAX_MODEL_CHARS:
        raise PreferenceError(f"{side}.model", "must name the model that answered (\"traind:v3\", \"traind:base\")")
    return model.strip(), _text(value.get("content"), f"{side}.content")


def iso_utc(now: float) -> str:
    return datetime.fromtimestamp(now, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def preference_record(body: Any, now: float, max_line_bytes: int = DataConfig.max_line_bytes) -> dict[str, Any]:
    """The record for a request body {prompt | messages, chosen: {model, content}, rejected: {model, content}};
    checked last by the inbox's own validator (daemon.validate), so what is saved is what trains."""
    if not isinstance(body, dict):
        raise PreferenceError("body", f"must be a JSON object, got {type(body).__name__}")
    messages = _messages(body)
    chosen_model, chosen = _answer(body, "chosen")
    rejected_model, rejected = _answer(body, "rejected")
    if chosen.strip() == rejected.strip():
        raise PreferenceError("rejected.content", "is the same as chosen.content: a preference needs two different answers")
    record = {"messages": messages,
              "chosen": {"role": "assistant", "content": chosen},
              "rejected": {"role": "assistant", "content": rejected},
              "meta": {"chosen_model": chosen_model, "rejected_model": rejected_model, "saved_at": iso_utc(now)}}
    try:
        line = json.dumps(record, ensure_ascii=False).encode("utf-8")  # as the store writes it
    except UnicodeEncodeError:  # a lone surrogate: escaped, so that the validator names its field
        line = json.dumps(record).encode("ascii")
    checked = parse_line(line, 1, DataFormat.PREFERENCE_CHAT, max_line_bytes)
    if isinstance(checked, LineError):
        raise PreferenceError(checked.field or "body", checked.reason)
    return record


def file_name(now: float) -> str:
    return f"{PREFIX}{datetime.fromtimestamp(now, timezone.utc):%Y-%m-%d}.jsonl"


class PreferenceStore:
    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def _locked(self) -> int:
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)  # threads of this monitor and any second monitor on the folder alike
        return fd

    def append(self, record: dict[str, Any], now: float) -> tuple[str, int]:
        """Add `record` to the day's file; returns the file's name and how many records it now holds."""
        name = file_name(now)
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        fd = self._locked()
        try:
            atomic.sweep_temps(self.folder, f"{PREFIX}*")  # an append killed before its rename (we hold the lock)
            path = self.folder / name
            try:
                old = path.read_bytes()
            except FileNotFoundError:
                old = b""
            if old and not old.endswith(b"\n"):  # written by hand without a last newline: keep its line whole
                old += b"\n"
            atomic.write_bytes(path, old + line, site="preferences")
            return name, (old + line).count(b"\n")
        finally:
            os.close(fd)  # closing releases the lock

    def files(self) -> list[PreferenceFile]:
        """The day files, newest first."""
        out = []
        for path in self.folder.glob(f"{PREFIX}*.jsonl"):
            if not NAME.match(path.name):
                continue
            try:
                data, st = path.read_bytes(), path.stat()
            except FileNotFoundError:
                continue
            out.append(PreferenceFile(path.name, data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0),
                                      st.st_size, st.st_mtime))
        return sorted(out, key=lambda f: f.name, reverse=True)

    def path_of(self, name: str) -> Path | None:
        """The file of that name if it is one of ours: only a day file's exact shape is joined to the folder."""
        if not NAME.match(name):
            return None
        path = self.folder / name
        return path if path.is_file() else None
