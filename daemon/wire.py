"""Typed frozen dataclasses over plain dicts: the codec daemon.protocol's messages are made with.

    @dataclass(frozen=True)
    class Job(Record):
        job_id: str = req("the job's id")
        priority: int = opt(0, "higher first")
    Job.from_wire({"job_id": "x"})      # checked: unknown, missing or mistyped fields are a ProtocolError
    checked(Job, raw, "the job")         # the keyword arguments of a class, every field of the right type

Every field carries a help text (`opt`, `req`): the protocol's tables in
docs/internals.md are generated from it. Standard library only.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from daemon.errors import TraindError


class ProtocolError(TraindError):
    """A message that is not one of the protocol's, or not well formed."""


def opt(default: Any = dataclasses.MISSING, help: str = "") -> Any:  # noqa: A002 - the field's help text
    """A field with a default (a list or dict default is copied for each instance)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def req(help: str) -> Any:  # noqa: A002
    """A field every message must carry."""
    return field(metadata={"help": help})


@dataclass(frozen=True)
class Record:
    """A typed value carried inside messages (a job)."""

    def to_wire(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_wire(cls, raw: Any, what: str = "") -> Record:
        if isinstance(raw, cls):
            return raw
        if not isinstance(raw, dict):
            raise ProtocolError(f"{what or cls.__name__}: expected an object, got {type(raw).__name__}")
        return cls(**checked(cls, raw, what or cls.__name__))


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, vars(sys.modules[cls.__module__]))  # its own module's names


def checked(cls: type, raw: dict[str, Any], what: str) -> dict[str, Any]:
    """`raw` as keyword arguments of `cls`, every field of the right type; ProtocolError naming what is wrong."""
    hints = _hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    extra = sorted(set(raw) - set(known))
    if extra:
        raise ProtocolError(f"{what}: unknown field(s) {', '.join(extra)}")
    out: dict[str, Any] = {}
    for name, f in known.items():
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ProtocolError(f"{what}, field {name!r} is missing")
            continue
        out[name] = _value(hints[name], raw[name], f"{what}, field {name!r}")
    return out


def _value(hint: Any, v: Any, what: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if v is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _value(a, v, what)
            except ProtocolError:
                continue
        raise ProtocolError(f"{what}: {v!r} is not {_name(hint)}")
    if isinstance(hint, type) and issubclass(hint, Record):
        return hint.from_wire(v, what)
    base = origin or hint
    if base is Any:
        return v
    if base is float and isinstance(v, int) and not isinstance(v, bool):
        return float(v)
    if base is int and isinstance(v, bool) or not isinstance(v, base):
        raise ProtocolError(f"{what}: {v!r} is not {_name(hint)}")
    if base is list and args:  # list[T]: every item a T
        return [_value(args[0], item, f"{what}, item {i}") for i, item in enumerate(v)]
    return v


def _name(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_name(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    if typing.get_origin(hint) is list and typing.get_args(hint):
        return f"a list of {_name(typing.get_args(hint)[0])}"
    return getattr(typing.get_origin(hint) or hint, "__name__", str(hint))
