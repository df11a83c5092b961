"""Reading JSON Lines as bytes: bounded-memory line splitting, encoding sniffing, strict JSON. Standard library only.

    from daemon import jsonl
    scan = jsonl.ChunkScan()                       # sha256 + whole-file encoding problems, chunk by chunk
    with open(path, "rb") as f:
        for raw in jsonl.raw_lines(f, max_line_bytes, scan.add):
            obj = jsonl.decode(raw.data.decode("utf-8")) if raw.data is not None else None
    scan.sha256, scan.problem

This is the layer below `daemon.validate`, which decides what a line means.
Lines are read in chunks, so an over-long line or a multi-GB file never needs
more than about `max_line_bytes` + one chunk of memory.
"""

from __future__ import annotations

import codecs
import hashlib
import json
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, NamedTuple

CHUNK = 1 << 18  # read size (256 KiB); also the largest piece of an over-long line held at once


class RawLine(NamedTuple):  # a tuple, not a dataclass: one is made per line of multi-GB files
    number: int  # 1-based
    data: bytes | None  # None when the line is longer than max_line_bytes (never held whole)
    length: int  # bytes, without the newline
    newline: bool  # False only for a last line without a trailing newline


def raw_lines(f: BinaryIO, max_line_bytes: int, on_chunk: Callable[[bytes], None] | None = None,
              chunk_size: int = CHUNK) -> Iterator[RawLine]:
    """Split a binary stream into lines, holding at most ~max_line_bytes + one chunk in memory.

    A UTF-8 BOM at the start of the first line is dropped; `on_chunk` sees every byte read.
    """
    buf = bytearray()
    length, overlong, number = 0, False, 0
    while chunk := f.read(chunk_size):
        if on_chunk is not None:
            on_chunk(chunk)
        pieces = chunk.split(b"\n")
        for i, piece in enumerate(pieces):
            length += len(piece)
            if not overlong:
                buf += piece
                if length > max_line_bytes:
                    overlong = True
                    buf = bytearray()  # drop it: the line is bad whatever it holds
            if i == len(pieces) - 1:
                break  # the last piece continues in the next chunk
            number += 1
            yield RawLine(number, None if overlong else _strip_bom(bytes(buf), number), length, True)
            buf = bytearray()
            length, overlong = 0, False
    if length or overlong:
        number += 1
        yield RawLine(number, None if overlong else _strip_bom(bytes(buf), number), length, False)


def _strip_bom(data: bytes, number: int) -> bytes:
    # RFC 8259 section 8.1: parsers may ignore a UTF-8 BOM at the start; anywhere else it is data.
    return data[len(codecs.BOM_UTF8):] if number == 1 and data.startswith(codecs.BOM_UTF8) else data


# ---------------------------------------------------------------- encodings


def bom_problem(head: bytes) -> str | None:
    """A fatal reason when the file starts with a byte order mark of a non-UTF-8 encoding."""
    # UTF-32 first: its LE mark begins with UTF-16 LE's.
    for bom, name in ((codecs.BOM_UTF32_LE, "UTF-32 LE"), (codecs.BOM_UTF32_BE, "UTF-32 BE"),
                      (codecs.BOM_UTF16_LE, "UTF-16 LE"), (codecs.BOM_UTF16_BE, "UTF-16 BE")):
        if head.startswith(bom):
            return f"not UTF-8: the file starts with a {name} byte order mark; save it as UTF-8"
    return None


def nul_problem(chunk: bytes, offset: int) -> str:
    """Why a chunk holding a NUL byte is not JSONL: UTF-16 without a BOM (at the start) or binary data."""
    at = chunk.index(b"\x00")
    head = chunk[:64]
    if offset == 0 and len(head) >= 4:
        # ASCII text in UTF-16 has a NUL in every other byte: the odd ones (LE) or the even ones (BE).
        for zeros, others, name in ((head[1::2], head[0::2], "LE"), (head[0::2], head[1::2], "BE")):
            if zeros.count(0) >= len(head) // 4 and others.count(0) == 0:
                return (f"not UTF-8: NUL bytes between characters; looks like UTF-16 {name} without a "
                        "byte order mark; save it as UTF-8")
    return f"binary data: NUL byte at byte offset {offset + at}; JSONL is UTF-8 text"


def guess_encoding(raw: bytes) -> str:
    """A hint for people, not a detector: what non-UTF-8 bytes probably are."""
    try:
        raw.decode("cp1252")
        return "Latin-1 / Windows-1252"
    except UnicodeDecodeError:
        return "a legacy single- or double-byte encoding"


class ChunkScan:
    """Fed every chunk of a file in order (`raw_lines`' on_chunk): its sha256 and the first whole-file encoding problem."""

    def __init__(self) -> None:
        self._digest = hashlib.sha256()
        self.offset = 0
        self.problem: str | None = None

    def add(self, chunk: bytes) -> None:
        self._digest.update(chunk)
        if self.problem is None and self.offset == 0:
            self.problem = bom_problem(chunk)
        if self.problem is None and b"\x00" in chunk:
            self.problem = nul_problem(chunk, self.offset)
        self.offset += len(chunk)

    @property
    def sha256(self) -> str:
        return self._digest.hexdigest()


# ---------------------------------------------------------------- JSON


def layout_problem(first: bytes | None) -> str | None:
    """Whole-file shapes that are JSON but not JSON Lines, seen on the first non-blank line."""
    if first is None:
        return None
    start = first.strip()
    if start.startswith(b"["):
        return "the file is a JSON array, not JSON Lines: write one JSON object per line (e.g. jq -c '.[]' in.json > out.jsonl)"
    if start == b"{":
        return "the file looks like pretty-printed JSON: JSON Lines needs each object on one line"
    return None


def json_type(value: Any) -> str:
    """JSON's name for a parsed value's type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "array", dict: "object"}.get(type(value), type(value).__name__)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")  # RFC 8259 has no NaN/Infinity; Python's json accepts them


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)  # one decoder: json.loads with options builds one per call


def decode(text: str) -> Any:
    """Strict RFC 8259 JSON: raises ValueError (json.JSONDecodeError with a column, or for NaN/Infinity)."""
    return _DECODER.decode(text)


def sha256_of(path: str | Path) -> str:
    """The sha256 of a whole file, read in 1 MiB chunks (a job's identity, a GGUF's content key)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
