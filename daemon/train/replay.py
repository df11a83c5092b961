"""Replay (`data.replay_fraction`): examples of files the adapter's lineage learnt before, in a new file's steps.

    from daemon.train.replay import sources_from, plan_replay
    sources = sources_from(manifest.learnt(), done_dir)     # the worker: what the lineage learnt, where its bytes lie
    plan, replay_ledger = plan_replay(sources, job.sha256, tok, cfg.data, seed_of, fraction, n_own_total)
    picks = plan.picks(own_before, own_after)               # the (source, line) replayed in one optimizer step
    extra = [plan.examples[p] for p in picks]                # their tokenised examples

What replay_fraction f means: f is the share of each optimizer step's examples
that are replayed, over the file. Replayed examples are ADDED to the file's
own: after the steps that consumed the file's first S examples (all epochs
counted), floor(S * f / (1 - f)) replayed ones have been trained, so 0.25 adds
one replayed example per three of the file's. Added, not taken out of the
file's share, so the file trains exactly its own lines, epochs, steps and
learning-rate schedule as without replay (and a checkpoint's position, counted
in the file's micro-batches, means what it meant); the cost is more examples
per step (1 / (1 - f) times as many). They go into the step as extra
micro-batches of `training.micro_batch_size`, so memory per forward is as
before, and the loss is the mean over every target of the step, replayed or not.

Which examples: lines of every earlier file whose bytes are still in
`queue/done/` with the sha256 the dataset ledger recorded, except every line
`data.eval_fraction` selects for eval with that file's own job seed
(data.is_eval_line): the held-out examples, which the forgetting checks score
as the file's keep-set, are all among those, so none is ever replayed (nor
are the few selected ones that trained because the eval cap was reached).
They are tokenised with the live tokenizer and the current data config, like
the file's own. The replay sequence draws from those P lines in a seeded
permutation (a new one each time all P were drawn), passing over a line that
makes no example (cut to nothing by max_length, refused by the tokenizer),
until it holds floor(n_own * f / (1 - f)) examples (n_own: the file's own
examples over its epochs); the steps take it in order. A function of (seed,
job, the earlier files) alone, so a resume replays what an uninterrupted run
does. A missing or changed file is left out, logged, and listed in the ledger
(`replay.left_out`); the file trains anyway.

The plan (the sources and the fraction) is fixed when the file begins and kept
in the sample ledger (daemon.sample_ledger.ReplayLedger), in every checkpoint:
a resume replays from the same sources at the same fraction, whatever the
config says now. Cost at each new file's start: every earlier file is read
(its sha256, then its lines parsed as JSON; no tokenising), and only the
lines drawn are tokenised and kept in memory (the replay sequence's distinct
examples).
Where several ranks train, rank 0 makes the plan and every rank gets it
(daemon.train.loop), so each step's replayed examples are the same everywhere.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable

from daemon.config import DataConfig
from daemon.errors import DataError
from daemon.sample_ledger import ReplayLedger
from daemon.train.data import Example, is_eval_line, tokenize_record
from daemon.validate import DataFormat, iter_records, validate_file

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReplaySource:
    """An earlier file of the lineage: who it was and where its bytes should be (`queue/done/<job_id>`)."""

    job_id: str
    original_name: str
    sha256: str
    path: str


def sources_from(learnt: list[dict[str, Any]], done_dir: str | Path) -> list[ReplaySource]:
    """The files a manifest's dataset ledger (AdapterManifest.learnt) names, oldest first, each content once."""
    out: list[ReplaySource] = []
    seen: set[str] = set()
    for e in learnt:
        sha, job_id = e.get("sha256"), e.get("job_id")
        if not sha or not job_id or sha in seen:
            continue
        seen.add(sha)
        out.append(ReplaySource(job_id, e.get("original_name") or job_id, sha, str(Path(done_dir) / job_id)))
    return out


def _ratio(fraction: float) -> Fraction:
    """Replayed examples per own example, f / (1 - f), exactly: the decimal written in the config (0.1 is 1/10)."""
    f = Fraction(repr(float(fraction)))
    return f / (1 - f)


