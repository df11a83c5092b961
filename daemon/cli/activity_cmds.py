"""trainctl activity: how far each LoRA module moves, per layer and module kind (the latest sample, or one file)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import sqlite3
import time
from typing import TYPE_CHECKING, Any

from daemon import activity_summary
from daemon.cli.shared import duration, from_history, number, out, scaled_chars, with_config
from daemon.config import Config
from daemon.errors import TraindError
from daemon.jobqueue import JobQueue, original_name
from daemon.schema import Mover
from daemon.states import JobState

if TYPE_CHECKING:
    from daemon.cli.shared import Subparsers

# What each measure is (daemon/train/activity_probe.py): a sample's, then a finished file's.
MEANING = {
    "relative": "‖ΔW‖ / ‖W₀‖, the LoRA update relative to the frozen weight",
    "update": "‖ΔW‖, the LoRA update",
    "change": "‖ΔW − ΔW at the previous sample‖",
    "relative_change": "‖ΔW − ΔW at the previous sample‖ / ‖W₀‖",
    "grad_a": "‖∇A‖ at the sampled step, before clipping",
    "grad_b": "‖∇B‖ at the sampled step, before clipping",
    "moved_relative": "‖ΔW after − ΔW before the file‖ / ‖W₀‖",
    "moved": "‖ΔW after − ΔW before the file‖",
}
SAMPLE_MEASURES = ("relative", "update", "change", "relative_change", "grad_a", "grad_b")
# A finished file keeps only what it moved; --measure relative/update name its two forms too.
FILE_MEASURES = {"relative": "moved_relative", "moved_relative": "moved_relative", "update": "moved", "moved": "moved"}
SHADES = "·░▒▓█"  # a module in fifths of the grid's largest; blank: no LoRA there
FROZEN = "×"  # a module lora.freeze_stalled froze (it takes no gradient)
LEGEND = "· under 20%, ░ 20-40%, ▒ 40-60%, ▓ 60-80%, █ 80-100% of the largest module"
SPARK = "▁▂▃▄▅▆▇█"  # a layer's total in eighths of the largest layer total
RULER_EVERY = 5  # a layer index over every 5th column ("0    5    10"), where its label has room
OTHER = "other"  # layer -1: modules outside the numbered layers (lm_head, embeddings)
NO_DATA = ("trainctl activity: no activity sampled yet "
           "(the daemon samples every activity.every_steps steps and at the end of each file)")
NO_RECORD = {
    JobState.PENDING: "it has not been trained yet",
    JobState.PROCESSING: "it is training now; what a file moved is recorded when it finishes",
    JobState.FAILED: "it failed, and a failed file's steps are taken back out of the adapter",
    JobState.DONE: "it finished without one (trained before traind measured activity)",
}


@dataclasses.dataclass(frozen=True)
class View:
    """What to show: the header lines, the grid ({layers, kinds, values}), the --json body (top-K added later)."""

    header: list[str]
    grid: activity_summary.Grid
    body: dict[str, Any]


def register(subparsers: Subparsers, common: argparse.ArgumentParser) -> None:
    a = subparsers.add_parser("activity", parents=[common], help="which LoRA modules move, per layer and module kind")
    a.add_argument("--job", metavar="NAME", help="what one finished file moved (a job id or original name)")
    a.add_argument("--top", type=_count, default=5, metavar="K", help="list the K most active modules (default 5)")
    a.add_argument("--measure", choices=[*SAMPLE_MEASURES, "moved_relative", "moved"], metavar="M",
                   help=f"what to shade and rank: {', '.join(SAMPLE_MEASURES)} (default relative); "
                        "with --job moved_relative (default) or moved")
    a.add_argument("--json", action="store_true", help="print the data as JSON for scripts (no drawing)")
    a.set_defaults(handler=with_config(cmd_activity))


def _count(text: str) -> int:
    n = int(text)
    if n < 0:
        raise argparse.ArgumentTypeError(f"{n} is negative; give 0 or more")
    return n


def cmd_activity(cfg: Config, args: argparse.Namespace) -> int:
    measure = _measure(args)
    view = _file_view(cfg, args.job, measure) if args.job else _sample_view(cfg, measure)
    if view is None:
        return 1
    if measure not in activity_summary.present(view.grid, (measure,)):
        out(f"trainctl activity: no {measure} here (there is {', '.join(sorted(view.grid['values']))})")
        return 1
    top = activity_summary.top_movers(view.grid, args.top, measure)
    totals = activity_summary.per_layer(view.grid, (measure,)).get(measure)
    if args.json:
        counts = activity_summary.per_layer(view.grid, activity_summary.COUNT_MEASURES)
        out(json.dumps({**view.body, "layer_totals": totals, "top": [dataclasses.asdict(m) for m in top],
                        **{f"{m}_per_layer": v for m, v in counts.items()}}, indent=2))
        return 0
    width = shutil.get_terminal_size().columns
    for line in [*view.header, *render_grid(view.grid, measure, totals, width), *_summary(view.grid, measure, totals, top)]:
        out(line)
    return 0


def _measure(args: argparse.Namespace) -> str:
    """The measure to shade and rank, checked against what the source keeps."""
    if args.job:
        if args.measure not in (None, *FILE_MEASURES):
            raise TraindError(f"--measure {args.measure} is taken at samples only; with --job use moved_relative or moved")
        return FILE_MEASURES[args.measure or "relative"]
    if args.measure in ("moved_relative", "moved"):
        raise TraindError(f"--measure {args.measure} is what a finished file moved; give it with --job NAME")
    return args.measure or "relative"


# -- the two sources -------------------------------------------------------------------
def _sample_view(cfg: Config, measure: str) -> View | None:
    """The newest sample that has its full grid; None (and said so) when there is none."""
    try:
        row = from_history(cfg, lambda db: db.latest_activity())
    except sqlite3.OperationalError as e:  # a history.db from before activity was measured has no table for it
        if "no such table" not in str(e):
            raise
        row = None
    if row is None:
        out(NO_DATA)
        return None
    job, ago = row["job_id"], duration(time.time() - row["t"])
    last = "  (the file's last sample)" if row["final"] else ""
    header = [f"activity of {original_name(job)}   ({job})",
              f"  sampled at step {row['step']} (global step {row['global_step']}), {ago} ago{last}"]
    grid = {"layers": row["layers"], "kinds": row["kinds"], "values": row["grid"]}
    body = {"source": "sample", "job_id": job, "original_name": original_name(job), "measure": measure, "sample": row}
    return View(header, grid, body)


def _not_trained(earlier: dict[str, Any]) -> str:
    """A duplicate in done/: done without training, its content learnt from an earlier file."""
    where = f", already in adapter v{earlier['version']}" if earlier.get("version") is not None else ""
    return (f"it was not trained, its content repeats {earlier.get('original_name') or earlier.get('job_id')} "
            f"({earlier.get('job_id')}){where}")


def _file_view(cfg: Config, name: str, measure: str) -> View | None:
    """What one finished file moved (its job record); None (and said why) when it has no record."""
    queue = JobQueue(cfg.path("queue"))
    entry = queue.find(name)
    record = from_history(cfg, lambda db: db.job(entry.job_id)) or {}
    if not record.get("activity"):  # also a history.db from before the column existed
        earlier = (queue.read_duplicate(entry.job_id) or {}).get("duplicate_of")
        why = _not_trained(earlier) if earlier else NO_RECORD[entry.state]
        out(f"trainctl activity: {entry.job_id} has no record of what it moved: {why}")
        return None
    moved = json.loads(record["activity"])
    ago = f", finished {duration(time.time() - record['finished_at'])} ago" if record.get("finished_at") else ""
    header = [f"what {entry.original_name} moved   ({entry.job_id})",
              f"  {number(record.get('steps'), 'd')} steps, into adapter v{number(record.get('adapter_version'), 'd')}{ago}"]
    body = {"source": "file", "job_id": entry.job_id, "original_name": entry.original_name, "measure": measure,
            "moved": moved}
    return View(header, moved, body)


# -- drawing ---------------------------------------------------------------------------
def render_grid(grid: activity_summary.Grid, measure: str, totals: list[float | None] | None, width: int) -> list[str]:
    """Kinds down, layers across, one shade per module; a layer ruler above and the layer totals below,
    in as many blocks of columns as `width` needs."""
    cells = activity_summary.cell_values(grid, measure)
    layers, kinds = grid["layers"], grid["kinds"]
    shades = [scaled_chars(row, _peak(cells), SHADES) for row in cells]  # [layer][kind]
    frozen = grid["values"].get("frozen")
    if frozen:
        shades = [[FROZEN if f == 1 else c for c, f in zip(row, frow)] for row, frow in zip(shades, frozen)]
    spark = scaled_chars(totals, _peak([totals]), SPARK) if totals else None
    label = max(len(s) for s in [*kinds, "layer", "total"]) + 2
    lines: list[str] = []
    for block in _blocks(layers, width - label):
        lines += ["", "layer".ljust(label) + _ruler(block, layers)]
        lines += [kind.ljust(label) + _columns(block, layers, [row[j] for row in shades]) for j, kind in enumerate(kinds)]
        if spark:
            lines.append("total".ljust(label) + _columns(block, layers, spark))
    return lines


def _peak(rows: list[list[float | None]]) -> float | None:
    return max((v for row in rows for v in row if v is not None and math.isfinite(v)), default=None)


def _blocks(layers: list[int], room: int) -> list[list[int]]:
    """Column indices per block: numbered layers, tens of them to a block as `room` allows; "other" last."""
    numbered = [i for i, layer in enumerate(layers) if layer >= 0]
    per = room // 10 * 10 if room >= 10 else max(room, 1)
    blocks = [numbered[s:s + per] for s in range(0, len(numbered), per)] or [[]]
    other = [i for i, layer in enumerate(layers) if layer < 0]
    if other and blocks[-1] and len(blocks[-1]) + _gap(layers) + len(OTHER) > room:
        blocks.append(other)
    else:
        blocks[-1] = blocks[-1] + other
    return blocks


def _gap(layers: list[int]) -> int:
    """Space before the "other" column: as wide as the longest layer label, so that "other" always has room."""
    return len(str(max(layers)))


def _positions(block: list[int], layers: list[int]) -> list[int]:
    return [k + (_gap(layers) if layers[i] < 0 and k else 0) for k, i in enumerate(block)]


def _columns(block: list[int], layers: list[int], chars: list[str]) -> str:
    line = ""
    for at, i in zip(_positions(block, layers), block):
        line = line.ljust(at) + chars[i]
    return line


def _ruler(block: list[int], layers: list[int]) -> str:
    """Layer indices over their columns: the block's first, every RULER_EVERY-th where it fits, "other"."""
    text = ""
    for k, (at, i) in enumerate(zip(_positions(block, layers), block)):
        label = OTHER if layers[i] < 0 else str(layers[i])
        wanted = k == 0 or layers[i] < 0 or layers[i] % RULER_EVERY == 0
        if wanted and (not text or at > len(text)):
            text = text.ljust(at) + label
    return text


