"""daemon.validate: formats, line errors, whole-file problems, policy, streaming memory."""

from __future__ import annotations

import codecs
import hashlib
import json
import subprocess
import sys
import tracemalloc
from dataclasses import replace
from pathlib import Path

import pytest

from daemon import validate
from daemon.config import DataConfig
from daemon.validate import DataFormat, LineError, Record, iter_records, parse_line, validate_file

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
CFG = DataConfig()
CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
TEXT = {"text": "some text"}


def write(tmp_path: Path, content: bytes | str | list, name: str = "data.jsonl") -> Path:
    """A file from bytes, a str (UTF-8), or a list of records/raw lines (one per line, newline-terminated)."""
    if isinstance(content, list):
        content = "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in content)
    if isinstance(content, str):
        content = content.encode("utf-8")
    path = tmp_path / name
    path.write_bytes(content)
    return path


def err(raw: bytes | str | dict, fmt: DataFormat | None = None, line: int = 1) -> LineError:
    """parse_line's answer for one line, which must be an error."""
    if isinstance(raw, dict):
        raw = json.dumps(raw)
    if isinstance(raw, str):
        raw = raw.encode()
    result = parse_line(raw, line, fmt, CFG.max_line_bytes)
    assert isinstance(result, LineError), result
    return result


# ---------------------------------------------------------------- good files


@pytest.mark.parametrize(
    "name,fmt,n",
    [("chat", DataFormat.CHAT, 240), ("text", DataFormat.TEXT, 160),
     ("alpaca", DataFormat.ALPACA, 160), ("prompt_completion", DataFormat.PROMPT_COMPLETION, 160)],
)
def test_example_files_detected_and_accepted(name: str, fmt: DataFormat, n: int) -> None:
    path = EXAMPLES / f"{name}.jsonl"
    r = validate_file(path, CFG)
    assert (r.format, r.n_lines, r.n_valid, r.n_bad, r.accepted, r.fatal, r.reason) == (fmt, n, n, 0, True, None, None)
    assert r.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert r.size == path.stat().st_size
    records = list(iter_records(path, fmt, CFG.max_line_bytes))
    assert [rec.line for rec in records] == list(range(1, n + 1))
    assert all(rec.format == fmt for rec in records)


def test_normalised_records() -> None:
    chat = parse_line(json.dumps({"messages": [
        {"role": "system", "content": "s"}, {"role": "user", "content": "u"},
        {"role": "assistant", "content": "a", "weight": 0}, {"role": "assistant", "content": "b"}],
        "tools": [], "metadata": {"x": 1}}).encode(), 3, None, 1000)
    assert chat == Record(3, DataFormat.CHAT, {"messages": [
        {"role": "system", "content": "s", "weight": 0}, {"role": "user", "content": "u", "weight": 0},
        {"role": "assistant", "content": "a", "weight": 0}, {"role": "assistant", "content": "b", "weight": 1}]})
    alpaca = parse_line(b'{"instruction": "i", "output": "o", "input": null}', 1, None, 1000)
    assert alpaca == Record(1, DataFormat.ALPACA, {"instruction": "i", "input": "", "output": "o"})
    pc = parse_line(b'{"prompt": "", "completion": "c", "id": 5}', 1, None, 1000)
    assert pc == Record(1, DataFormat.PROMPT_COMPLETION, {"prompt": "", "completion": "c"})
    assert parse_line(b'{"text": "t"}', 1, DataFormat.TEXT, 1000) == Record(1, DataFormat.TEXT, {"text": "t"})


def test_utf8_bom_crlf_and_missing_final_newline_are_fine(tmp_path: Path) -> None:
    body = codecs.BOM_UTF8 + b'{"text": "caf\xc3\xa9"}\r\n\r\n{"text": "b"}'
    r = validate_file(write(tmp_path, body), CFG)
    assert (r.accepted, r.n_lines, r.n_valid, r.n_bad, r.format) == (True, 3, 2, 0, DataFormat.TEXT)
    assert [rec.data["text"] for rec in iter_records(tmp_path / "data.jsonl", DataFormat.TEXT, 1000)] == ["café", "b"]


# ---------------------------------------------------------------- whole-file problems


def test_empty_file(tmp_path: Path) -> None:
    r = validate_file(write(tmp_path, b""), CFG)
    assert (r.accepted, r.fatal, r.reason, r.n_lines) == (False, "empty file", "empty file", 0)


