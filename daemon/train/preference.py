"""Preference files: DPO against the adapter as the file began, or SimPO without a reference.

    from daemon.train import preference
    prefs = preference.Trainer.fresh(lm, cfg, plan, train, ckpt_folder, sha256, tick, ranks)   # or .resumed(...)
    stats, figures = prefs.step(group, opt, sched, scaler, max_norm, probe)   # one optimizer step on Pairs
    loss, held_out = prefs.evaluate()                               # the held-out pairs' loss and figures

A pair's score is the log-probability of its answer after the prompt: summed over the answer's tokens
(DPO), or their mean (SimPO). The losses, with beta and gamma from `preference.*`:
- sigmoid (DPO, Rafailov et al. 2023, eq. 7; TRL's loss_type "sigmoid"):
    -log sigmoid(beta * ((pc - rc) - (pr - rr)))
  where pc, pr are the policy's scores of chosen and rejected, rc, rr the reference's;
- simpo (SimPO, Meng et al. 2024, eq. 6; TRL's CPOTrainer loss_type "simpo"):
    -log sigmoid(beta * (pc/|c| - pr/|r|) - gamma).
With `preference.sft_weight` w > 0, each pair's loss adds w * (-pc/|c|), the chosen answer's negative
log-likelihood per token (RPO, Pang et al. 2024, eq. 2; TRL's rpo_alpha): the pair's gap grows while the chosen
answer stays likely, where plain DPO may lower both answers' probabilities (and the model's answers elsewhere).
The implicit rewards are beta * (pc - rc) (DPO) or beta * pc/|c| (SimPO); a step reports the share of its
pairs whose chosen reward is above the rejected one (reward accuracy) and their mean gap (reward margin).

The reference is the adapter as it was at the file's start, without a second copy of the model: before the
first step, one pass in eval mode scores every pair of the file (train and held-out), and the scores are
written to the job's checkpoint folder (`reference.pt`), next to the checkpoints, so a resumed file trains
against the same numbers bit for bit. The same pass gives the held-out figures before the file; SimPO needs
only the held-out pairs scored.

Several ranks (torchrun, daemon.train.ranks): a step's pairs are shared as a supervised step's examples, each
rank's summed loss divided by the pairs of the whole group, and the gradients summed over ranks: the gradient of
one process. The reference pass and the held-out scoring deal out the micro-batches one process scores (rank r
the r-th of every world_size), so the scores are one process's, and gather them: every rank holds them all and
computes the same figures. Rank 0 alone writes `reference.pt`, and on a resume reads it and sends it to the others.
With `distributed.strategy` fsdp every rank runs the same number of forwards (a filler where it has none).

Out of memory (CUDA): as a supervised step, each micro-batch's pairs then run in twice as many pieces (`lm.split`),
the step taken again: the same pair-mean loss and gradient. Only one pair that does not fit fails the file.

Held-out figures: `accuracy` (chosen scored above rejected by the model itself), `margin` (mean score gap,
nats: summed for DPO, per token for SimPO), `reward_accuracy` and `reward_margin` (as a step's), `loss`.
Before the file DPO's rewards are zero by definition (the policy is its reference).
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F

from daemon import atomic
from daemon.config import Config, PreferenceConfig
from daemon.train.batching import batches, collate
from daemon.train.data import IGNORE, Example, FilePlan, Pair
from daemon.train.model import LoadedModel
from daemon.train.ranks import Ranks
from daemon.train.sharding import reshard
from daemon.train.step import (FastPaths, StepStats, _inputs, _maybe_inject_oom, _pieces, finish_step, labelled_logits,
                               split_after_oom, to_device)

log = logging.getLogger(__name__)

REFERENCE_FILE = "reference.pt"


# ---------------------------------------------------------------- scores and the loss


def answer_logps(model: Any, batch: dict[str, torch.Tensor], label_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probability of each row's labelled tokens [B], their count [B]) for one padded batch;
    `label_only`: the LM head only where labels are (as the supervised step's shortcut)."""
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    if label_only:
        logits = labelled_logits(model, batch, keep)
    else:
        logits = model(**_inputs(batch)).logits[:, :-1][keep]
    token_logps = -F.cross_entropy(logits.float(), targets[keep], reduction="none")
    rows = keep.nonzero()[:, 0]
    sums = torch.zeros(keep.shape[0], dtype=token_logps.dtype, device=token_logps.device).index_add(0, rows, token_logps)
    return sums, keep.sum(1)


