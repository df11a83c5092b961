"""What the model must keep: probes and earlier files' keep-sets scored after every file, and the gate.

    probes, problems = load_probes(cfg, lm.tokenizer)          # forgetting.probe_files (and eval.file), tokenised once
    before = probes_before(sess)                              # the probes under the version before the file
    check = check_file(sess, job, steps_log, before)          # after it: every set scored, the report, the gate
    save_keep_set(cfg, check, version)                        # the file's keep-set and its scores right after learning

A file's **keep-set** is its first `forgetting.keep_examples` held-out examples
(`data.eval_fraction` picks them, daemon.train.data; they are never trained on).
It is stored tokenised, with each example's score right after the file was
learnt, under `adapters/forgetting/keep/<job_id>.json`: later files are compared
with that, on the same tokens. A **probe** is a file the user names
(`forgetting.probe_files`; an older config's `eval.file` is one); its score at the
generation's start is its baseline (`adapters/forgetting/baselines.json`).

Every score is kept per example, (loss sum, target tokens, right next-token
predictions): when the sets outgrow the budget (`forgetting.budget_fraction` of
the file's training time) only the first N examples of each set are scored, and
the references are summed over the same N examples, so a change is always on the
same tokens. The trainer is the one writer of `adapters/forgetting/`.

The report (`Done.forgetting`, the version's manifest, the history) is a dict:
job_id, original_name, version, generation, seconds, train_seconds,
budget_seconds, sampled, examples_per_set, sets (id, kind, name, job_id,
examples, tokens, loss, accuracy, reference, baseline, change, drift, limit,
over), backward_transfer, worst, gate (action, tripped, over, message).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daemon import atomic, protocol
from daemon.config import Config

if TYPE_CHECKING:  # pragma: no cover
    from daemon.train.data import Example
    from daemon.train.session import Session

log = logging.getLogger(__name__)

FOLDER = "forgetting"  # under paths.adapters
BASELINES = "baselines.json"
# A forward pass costs about a third of a training step's forward and backward: the first estimate of the
# scoring's cost, before any scoring has been timed in this process.
FORWARD_SHARE = 1 / 3

Row = tuple[float, int, int]  # one example: (loss summed over its target tokens, target tokens, right predictions)


@dataclass(frozen=True)
class ScoreSet:
    """A set scored after every file: a probe, or an earlier file's keep-set."""

    id: str  # "probe:<file name>" or "keep:<job_id>"
    kind: str  # "probe" | "keep"
    name: str  # the probe file's name, or the original name of the file the keep-set stands for
    examples: tuple  # daemon.train.data.Example, in a fixed order
    job_id: str | None = None  # keep: the file
    sha256: str | None = None  # probe: the file's content (a changed probe starts a new baseline)
    path: str | None = None  # probe: where it is
    learnt: tuple = ()  # keep: its rows right after the file was learnt


@dataclass
class FileCheck:
    """One file's scoring: the report, and its own keep-set with its rows (saved once the version is published)."""

    report: dict[str, Any]
    keep: ScoreSet | None
    keep_rows: list[Row] = field(default_factory=list)
    after: dict[str, list[Row]] = field(default_factory=dict)  # the probes' rows now (every example, or None)

    @property
    def tripped(self) -> bool:
        return bool(self.report["gate"]["tripped"])


# ---------------------------------------------------------------- loading the sets


def folder(cfg: Config) -> Path:
    return cfg.path("adapters") / FOLDER


def load_probes(cfg: Config, tokenizer: Any) -> tuple[list[ScoreSet], list[str]]:
    """The probe files' first `forgetting.probe_max_examples` examples, tokenised; the problems of those that
    cannot be used (each named; training goes on without them)."""
    from daemon.jsonl import sha256_of
    from daemon.train.data import supervised, train_examples
    from daemon.validate import validate_file

    probes: list[ScoreSet] = []
    problems: list[str] = []
    data = dataclasses.replace(cfg.data, eval_fraction=0.0)
    for path in cfg.probe_paths:
        try:
            report = validate_file(path, cfg.data, 0)
            if not report.accepted or report.format is None:
                raise ValueError(report.reason or "not a training file")
            # an older config's eval.file keeps its own eval.max_examples
            most = cfg.eval.max_examples if path == cfg.eval_file else cfg.forgetting.probe_max_examples
            examples = sorted(map(supervised, train_examples(path, report.format, tokenizer, data,
                                                             cfg.training.seed, 0)), key=lambda e: e.line)[:most]
            if not examples:
                raise ValueError("no example keeps a token to score")
            sha = sha256_of(path)
        except (OSError, ValueError) as e:
            what = "eval.file" if path == cfg.eval_file else "forgetting.probe_files"
            problems.append(f"{what} {path}: {e}")
            log.error("probe %s is not used: %s", path, e)
            continue
        pid = f"probe:{path.name}"
        if any(p.id == pid for p in probes):  # two probes of one name in different folders
            pid = f"probe:{path}"
        probes.append(ScoreSet(pid, "probe", path.name, tuple(examples), sha256=sha, path=str(path)))
        log.info("probe %s: %d examples", path, len(examples))
    return probes, problems