def test_whitespace_only(tmp_path: Path) -> None:
    r = validate_file(write(tmp_path, "\n  \n\t\r\n\n"), CFG)
    assert not r.accepted
    assert r.fatal == "no records: the file has only blank lines"
    assert (r.n_lines, r.n_valid, r.n_bad) == (4, 0, 0)


@pytest.mark.parametrize("encoding,name", [("utf-16", "UTF-16 LE"), ("utf-16-be", None), ("utf-32", "UTF-32 LE")])
def test_utf16_and_utf32_refused(tmp_path: Path, encoding: str, name: str | None) -> None:
    data = (json.dumps(TEXT) + "\n").encode(encoding)
    if name is None:  # no BOM: recognised from where the NULs sit
        name = "UTF-16 BE without a byte order mark"
    r = validate_file(write(tmp_path, data), CFG)
    assert not r.accepted and r.fatal is not None
    assert r.fatal.startswith("not UTF-8") and name in r.fatal, r.fatal
    assert r.reason == r.fatal


def test_latin1_refused_with_line(tmp_path: Path) -> None:
    data = b'{"text": "plain"}\n{"text": "caf\xe9 cr\xe8me"}\n{"text": "more"}\n'
    r = validate_file(write(tmp_path, data), replace(CFG, max_bad_lines=100, max_bad_fraction=1.0))
    assert not r.accepted
    assert r.fatal is not None and r.fatal.startswith("not UTF-8: line 2: not valid UTF-8 (byte 0xE9")
    assert "Latin-1" in r.fatal
    assert r.errors[0].line == 2 and r.errors[0].field == ""


def test_binary_nul_refused(tmp_path: Path) -> None:
    data = b'{"text": "a"}\n' + bytes(range(256)) * 4
    r = validate_file(write(tmp_path, data), CFG)
    assert not r.accepted
    assert r.fatal == "binary data: NUL byte at byte offset 14; JSONL is UTF-8 text"
    assert r.sha256 == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("body", [json.dumps([TEXT, TEXT]), json.dumps([TEXT, TEXT], indent=2), "\n  [\n"])
def test_json_array_refused(tmp_path: Path, body: str) -> None:
    r = validate_file(write(tmp_path, body + "\n"), CFG)
    assert not r.accepted
    assert r.fatal is not None and r.fatal.startswith("the file is a JSON array, not JSON Lines")


def test_pretty_printed_object_refused(tmp_path: Path) -> None:
    r = validate_file(write(tmp_path, json.dumps(TEXT, indent=2) + "\n"), CFG)
    assert r.fatal is not None and "pretty-printed JSON" in r.fatal and not r.accepted


def test_too_large_refused_unread(tmp_path: Path) -> None:
    path = write(tmp_path, [TEXT] * 10)
    r = validate_file(path, CFG, max_file_bytes=20)
    assert not r.accepted and r.sha256 == ""
    assert r.fatal == f"too large: {path.stat().st_size} bytes, limit 20 (intake.max_file_bytes)"
    assert validate_file(path, CFG, max_file_bytes=10_000).accepted


def test_mixed_formats(tmp_path: Path) -> None:
    r = validate_file(write(tmp_path, [CHAT] * 5 + [TEXT] * 20 + [{"prompt": "p", "completion": "c"}]), CFG)
    assert not r.accepted and r.format == DataFormat.CHAT
    assert r.fatal == "mixed formats: the file is chat but has lines of another format (1 prompt_completion, 20 text)"
    assert r.reason == r.fatal + "; 21 bad lines (limit 10)"
    assert str(r.errors[0]) == "line 6, field messages: missing: the file is chat format but this line is text format"
    # One stray line of another format is just a bad line under the skip policy.
    r = validate_file(write(tmp_path, [CHAT] * 20 + [TEXT]), CFG)
    assert r.accepted and r.fatal is None and r.n_bad == 1 and r.errors[0].field == "messages"


def test_format_from_first_valid_record(tmp_path: Path) -> None:
    bad_chat = {"messages": []}
    r = validate_file(write(tmp_path, [bad_chat] + [TEXT] * 20), CFG)
    assert r.format == DataFormat.TEXT and r.accepted and r.n_bad == 1
    assert str(r.errors[0]) == "line 1, field messages: must not be empty"


# ---------------------------------------------------------------- line problems


