"""Which samples an adapter learnt from: per file and epoch, the lines its optimizer steps consumed.

    from daemon.sample_ledger import SampleLedger, check_ledger
    ledger = SampleLedger()                        # a file's first step; SampleLedger.from_dict(d) on resume
    ledger.add_step(epoch=0, lines=[12, 3, 40, 7]) # the file lines of one optimizer step's examples
    ledger.to_dict()
    # {"complete": true, "steps": 1, "samples": 4, "epochs": [{"epoch": 0, "steps": 1, "samples": 4,
    #   "lines": [[3, 3], [7, 7], [12, 12], [40, 40]], "digest": "9c1f..."}]}
    check_ledger(d, expected_lines=range(1, 41), epochs=1, steps=10)   # [] or what is wrong

The trainer keeps one ledger per file in training. It goes into every
checkpoint (`ledger.json`, in the same folder rename as the weights and the
data position, so it always describes exactly the steps those weights hold)
and into the manifest of the adapter version the file publishes (`ledger`).
Walking a version's lineage (daemon.adapters.lineage) therefore says which
lines of which file every version has trained on, and how often.

Compact on purpose, so a file of millions of lines costs kilobytes: per epoch
the lines consumed are kept as sorted, disjoint, inclusive ranges (while an
epoch is in progress they fragment only as far as the shuffle window), with
the number of samples consumed (a line consumed twice makes it exceed the
number of lines in the ranges) and a digest chained over the steps' line
lists in order (two runs that trained the same samples in the same steps
have the same digest; a resume that repeated or skipped a step does not).
With `data.replay_fraction` > 0 the examples replayed from earlier files
(daemon.train.replay) are kept apart, under `replay`: per source file the
lines replayed and how many samples, and the files left out and why. The
file's own `epochs`, `steps` and `samples` are what they would be without
replay, so `check_ledger` (every train line of the file once per epoch)
holds as before.
Standard library only: the service, the CLI and tests read it without torch.
"""

from __future__ import annotations

import bisect
import hashlib
from dataclasses import dataclass, field
from typing import Any, Iterable

_DIGEST_BYTES = 16


@dataclass
class _Epoch:
    epoch: int
    steps: int = 0
    samples: int = 0
    lines: list[list[int]] = field(default_factory=list)  # sorted, disjoint, inclusive [first, last]
    digest: str = ""

    def add(self, lines: list[int]) -> None:
        self.steps += 1
        self.samples += len(lines)
        for line in lines:
            _insert(self.lines, line)
        text = f"{self.digest}|{','.join(map(str, lines))}".encode()
        self.digest = hashlib.blake2b(text, digest_size=_DIGEST_BYTES).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "steps": self.steps, "samples": self.samples,
                "lines": [list(r) for r in self.lines], "digest": self.digest}


def _insert(ranges: list[list[int]], x: int) -> None:
    """Add line x to the ranges (already there: nothing changes; the sample count tells the repeat)."""
    i = bisect.bisect_right(ranges, [x, float("inf")]) - 1  # the last range starting at or before x
    if i >= 0 and ranges[i][1] >= x:
        return
    joins_left = i >= 0 and ranges[i][1] == x - 1
    joins_right = i + 1 < len(ranges) and ranges[i + 1][0] == x + 1
    if joins_left and joins_right:
        ranges[i][1] = ranges[i + 1][1]
        del ranges[i + 1]
    elif joins_left:
        ranges[i][1] = x
    elif joins_right:
        ranges[i + 1][0] = x
    else:
        ranges.insert(i + 1, [x, x])


def ranges_of(lines: Iterable[int]) -> list[list[int]]:
    """Sorted, disjoint, inclusive ranges of a set of line numbers."""
    out: list[list[int]] = []
    for x in sorted(set(lines)):
        if out and out[-1][1] == x - 1:
            out[-1][1] = x
        else:
            out.append([x, x])
    return out


def count_lines(ranges: list[list[int]]) -> int:
    return sum(b - a + 1 for a, b in ranges)