@dataclass
class ReplayPlan:
    """What one file replays: the pool of (source index, line), and the sequence its steps take in order."""

    fraction: float
    seed: int
    pool: list[tuple[int, int]]  # every replayable line: (index into the ledger's sources, line)
    sequence: list[tuple[int, int]] = field(default_factory=list)  # the file's replayed examples, in order
    examples: dict[tuple[int, int], Example] = field(default_factory=dict)
    _perm: tuple[int, list[int]] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.ratio = _ratio(self.fraction)

    def total(self, own: int) -> int:
        """Replayed examples once the file's steps have consumed `own` of its own examples (fewer only where the
        earlier files hold fewer trainable examples than that, counted with repeats)."""
        return min(math.floor(own * self.ratio), len(self.sequence))

    def picks(self, own_before: int, own_after: int) -> list[tuple[int, int]]:
        """The (source, line) pairs of the step that takes the file's own examples own_before..own_after."""
        return self.sequence[self.total(own_before):self.total(own_after)]

    def draw(self, j: int) -> tuple[int, int]:
        """The j-th draw from the pool: entry j mod P of the seeded permutation of pass j // P."""
        n = len(self.pool)
        round_, i = divmod(j, n)
        if self._perm is None or self._perm[0] != round_:
            h = hashlib.blake2b(f"traind-replay:{self.seed}:{round_}".encode(), digest_size=8).digest()
            order = list(range(n))
            random.Random(int.from_bytes(h, "big")).shuffle(order)
            self._perm = (round_, order)
        return self.pool[self._perm[1][i]]


def _check(source: ReplaySource, data_cfg: DataConfig) -> tuple[DataFormat | None, str | None]:
    """The format of a source's bytes, or why it cannot be replayed."""
    path = Path(source.path)
    if not path.is_file():
        return None, f"not in done/ any more ({path})"
    try:
        report = validate_file(path, data_cfg)
    except OSError as e:
        return None, f"unreadable: {e}"
    if report.sha256 != source.sha256:
        return None, f"changed since it was learnt (sha256 {report.sha256[:12]}, learnt {source.sha256[:12]})"
    if report.format is None:
        return None, f"no format recognised: {report.fatal or report.reason}"
    return report.format, None


def replayable_lines(path: str | Path, fmt: DataFormat, data_cfg: DataConfig, seed: int,
                     tick: Callable[[], None] = lambda: None) -> list[int]:
    """The valid lines of an earlier file that replay may draw: every one that `data.eval_fraction` does not
    select for eval with the file's own job seed (data.is_eval_line). A superset of nothing held out: its held-out
    examples (the forgetting checks' keep-sets) are all among the selected ones, which are never replayed,
    not even those that trained because the eval cap was reached. Read without tokenising (the costly part
    on a long lineage); a drawn line the tokenizer drops or refuses is passed over when drawn."""
    out = []
    for record in iter_records(path, fmt, data_cfg.max_line_bytes):
        tick()
        if not is_eval_line(record.line, seed, data_cfg.eval_fraction):
            out.append(record.line)
    return out


def _tokenised(path: str, fmt: DataFormat, tok: Any, data_cfg: DataConfig, wanted: set[int],
               tick: Callable[[], None]) -> dict[int, Example | None]:
    """The examples of the `wanted` lines; None for one the tokenizer drops or refuses, or no longer there."""
    out: dict[int, Example | None] = dict.fromkeys(wanted)
    for record in iter_records(path, fmt, data_cfg.max_line_bytes):
        tick()
        if record.line in wanted:
            try:
                out[record.line] = tokenize_record(record, tok, data_cfg.max_length)
            except DataError:  # RecordError, TokenizerUnfit: not an example to replay
                out[record.line] = None
    return out


Usable = tuple[ReplaySource, DataFormat, list[int]]  # a source that can be replayed: its format and lines