def _summary(grid: activity_summary.Grid, measure: str, totals: list[float | None] | None, top: list[Mover]) -> list[str]:
    """The legend, the busiest layers and the top modules, with their numbers."""
    peak = _peak(activity_summary.cell_values(grid, measure))
    lines = ["", f"{measure}: {MEANING[measure]}"]
    if peak is None:
        lines.append("  no module has a value of it here (change is measured from the second sample on)")
    else:
        lines.append(f"  {LEGEND} ({peak:.4g}); blank: no LoRA")
    if totals:
        ranked = sorted((v, layer) for v, layer in zip(totals, grid["layers"]) if v is not None and math.isfinite(v))[::-1]
        lines.append(f"  total: per layer, {SPARK[0]} to {SPARK[-1]} of the largest; the busiest: "
                     + ", ".join(f"{_layer(layer)} {v:.4g}" for v, layer in ranked[:3]))
    else:
        lines.append(f"  no per-layer totals of {measure}: the grid has no ‖W₀‖ (base) to relate them to")
    lines += _frozen_and_intruders(grid)
    lines += ["", f"top {len(top)} modules by {measure}"]
    lines += [f"  {_layer(m.layer):<9} {m.kind:<16} {number(m.value, '.4g')}" for m in top]
    return lines


def _layer(layer: int) -> str:
    return OTHER if layer < 0 else f"layer {layer}"


