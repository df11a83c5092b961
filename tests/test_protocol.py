"""The service-trainer protocol (daemon/protocol.py): typed messages, typed errors, and docs that cannot drift."""

from __future__ import annotations

import dataclasses
import re
import typing

import pytest

from daemon import protocol as p
from bench.harness import REPO

EXAMPLES: dict[str, dict] = {  # a value for each field type, to build every message
    "str": "x", "int": 3, "float": 0.5, "bool": True, "list": [1], "dict": {"a": 1},
}


def value_of(hint: object) -> object:
    if typing.get_origin(hint) in (typing.Union, __import__("types").UnionType):
        return value_of(next(a for a in typing.get_args(hint) if a is not type(None)))
    if isinstance(hint, type) and issubclass(hint, p.Record):
        return example(hint)
    if typing.get_origin(hint) is list and typing.get_args(hint):
        return [value_of(typing.get_args(hint)[0])]
    return EXAMPLES[getattr(typing.get_origin(hint) or hint, "__name__")]


def example(cls: type) -> object:
    """An instance of a message (or record) with a value of the right type in every field."""
    hints = typing.get_type_hints(cls, vars(p))
    return cls(**{f.name: value_of(hints[f.name]) for f in dataclasses.fields(cls)})


ALL = [cls for d in p.DIRECTIONS for cls in p.messages(d)]


@pytest.mark.parametrize("cls", ALL, ids=lambda c: f"{c.DIRECTION}:{c.TYPE}")
def test_every_message_goes_over_the_wire_and_back_unchanged(cls):
    msg = example(cls)
    wire = msg.to_wire()
    assert wire["type"] == cls.TYPE and all(isinstance(k, str) for k in wire)
    assert p.decode(wire, cls.DIRECTION) == msg
    for f in dataclasses.fields(cls):
        assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help text"
    assert cls.DOC, f"{cls.__name__} says nothing of what the receiver does"


def test_a_message_that_is_not_one_is_a_typed_error_naming_what_is_wrong():
    cases = {
        "unknown message type 'pasue'": {"type": "pasue"},
        "'rollback' message, field 'version' is missing": {"type": "rollback"},
        "'rollback' message, field 'version': '2' is not int": {"type": "rollback", "version": "2"},
        "'pause' message: unknown field(s) job": {"type": "pause", "job": "x"},
        "'train' message, field 'job', field 'n_records' is missing": {"type": "train", "job": {
            "job_id": "a", "path": "/a", "original_name": "a", "sha256": "0", "format": "text"}},
        "a message must be an object": ["train"],
        "'train' message, field 'job', field 'n_records': '5' is not int": {"type": "train", "job": {
            "job_id": "a", "path": "/a", "original_name": "a", "sha256": "0", "format": "text", "n_records": "5"}},
    }
    for said, raw in cases.items():
        with pytest.raises(p.ProtocolError) as e:
            p.decode(raw, p.TO_TRAINER)
        assert said in str(e.value), (said, str(e.value))
    with pytest.raises(p.ProtocolError, match="field 'problems', item 1: 2 is not str"):
        p.decode({"type": "config_refused", "problems": ["a", 2]}, p.TO_SERVICE)
    with pytest.raises(p.ProtocolError, match="trainer → service"):  # a direction has only its own types
        p.decode({"type": "train", "job": example(p.Job).to_wire()}, p.TO_SERVICE)


def test_the_internals_doc_tables_are_the_protocols():
    doc = (REPO / "docs" / "internals.md").read_text(encoding="utf-8")
    for name, table in p.tables().items():
        block = re.search(rf"<!-- {re.escape(name)} -->\n(.*?)\n<!-- /{re.escape(name)} -->", doc, re.S)
        assert block, f"docs/internals.md has no <!-- {name} --> block"
        assert block.group(1) == table, f"the {name} table drifted: run `python -m daemon.protocol` and paste it"


def test_no_message_is_built_as_a_dict_outside_the_protocol():
    """Every message crossing the seam is made from its dataclass: no `{"type": ...}` literal elsewhere."""
    literal = re.compile(r"""["']type["']\s*:\s*["'](\w+)["']|["']op["']\s*:\s*["'](\w+)["']""")
    found = []
    for path in sorted((REPO / "daemon").rglob("*.py")):
        if path.name == "protocol.py":
            continue
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if literal.search(line):
                found.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert not found, "\n".join(found)