def keep_path(cfg: Config, job_id: str) -> Path:
    return folder(cfg) / "keep" / f"{job_id}.json"


def load_keep_set(cfg: Config, job_id: str) -> ScoreSet | None:
    """An earlier file's keep-set with its rows right after it was learnt; None when it has none (written
    before keep-sets existed, held out nothing, or unreadable: logged)."""
    from daemon.train.data import Example

    path = keep_path(cfg, job_id)
    if not path.is_file():
        return None
    try:
        raw = atomic.read_json(path)
        examples = tuple(Example(int(e["line"]), list(e["input_ids"]), list(e["labels"])) for e in raw["examples"])
        learnt = tuple((float(a), int(b), int(c)) for a, b, c in raw["learnt"])
        if len(learnt) != len(examples) or not examples:
            raise ValueError("its examples and scores do not match")
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("the keep-set of %s is not used: %s", job_id, e)
        return None
    return ScoreSet(f"keep:{job_id}", "keep", raw.get("original_name") or job_id, examples, job_id=job_id,
                    learnt=learnt)


def save_keep_set(cfg: Config, check: FileCheck, version: int) -> None:
    """The file's keep-set and its rows right after it was learnt; written before its version is published
    (a crash in between trains the file again and writes it again)."""
    keep = check.keep
    if keep is None or not check.keep_rows:
        return
    record = {"job_id": keep.job_id, "original_name": keep.name, "version": version,
              "generation": check.report["generation"],
              "examples": [{"line": e.line, "input_ids": e.input_ids, "labels": e.labels} for e in keep.examples],
              "learnt": [list(r) for r in check.keep_rows]}
    path = keep_path(cfg, keep.job_id or "")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_json(path, record, site="adapter")


def own_keep_set(cfg: Config, job: protocol.Job, tokenizer: Any) -> ScoreSet | None:
    """The file's first `forgetting.keep_examples` held-out examples (the training loop's own split)."""
    from daemon.train.data import eval_examples, supervised
    from daemon.train.loop import job_seed
    from daemon.validate import DataFormat

    n = cfg.forgetting.keep_examples
    if n <= 0 or cfg.data.eval_fraction <= 0:
        return None
    held = eval_examples(job.path, DataFormat(job.format), tokenizer, cfg.data, job_seed(cfg.training.seed, job.sha256))
    if not held:
        return None
    # a preference file keeps its held-out chosen answers: what it taught, scored as any file's answers
    return ScoreSet(f"keep:{job.job_id}", "keep", job.original_name, tuple(supervised(ex) for ex in held[:n]),
                    job_id=job.job_id)


# ---------------------------------------------------------------- scoring


def score_examples(lm: Any, examples: list[Example] | tuple, micro_batch_size: int) -> list[Row]:
    """Each example's (loss sum, target tokens, right predictions) under the live adapter, dropout off;
    one padded row per example, so no example sees another."""
    import torch
    import torch.nn.functional as F

    from daemon.train.batching import batches, collate
    from daemon.train.data import IGNORE
    from daemon.train.step import to_device

    rows: list[Row] = []
    lm.model.eval()
    try:
        with torch.no_grad():
            for mb in batches(list(examples), micro_batch_size):
                b = to_device(collate(mb, lm.tokenizer.pad_token_id), lm.device)
                logits = lm.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].float()
                targets = b["labels"][:, 1:]
                keep = targets != IGNORE
                loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE,
                                       reduction="none").view_as(targets)
                right = (logits.argmax(-1) == targets) & keep
                for r in range(len(mb)):
                    rows.append((float(loss[r][keep[r]].sum()), int(keep[r].sum()), int(right[r].sum())))
    finally:
        lm.model.train()
    return rows


