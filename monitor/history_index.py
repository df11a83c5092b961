"""An in-memory summary of `metrics` so a month of steps downsamples in milliseconds.

Scanning a million rows in SQLite takes about a second of CPU, shared with the
trainer on small machines; the dashboard asks for the whole history on every
page load. So the monitor keeps, per FINE-step bucket of global steps, the four
rows the downsampler wants (first, last, lowest and highest loss) plus the row
count, as (global_step, loss) pairs. It is built once (in the background at
start) and then kept current by reading only rows written since the last look,
found through the `t` index: new steps, and steps a resumed run trained again
(after a resume the service deletes and rewrites rows past the checkpoint). A
row at or below the known end, or a shorter table, marks the buckets from there
on dirty; they are read again from the database. Any request coarser than FINE
steps per bucket is answered from here; finer ones go to SQLite directly.
"""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass

FINE = 64  # global steps per summary bucket: 1M steps -> ~16k buckets, ~2 MB


@dataclass
class Bucket:
    n: int
    first: int
    last: int
    lo: tuple[float, int] | None  # (loss, global_step) with the lowest loss
    hi: tuple[float, int] | None

    def add(self, g: int, loss: float | None) -> None:
        self.n += 1
        self.first, self.last = min(self.first, g), max(self.last, g)
        if loss is not None:
            if self.lo is None or loss < self.lo[0]:
                self.lo = (loss, g)
            if self.hi is None or loss > self.hi[0]:
                self.hi = (loss, g)

    def keep(self) -> set[int]:
        return {self.first, self.last} | {x[1] for x in (self.lo, self.hi) if x is not None}


class HistoryIndex:
    def __init__(self) -> None:
        self.buckets: dict[int, Bucket] = {}
        self.max_g = -1
        self.last_t = float("-inf")
        self.series = 0  # the series of steps summarised: the current one (`metrics` holds it alone)
        self.lock = threading.Lock()

    def refresh(self, conn: sqlite3.Connection) -> None:
        with self.lock:
            try:
                series = conn.execute("SELECT COALESCE(MAX(id), 0) FROM series").fetchone()[0]
            except sqlite3.OperationalError:  # a history.db from before series
                series = 0
            if series != self.series:  # `config approve` started a new adapter: its steps start again from 0
                self.buckets, self.max_g, self.last_t, self.series = {}, -1, float("-inf"), series
            # >= : a row written in the same instant as the last one seen is not missed; such rows sit
            # at or below max_g, so they only cause the last bucket to be read again (<= FINE rows)
            # no ORDER BY: it would lead SQLite to walk the global_step index over every row
            new = sorted(tuple(r) for r in conn.execute("SELECT global_step, loss, t FROM metrics WHERE t >= ?", (self.last_t,)))
            top = conn.execute("SELECT MAX(global_step) FROM metrics").fetchone()[0]
            if top is None:
                self.__init__()
                self.series = series
                return
            dirty = [g for g, _, _ in new if g <= self.max_g]
            if top < self.max_g:
                dirty.append(top)  # rows were deleted at the end
            if dirty:
                self._reread(conn, min(dirty) // FINE)
            else:
                for g, loss, _ in new:
                    self._add(g, loss)
            if new:
                self.last_t = max(self.last_t, max(t for _, _, t in new))

    def _reread(self, conn: sqlite3.Connection, from_bucket: int) -> None:
        for b in [b for b in self.buckets if b >= from_bucket]:
            del self.buckets[b]
        self.max_g = from_bucket * FINE - 1
        for g, loss in conn.execute("SELECT global_step, loss FROM metrics WHERE global_step >= ? ORDER BY global_step",
                                    (from_bucket * FINE,)):
            self._add(g, loss)

    def _add(self, g: int, loss: float | None) -> None:
        b = self.buckets.get(g // FINE)
        if b is None:
            self.buckets[g // FINE] = b = Bucket(0, g, g, None, None)
        b.add(g, loss)
        self.max_g = max(self.max_g, g)

    def count(self, lo_bucket: int, hi_bucket: int) -> int:
        with self.lock:
            return sum(b.n for k, b in self.buckets.items() if lo_bucket <= k <= hi_bucket)

    def keep(self, lo_bucket: int, hi_bucket: int, per: int) -> set[int]:
        """Global steps to keep when `per` summary buckets are merged into one, over whole buckets lo..hi."""
        merged: dict[int, Bucket] = {}
        with self.lock:
            for k in sorted(k for k in self.buckets if lo_bucket <= k <= hi_bucket):
                b = self.buckets[k]
                m = merged.get((k - lo_bucket) // per)
                if m is None:
                    merged[(k - lo_bucket) // per] = Bucket(b.n, b.first, b.last, b.lo, b.hi)
                    continue
                m.n += b.n
                m.first, m.last = min(m.first, b.first), max(m.last, b.last)
                if b.lo is not None and (m.lo is None or b.lo[0] < m.lo[0]):
                    m.lo = b.lo
                if b.hi is not None and (m.hi is None or b.hi[0] > m.hi[0]):
                    m.hi = b.hi
        out: set[int] = set()
        for m in merged.values():
            out |= m.keep()
        return out