def plan_replay(sources: list[ReplaySource], job_sha256: str, tok: Any, data_cfg: DataConfig,
                seed_of: Callable[[str], int], seed: int, n_own: int, kept: ReplayLedger | None = None,
                tick: Callable[[], None] = lambda: None) -> tuple[ReplayPlan, ReplayLedger]:
    """The replay of one file: its plan and its ledger (fresh, or `kept` from the checkpoint a resume starts at).

    `seed_of(sha256)` is a file's job seed (its held-out split), `seed` the current job's, `n_own` the
    file's own examples over all its epochs. Fresh, the fraction is `data_cfg.replay_fraction`; resumed, the
    kept one, from the kept sources (a source gone since then is left out, and said: that resume replays less).
    Never raises for an earlier file: one that cannot be replayed is left out.
    """
    fraction = kept.fraction if kept is not None else data_cfg.replay_fraction
    left_out = list(kept.left_out) if kept is not None else []

    def leave_out(source: ReplaySource, why: str) -> None:
        log.warning("replay: %s (%s) left out: %s", source.original_name, source.job_id, why)
        if kept is not None:
            log.warning("replay: so the resumed run replays less than the run it continues")
        if not any(x["sha256"] == source.sha256 for x in left_out):  # once, however often the file resumes
            left_out.append({"job_id": source.job_id, "original_name": source.original_name,
                             "sha256": source.sha256, "reason": why})

    usable = _readable(_candidates(sources, job_sha256, kept), data_cfg, seed_of, tick, leave_out)
    # a source's index in the ledger: resumed, the one it had at the file's start
    index = ({s["sha256"]: i for i, s in enumerate(kept.sources)} if kept is not None
             else {source.sha256: i for i, (source, _, _) in enumerate(usable)})
    plan = ReplayPlan(fraction, seed, [(index[src.sha256], line) for src, _, lines in usable for line in lines])
    _draw_sequence(plan, math.floor(n_own * plan.ratio), {index[u[0].sha256]: u for u in usable}, tok, data_cfg, tick)
    if kept is not None:
        ledger = kept
        ledger.left_out = left_out
    else:
        ledger = ReplayLedger(fraction, [{"job_id": s.job_id, "original_name": s.original_name, "sha256": s.sha256,
                                          "replayable": len(lines)} for s, _, lines in usable], left_out)
    log.info("replay: %s of each step's examples from %d earlier file(s) (%d lines to draw from), %d example(s) "
             "over the file%s", fraction, len(usable), len(plan.pool), len(plan.sequence),
             f"; {len(left_out)} file(s) left out" if left_out else "")
    return plan, ledger


def _candidates(sources: list[ReplaySource], job_sha256: str, kept: ReplayLedger | None) -> list[ReplaySource]:
    """Fresh: every source but the file itself. Resumed: the sources the file began with, in their order (one
    no longer in `sources` has no path: it is left out)."""
    if kept is None:
        return [s for s in sources if s.sha256 != job_sha256]
    by_sha = {s.sha256: s for s in sources}
    return [by_sha.get(s["sha256"]) or ReplaySource(s["job_id"], s["original_name"], s["sha256"], "")
            for s in kept.sources]


def _readable(candidates: list[ReplaySource], data_cfg: DataConfig, seed_of: Callable[[str], int],
              tick: Callable[[], None], leave_out: Callable[[ReplaySource, str], None]) -> list[Usable]:
    """The candidates whose bytes are there, unchanged, with lines to draw; `leave_out` told of the others."""
    usable: list[Usable] = []
    for source in candidates:
        fmt, why = _check(source, data_cfg) if source.path else (None, "no longer in the lineage's dataset ledger")
        lines: list[int] = []
        if fmt is not None:
            try:
                lines = replayable_lines(source.path, fmt, data_cfg, seed_of(source.sha256), tick)
                why = None if lines else "no lines outside its held-out ones"
            except OSError as e:
                why = f"unreadable: {e}"
        if fmt is None or why is not None:
            leave_out(source, why or "unreadable")
        else:
            usable.append((source, fmt, lines))
    return usable


def _draw_sequence(plan: ReplayPlan, needed: int, by_index: dict[int, Usable], tok: Any, data_cfg: DataConfig,
                   tick: Callable[[], None]) -> None:
    """Draw from the pool in order until `needed` examples are found, passing over lines that make none (dropped
    by truncation, refused by the tokenizer): the file's replay sequence, a function of the files and the seed.
    Each round tokenises only the lines it drew (one read of each source drawn from)."""
    unfit: set[tuple[int, int]] = set()
    j = 0
    while len(plan.sequence) < needed and len(unfit) < len(plan.pool):
        drawn = []
        while len(drawn) < needed - len(plan.sequence):
            pick = plan.draw(j)
            j += 1
            if pick not in unfit:
                drawn.append(pick)
        for index in sorted({i for i, _ in drawn}):
            source, fmt, _ = by_index[index]
            lines = {line for i, line in drawn if i == index and (i, line) not in plan.examples}
            for line, ex in _tokenised(source.path, fmt, tok, data_cfg, lines, tick).items():
                if ex is None:
                    unfit.add((index, line))
                else:
                    plan.examples[(index, line)] = ex
        plan.sequence += [pick for pick in drawn if pick not in unfit]