def summary(rows: list[Row] | tuple, n: int | None = None) -> dict[str, float] | None:
    """Token-mean loss and accuracy over the first `n` rows (all: None)."""
    rows = list(rows)[:n] if n is not None else list(rows)
    tokens = sum(r[1] for r in rows)
    if not tokens:
        return None
    return {"loss": sum(r[0] for r in rows) / tokens, "accuracy": sum(r[2] for r in rows) / tokens}


def relative(now: float, ref: float) -> float | None:
    return (now - ref) / ref if ref > 0 else None


class Scorer:
    """Scores sets and learns what a scored token costs on this machine (the budget's estimate)."""

    def __init__(self, clock: Any = time.monotonic, score_fn: Any = None) -> None:
        self.seconds_per_token: float | None = None
        self.clock = clock
        self.score_fn = score_fn or score_examples

    def score(self, lm: Any, s: ScoreSet, n: int | None, micro_batch_size: int) -> list[Row]:
        examples = s.examples[:n] if n is not None else s.examples
        t0 = self.clock()
        rows = self.score_fn(lm, examples, micro_batch_size)
        tokens = sum(len(e.input_ids) for e in examples)
        if tokens:
            # A mean that never rises above the newest reading: the first scoring after a load runs cold (several
            # times slower), and one slow reading must not sample every later file.
            rate = (self.clock() - t0) / tokens
            old = self.seconds_per_token
            self.seconds_per_token = rate if old is None else min(rate, 0.5 * (old + rate))
        return rows


def probes_before(sess: Session) -> dict[str, list[Row]]:
    """Every probe's rows under the live adapter, the version before the next file (kept per version: the
    previous file's `after` when it scored every example). Records a probe's baseline the first time it is
    scored in a generation."""
    if not sess.probes:
        return {}
    cached = sess.probe_rows
    if cached is not None and cached[0] == sess.version:
        return cached[1]
    try:
        rows = {p.id: sess.scorer.score(sess.lm, p, None, sess.cfg.training.micro_batch_size) for p in sess.probes}
    except Exception:  # a diagnostic: never fails a file
        log.warning("the probes were not scored before the file", exc_info=True)
        return {}
    sess.probe_rows = (sess.version, rows)
    note_baselines(sess, rows)
    return rows


def read_baselines(cfg: Config) -> dict[str, Any]:
    try:
        return atomic.read_json(folder(cfg) / BASELINES)
    except (OSError, ValueError):
        return {}


def note_baselines(sess: Session, rows: dict[str, list[Row]]) -> None:
    """A probe's first rows in a generation (or after its file changed) are its baseline."""
    cfg, gen = sess.cfg, str(sess.manifest.generation)
    every = read_baselines(cfg)
    known = every.setdefault(gen, {})
    new = {p.id: {"sha256": p.sha256, "rows": [list(r) for r in rows[p.id]], "version": sess.version}
           for p in sess.probes if p.id in rows and known.get(p.id, {}).get("sha256") != p.sha256}
    if not new:
        return
    known.update(new)
    try:
        folder(cfg).mkdir(parents=True, exist_ok=True)
        atomic.write_json(folder(cfg) / BASELINES, every, site="adapter")
    except OSError:
        log.warning("the probes' baselines were not written", exc_info=True)


def baseline_rows(sess: Session, probe: ScoreSet) -> list[Row] | None:
    known = read_baselines(sess.cfg).get(str(sess.manifest.generation), {}).get(probe.id)
    if not known or known.get("sha256") != probe.sha256:
        return None
    return [tuple(r) for r in known["rows"]]


# ---------------------------------------------------------------- after a file


def earlier_keep_sets(sess: Session, job_id: str) -> list[ScoreSet]:
    """The keep-sets of the files the lineage learnt (the current version's dataset ledger), oldest first."""
    out = []
    for entry in sess.manifest.learnt():
        jid = entry.get("job_id")
        if not jid or jid == job_id:
            continue
        if jid not in sess.keep_sets:  # read once per process: a learnt file's keep-set never changes
            sess.keep_sets[jid] = load_keep_set(sess.cfg, jid)
        if (s := sess.keep_sets[jid]) is not None:
            out.append(s)
    return out


def per_set_quota(sets: list[ScoreSet], fixed_tokens: int, seconds_per_token: float | None,
                  budget: float | None) -> int | None:
    """How many first examples of each set fit the budget (None: every example does); at least one."""
    if budget is None or seconds_per_token is None or not sets:
        return None
    lengths = [[len(e.input_ids) for e in s.examples] for s in sets]
    longest = max(len(x) for x in lengths)

    def cost(n: int) -> float:
        return (fixed_tokens + sum(sum(x[:n]) for x in lengths)) * seconds_per_token

    if cost(longest) <= budget:
        return None
    n = longest
    while n > 1 and cost(n) > budget:
        n -= 1
    return n


