"""trainctl forgetting: after each file, how the probes and the earlier files' keep-sets scored (the matrix).

Read from history.db, so it works while the daemon is stopped; `--json` prints the document GET /api/forgetting
serves (daemon/forgetting_view.py).
"""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

from daemon import adapters, forgetting_view
from daemon.cli.shared import from_history, out, scaled_chars, with_config
from daemon.config import Config
from daemon.forgetting_view import signed_percent

if TYPE_CHECKING:
    from daemon.cli.shared import Subparsers

TABLE_FILES = 12  # rows of the table by default: a screen wide with their keep-sets as columns
NAME_WIDTH = 24
CELL = 9  # "+123.4%*" and a space
SPARK = "▁▂▃▄▅▆▇█"
NOTHING = ("trainctl forgetting: no forgetting scored yet (after every file the trainer scores the probe files "
           "and the keep-sets of the files learnt before it; see forgetting.* in the config)")


def register(subparsers: Subparsers, common: argparse.ArgumentParser) -> None:
    f = subparsers.add_parser("forgetting", parents=[common],
                              help="what each file made the model forget: probes and earlier files, file by file")
    f.add_argument("--generation", type=int, metavar="G", help="a generation (default: the current one)")
    f.add_argument("--files", type=_files, metavar="N",
                   help=f"the last N files of it (default {TABLE_FILES} in the table, "
                        f"{forgetting_view.DEFAULT_FILES} with --json as the API; at most {forgetting_view.MAX_FILES})")
    f.add_argument("--json", action="store_true", help="print GET /api/forgetting's document")
    f.set_defaults(handler=with_config(cmd_forgetting))


def _files(text: str) -> int:
    n = int(text)
    if not 1 <= n <= forgetting_view.MAX_FILES:
        raise argparse.ArgumentTypeError(f"{n}: give 1 to {forgetting_view.MAX_FILES}")
    return n


def current_generation(cfg: Config) -> int | None:
    """The generation of the adapter in use (None before the first: then the newest one scored)."""
    current = adapters.peek_current(cfg.path("adapters"))
    return current.manifest.generation if current is not None else None


def cmd_forgetting(cfg: Config, args: argparse.Namespace) -> int:
    files = args.files or (forgetting_view.DEFAULT_FILES if args.json else TABLE_FILES)
    here = current_generation(cfg)
    doc = from_history(cfg, lambda db: forgetting_view.matrix(db.conn, args.generation, files, here))
    if args.json:  # what GET /api/forgetting answers, with no history.db yet too
        gen = args.generation if args.generation is not None else here or 0
        out(json.dumps(doc if doc is not None else forgetting_view.empty(gen, files), indent=2))
        return 0
    if doc is None or not doc["generations"]:
        out(NOTHING)
        return 0
    if not doc["files"]:
        out(f"generation {doc['generation']}: no file scored (scored generations: "
            f"{', '.join(str(g) for g in doc['generations'])})")
        return 0
    for line in render(doc):
        out(line)
    return 0


def labels(sets: list[dict[str, Any]]) -> list[str]:
    """Column heads: P1.. for the probes, K<file index> for the keep-sets."""
    n = 0
    out_: list[str] = []
    for s in sets:
        if s["kind"] == "probe":
            n += 1
            out_.append(f"P{n}")
        else:
            out_.append(f"K{s['learnt_at']}")
    return out_


def _cell(c: dict[str, Any] | None, diagonal: bool) -> str:
    if c is None:
        return ""
    if diagonal:
        return "·"  # the file's own keep-set: its reference is now
    return signed_percent(c["change"]) + ("*" if c["over"] else "")