def test_truncated_last_line(tmp_path: Path) -> None:
    path = write(tmp_path, "\n".join([json.dumps(TEXT)] * 3) + '\n{"text": "cut o')
    r = validate_file(path, CFG)
    assert r.errors == (LineError(4, "", "truncated last line (no newline at end, invalid JSON)"),)
    assert str(r.errors[0]) == "line 4: truncated last line (no newline at end, invalid JSON)"
    assert (r.n_lines, r.n_valid, r.n_bad) == (4, 3, 1)
    assert r.accepted is False  # 1 of 4 is over the default 10 %
    assert [x.line for x in iter_records(path, DataFormat.TEXT, 1000)] == [1, 2, 3]


def test_invalid_json_in_the_middle_is_not_called_truncated(tmp_path: Path) -> None:
    r = validate_file(write(tmp_path, [TEXT, '{"text": oops}', TEXT]), CFG)
    assert r.errors[0].line == 2 and r.errors[0].reason.startswith("invalid JSON at column 10")


def test_overlong_line_streamed(tmp_path: Path) -> None:
    cfg = replace(CFG, max_line_bytes=1_000_000, max_bad_lines=1, max_bad_fraction=0.5)
    long_line = json.dumps({"text": "x" * 6_000_000})
    path = write(tmp_path, [TEXT, long_line, "", TEXT])
    tracemalloc.start()
    try:
        r = validate_file(path, cfg)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert r.errors == (LineError(2, "", f"line is {len(long_line)} bytes, longer than max_line_bytes (1000000)"),)
    assert (r.n_lines, r.n_valid, r.n_bad, r.accepted) == (4, 2, 1, True)
    assert peak < 5_000_000, peak  # the 6 MB line was never held whole
    assert [x.line for x in iter_records(path, DataFormat.TEXT, cfg.max_line_bytes)] == [1, 4]
    assert parse_line(b'{"text": "' + b"y" * 100 + b'"}', 9, None, 64) == LineError(
        9, "", "line is 112 bytes, longer than max_line_bytes (64)")


@pytest.mark.parametrize(
    "line,fmt,field,reason",
    [
        ('{"messages": "hi"}', None, "messages", "must be an array of messages, got string"),
        ('{"messages": []}', None, "messages", "must not be empty"),
        ('{"messages": ["hi"]}', None, "messages[0]", "must be an object with role and content, got string"),
        ('{"messages": [{"content": "x"}]}', None, "messages[0].role", "missing"),
        ('{"messages": [{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}]}', None,
         "messages[1].role", "'bot' is not one of system, user, assistant"),
        ('{"messages": [{"role": "tool", "content": "x"}]}', None, "messages[0].role",
         "'tool' is not one of system, user, assistant (tool messages are not supported)"),
        ('{"messages": [{"role": "assistant", "content": null}]}', None, "messages[0].content", "must be a string, got null"),
        ('{"messages": [{"role": "assistant", "content": [{"type": "text"}]}]}', None, "messages[0].content",
         "must be a string, got array"),
        ('{"messages": [{"role": "user"}]}', None, "messages[0].content", "missing"),
        ('{"messages": [{"role": "assistant", "content": "x", "weight": 2}]}', None, "messages[0].weight", "must be 0 or 1, got 2"),
        ('{"messages": [{"role": "assistant", "content": "x", "weight": true}]}', None, "messages[0].weight", "must be 0 or 1, got True"),
        ('{"messages": [{"role": "assistant", "content": "x", "weight": 1.0}]}', None, "messages[0].weight", "must be 0 or 1, got 1.0"),
        ('{"messages": [{"role": "user", "content": "x", "weight": 1}, {"role": "assistant", "content": "y"}]}', None,
         "messages[0].weight", "only assistant messages take a weight (this one is user)"),
        ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": 0}]}', None,
         "messages", "no assistant message with weight 1: nothing to train on"),
        ('{"messages": [{"role": "user", "content": "x"}]}', None, "messages", "no assistant message with weight 1: nothing to train on"),
        ('{"prompt": "p"}', None, "completion", "missing"),
        ('{"prompt": ["p"], "completion": "c"}', None, "prompt", "must be a string, got array"),
        ('{"prompt": "p", "completion": "  "}', None, "completion", "must not be empty"),
        ('{"completion": "c"}', None, "prompt", "missing"),
        ('{"text": ""}', None, "text", "must not be empty"),
        ('{"text": 5}', None, "text", "must be a string, got number"),
        ('{"instruction": "i"}', None, "output", "missing"),
        ('{"output": "o"}', None, "instruction", "missing"),
        ('{"instruction": "i", "input": 3, "output": "o"}', None, "input", "must be a string, got number"),
        ('{"instruction": "i", "output": ""}', None, "output", "must not be empty"),
        ('{"text": "t"}', DataFormat.ALPACA, "output", "missing: the file is alpaca format but this line is text format"),
        ('[1, 2]', None, "", "expected a JSON object, got array"),
        ('"just a string"', None, "", "expected a JSON object, got string"),
        ('{"foo": 1, "bar": 2}', None, "", "unknown record shape (keys: bar, foo); expected messages (chat), "
         "prompt+completion, instruction+output (alpaca), text, or prompt+chosen+rejected (preference)"),
        ('{"text": NaN}', None, "", "invalid JSON: NaN is not valid JSON"),
        ('{"text": "a",}', None, "", "invalid JSON at column 14: Expecting property name enclosed in double quotes"),
    ],
)
def test_line_errors(line: str, fmt: DataFormat | None, field: str, reason: str) -> None:
    assert err(line, fmt, line=7) == LineError(7, field, reason)