class ReplayLedger:
    """The examples of earlier files that the steps replayed (daemon.train.replay, `data.replay_fraction`), kept
    apart from the file's own lines: per source file the lines replayed (ranges) and how many samples, a digest
    chained over the steps' (source, line) lists, and the earlier files left out with the reason.

    `fraction` and the sources are the ones the file began with: a resume replays from them whatever the config
    says now (as a checkpoint keeps the batch order), so it replays what an uninterrupted run does."""

    def __init__(self, fraction: float, sources: list[dict[str, Any]], left_out: list[dict[str, Any]]) -> None:
        self.fraction = fraction
        # job_id, original_name, sha256, replayable (lines it may draw), then samples and lines replayed
        self.sources = [{**s, "samples": int(s.get("samples", 0)), "lines": [list(r) for r in s.get("lines", [])]}
                        for s in sources]
        self.left_out = list(left_out)  # job_id, original_name, sha256, reason
        self.samples = 0
        self.steps = 0  # steps that replayed anything
        self.digest = ""

    def add_step(self, picks: list[tuple[int, int]]) -> None:
        """One optimizer step's replayed examples: (index into `sources`, line of that file)."""
        if not picks:
            return
        self.steps += 1
        self.samples += len(picks)
        for source, line in picks:
            self.sources[source]["samples"] += 1
            _insert(self.sources[source]["lines"], line)
        text = f"{self.digest}|{','.join(f'{s}:{x}' for s, x in picks)}".encode()
        self.digest = hashlib.blake2b(text, digest_size=_DIGEST_BYTES).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        return {"fraction": self.fraction, "samples": self.samples, "steps": self.steps, "digest": self.digest,
                "sources": [dict(s, lines=[list(r) for r in s["lines"]]) for s in self.sources],
                "left_out": list(self.left_out)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ReplayLedger":
        replay = cls(float(d["fraction"]), list(d["sources"]), list(d.get("left_out", [])))
        replay.samples, replay.steps, replay.digest = int(d["samples"]), int(d["steps"]), str(d["digest"])
        return replay


class SampleLedger:
    """The samples of one file consumed by the optimizer steps so far (see the module docstring)."""

    def __init__(self, complete: bool = True) -> None:
        self.complete = complete  # False: resumed from a checkpoint made before ledgers existed
        self.epochs: list[_Epoch] = []
        self.replay: ReplayLedger | None = None  # with data.replay_fraction > 0 at the file's start

    def add_step(self, epoch: int, lines: list[int]) -> None:
        if not self.epochs or self.epochs[-1].epoch != epoch:
            self.epochs.append(_Epoch(epoch))
        self.epochs[-1].add(lines)

    @property
    def steps(self) -> int:
        return sum(e.steps for e in self.epochs)

    @property
    def samples(self) -> int:
        """The file's own samples consumed so far (replayed ones not counted)."""
        return sum(e.samples for e in self.epochs)

    def to_dict(self) -> dict[str, Any]:
        out = {"complete": self.complete, "steps": self.steps, "samples": self.samples,
               "epochs": [e.to_dict() for e in self.epochs]}
        return out if self.replay is None else {**out, "replay": self.replay.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SampleLedger":
        ledger = cls(bool(d.get("complete", True)))
        ledger.epochs = [_Epoch(int(e["epoch"]), int(e["steps"]), int(e["samples"]),
                                [[int(a), int(b)] for a, b in e["lines"]], str(e["digest"])) for e in d["epochs"]]
        ledger.replay = ReplayLedger.from_dict(d["replay"]) if d.get("replay") else None
        return ledger


def check_ledger(d: dict[str, Any] | None, expected_lines: Iterable[int], epochs: int,
                 steps: int | None = None) -> list[str]:
    """What is wrong with a finished file's ledger: every expected line exactly once per epoch, no other
    line, every epoch present, and (given `steps`) as many optimizer steps. An empty list: nothing."""
    if d is None:
        return ["no ledger"]
    problems = [] if d.get("complete", True) else ["incomplete (resumed from a checkpoint without a ledger)"]
    want = ranges_of(expected_lines)
    got_epochs = [e["epoch"] for e in d["epochs"]]
    if got_epochs != list(range(epochs)):
        problems.append(f"epochs {got_epochs}, expected 0..{epochs - 1}")
    for e in d["epochs"]:
        distinct = count_lines(e["lines"])
        if e["samples"] != distinct:
            problems.append(f"epoch {e['epoch']}: {e['samples']} samples over {distinct} distinct lines "
                            f"({e['samples'] - distinct} consumed twice)")
        if e["lines"] != want:
            have = {x for a, b in e["lines"] for x in range(a, b + 1)}
            need = {x for a, b in want for x in range(a, b + 1)}
            problems.append(f"epoch {e['epoch']}: lines missing {ranges_of(need - have)}, "
                            f"not expected {ranges_of(have - need)}")
    if steps is not None and d["steps"] != steps:
        problems.append(f"{d['steps']} steps in the ledger, {steps} expected")
    return problems
