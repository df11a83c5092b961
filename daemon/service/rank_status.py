"""A trainer of several processes (ranks), as the status shows it: world size, setup, per-rank figures.

    world_size, setup = rank_status.setup(ready)                # DistributedSetup, or None with one process
    figures, slowest = rank_status.figures(step.ranks)          # [RankFigures, ...] and the slowest rank, or (None, None)

Only rank 0 talks to the service; it sends the world size and setup in `ready`
and, when there is more than one rank, every rank's figures in each `step`
(docs/internals.md, "Service ⇄ trainer child"). With one process these keys are
absent and the status looks as it always did. Standard library only.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from daemon import protocol
from daemon.schema import DistributedSetup, RankFigures

_RANK_KEYS = tuple(f.name for f in dataclasses.fields(RankFigures))


def setup(ready: protocol.Ready) -> tuple[int, DistributedSetup | None]:
    """World size and setup from a `ready` message."""
    if ready.world_size <= 1:
        return 1, None
    return ready.world_size, DistributedSetup(strategy=ready.strategy, backend=ready.backend, nnodes=ready.nnodes)


def figures(reported: list[dict[str, Any]] | None) -> tuple[list[RankFigures] | None, int | None]:
    """Per-rank figures of a `step` message (its `ranks`), ordered by rank, and the rank the others waited for."""
    if not reported or len(reported) < 2:  # one process: the status looks as it always did
        return None, None
    ranks = sorted((RankFigures(**{k: r[k] for k in _RANK_KEYS if r.get(k) is not None}) for r in reported),
                   key=lambda r: r.rank)
    return ranks, slowest(ranks)


def slowest(ranks: list[RankFigures]) -> int | None:
    """The rank with the longest compute time (the lowest such rank on a tie); None when none says."""
    timed = [r for r in ranks if r.compute_seconds is not None]
    if not timed:
        return None
    return max(timed, key=lambda r: (r.compute_seconds, -r.rank)).rank