def pair_logps(lm: LoadedModel, pairs: list[Pair], label_only: bool) -> tuple[torch.Tensor, ...]:
    """(chosen, rejected, chosen tokens, rejected tokens), each [len(pairs)]: both sides in one padded batch."""
    examples = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    batch = to_device(collate(examples, lm.tokenizer.pad_token_id, pack=False), lm.device)
    sums, counts = answer_logps(lm.model, batch, label_only)
    n = len(pairs)
    return sums[:n], sums[n:], counts[:n], counts[n:]


def pair_loss(pc: torch.Tensor, pr: torch.Tensor, nc: torch.Tensor, nr: torch.Tensor,
              rc: torch.Tensor | None, rr: torch.Tensor | None, pcfg: PreferenceConfig) -> tuple[torch.Tensor, ...]:
    """(loss per pair, chosen reward, rejected reward) of the configured loss (the module docstring's formulas),
    plus `preference.sft_weight` times the chosen answer's negative log-likelihood per token."""
    if pcfg.loss == "simpo":
        chosen, rejected = pcfg.beta * pc / nc, pcfg.beta * pr / nr
        losses = -F.logsigmoid(chosen - rejected - pcfg.simpo_gamma)
    else:
        if rc is None or rr is None:
            raise ValueError("DPO needs the reference's scores")
        chosen, rejected = pcfg.beta * (pc - rc), pcfg.beta * (pr - rr)
        losses = -F.logsigmoid(chosen - rejected)
    if pcfg.sft_weight:
        losses = losses - pcfg.sft_weight * pc / nc
    return losses, chosen.detach(), rejected.detach()


def score(logp: torch.Tensor, n: torch.Tensor, pcfg: PreferenceConfig) -> torch.Tensor:
    """What the loss ranks an answer by: its summed log-probability (DPO) or its mean per token (SimPO)."""
    return logp / n if pcfg.loss == "simpo" else logp


# ---------------------------------------------------------------- the reference, kept with the checkpoints


@dataclass(frozen=True)
class Reference:
    """The scores of every pair (by line) under the adapter as the file began: summed log-probabilities of
    chosen and rejected, and their token counts. Held-out pairs are always there; train pairs with DPO."""

    sha256: str
    loss: str
    scores: dict[int, tuple[float, float, int, int]]
    # the file's preference.* as it began (beta, simpo_gamma, sft_weight): a resume trains with them, whatever
    # the config says now (None: a reference from before they were kept)
    settings: dict[str, float] | None = None

    def tensors(self, pairs: list[Pair], device: str) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self.scores[p.line] for p in pairs]
        return (torch.tensor([r[0] for r in rows], dtype=torch.float32, device=device),
                torch.tensor([r[1] for r in rows], dtype=torch.float32, device=device))

    def save(self, folder: Path) -> None:
        """Written whole or not at all (daemon.atomic), before the file's first step."""
        lines = sorted(self.scores)
        data = {"sha256": self.sha256, "loss": self.loss, "settings": self.settings,
                "lines": torch.tensor(lines, dtype=torch.int64),
                "logps": torch.tensor([self.scores[k][:2] for k in lines], dtype=torch.float32).reshape(-1, 2),
                "tokens": torch.tensor([self.scores[k][2:] for k in lines], dtype=torch.int64).reshape(-1, 2)}
        buf = io.BytesIO()
        torch.save(data, buf)
        atomic.write_bytes(folder / REFERENCE_FILE, buf.getvalue())

    @classmethod
    def load(cls, folder: Path, sha256: str, loss: str) -> Reference | None:
        """The file's reference, or None where none was kept for this file and loss (or it cannot be read)."""
        path = folder / REFERENCE_FILE
        if not path.is_file():
            return None
        try:
            data = torch.load(path, weights_only=True)
        except Exception as e:  # a torn or foreign file: the checkpoints cannot resume exactly without it
            log.warning("%s unreadable (%s): the file trains from its start", path, e)
            return None
        if data.get("sha256") != sha256 or data.get("loss") != loss:
            return None
        lines, logps, tokens = data["lines"].tolist(), data["logps"], data["tokens"].tolist()
        return cls(sha256, loss, {k: (float(logps[i, 0]), float(logps[i, 1]), tokens[i][0], tokens[i][1])
                                  for i, k in enumerate(lines)}, data.get("settings"))


