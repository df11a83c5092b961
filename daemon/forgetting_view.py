"""The forgetting matrix as people read it, from `history.db` (GET /api/forgetting, `trainctl forgetting`, the status).

    matrix(db.conn, generation=None, files=50, current_generation=2)   # the document the API and `--json` give
    report_of(db.conn, job_id)                                          # one file's report, as the trainer sent it
    summary(report, outcome)                                            # the status' `forgetting` block
    rows_of(report, outcome, t)                                         # what HistoryDB.record_forgetting writes

The trainer scores, after every file, the probe files and the keep-sets of the files learnt before it
(daemon/train/forgetting.py); the service records each report (HistoryDB.record_forgetting): a row per file in
`forgetting_files`, a row per file and set in `forgetting`. The matrix is one generation's: rows are its files in
the order they were learnt, columns its sets (probes first, then keep-sets in learning order). It is bounded: the
last `files` files (at most MAX_FILES) and, as columns, the probes (at most MAX_PROBES) and the keep-sets of those
files; older keep-sets still scored are counted in `omitted_sets` (backward transfer covers them all).
Standard library only.
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any

DEFAULT_FILES = 50
MAX_FILES = 500
MAX_PROBES = 20  # probes in the matrix, the status block and the Prometheus gauges
MAX_MARKERS = 200
MARKED_EVENTS = {"consolidated": "consolidation", "rollback": "rollback"}  # events kind -> marker kind
_IN_CHUNK = 900  # under SQLite's default limit of host parameters


def rows_of(report: dict[str, Any], outcome: str, t: float) -> tuple[tuple, list[tuple]]:
    """The `forgetting_files` row and the `forgetting` rows of a report (HistoryDB.record_forgetting);
    ValueError naming the field that is missing or not of its type."""
    if not isinstance(report, dict):
        raise ValueError("forgetting report: not an object")
    gate, worst, bwt = (_obj(report, k, "") for k in ("gate", "worst", "backward_transfer"))
    job_id, generation = _text(report, "job_id", "", need=True), _int(report, "generation", "", need=True)
    version = _int(report, "version", "")
    row = (job_id, generation, version, t, _text(report, "original_name", ""), outcome,
           *(_num(report, k, "") for k in ("seconds", "train_seconds", "budget_seconds")),
           int(bool(report.get("sampled"))), _int(report, "examples_per_set", ""),
           _num(bwt, "loss", "backward_transfer."), _num(bwt, "accuracy", "backward_transfer."),
           _int(bwt, "sets", "backward_transfer."), _text(worst, "id", "worst."), _text(worst, "name", "worst."),
           _num(worst, "change", "worst."), _text(gate, "action", "gate."), int(bool(gate.get("tripped"))),
           json.dumps([str(x) for x in _list(gate, "over", "gate.")]), _text(gate, "message", "gate."))
    cells = []
    for i, s in enumerate(_list(report, "sets", "")):
        at = f"sets[{i}]."
        if not isinstance(s, dict):
            raise ValueError(f"forgetting report: sets[{i}] is not an object")
        ref, base = _obj(s, "reference", at), _obj(s, "baseline", at)
        cells.append((job_id, _text(s, "id", at, need=True), generation, version, t, _text(s, "kind", at, need=True),
                      _text(s, "name", at), _text(s, "job_id", at), _int(s, "examples", at), _int(s, "tokens", at),
                      _num(s, "loss", at), _num(s, "accuracy", at), _num(ref, "loss", at + "reference."),
                      _num(ref, "accuracy", at + "reference."), _num(base, "loss", at + "baseline."),
                      _num(base, "accuracy", at + "baseline."), _num(s, "change", at), _num(s, "drift", at),
                      _num(s, "limit", at), int(bool(s.get("over")))))
    return row, cells


def _bad(where: str, key: str, what: str) -> ValueError:
    return ValueError(f"forgetting report: {where}{key} {what}")


def _text(d: dict, key: str, where: str, need: bool = False) -> str | None:
    v = d.get(key)
    if v is None and need:
        raise _bad(where, key, "is missing")
    if v is not None and not isinstance(v, str):
        raise _bad(where, key, f"is not a string: {v!r}")
    return v


def _num(d: dict, key: str, where: str) -> float | None:
    v = d.get(key)
    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
        raise _bad(where, key, f"is not a number: {v!r}")
    return v


def _int(d: dict, key: str, where: str, need: bool = False) -> int | None:
    v = d.get(key)
    if v is None and need:
        raise _bad(where, key, "is missing")
    if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
        raise _bad(where, key, f"is not a whole number: {v!r}")
    return v


def _obj(d: dict, key: str, where: str) -> dict:
    v = d.get(key)
    if v is not None and not isinstance(v, dict):
        raise _bad(where, key, f"is not an object: {v!r}")
    return v or {}


def _list(d: dict, key: str, where: str) -> list:
    v = d.get(key)
    if v is not None and not isinstance(v, list):
        raise _bad(where, key, f"is not a list: {v!r}")
    return v or []


def _pair(loss: float | None, accuracy: float | None) -> dict[str, float | None] | None:
    return None if loss is None and accuracy is None else {"loss": loss, "accuracy": accuracy}


def _bwt(r: dict[str, Any]) -> dict[str, Any] | None:
    pair = _pair(r["bwt_loss"], r["bwt_accuracy"])
    return None if pair is None else {**pair, "sets": r["bwt_sets"]}


def _file(r: dict[str, Any], index: int) -> dict[str, Any]:
    return {
        "index": index, "job_id": r["job_id"], "name": r["original_name"], "version": r["version"], "t": r["t"],
        "outcome": r["outcome"], "sampled": bool(r["sampled"]), "examples_per_set": r["examples_per_set"],
        "seconds": r["seconds"], "train_seconds": r["train_seconds"], "budget_seconds": r["budget_seconds"],
        "backward_transfer": _bwt(r),
        "worst": {"id": r["worst_id"], "name": r["worst_name"], "change": r["worst_change"]}
        if r["worst_id"] is not None else None,
        "gate": {"action": r["gate_action"], "tripped": bool(r["gate_tripped"]),
                 "over": json.loads(r["gate_over"] or "[]"), "message": r["gate_message"]},
    }


def _set(r: dict[str, Any]) -> dict[str, Any]:
    """A cell as the trainer reported it (the report's `sets` entry)."""
    return {"id": r["set_id"], "kind": r["kind"], "name": r["name"], "job_id": r["set_job_id"],
            "examples": r["examples"], "tokens": r["tokens"], "loss": r["loss"], "accuracy": r["accuracy"],
            "reference": _pair(r["reference_loss"], r["reference_accuracy"]),
            "baseline": _pair(r["baseline_loss"], r["baseline_accuracy"]),
            "change": r["change"], "drift": r["drift"], "limit": r["limit_increase"], "over": bool(r["over"])}


def _cell(r: dict[str, Any]) -> dict[str, Any]:
    s = _set(r)
    return {k: s[k] for k in ("loss", "accuracy", "change", "drift", "over", "limit", "examples", "tokens",
                              "reference", "baseline")}


def generations(db_conn: sqlite3.Connection) -> list[int]:
    return [g for (g,) in db_conn.execute("SELECT DISTINCT generation FROM forgetting_files ORDER BY generation")]


def report_of(db_conn: sqlite3.Connection, job_id: str) -> dict[str, Any] | None:
    """The file's last forgetting report, rebuilt from the history (None: never scored, or an older history)."""
    try:
        row = db_conn.execute("SELECT * FROM forgetting_files WHERE job_id=?", (job_id,)).fetchone()
        if row is None:
            return None
        sets = db_conn.execute("SELECT * FROM forgetting WHERE job_id=? ORDER BY rowid", (job_id,)).fetchall()
    except sqlite3.OperationalError:  # a history.db from before the forgetting tables, opened read-only
        return None
    f = _file(dict(row), 0)
    return {"job_id": job_id, "original_name": f["name"], "version": f["version"], "generation": row["generation"],
            "outcome": f["outcome"], "seconds": f["seconds"], "train_seconds": f["train_seconds"],
            "budget_seconds": f["budget_seconds"], "sampled": f["sampled"], "examples_per_set": f["examples_per_set"],
            "sets": [_set(dict(s)) for s in sets], "backward_transfer": f["backward_transfer"],
            "worst": f["worst"], "gate": f["gate"]}


def file_summaries(db_conn: sqlite3.Connection, job_ids: list[str]) -> dict[str, dict[str, Any]]:
    """Each file's summary (outcome, version, generation, backward transfer, worst, gate, cost) for a job record;
    files never scored are absent."""
    out: dict[str, dict[str, Any]] = {}
    try:
        for i in range(0, len(job_ids), _IN_CHUNK):
            chunk = job_ids[i:i + _IN_CHUNK]
            for r in db_conn.execute(f"SELECT * FROM forgetting_files WHERE job_id IN ({','.join('?' * len(chunk))})",
                                     chunk):
                f = _file(dict(r), 0)
                del f["index"], f["name"]
                out[r["job_id"]] = {**f, "generation": r["generation"]}
    except sqlite3.OperationalError:  # a history.db from before the forgetting tables
        return {}
    return out


def _rows_of(db_conn: sqlite3.Connection, generation: int, files: int) -> tuple[list[dict[str, Any]], int]:
    total = db_conn.execute("SELECT COUNT(*) FROM forgetting_files WHERE generation=?", (generation,)).fetchone()[0]
    first = max(0, total - files)
    rows = db_conn.execute("SELECT * FROM forgetting_files WHERE generation=? ORDER BY t, rowid LIMIT ? OFFSET ?",
                           (generation, files, first)).fetchall()
    return [_file(dict(r), first + i) for i, r in enumerate(rows)], first


def _cells_of(db_conn: sqlite3.Connection, job_ids: list[str]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i in range(0, len(job_ids), _IN_CHUNK):
        chunk = job_ids[i:i + _IN_CHUNK]
        out += [dict(r) for r in db_conn.execute(
            f"SELECT * FROM forgetting WHERE job_id IN ({','.join('?' * len(chunk))}) ORDER BY rowid", chunk)]
    return out


def _columns(rows: list[dict[str, Any]], cells: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """Probes in the order first scored, then the keep-sets of the shown files in learning order; and how many
    other sets were scored (probes beyond MAX_PROBES, keep-sets of files before the window)."""
    learnt_at = {r["job_id"]: r["index"] for r in rows}
    probes: dict[str, dict[str, Any]] = {}
    keeps: dict[str, dict[str, Any]] = {}
    other: set[str] = set()
    for c in cells:
        sid = c["set_id"]
        if c["kind"] == "probe":
            if sid not in probes and len(probes) < MAX_PROBES:
                probes[sid] = {"id": sid, "kind": "probe", "name": c["name"], "job_id": None, "learnt_at": None}
            elif sid not in probes:
                other.add(sid)
        elif c["set_job_id"] in learnt_at:
            keeps.setdefault(sid, {"id": sid, "kind": c["kind"], "name": c["name"], "job_id": c["set_job_id"],
                                   "learnt_at": learnt_at[c["set_job_id"]]})
        else:
            other.add(sid)
    return [*probes.values(), *sorted(keeps.values(), key=lambda s: s["learnt_at"])], len(other)


def _markers(db_conn: sqlite3.Connection, generation: int, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Consolidations and rollbacks from the first shown file on, until the next generation's first file;
    `after`: the index of the last file learnt before it."""
    if not rows:
        return []
    nxt = db_conn.execute("SELECT MIN(t) FROM forgetting_files WHERE generation>?", (generation,)).fetchone()[0]
    found = db_conn.execute(
        f"SELECT t, kind, message FROM events WHERE kind IN ({','.join('?' * len(MARKED_EVENTS))}) AND t >= ? AND t < ? "
        "ORDER BY t LIMIT ?", (*MARKED_EVENTS, rows[0]["t"], nxt if nxt is not None else 1e18, MAX_MARKERS)).fetchall()
    out = []
    for t, kind, message in found:
        before = [r["index"] for r in rows if r["t"] <= t]
        out.append({"kind": MARKED_EVENTS[kind], "t": t, "after": before[-1] if before else None, "message": message})
    return out


def _probe_series(sets: list[dict[str, Any]], grid: list[list[dict[str, Any] | None]]) -> list[dict[str, Any]]:
    out = []
    for j, s in enumerate(sets):
        if s["kind"] != "probe":
            continue
        column = [row[j] for row in grid]
        baseline = next((c["baseline"] for c in column if c is not None and c["baseline"] is not None), None)
        out.append({"id": s["id"], "name": s["name"], "baseline": baseline,
                    **{k: [c[k] if c is not None else None for c in column] for k in ("loss", "accuracy", "drift", "change")}})
    return out


def matrix(db_conn: sqlite3.Connection, generation: int | None = None, files: int = DEFAULT_FILES,
           current_generation: int | None = None) -> dict[str, Any]:
    """The document of GET /api/forgetting: one generation's files × sets (default: `current_generation`, else
    the newest one scored), the last `files` files of it."""
    files = max(1, min(files, MAX_FILES))
    try:
        gens = generations(db_conn)
    except sqlite3.OperationalError:  # a history.db from before the forgetting tables
        gens = []
    gen = generation if generation is not None else (current_generation if current_generation is not None
                                                     else (gens[-1] if gens else 0))
    rows, first = _rows_of(db_conn, gen, files) if gens else ([], 0)
    cells = _cells_of(db_conn, [r["job_id"] for r in rows])
    sets, omitted = _columns(rows, cells)
    where = {(c["job_id"], c["set_id"]): c for c in cells}
    grid = [[_cell(where[(r["job_id"], s["id"])]) if (r["job_id"], s["id"]) in where else None for s in sets]
            for r in rows]
    total = first + len(rows)
    return {"generation": gen, "generations": gens, "total_files": total, "first_index": first, "files_limit": files,
            "files": rows, "sets": sets, "cells": grid, "omitted_sets": omitted,
            "probes": _probe_series(sets, grid), "markers": _markers(db_conn, gen, rows)}


def empty(generation: int, files: int = DEFAULT_FILES) -> dict[str, Any]:
    """The document before anything was scored (or with no history.db yet)."""
    return {"generation": generation, "generations": [], "total_files": 0, "first_index": 0,
            "files_limit": max(1, min(files, MAX_FILES)), "files": [], "sets": [], "cells": [], "omitted_sets": 0,
            "probes": [], "markers": []}


def summary(report: dict[str, Any], outcome: str) -> dict[str, Any]:
    """The status' `forgetting` block: what the last file's scoring found, in a few lines (bounded)."""
    sets = report.get("sets") or []
    probes = [s for s in sets if s.get("kind") == "probe"]
    over = [s.get("id") for s in sets if s.get("over")]
    gate = dict(report.get("gate") or {})
    gate["over"] = list(gate.get("over") or [])[:MAX_PROBES]
    return {
        "job_id": report.get("job_id"), "original_name": report.get("original_name"), "version": report.get("version"),
        "generation": report.get("generation"), "outcome": outcome, "sampled": bool(report.get("sampled")),
        "seconds": report.get("seconds"), "train_seconds": report.get("train_seconds"),
        "worst": report.get("worst"), "backward_transfer": report.get("backward_transfer"), "gate": gate,
        "probes": [{k: p.get(k) for k in ("id", "name", "loss", "change", "drift", "over")} for p in probes[:MAX_PROBES]],
        "probes_over": [p.get("id") for p in probes if p.get("over")][:MAX_PROBES],
        "sets_over": len(over),
    }


def set_said(s: dict[str, Any]) -> str:
    """A set as people read it: "probe general.jsonl", "keep-set of a.jsonl" (its id where it has no name)."""
    kind = (s.get("id") or "").partition(":")[0]
    if not s.get("name"):
        return s.get("id") or "?"
    return f"probe {s['name']}" if kind == "probe" else f"keep-set of {s['name']}"


def signed_percent(x: float | None) -> str:
    """A relative change as people read it: +12.3%, -0.4%; '-' when unknown."""
    return "-" if x is None else f"{x * 100:+.1f}%"


def one_line(block: dict[str, Any]) -> str:
    """The status block in one line (`trainctl status`)."""
    worst = block.get("worst") or {}
    bwt = block.get("backward_transfer") or {}
    gate = block.get("gate") or {}
    parts = [f"after {block.get('original_name') or block.get('job_id')}"
             + (f" (v{block['version']})" if block.get("version") is not None else "")]
    if worst.get("id"):
        parts.append(f"worst {set_said(worst)} {signed_percent(worst.get('change'))}")
    if bwt.get("loss") is not None:
        parts.append(f"backward transfer loss {bwt['loss']:+.4g}")
    if block.get("probes_over"):
        parts.append(f"probes over: {', '.join(block['probes_over'])}")
    if gate.get("tripped"):
        parts.append(f"GATE {gate.get('action')}: {gate.get('message') or 'tripped'}")
    elif gate.get("action"):
        parts.append(f"gate {gate['action']}: ok")
    if block.get("sampled"):
        parts.append("sampled (budget)")
    return "; ".join(parts)