def train_seconds_of(steps_log: list[dict[str, Any]]) -> float | None:
    """The file's training time from its step reports (each step's tokens over its tokens/s), resumed parts too."""
    total = sum(m["tokens"] / m["tokens_per_sec"] for m in steps_log
                if m.get("tokens") and m.get("tokens_per_sec"))
    return total or None


def check_file(sess: Session, job: protocol.Job, steps_log: list[dict[str, Any]],
               before: dict[str, list[Row]]) -> FileCheck | None:
    """Score the probes and the keep-sets after `job` trained; the report and the gate's verdict. None when
    off or nothing could be scored (a diagnostic never fails a file: logged)."""
    cfg = sess.cfg
    fc = cfg.forgetting
    if sess.forgetting_off or not (fc.enabled or sess.probes):  # probes alone: an older config's eval.file
        return None
    t0 = time.monotonic()
    try:
        own = own_keep_set(cfg, job, sess.lm.tokenizer) if fc.enabled else None
        earlier = earlier_keep_sets(sess, job.job_id) if fc.enabled else []
        probes = list(sess.probes or [])
        train_seconds = train_seconds_of(steps_log)
        rate = sess.scorer.seconds_per_token
        if rate is None and train_seconds:
            tokens = sum(m.get("tokens") or 0 for m in steps_log)
            rate = train_seconds / tokens * FORWARD_SHARE if tokens else None
        budget = max(fc.budget_fraction * train_seconds, fc.min_budget_seconds) if train_seconds else None
        own_tokens = sum(len(e.input_ids) for e in own.examples) if own else 0
        n = per_set_quota(probes + earlier, own_tokens, rate, budget)
        mbs = cfg.training.micro_batch_size
        scored = {s.id: sess.scorer.score(sess.lm, s, n, mbs) for s in probes + earlier}
        keep_rows = sess.scorer.score(sess.lm, own, None, mbs) if own else []
    except Exception:
        log.warning("%s: the forgetting checks did not run", job.job_id, exc_info=True)
        return None
    seconds = time.monotonic() - t0
    sets = [probe_entry(sess, p, scored[p.id], before.get(p.id), n) for p in probes]
    sets += [keep_entry(s, scored[s.id], n, fc.max_keep_increase) for s in earlier]
    if own is not None and keep_rows:
        mine = summary(keep_rows)
        sets.append({**set_head(own, keep_rows), **(mine or {}), "reference": mine, "baseline": mine,
                     "change": 0.0, "drift": None, "limit": fc.max_keep_increase, "over": False})
    report = {"job_id": job.job_id, "original_name": job.original_name, "version": None,
              "generation": sess.manifest.generation, "seconds": round(seconds, 3), "train_seconds": train_seconds,
              "budget_seconds": budget, "sampled": n is not None, "examples_per_set": n, "sets": sets,
              "backward_transfer": backward_transfer(sets, job.job_id), "worst": worst(sets, job.job_id),
              "gate": gate(sets if fc.enabled else [], fc.action)}
    if sess.intruders is not None:
        report["intruders"] = intruder_figures(sess, job)
    if n is not None:
        log.info("%s: forgetting checks scored the first %d examples of each set (budget %.1f s)", job.job_id, n,
                 budget or 0)
    after = {p.id: scored[p.id] for p in probes} if n is None else {}
    return FileCheck(report, own, keep_rows, after)


def intruder_figures(sess: Session, job: protocol.Job) -> dict[str, Any] | None:
    """activity.intruders after the file: the count per layer, against the version before; `over` (a warning,
    never a hold or a rollback) when it rose by more than forgetting.max_intruders_increase."""
    try:
        grid = sess.intruders.grid()
    except Exception:  # a diagnostic never fails a file
        log.warning("%s: intruder dimensions not counted", job.job_id, exc_info=True)
        return None
    per_layer = [sum(v for v in row if v is not None) for row in grid["values"]["intruders"]]
    count = int(sum(per_layer))
    before = ((sess.manifest.forgetting or {}).get("intruders") or {}).get("count")
    limit = sess.cfg.forgetting.max_intruders_increase
    increase = count - before if before is not None else None
    over = bool(limit) and increase is not None and increase > limit
    message = (f"intruder dimensions rose from {before} to {count} (limit +{limit}): new dominant directions "
               "the base did not have, where forgetting tends to concentrate" if over else None)
    if over:
        log.warning("%s: %s", job.job_id, message)
    return {"count": count, "before": before, "increase": increase, "limit": limit, "over": over,
            "message": message, "layers": grid["layers"], "per_layer": per_layer}