def _frozen_and_intruders(grid: activity_summary.Grid) -> list[str]:
    """The frozen modules (lora.freeze_stalled) and the intruder counts (activity.intruders), where the grid has them."""
    counts = activity_summary.per_layer(grid, activity_summary.COUNT_MEASURES)
    lines = []
    if "frozen" in counts:
        frozen = [layer for layer, v in zip(grid["layers"], counts["frozen"]) if v]
        lines.append(f"  {FROZEN} frozen (lora.freeze_stalled): " + (_ranges(frozen) if frozen else "none"))
    freezing = grid.get("freezing")
    if freezing:
        for e in freezing.get("events", []):
            lines.append(f"    step {e['step']}: {e['action']} {', '.join(e['units'])}")
        if freezing.get("skipped_layers"):
            lines.append(f"    no backward pass below layer {max(freezing['skipped_layers']) + 1}")
    if "intruders" in counts:
        total = sum(v for v in counts["intruders"] if v)
        busiest = sorted(((v, layer) for v, layer in zip(counts["intruders"], grid["layers"]) if v), reverse=True)[:5]
        lines.append(f"  intruder dimensions: {total:.0f}" + (" (most in " + ", ".join(
            f"{_layer(layer)}: {v:.0f}" for v, layer in busiest) + ")" if busiest else ""))
    return lines


def _ranges(layers: list[int]) -> str:
    """[0, 1, 2, 5] -> 'layers 0-2, 5'."""
    parts, start = [], None
    for k, layer in enumerate(layers):
        if start is None:
            start = layer
        if k + 1 == len(layers) or layers[k + 1] != layer + 1:
            parts.append(f"{start}-{layer}" if layer != start else f"{layer}")
            start = None
    return "layers " + ", ".join(parts)
