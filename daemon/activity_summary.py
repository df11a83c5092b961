"""Per-layer LoRA activity, service side: totals per layer and per module kind, top movers, the status block.

    from daemon import activity_summary
    totals = activity.per_layer(grid)                  # {"update": [one value per layer], ...}
    block = activity.summary(msg, now)                 # the status' layer_activity_summary
    activity.top_movers(grid, k=5)                     # [Mover(layer, kind, measure, value)]
    activity.file_moved(done_msg["activity_moved"])   # what one file moved, for its job record

A grid is what the trainer measures (daemon/train/activity_probe.py): `layers`,
`kinds` and `values[measure][i][j]` for layers[i] × kinds[j], None where no
LoRA sits. Totals over a layer (or a kind) are the Frobenius norm of the
modules taken together, sqrt(Σ v²); a relative measure is the total of its
absolute measure over the total of ‖W₀‖ (`base`), so a layer's relative
update is that of the layer as a whole. Standard library only.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from daemon.schema import LayerActivitySummary, Mover, iso

MEASURES = ("update", "relative", "change", "grad_a", "grad_b")  # what a sample holds (and `base`)
# Per-module counts, summed over a layer (or kind), where a sample has them: `frozen` 1/0 (lora.freeze_stalled),
# `intruders` (activity.intruders)
COUNT_MEASURES = ("frozen", "intruders")
SAMPLED = (*MEASURES, *COUNT_MEASURES)  # the totals of a sample (the status block, the history)
HISTORY_MEASURES = (*SAMPLED, "relative_change")  # per-layer totals a history row keeps
MOVED_MEASURES = ("moved", "moved_relative")  # what a finished file holds (and `base`)
RELATIVE_OF = {"relative": "update", "moved_relative": "moved", "relative_change": "change"}
TOP_MOVERS = 5  # movers in the status block: enough to name the hot spots, bounded whatever the model
DIGITS = 4  # significant digits kept in the status block (the history keeps full precision)

Grid = dict[str, Any]  # {"layers": [...], "kinds": [...], "values": {measure: [[...]]}}


def _norm(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return math.sqrt(sum(v * v for v in present)) if present else None


def _totals(grid: Grid, measures: tuple[str, ...], axis: int) -> dict[str, list[float | None]]:
    values = grid["values"]
    n = len(grid["layers"]) if axis == 0 else len(grid["kinds"])

    def line(measure: str, k: int) -> list[float | None]:
        rows = values[measure]
        return rows[k] if axis == 0 else [row[k] for row in rows]

    out: dict[str, list[float | None]] = {}
    for m in measures:
        absolute = RELATIVE_OF.get(m)
        if m in COUNT_MEASURES:
            out[m] = [_sum(line(m, k)) for k in range(n)]
        elif absolute is None:
            out[m] = [_norm(line(m, k)) for k in range(n)]
        elif absolute in values and "base" in values:
            out[m] = [_ratio(_norm(_paired(line(absolute, k), line("base", k))),
                             _norm(_paired(line("base", k), line(absolute, k)))) for k in range(n)]
    return out


def _sum(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(sum(present)) if present else None


def _paired(a: list[float | None], b: list[float | None]) -> list[float | None]:
    """a where both a and b have a value (a relative total compares like with like)."""
    return [x if x is not None and y is not None else None for x, y in zip(a, b)]


def _ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num is not None and den else None


def present(grid: Grid, measures: tuple[str, ...]) -> tuple[str, ...]:
    """The measures of `measures` this grid has, or can derive (relative ones need their absolute and base)."""
    values = grid["values"]
    return tuple(m for m in measures if m in values or (RELATIVE_OF.get(m) in values and "base" in values))


def per_layer(grid: Grid, measures: tuple[str, ...] = SAMPLED) -> dict[str, list[float | None]]:
    """One total per layer for each measure."""
    return _totals(grid, present(grid, measures), axis=0)


def per_kind(grid: Grid, measures: tuple[str, ...] = SAMPLED) -> dict[str, list[float | None]]:
    """One total per module kind for each measure."""
    return _totals(grid, present(grid, measures), axis=1)


def cell_values(grid: Grid, measure: str) -> list[list[float | None]]:
    """The grid of `measure`, deriving `relative_change` (change / ‖W₀‖) when asked."""
    values = grid["values"]
    if measure in values:
        return values[measure]
    absolute = RELATIVE_OF.get(measure)
    if absolute in values and "base" in values:
        return [[_ratio(a, b) if a is not None else None for a, b in zip(ra, rb)]
                for ra, rb in zip(values[absolute], values["base"])]
    raise KeyError(f"the grid has no {measure!r} (it has {', '.join(sorted(values))})")


def top_movers(grid: Grid, k: int = TOP_MOVERS, measure: str | None = None) -> list[Mover]:
    """The k modules with the largest `measure`; by default the recent change relative to ‖W₀‖,
    or the relative update where there is no change yet (the first sample)."""
    if measure is None:
        has_change = any(v is not None for row in grid["values"].get("change", []) for v in row)
        measure = "relative_change" if has_change else ("relative" if "update" in grid["values"] else "moved_relative")
    cells = cell_values(grid, measure)
    ranked = sorted(((v, i, j) for i, row in enumerate(cells) for j, v in enumerate(row) if v is not None),
                    key=lambda c: -c[0])
    return [Mover(layer=grid["layers"][i], kind=grid["kinds"][j], measure=measure, value=v) for v, i, j in ranked[:k]]


def rounded(x: float | None, digits: int = DIGITS) -> float | None:
    """`x` to `digits` significant digits (the status block is for reading, not for sums)."""
    return None if x is None or not math.isfinite(x) else float(f"{x:.{digits - 1}e}")


def summary(msg: dict[str, Any], t: float) -> LayerActivitySummary:
    """The status block from an `activity` message: totals per layer and kind, top movers, rounded."""
    layers = per_layer(msg)
    kinds = per_kind(msg)
    return LayerActivitySummary(
        job_id=msg.get("job_id"), step=int(msg.get("step") or 0), global_step=int(msg.get("global_step") or 0),
        sampled_at=iso(t), layers=list(msg["layers"]), kinds=list(msg["kinds"]),
        per_layer={m: [rounded(v) for v in vs] for m, vs in layers.items()},
        per_kind={m: [rounded(v) for v in vs] for m, vs in kinds.items()},
        top_movers=[Mover(x.layer, x.kind, x.measure, rounded(x.value)) for x in top_movers(msg)],
    )


def file_moved(grid: Grid, k: int = 10) -> dict[str, Any]:
    """What one file moved, for its job record: the grid, totals per layer and kind, the top modules."""
    return {**grid, "per_layer": per_layer(grid, MOVED_MEASURES), "per_kind": per_kind(grid, MOVED_MEASURES),
            "top": [dataclasses.asdict(m) for m in top_movers(grid, k, "moved_relative")]}