def set_head(s: ScoreSet, rows: list[Row]) -> dict[str, Any]:
    used = list(rows)
    return {"id": s.id, "kind": s.kind, "name": s.name, "job_id": s.job_id, "examples": len(used),
            "tokens": sum(r[1] for r in used)}


def probe_entry(sess: Session, p: ScoreSet, rows: list[Row], before: list[Row] | None, n: int | None) -> dict[str, Any]:
    now = summary(rows) or {}
    ref = summary(before, n) if before else None
    base_rows = baseline_rows(sess, p)
    base = summary(base_rows, n) if base_rows else None
    change = relative(now["loss"], ref["loss"]) if now and ref else None
    limit = sess.cfg.forgetting.max_probe_increase
    return {**set_head(p, rows), **now, "reference": ref, "baseline": base, "change": change,
            "drift": relative(now["loss"], base["loss"]) if now and base else None, "limit": limit,
            "over": change is not None and change > limit}


def keep_entry(s: ScoreSet, rows: list[Row], n: int | None, limit: float) -> dict[str, Any]:
    now = summary(rows) or {}
    ref = summary(s.learnt, n)
    change = relative(now["loss"], ref["loss"]) if now and ref else None
    return {**set_head(s, rows), **now, "reference": ref, "baseline": ref, "change": change, "drift": None,
            "limit": limit, "over": change is not None and change > limit}


def backward_transfer(sets: list[dict[str, Any]], job_id: str) -> dict[str, float] | None:
    """GEM's backward transfer over the earlier files' keep-sets: the mean of (now - right after learnt), in
    accuracy (negative: forgotten) and in loss (positive: forgotten)."""
    earlier = [s for s in sets if s["kind"] == "keep" and s["job_id"] != job_id and s.get("reference")
               and "loss" in s]
    if not earlier:
        return None
    k = len(earlier)
    return {"accuracy": sum(s["accuracy"] - s["reference"]["accuracy"] for s in earlier) / k,
            "loss": sum(s["loss"] - s["reference"]["loss"] for s in earlier) / k, "sets": k}


def worst(sets: list[dict[str, Any]], job_id: str) -> dict[str, Any] | None:
    judged = [s for s in sets if s["change"] is not None and s["job_id"] != job_id]
    if not judged:
        return None
    w = max(judged, key=lambda s: s["change"])
    return {"id": w["id"], "name": w["name"], "change": w["change"]}


def gate(sets: list[dict[str, Any]], action: str) -> dict[str, Any]:
    over = [s for s in sets if s["over"]]
    message = None
    if over:
        said = [f"{'probe' if s['kind'] == 'probe' else 'the keep-set of'} {s['name']}: loss "
                f"{s['reference']['loss']:.4f} -> {s['loss']:.4f} ({100 * s['change']:+.1f}%, limit "
                f"{100 * s['limit']:.0f}%{' since the version before' if s['kind'] == 'probe' else ' since learnt'})"
                for s in over]
        message = "forgot " + "; ".join(said)
    return {"action": action, "tripped": bool(over), "over": [s["id"] for s in over], "message": message}


def probes_over_since_generation(report: dict[str, Any] | None, limit: float) -> list[str]:
    """Probes whose loss is over `limit` against the generation's baseline in `report` (consolidation's check)."""
    if not report:
        return []
    return [f"{s['name']} ({100 * s['drift']:+.1f}% since the generation began, limit {100 * limit:.0f}%)"
            for s in report.get("sets", []) if s.get("kind") == "probe" and s.get("drift") is not None
            and s["drift"] > limit]


def eval_set_figures(cfg: Config, probes: list[ScoreSet], before: dict[str, list[Row]],
                     check: FileCheck | None) -> dict[str, Any] | None:
    """An older config's `eval_set` figures (eval.file's loss before and after the file), from its probe."""
    if cfg.eval_file is None:
        return None
    probe = next((p for p in probes if p.path == str(cfg.eval_file)), None)
    if probe is None:
        return None
    b = summary(before[probe.id]) if probe.id in before else None
    entry = next((s for s in check.report["sets"] if s["id"] == probe.id), None) if check else None
    after = entry.get("loss") if entry else None
    if b is None and after is None:
        return None
    return {"file": str(cfg.eval_file), "examples": entry["examples"] if entry else len(probe.examples),
            "before": b["loss"] if b else None, "after": after}