@torch.no_grad()
def score_pairs(lm: LoadedModel, pairs: Iterable[Pair], micro_batch_size: int, label_only: bool,
                tick: Callable[[], None] = lambda: None,
                ranks: Ranks | None = None) -> dict[int, tuple[float, float, int, int]]:
    """Every pair's scores under the model as it is (eval mode: no dropout), by line.

    With several `ranks` the micro-batches are dealt out in rounds of world_size (rank r scores the r-th of each
    round): each is scored as one process scores it, so the scores are one process's; then they are gathered and
    every rank returns them all. `tick()` runs after each round on every rank (the loop makes it a meeting point
    where rank 0's stop or skip reaches the others). Under fsdp a rank without a micro-batch in a round runs a
    filler forward: a sharded layer's forward is a collective."""
    ranks = ranks or Ranks()
    lm.model.eval()
    out: dict[int, tuple[float, float, int, int]] = {}
    stream = batches(pairs, micro_batch_size)
    try:
        while dealt := list(itertools.islice(stream, ranks.world_size)):
            if ranks.rank < len(dealt):
                out.update(_scores(lm, dealt[ranks.rank], label_only, ranks.sharded))
            elif ranks.sharded:  # the round's shortest pair, its scores unused
                _scores(lm, [min((p for mb in dealt for p in mb), key=lambda p: len(p.input_ids))], label_only, True)
            tick()
    finally:
        lm.model.train()
        if ranks.sharded:  # forwards without a backward leave the layers gathered (daemon.train.sharding.reshard)
            reshard(lm.model)
    if ranks.many:
        everyone: dict[int, tuple[float, float, int, int]] = {}
        for part in ranks.gather(out):
            everyone.update(part)
        out = everyone
    return out


def _scores(lm: LoadedModel, mb: list[Pair], label_only: bool,
            sharded: bool) -> dict[int, tuple[float, float, int, int]]:
    """One micro-batch's scores, in `lm.split` pieces (more after an out-of-memory: `split_after_oom`)."""
    while True:
        pieces = _pieces(mb, lm.split)
        try:
            out = {}
            for piece in pieces:
                _maybe_inject_oom(2 * len(piece))  # a pair is two sequences in one forward
                pc, pr, nc, nr = pair_logps(lm, piece, label_only)
                for k, p in enumerate(piece):
                    out[p.line] = (float(pc[k]), float(pr[k]), int(nc[k]), int(nr[k]))
            return out
        except torch.OutOfMemoryError:
            if not split_after_oom(lm, pieces, sharded):
                raise


def settings_of(pcfg: PreferenceConfig) -> dict[str, float]:
    """The settings a file keeps from its start (the loss itself decides whether the reference is usable)."""
    return {"beta": pcfg.beta, "simpo_gamma": pcfg.simpo_gamma, "sft_weight": pcfg.sft_weight}


def _said(pcfg: PreferenceConfig) -> str:
    return ", ".join(f"{k} {v}" for k, v in settings_of(pcfg).items())


def figures_record(pcfg: PreferenceConfig, before: dict[str, Any] | None, after: dict[str, Any] | None,
                   reference_seconds: float | None) -> dict[str, Any]:
    """A done file's `preference` (protocol.Done): the settings it trained with and its held-out figures before
    and after (None each without held-out pairs)."""
    return {"loss_type": pcfg.loss, **settings_of(pcfg), "before": before, "after": after,
            "reference_seconds": reference_seconds}


# ---------------------------------------------------------------- one file's training