def test_error_message_names_line_and_field() -> None:
    e = err({"messages": [{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}]}, line=7)
    assert str(e) == "line 7, field messages[1].role: 'bot' is not one of system, user, assistant"
    assert e.to_dict() == {"line": 7, "field": "messages[1].role", "reason": "'bot' is not one of system, user, assistant"}


def test_line_numbers_count_blank_lines(tmp_path: Path) -> None:
    body = [TEXT, "", "   ", TEXT, "", '{"text": 1}', TEXT, "", '{"text": ""}'] + [TEXT] * 20
    r = validate_file(write(tmp_path, body), CFG)
    assert [(e.line, e.field) for e in r.errors] == [(6, "text"), (9, "text")]
    assert (r.n_lines, r.n_valid, r.n_bad) == (29, 23, 2)
    assert r.accepted


# ---------------------------------------------------------------- policy


def _file_with_bad(tmp_path: Path, n_good: int, n_bad: int) -> Path:
    return write(tmp_path, [TEXT] * n_good + ['{"text": 0}'] * n_bad)


@pytest.mark.parametrize(
    "n_good,n_bad,policy,max_lines,max_frac,reason",
    [
        (95, 5, "skip", 10, 0.1, None),
        (90, 10, "skip", 10, 0.1, None),  # exactly at both limits
        (88, 12, "skip", 10, 0.5, "12 bad lines (limit 10)"),
        (30, 5, "skip", 10, 0.1, "5 of 35 lines bad (14.3%, limit 10.0%)"),
        (99, 1, "reject", 10, 0.1, "1 bad lines (bad_line_policy 'reject' allows none)"),
        (100, 0, "reject", 0, 0.0, None),
        (0, 3, "skip", 10, 1.0, "no valid records (3 bad lines)"),
    ],
)
def test_policy(tmp_path: Path, n_good: int, n_bad: int, policy: str, max_lines: int, max_frac: float, reason: str | None) -> None:
    cfg = replace(CFG, bad_line_policy=policy, max_bad_lines=max_lines, max_bad_fraction=max_frac)
    r = validate_file(_file_with_bad(tmp_path, n_good, n_bad), cfg)
    assert (r.accepted, r.reason, r.n_valid, r.n_bad) == (reason is None, reason, n_good, n_bad)
    assert r.fatal is None


def test_errors_capped_and_report_is_json(tmp_path: Path) -> None:
    r = validate_file(_file_with_bad(tmp_path, 10, 80), CFG)
    assert r.n_bad == 80 and len(r.errors) == validate.MAX_REPORTED_ERRORS == 50
    assert r.errors[-1].line == 60
    d = json.loads(json.dumps(r.to_dict()))
    assert d["format"] == "text" and d["accepted"] is False and d["reason"] == "80 bad lines (limit 10)"
    assert d["errors"][0] == {"line": 11, "field": "text", "reason": "must be a string, got number"}
    assert set(d) == {"path", "size", "sha256", "format", "n_lines", "n_valid", "n_bad", "errors", "fatal", "accepted", "reason"}


# ---------------------------------------------------------------- streaming


def test_tiny_chunks_give_the_same_lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    body = (codecs.BOM_UTF8 + b'{"text": "a"}\n\n{"text": "bb"}\r\n' + b'{"text": "' + b"z" * 90 + b'"}\n'
            + '{"text": "ünï"}\n'.encode() + b'{"text": 3}\n{"text": "end"}')
    path = write(tmp_path, body)
    whole = validate_file(path, replace(CFG, max_line_bytes=64))
    for chunk in (1, 2, 3, 7, 64):
        monkeypatch.setattr(validate, "_CHUNK", chunk)
        small = validate_file(path, replace(CFG, max_line_bytes=64))
        assert small == whole
        assert [r.data for r in iter_records(path, DataFormat.TEXT, 64)] == [{"text": t} for t in ("a", "bb", "ünï", "end")]
    assert [(e.line, e.reason[:20]) for e in whole.errors] == [(4, "line is 102 bytes, l"), (6, "must be a string, go")]
    assert (whole.n_lines, whole.n_valid, whole.sha256) == (7, 4, hashlib.sha256(body).hexdigest())