def render(doc: dict[str, Any]) -> list[str]:
    sets, heads = doc["sets"], labels(doc["sets"])
    shown = f"files {doc['first_index']}-{doc['first_index'] + len(doc['files']) - 1} of {doc['total_files']}"
    lines = [f"generation {doc['generation']}: {shown}; change in loss: keep-sets (K) since the file was learnt, "
             "probes (P) since the version before the file; * over its limit; · the file's own keep-set"]
    lines.append(f"  {'#':>3}  {'file':<{NAME_WIDTH}} {'ver':<5} {'outcome':<8}"
                 + "".join(f"{h:>{CELL}}" for h in heads) + f"  {'BWT loss':>9}  worst")
    marks: dict[int | None, list[dict]] = {}
    for m in doc["markers"]:
        marks.setdefault(m["after"], []).append(m)
    lines += [_marker(m) for m in marks.get(None, [])]
    for f, row in zip(doc["files"], doc["cells"]):
        cells = "".join(f"{_cell(c, s['kind'] != 'probe' and s['job_id'] == f['job_id']):>{CELL}}" for s, c in zip(sets, row))
        bwt = f["backward_transfer"]
        worst = f["worst"]
        lines.append(f"  {f['index']:>3}  {_short(f['name'] or f['job_id']):<{NAME_WIDTH}} "
                     f"{'v' + str(f['version']) if f['version'] is not None else '-':<5} {f['outcome']:<8}{cells}"
                     f"  {format(bwt['loss'], '+.4g') if bwt and bwt['loss'] is not None else '-':>9}  "
                     + (f"{forgetting_view.set_said(worst)} {signed_percent(worst['change'])}" if worst else "-")
                     + ("  (sampled)" if f["sampled"] else ""))
        lines += [_marker(m) for m in marks.get(f["index"], [])]
    for f in doc["files"]:
        if f["gate"]["tripped"]:
            lines.append(f"  gate on file {f['index']} ({f['gate']['action']}): {f['gate']['message'] or 'tripped'}")
    if doc["omitted_sets"]:
        lines.append(f"  ({doc['omitted_sets']} more set(s) scored, of files before these or probes past "
                     f"{forgetting_view.MAX_PROBES}: --files N, or --json)")
    lines.append("sets:")
    lines += [f"  {h:<4} {s['kind']} {s['name']}" + (f" ({s['job_id']})" if s["job_id"] else "") for h, s in zip(heads, sets)]
    if doc["probes"]:
        lines.append("probes (loss per file; drift since the generation began):")
    for h, p in zip([h for h, s in zip(heads, sets) if s["kind"] == "probe"], doc["probes"]):
        lines.append(_probe_line(h, p, [f["outcome"] for f in doc["files"]]))
    return lines


def _probe_line(head: str, p: dict[str, Any], outcomes: list[str]) -> str:
    """The probe over the files (the sparkline: every file scored); the span and the drift of the versions that
    became current (a held or rolled-back file's figures are not the model's)."""
    losses = [x for x in p["loss"] if x is not None]
    lo = min(losses, default=0.0)
    spark = "".join(scaled_chars([None if x is None else x - lo for x in p["loss"]],
                                 (max(losses) - lo) if losses else None, SPARK))
    kept = [k for k, o in enumerate(outcomes) if o == "done"] or list(range(len(p["loss"])))
    learnt = [p["loss"][k] for k in kept if k < len(p["loss"]) and p["loss"][k] is not None]
    drift = next((p["drift"][k] for k in reversed(kept) if k < len(p["drift"]) and p["drift"][k] is not None), None)
    base = p["baseline"]["loss"] if p["baseline"] else None
    span = f"{learnt[0]:.4g} -> {learnt[-1]:.4g}" if learnt else "-"
    return (f"  {head:<4} {p['name']}  {spark}  loss {span}  drift {signed_percent(drift)}"
            + (f" (baseline {base:.4g})" if base is not None else ""))


def _marker(m: dict[str, Any]) -> str:
    where = f"after file {m['after']}" if m["after"] is not None else "before these files"
    return f"  --- {m['kind']} {where}: {m['message']}"


def _short(name: str) -> str:
    return name if len(name) <= NAME_WIDTH else name[:NAME_WIDTH - 1] + "…"


def report_lines(report: dict[str, Any]) -> list[str]:
    """One file's report (`trainctl queue status NAME`): each set scored after it, the summary, the gate."""
    bwt, worst, gate = report["backward_transfer"], report["worst"], report["gate"]
    head = [f"v{report['version']}" if report["version"] is not None else "no version",
            f"generation {report['generation']}", report["outcome"]]
    said = [f"backward transfer loss {bwt['loss']:+.4g} accuracy {bwt['accuracy']:+.4g}"
            if bwt and bwt.get("loss") is not None and bwt.get("accuracy") is not None else "no earlier file"]
    if worst:
        said.append(f"worst {forgetting_view.set_said(worst)} {signed_percent(worst['change'])}")
    if report["sampled"]:
        said.append(f"sampled: the first {report['examples_per_set']} examples of each set (budget)")
    lines = [f"  forgetting after it ({', '.join(head)}): {'; '.join(said)}"]
    for s in report["sets"]:
        ref = s["reference"]["loss"] if s["reference"] else None
        was = (f" ({'before' if s['kind'] == 'probe' else 'learnt'} {ref:.4g})" if ref is not None else " (learnt now)")
        over = f" over (limit {signed_percent(s['limit'])})" if s["over"] else ""
        drift = f"; drift {signed_percent(s['drift'])}" if s["drift"] is not None else ""
        lines.append(f"    {s['id']:<28} loss {s['loss']:.4g}{was}  {signed_percent(s['change'])}{over}{drift}")
    if gate.get("tripped"):
        lines.append(f"    gate {gate.get('action')} TRIPPED: {gate.get('message') or ', '.join(gate.get('over') or [])}")
    return lines