class Trainer:
    """The preference side of one file in training: its reference, its steps, its held-out figures."""

    def __init__(self, lm: LoadedModel, pcfg: PreferenceConfig, fast: FastPaths, micro_batch_size: int,
                 held_out: list[Pair], reference: Reference, ranks: Ranks | None = None) -> None:
        self.lm, self.pcfg, self.mbs, self.held_out, self.reference = lm, pcfg, micro_batch_size, held_out, reference
        self.label_only = fast.label_only
        self.ranks = ranks or Ranks()
        self.reference_seconds: float | None = None  # the reference pass of this run (None: read back)

    @classmethod
    def fresh(cls, lm: LoadedModel, cfg: Config, plan: FilePlan, train: Callable[[], Iterable[Pair]], folder: Path,
              sha256: str, tick: Callable[[], None], ranks: Ranks | None = None) -> Trainer:
        """The trainer of a file that begins (the adapter is as the file began): its reference scored now and kept
        in `folder` (by rank 0). `train()` gives the file's train pairs (one pass over it; DPO only). With several
        `ranks`, `tick` runs on every rank at the same points (score_pairs)."""
        ranks = ranks or Ranks()
        pcfg, fast = cfg.preference, lm.fast or FastPaths(False, False)
        held = list(plan.held_out)
        t0 = time.monotonic()
        pairs = itertools.chain(held, train() if pcfg.loss == "sigmoid" else ())  # streamed: a file may be large
        log.info("preference reference pass: scoring the %s pairs before step 1",
                 "held-out and train" if pcfg.loss == "sigmoid" else "held-out")
        ref = Reference(sha256, pcfg.loss, score_pairs(lm, pairs, cfg.training.micro_batch_size, fast.label_only, tick,
                                                       ranks), settings_of(pcfg))
        if ranks.main:  # one writer: every rank holds the same scores
            ref.save(folder)
        seconds = time.monotonic() - t0
        log.info("preference reference: %d pair(s) scored in %.1f s", len(ref.scores), seconds)
        trainer = cls(lm, pcfg, fast, cfg.training.micro_batch_size, held, ref, ranks)
        trainer.reference_seconds = seconds
        return trainer

    @classmethod
    def resumed(cls, lm: LoadedModel, cfg: Config, plan: FilePlan, folder: Path, sha256: str,
                ranks: Ranks | None = None) -> Trainer | None:
        """The trainer of a file resumed from a checkpoint: its reference read back from `folder` (by rank 0, which
        sends it to the other ranks: the other nodes cannot read its folder); None on every rank when none was
        kept for this file and loss (the caller trains the file from its start)."""
        ranks = ranks or Ranks()
        ref = Reference.load(folder, sha256, cfg.preference.loss) if ranks.main else None
        ref = ranks.broadcast(ref)
        if ref is None:
            return None
        pcfg = cfg.preference
        if ref.settings is not None and ref.settings != settings_of(pcfg):
            began = dataclasses.replace(pcfg, **ref.settings)
            log.warning("resumed with the preference settings the file began with (%s); the config now says %s: "
                        "they apply from the next file", _said(began), _said(pcfg))
            pcfg = began
        return cls(lm, pcfg, lm.fast or FastPaths(False, False), cfg.training.micro_batch_size,
                   list(plan.held_out), ref, ranks)

    def _loss(self, mb: list[Pair]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pc, pr, nc, nr = pair_logps(self.lm, mb, self.label_only)
        rc, rr = self.reference.tensors(mb, self.lm.device) if self.pcfg.loss == "sigmoid" else (None, None)
        return pair_loss(pc, pr, nc, nr, rc, rr, self.pcfg)

    def _replay_nll(self, piece: list[Example]) -> torch.Tensor:
        """The summed negative log-likelihood per token of replayed supervised examples (one per example)."""
        batch = to_device(collate(piece, self.lm.tokenizer.pad_token_id, pack=False), self.lm.device)
        sums, counts = answer_logps(self.lm.model, batch, self.label_only)
        return (-sums / counts.clamp(min=1)).sum()

    def step(self, group: list[list[Pair]], opt: Any, sched: Any, scaler: Any, max_norm: float,
             probe: Any = None, after_backward: Callable[[], None] | None = None,
             replayed: list[list[Example]] | None = None) -> tuple[StepStats, dict[str, float]]:
        """One optimizer step on a group of micro-batches of pairs: the gradient of the group's mean loss (each
        piece's summed loss divided by the group's pairs, on every rank), clipped as a supervised step's.
        `replayed` (data.replay_fraction): earlier files' supervised examples, each counted as one more item of
        the group whose loss is its negative log-likelihood per token (the supervised term's measure).
        With several ranks each computes its share (Ranks.shard) and the gradients are summed over ranks; the
        loss and reward figures are the whole group's. `after_backward()` runs once the gradients are in, before
        anything reads them (daemon.train.freezing)."""
        ranks = self.ranks
        replayed = replayed or []
        n_pairs = sum(len(mb) for mb in group)
        n_items = n_pairs + sum(len(mb) for mb in replayed)
        mine, mine_replayed = ranks.shard(group), ranks.shard(replayed) if replayed else []
        while True:
            pieces = [p for mb in mine for p in _pieces(mb, self.lm.split)]
            replay_pieces = [p for mb in mine_replayed for p in _pieces(mb, self.lm.split)]
            real = len(pieces)
            if ranks.sharded:  # the same number of forwards on every rank; a filler's loss weighs nothing
                filler = min((p for mb in group for p in mb), key=lambda p: len(p.input_ids))
                pieces += [[filler]] * (ranks.most(real + len(replay_pieces)) - real - len(replay_pieces))
            total, gaps, slots = 0.0, [], 0
            t0 = time.perf_counter()
            try:
                for k, piece in enumerate(pieces):
                    _maybe_inject_oom(2 * len(piece))  # a pair is two sequences in one forward
                    losses, chosen, rejected = self._loss(piece)  # the rewards
                    s = losses.sum() if k < real else losses.sum() * 0.0
                    scaler.scale(s / n_items).backward()
                    if k < real:
                        total += float(s.detach())
                        gaps.append((chosen - rejected).float())
                        slots += 2 * len(piece) * max(len(e.input_ids) for p in piece for e in (p.chosen, p.rejected))
                for piece in replay_pieces:
                    _maybe_inject_oom(len(piece))
                    s = self._replay_nll(piece)
                    scaler.scale(s / n_items).backward()
                    total += float(s.detach())
                    slots += len(piece) * max(len(e.input_ids) for e in piece)
                compute = time.perf_counter() - t0
                break
            except torch.OutOfMemoryError:
                opt.zero_grad(set_to_none=True)  # the step is taken again from its first piece
                if not split_after_oom(self.lm, pieces[:real] + replay_pieces, ranks.sharded):
                    raise
        gap = torch.cat(gaps) if gaps else torch.zeros(0)
        wins, gap_sum = (sum(col) for col in zip(*ranks.gather_floats([float((gap > 0).sum()), float(gap.sum())])))
        tokens = sum(len(p.input_ids) for mb in mine for p in mb) + sum(len(e.input_ids) for mb in mine_replayed for e in mb)
        stats = finish_step(self.lm, opt, sched, scaler, max_norm, probe, ranks, after_backward,
                            {"loss_sum": total, "tokens": tokens, "slots": slots, "compute_seconds": compute}, n_items)
        return stats, {"reward_accuracy": wins / n_pairs, "reward_margin": gap_sum / n_pairs}

    def before(self) -> tuple[float | None, dict[str, Any] | None]:
        """The held-out figures of the adapter as the file began (from the reference pass)."""
        if not self.held_out:
            return None, None
        s = self.reference.scores
        pc, pr, nc, nr = (torch.tensor([float(s[p.line][i]) for p in self.held_out]) for i in range(4))
        return self._figures(pc, pr, nc, nr)

    @torch.no_grad()
    def evaluate(self) -> tuple[float | None, dict[str, Any] | None]:
        """The held-out pairs' loss and figures now (None without held-out pairs)."""
        if not self.held_out:
            return None, None
        now = score_pairs(self.lm, self.held_out, self.mbs, self.label_only, ranks=self.ranks)  # all, on every rank
        pc, pr, nc, nr = (torch.tensor([float(now[p.line][i]) for p in self.held_out]) for i in range(4))
        return self._figures(pc, pr, nc, nr)

    def _figures(self, pc: torch.Tensor, pr: torch.Tensor, nc: torch.Tensor,
                 nr: torch.Tensor) -> tuple[float, dict[str, Any]]:
        rc, rr = self.reference.tensors(self.held_out, "cpu") if self.pcfg.loss == "sigmoid" else (None, None)
        losses, chosen, rejected = pair_loss(pc, pr, nc, nr, rc, rr, self.pcfg)
        gap, reward_gap = score(pc, nc, self.pcfg) - score(pr, nr, self.pcfg), chosen - rejected
        loss = float(losses.mean())
        return loss, {"pairs": len(self.held_out), "loss": loss, "accuracy": float((gap > 0).float().mean()),
                      "margin": float(gap.mean()), "reward_accuracy": float((reward_gap > 0).float().mean()),
                      "reward_margin": float(reward_gap.mean())}

