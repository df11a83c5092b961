"""Validate a JSONL training file in one streaming pass. Standard library only.

    from daemon.validate import validate_file
    report = validate_file("inbox/my_data.jsonl", cfg.data, cfg.intake.max_file_bytes)
    if not report.accepted:
        print(report.reason, [str(e) for e in report.errors])
    json.dumps(report.to_dict())          # for queue/failed/<name>.error.json and the job record

The service imports this module, so it must never import torch or transformers.
The trainer reads the same file again with `iter_records`, which applies exactly
the same line rules (same line numbers, same normalised records).

Rules: UTF-8 (RFC 8259) with an optional UTF-8 BOM; one JSON object per line;
blank lines ignored. The file's format is the format of its first valid record
and every line must match it. Line splitting in bounded memory, encoding
sniffing and strict JSON decoding are in `daemon.jsonl`; this module decides
what a line means.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, fields
from enum import Enum
from typing import Any, Callable, Iterator, NamedTuple

from daemon import jsonl
from daemon.config import DataConfig
from daemon.jsonl import RawLine, decode, guess_encoding, json_type, layout_problem

log = logging.getLogger(__name__)

MAX_REPORTED_ERRORS = 50
_CHUNK = jsonl.CHUNK  # read size, looked up at each read so a test can shrink it
_ROLES = ("system", "user", "assistant")
# JSON may escape half of a UTF-16 surrogate pair alone ("\ud800"); Python decodes that into a str no
# UTF-8 codec, and so no tokenizer, can encode. A well-formed pair decodes to one character and never matches.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


class DataFormat(str, Enum):
    """The record shapes traind trains on; a file holds exactly one of them."""

    CHAT = "chat"  # {"messages": [{"role", "content", "weight"?}, ...]} (OpenAI fine-tuning format)
    PROMPT_COMPLETION = "prompt_completion"  # {"prompt", "completion"}
    TEXT = "text"  # {"text"}
    ALPACA = "alpaca"  # {"instruction", "input"?, "output"}
    PREFERENCE = "preference"  # {"prompt", "chosen", "rejected"}: two answers to one prompt, the first preferred
    PREFERENCE_CHAT = "preference_chat"  # {"messages": prompt turns, "chosen": assistant msg, "rejected": assistant msg}

    @property
    def is_preference(self) -> bool:
        """Trained on pairs (daemon/train/preference.py), not on one answer per record."""
        return self in (DataFormat.PREFERENCE, DataFormat.PREFERENCE_CHAT)


# The key whose absence a line of another format is reported under.
_MAIN_KEY = {
    DataFormat.CHAT: "messages",
    DataFormat.PROMPT_COMPLETION: "completion",
    DataFormat.TEXT: "text",
    DataFormat.ALPACA: "output",
    DataFormat.PREFERENCE: "chosen",
    DataFormat.PREFERENCE_CHAT: "chosen",
}


@dataclass(frozen=True)
class LineError:
    """One bad line. `line` is 1-based; `field` is "" for whole-line problems, else a path like "messages[2].role"."""

    line: int
    field: str
    reason: str

    def __str__(self) -> str:
        where = f"line {self.line}, field {self.field}" if self.field else f"line {self.line}"
        return f"{where}: {self.reason}"

    def to_dict(self) -> dict:
        return {"line": self.line, "field": self.field, "reason": self.reason}


@dataclass(frozen=True)
class Record:
    """One valid line, normalised (see the module docstring of `daemon.train.data` for how each is trained).

    chat -> {"messages": [{"role", "content", "weight"}]} (weight 0|1; 1 by default for assistant, 0 for others)
    prompt_completion -> {"prompt", "completion"}; text -> {"text"}; alpaca -> {"instruction", "input", "output"}
    preference -> {"prompt", "chosen", "rejected"} (three strings)
    preference_chat -> {"messages": the prompt turns (as chat's), "chosen": str, "rejected": str} (the answers' text)
    """

    line: int
    format: DataFormat
    data: dict


@dataclass(frozen=True)
class ValidationReport:
    """What `validate_file` found. `n_lines` counts every line, blank ones too; `n_valid + n_bad` are the non-blank ones."""

    path: str
    size: int
    sha256: str  # of the whole file; "" when it was refused unread (too large)
    format: DataFormat | None
    n_lines: int
    n_valid: int
    n_bad: int
    errors: tuple[LineError, ...]  # the first MAX_REPORTED_ERRORS bad lines
    fatal: str | None  # a whole-file problem; the file is refused whatever the policy
    accepted: bool
    reason: str | None  # why not accepted (None when accepted)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}  # in field order
        return d | {"format": self.format.value if self.format else None, "errors": [e.to_dict() for e in self.errors]}


# ---------------------------------------------------------------- one line


def _show(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _detect(obj: dict) -> DataFormat | None:
    """The format a JSON object's keys say it is, or None. Order matters when keys overlap."""
    if "chosen" in obj or "rejected" in obj:  # before messages and prompt, which a pair has too
        chat = "messages" in obj or isinstance(obj.get("prompt"), list)  # TRL's conversational prompt: a list
        return DataFormat.PREFERENCE_CHAT if chat else DataFormat.PREFERENCE
    if "messages" in obj:
        return DataFormat.CHAT
    if "prompt" in obj or "completion" in obj:
        return DataFormat.PROMPT_COMPLETION
    if "instruction" in obj or "output" in obj:
        return DataFormat.ALPACA
    if "text" in obj:
        return DataFormat.TEXT
    return None


def _string(obj: dict, key: str, line: int, field: str, non_empty: bool) -> str | LineError:
    """obj[key] as a string, or the LineError saying why not."""
    if key not in obj:
        return LineError(line, field, "missing")
    value = obj[key]
    if not isinstance(value, str):
        return LineError(line, field, f"must be a string, got {json_type(value)}")
    if non_empty and not value.strip():
        return LineError(line, field, "must not be empty")
    return _encodable(value, line, field)


def _encodable(value: str, line: int, field: str) -> str | LineError:
    """`value`, or the LineError saying where it holds text no tokenizer can encode."""
    bad = _LONE_SURROGATE.search(value)
    if bad is None:
        return value
    code = f"U+{ord(bad.group()):04X}"
    return LineError(line, field, f"lone surrogate {code} at character {bad.start() + 1} (a \\u{code[2:].lower()} "
                                  "escape without the other half of its pair): it cannot be encoded as UTF-8 "
                                  "or tokenised; fix or drop the escape")


def _parse_message(msg: Any, line: int, i: int) -> dict | LineError:
    field = f"messages[{i}]"
    if not isinstance(msg, dict):
        return LineError(line, field, f"must be an object with role and content, got {json_type(msg)}")
    role = _string(msg, "role", line, f"{field}.role", non_empty=False)
    if isinstance(role, LineError):
        return role
    if role not in _ROLES:
        hint = " (tool messages are not supported)" if role == "tool" else ""
        return LineError(line, f"{field}.role", f"{_show(role)} is not one of {', '.join(_ROLES)}{hint}")
    content = _string(msg, "content", line, f"{field}.content", non_empty=False)
    if isinstance(content, LineError):
        return content
    weight = 1 if role == "assistant" else 0
    if "weight" in msg:
        w = msg["weight"]
        if role != "assistant":
            return LineError(line, f"{field}.weight", f"only assistant messages take a weight (this one is {role})")
        if not isinstance(w, int) or isinstance(w, bool) or w not in (0, 1):
            return LineError(line, f"{field}.weight", f"must be 0 or 1, got {_show(w)}")
        weight = w
    return {"role": role, "content": content, "weight": weight}


def _parse_chat(obj: dict, line: int) -> dict | LineError:
    if "messages" not in obj:
        return LineError(line, "messages", "missing")
    messages = obj["messages"]
    if not isinstance(messages, list):
        return LineError(line, "messages", f"must be an array of messages, got {json_type(messages)}")
    if not messages:
        return LineError(line, "messages", "must not be empty")
    out = []
    for i, msg in enumerate(messages):
        parsed = _parse_message(msg, line, i)
        if isinstance(parsed, LineError):
            return parsed
        out.append(parsed)
    if not any(m["role"] == "assistant" and m["weight"] == 1 for m in out):
        return LineError(line, "messages", "no assistant message with weight 1: nothing to train on")
    return {"messages": out}


def _parse_prompt_completion(obj: dict, line: int) -> dict | LineError:
    prompt = _string(obj, "prompt", line, "prompt", non_empty=False)
    if isinstance(prompt, LineError):
        return prompt
    completion = _string(obj, "completion", line, "completion", non_empty=True)
    if isinstance(completion, LineError):
        return completion
    return {"prompt": prompt, "completion": completion}


def _parse_text(obj: dict, line: int) -> dict | LineError:
    text = _string(obj, "text", line, "text", non_empty=True)
    return text if isinstance(text, LineError) else {"text": text}


def _parse_alpaca(obj: dict, line: int) -> dict | LineError:
    instruction = _string(obj, "instruction", line, "instruction", non_empty=True)
    if isinstance(instruction, LineError):
        return instruction
    # "input": null is common in exported datasets and plainly means "no input".
    inp = "" if obj.get("input") is None else obj["input"]
    if not isinstance(inp, str):
        return LineError(line, "input", f"must be a string, got {json_type(inp)}")
    inp = _encodable(inp, line, "input")
    if isinstance(inp, LineError):
        return inp
    output = _string(obj, "output", line, "output", non_empty=True)
    if isinstance(output, LineError):
        return output
    return {"instruction": instruction, "input": inp, "output": output}


def _answers(obj: dict, line: int, side: Callable[[dict, str, int], str | LineError]) -> dict | LineError:
    """The chosen and rejected answers of a pair: each there, not empty, and not the same."""
    out = {}
    for key in ("chosen", "rejected"):
        answer = side(obj, key, line)
        if isinstance(answer, LineError):
            return answer
        out[key] = answer
    if out["chosen"] == out["rejected"]:
        return LineError(line, "rejected", "identical to chosen: a pair must differ to say which answer is better")
    return out


def _text_side(obj: dict, key: str, line: int) -> str | LineError:
    return _string(obj, key, line, key, non_empty=True)


def _message_side(obj: dict, key: str, line: int) -> str | LineError:
    """An answer of the chat form: an assistant message, or TRL's one-element list of one; its content."""
    if key not in obj:
        return LineError(line, key, "missing")
    msg, field = obj[key], key
    if isinstance(msg, list):
        if len(msg) != 1:
            return LineError(line, key, f"must be one assistant message (or a list of exactly one), got a list of {len(msg)}")
        msg, field = msg[0], f"{key}[0]"
    if isinstance(msg, str):  # the answer's text alone: the role goes without saying
        return _string(obj, key, line, key, non_empty=True)
    if not isinstance(msg, dict):
        return LineError(line, field, f"must be an assistant message {{role, content}}, got {json_type(msg)}")
    role = msg.get("role", "assistant")
    if role != "assistant":
        return LineError(line, f"{field}.role", f"must be assistant, got {_show(role)}")
    return _string(msg, "content", line, f"{field}.content", non_empty=True)


def _parse_preference(obj: dict, line: int) -> dict | LineError:
    prompt = _string(obj, "prompt", line, "prompt", non_empty=False)
    if isinstance(prompt, LineError):
        return prompt
    answers = _answers(obj, line, _text_side)
    return answers if isinstance(answers, LineError) else {"prompt": prompt, **answers}


def _parse_preference_chat(obj: dict, line: int) -> dict | LineError:
    key = "messages" if "messages" in obj else "prompt"  # TRL names the prompt turns "prompt"
    turns = obj.get(key)
    if not isinstance(turns, list):
        return LineError(line, key, f"must be an array of the prompt's messages, got {json_type(turns)}"
                                    if key in obj else "missing")
    if not turns:
        return LineError(line, key, "must not be empty: the answers reply to a prompt")
    messages = []
    for i, msg in enumerate(turns):
        parsed = _parse_message(msg, line, i)
        if isinstance(parsed, LineError):
            return LineError(line, parsed.field.replace("messages", key, 1), parsed.reason)
        messages.append(parsed | {"weight": 0})  # the prompt is context: only the answers are scored
    if messages[-1]["role"] == "assistant":
        return LineError(line, f"{key}[{len(messages) - 1}].role",
                         "the prompt's last message must not be the assistant's: chosen and rejected are its reply")
    answers = _answers(obj, line, _message_side)
    return answers if isinstance(answers, LineError) else {"messages": messages, **answers}


_PARSERS: dict[DataFormat, Callable[[dict, int], dict | LineError]] = {
    DataFormat.PREFERENCE: _parse_preference,
    DataFormat.PREFERENCE_CHAT: _parse_preference_chat,
    DataFormat.CHAT: _parse_chat,
    DataFormat.PROMPT_COMPLETION: _parse_prompt_completion,
    DataFormat.TEXT: _parse_text,
    DataFormat.ALPACA: _parse_alpaca,
}


def _decode_error(raw: bytes, line: int, e: UnicodeDecodeError) -> LineError:
    bad = raw[e.start : e.start + 1].hex().upper()
    return LineError(line, "", f"not valid UTF-8 (byte 0x{bad} at byte {e.start + 1} of the line; "
                               f"looks like {guess_encoding(raw)}); save the file as UTF-8")


class _Parsed(NamedTuple):
    result: Record | LineError
    shape: DataFormat | None  # what the line's keys say it is, when it is a JSON object
    not_utf8: bool  # an encoding problem, which refuses the whole file


def _parse(raw: bytes, line: int, fmt: DataFormat | None, max_line_bytes: int, last_no_newline: bool = False) -> _Parsed:
    if len(raw) > max_line_bytes:
        return _Parsed(_overlong(line, len(raw), max_line_bytes), None, False)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return _Parsed(_decode_error(raw, line, e), None, True)
    try:
        obj = decode(text)
    except ValueError as e:  # JSONDecodeError is a ValueError, and so is decode's NaN refusal
        if last_no_newline:
            return _Parsed(LineError(line, "", "truncated last line (no newline at end, invalid JSON)"), None, False)
        where = f" at column {e.colno}" if isinstance(e, json.JSONDecodeError) else ""
        return _Parsed(LineError(line, "", f"invalid JSON{where}: {getattr(e, 'msg', str(e))}"), None, False)
    if not isinstance(obj, dict):
        return _Parsed(LineError(line, "", f"expected a JSON object, got {json_type(obj)}"), None, False)
    shape = _detect(obj)
    if shape is None:
        # a key may hold a lone surrogate: escaped, so the reason can be logged and printed
        keys = ", ".join(k.encode("utf-8", "backslashreplace").decode("utf-8")
                         for k in sorted(obj)[:8]) or "none"
        reason = (f"unknown record shape (keys: {keys}); expected messages (chat), prompt+completion, "
                  "instruction+output (alpaca), text, or prompt+chosen+rejected (preference)")
        return _Parsed(LineError(line, "", reason), None, False)
    if fmt is not None and shape != fmt:
        reason = f"missing: the file is {fmt.value} format but this line is {shape.value} format"
        return _Parsed(LineError(line, _MAIN_KEY[fmt], reason), shape, False)
    data = _PARSERS[shape](obj, line)
    return _Parsed(data if isinstance(data, LineError) else Record(line, shape, data), shape, False)


def _overlong(line: int, length: int, max_line_bytes: int) -> LineError:
    return LineError(line, "", f"line is {length} bytes, longer than max_line_bytes ({max_line_bytes})")


def parse_line(raw: bytes, line: int, fmt: DataFormat | None, max_line_bytes: int) -> Record | LineError:
    """Parse one non-blank line (bytes, without the newline) into a Record, or say what is wrong with it.

    With `fmt` None the format is detected from the keys; otherwise the line must be of `fmt`.
    Callers skip blank lines themselves (they are not errors).
    """
    return _parse(raw, line, fmt, max_line_bytes).result


# ---------------------------------------------------------------- whole file


class _Tally:
    """Counts and first errors while a file streams past."""

    def __init__(self, data_cfg: DataConfig) -> None:
        self.cfg = data_cfg
        self.fmt: DataFormat | None = None
        self.n_lines = self.n_valid = self.n_bad = 0
        self.errors: list[LineError] = []
        self.fatal: str | None = None
        self.other_formats: Counter[DataFormat] = Counter()  # bad lines whose keys are another format
        self.seen_nonblank = False

    def add(self, raw: RawLine) -> None:
        self.n_lines = raw.number
        if raw.data is not None and not raw.data.strip():
            return
        if not self.seen_nonblank:
            self.seen_nonblank = True
            self.fatal = layout_problem(raw.data)
            if self.fatal:
                return
        if raw.data is None:
            parsed = _Parsed(_overlong(raw.number, raw.length, self.cfg.max_line_bytes), None, False)
        else:
            parsed = _parse(raw.data, raw.number, self.fmt, self.cfg.max_line_bytes, not raw.newline)
        if isinstance(parsed.result, Record):
            self.n_valid += 1
            self.fmt = parsed.result.format
            return
        self.n_bad += 1
        if len(self.errors) < MAX_REPORTED_ERRORS:
            self.errors.append(parsed.result)
        if parsed.not_utf8:
            self.fatal = f"not UTF-8: {parsed.result}"
        elif parsed.shape is not None and self.fmt is not None and parsed.shape != self.fmt:
            self.other_formats[parsed.shape] += 1


def _mixed(t: _Tally) -> str | None:
    if not t.other_formats or t.fmt is None:
        return None
    others = ", ".join(f"{n} {f.value}" for f, n in sorted(t.other_formats.items(), key=lambda kv: kv[0].value))
    return f"mixed formats: the file is {t.fmt.value} but has lines of another format ({others})"


def _policy(t: _Tally) -> str | None:
    """Apply the bad-line policy; None when the file is accepted, else why not."""
    return t.fatal or bad_line_refusal(t.n_valid, t.n_bad, t.cfg)


def bad_line_refusal(n_valid: int, n_bad: int, data_cfg: DataConfig) -> str | None:
    """`data_cfg.bad_line_policy` for a file of n_valid good and n_bad bad lines: None when it may
    train, else why not. The trainer applies it again to lines only the tokenizer finds bad."""
    nonblank = n_valid + n_bad
    if n_valid == 0:
        return f"no valid records ({n_bad} bad lines)"
    if data_cfg.bad_line_policy == "reject" and n_bad:
        return f"{n_bad} bad lines (bad_line_policy 'reject' allows none)"
    if n_bad > data_cfg.max_bad_lines:
        return f"{n_bad} bad lines (limit {data_cfg.max_bad_lines})"
    if n_bad / nonblank > data_cfg.max_bad_fraction:
        return f"{n_bad} of {nonblank} lines bad ({n_bad / nonblank:.1%}, limit {data_cfg.max_bad_fraction:.1%})"
    return None


def validate_file(path: str | os.PathLike, data_cfg: DataConfig, max_file_bytes: int = 0) -> ValidationReport:
    """Check a JSONL file in one streaming pass (sha256 included) and apply `data_cfg.bad_line_policy`.

    Never raises for bad content: everything wrong is in the report. OSError
    (missing/unreadable file) propagates. `max_file_bytes` 0 means no limit.
    """
    size = os.stat(path).st_size
    if max_file_bytes and size > max_file_bytes:
        return _refused(path, size, "", f"too large: {size} bytes, limit {max_file_bytes} (intake.max_file_bytes)")
    if size == 0:
        return _refused(path, size, hashlib.sha256().hexdigest(), "empty file")
    scan = jsonl.ChunkScan()
    tally = _Tally(data_cfg)
    with open(path, "rb") as f:
        for raw in jsonl.raw_lines(f, data_cfg.max_line_bytes, scan.add, _CHUNK):
            tally.fatal = tally.fatal or scan.problem
            if tally.fatal is None:
                tally.add(raw)
            else:  # after a whole-file problem only the hash and the line count go on
                tally.n_lines = raw.number
    tally.fatal = tally.fatal or scan.problem
    if tally.fatal is None and tally.n_valid + tally.n_bad == 0:
        tally.fatal = "no records: the file has only blank lines"
    reason = _policy(tally)
    # Lines of another format are bad lines (a stray one may be skipped); when they
    # sink the file, the whole-file diagnosis is the useful one.
    mixed = _mixed(tally) if reason and not tally.fatal else None
    if mixed:
        reason = f"{mixed}; {reason}"
    report = ValidationReport(
        str(path), size, scan.sha256, tally.fmt, tally.n_lines, tally.n_valid, tally.n_bad,
        tuple(tally.errors), tally.fatal or mixed, reason is None, reason,
    )
    log.debug("validated %s: %s", path, reason or "accepted")
    return report


def _refused(path: str | os.PathLike, size: int, sha256: str, fatal: str) -> ValidationReport:
    return ValidationReport(str(path), size, sha256, None, 0, 0, 0, (), fatal, False, fatal)


def iter_records(path: str | os.PathLike, fmt: DataFormat, max_line_bytes: int,
                 on_bad: Callable[[LineError], None] | None = None) -> Iterator[Record]:
    """Stream the valid records of a file already validated as `fmt`; bad lines are skipped (and passed
    to `on_bad` when given: validation reported them already).

    Same line splitting, numbering and rules as `validate_file`, so line numbers agree.
    """
    fmt = DataFormat(fmt)
    with open(path, "rb") as f:
        for raw in jsonl.raw_lines(f, max_line_bytes, chunk_size=_CHUNK):
            if raw.data is not None and not raw.data.strip():
                continue
            if raw.data is None:
                result: Record | LineError = _overlong(raw.number, raw.length, max_line_bytes)
            else:
                result = _parse(raw.data, raw.number, fmt, max_line_bytes, not raw.newline).result
            if isinstance(result, Record):
                yield result
            elif on_bad is not None:
                on_bad(result)