def test_large_file_flat_memory(tmp_path: Path) -> None:
    n = 200_000
    path = tmp_path / "big.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(f'{{"prompt": "Q{i}:", "completion": " answer number {i}"}}\n' if i % 50_000 else '{"prompt": 1}\n')
    tracemalloc.start()
    try:
        r = validate_file(path, CFG)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (r.n_lines, r.n_valid, r.n_bad, r.accepted) == (n, n - 4, 4, True)
    assert [e.line for e in r.errors] == [1, 50_001, 100_001, 150_001]
    assert r.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    # The file is ~12 MB; a streaming pass holds one 256 KiB chunk and its split lines (~1.2 MB measured).
    assert path.stat().st_size > 10_000_000 and peak < 2_500_000, peak


def test_service_side_stays_free_of_torch() -> None:
    code = "import sys, daemon.validate; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------- text a tokenizer cannot encode (#26 item 3)

# JSON lets a string hold a lone UTF-16 surrogate as an escape ("\ud800"); Python decodes it into a str
# that no UTF-8 codec, and so no tokenizer, can encode. Each field that is trained or rendered is checked.
SURROGATE_CASES = [
    (r'{"text": "bad \ud800 one"}', "text", "U+D800", 5),
    (r'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok \udfff"}]}',
     "messages[1].content", "U+DFFF", 4),
    (r'{"messages": [{"role": "us\ud800er", "content": "hi"}, {"role": "assistant", "content": "ok"}]}',
     "messages[0].role", "U+D800", 3),
    (r'{"prompt": "\udc00", "completion": "fine"}', "prompt", "U+DC00", 1),
    (r'{"prompt": "fine", "completion": "x\ud83d"}', "completion", "U+D83D", 2),
    (r'{"instruction": "do \udbff it", "output": "done"}', "instruction", "U+DBFF", 4),
    (r'{"instruction": "do it", "input": "in\ud800", "output": "done"}', "input", "U+D800", 3),
    (r'{"instruction": "do it", "output": "\ude00 done"}', "output", "U+DE00", 1),
]


@pytest.mark.parametrize("raw,field,code,position", SURROGATE_CASES)
def test_a_lone_surrogate_is_a_bad_line_naming_field_and_position(raw: str, field: str, code: str, position: int) -> None:
    e = err(raw, line=7)
    assert (e.line, e.field) == (7, field)
    assert f"lone surrogate {code} at character {position}" in e.reason and "cannot be encoded" in e.reason


def test_a_surrogate_pair_is_one_character_and_fine() -> None:
    r = parse_line(rb'{"text": "smile \ud83d\ude00"}', 1, None, CFG.max_line_bytes)
    assert isinstance(r, Record) and r.data["text"] == "smile \U0001F600"


@pytest.mark.parametrize("policy", ["skip", "reject"])
def test_a_lone_surrogate_line_is_found_at_validation_under_each_policy(tmp_path: Path, policy: str) -> None:
    good = [json.dumps({"text": f"line {i}"}) for i in range(20)]
    path = write(tmp_path, good[:3] + [r'{"text": "bad \ud800 one"}'] + good[3:])
    r = validate_file(path, replace(CFG, bad_line_policy=policy))
    assert (r.n_valid, r.n_bad) == (20, 1)
    assert [(e.line, e.field) for e in r.errors] == [(4, "text")] and "U+D800" in r.errors[0].reason
    if policy == "skip":
        assert r.accepted
        assert [x.line for x in iter_records(path, DataFormat.TEXT, CFG.max_line_bytes)] == [1, 2, 3, *range(5, 22)]
    else:
        assert not r.accepted and r.reason == "1 bad lines (bad_line_policy 'reject' allows none)"


def test_a_reason_quoting_a_key_with_a_lone_surrogate_can_still_be_printed() -> None:
    e = err(r'{"ke\ud800y": "x", "café": 1}')
    assert "café, ke\\ud800y" in e.reason
    e.reason.encode("utf-8")  # a reason goes to logs, sidecars and terminals
