"""Preference files: DPO against the adapter as the file began, or SimPO without a reference.

    from daemon.train import preference
    prefs = preference.Trainer.fresh(lm, cfg, plan, train, ckpt_folder, sha256, tick)   # or .resumed(...)
    stats, figures = prefs.step(group, opt, sched, scaler, probe)   # one optimizer step on micro-batches of Pairs
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

Held-out figures: `accuracy` (chosen scored above rejected by the model itself), `margin` (mean score gap,
nats: summed for DPO, per token for SimPO), `reward_accuracy` and `reward_margin` (as a step's), `loss`.
Before the file DPO's rewards are zero by definition (the policy is its reference).
"""

from __future__ import annotations

import itertools
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F

from daemon.config import Config, PreferenceConfig
from daemon.errors import DataError
from daemon.train.batching import batches, collate
from daemon.train.data import IGNORE, Example, FilePlan, Pair
from daemon.train.model import LoadedModel
from daemon.train.step import FastPaths, StepStats, _inputs, _lora_grads, apply_step, to_device

log = logging.getLogger(__name__)

REFERENCE_FILE = "reference.pt"


# ---------------------------------------------------------------- scores and the loss


def answer_logps(model: Any, batch: dict[str, torch.Tensor], label_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probability of each row's labelled tokens [B], their count [B]) for one padded batch;
    `label_only`: the LM head only where labels are (as the supervised step's shortcut)."""
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    if label_only:
        base = model.get_base_model()
        hidden = base.get_decoder()(**_inputs(batch), use_cache=False).last_hidden_state[:, :-1][keep]
        logits = base.get_output_embeddings()(hidden)
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

    def tensors(self, pairs: list[Pair], device: str) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self.scores[p.line] for p in pairs]
        return (torch.tensor([r[0] for r in rows], dtype=torch.float32, device=device),
                torch.tensor([r[1] for r in rows], dtype=torch.float32, device=device))

    def save(self, folder: Path) -> None:
        """Written whole or not at all (a temp file renamed), before the file's first step."""
        folder.mkdir(parents=True, exist_ok=True)
        lines = sorted(self.scores)
        data = {"sha256": self.sha256, "loss": self.loss, "lines": torch.tensor(lines, dtype=torch.int64),
                "logps": torch.tensor([self.scores[k][:2] for k in lines], dtype=torch.float32).reshape(-1, 2),
                "tokens": torch.tensor([self.scores[k][2:] for k in lines], dtype=torch.int64).reshape(-1, 2)}
        fd, tmp = tempfile.mkstemp(prefix=f".{REFERENCE_FILE}.", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(data, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, folder / REFERENCE_FILE)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

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
                                  for i, k in enumerate(lines)})


@torch.no_grad()
def score_pairs(lm: LoadedModel, pairs: Iterable[Pair], micro_batch_size: int, label_only: bool,
                tick: Callable[[], None] = lambda: None) -> dict[int, tuple[float, float, int, int]]:
    """Every pair's scores under the model as it is (eval mode: no dropout), by line."""
    lm.model.eval()
    out = {}
    try:
        for mb in batches(pairs, micro_batch_size):
            tick()
            pc, pr, nc, nr = pair_logps(lm, mb, label_only)
            for k, p in enumerate(mb):
                out[p.line] = (float(pc[k]), float(pr[k]), int(nc[k]), int(nr[k]))
    finally:
        lm.model.train()
    return out


# ---------------------------------------------------------------- one file's training


class Trainer:
    """The preference side of one file in training: its reference, its steps, its held-out figures."""

    def __init__(self, lm: LoadedModel, pcfg: PreferenceConfig, fast: FastPaths, micro_batch_size: int,
                 held_out: list[Pair], reference: Reference) -> None:
        self.lm, self.pcfg, self.mbs, self.held_out, self.reference = lm, pcfg, micro_batch_size, held_out, reference
        self.label_only = fast.label_only
        self.reference_seconds: float | None = None  # the reference pass of this run (None: read back)

    @classmethod
    def fresh(cls, lm: LoadedModel, cfg: Config, plan: FilePlan, train: Callable[[], Iterable[Pair]], folder: Path,
              sha256: str, tick: Callable[[], None]) -> Trainer:
        """The trainer of a file that begins (the adapter is as the file began): its reference scored now and kept
        in `folder`. `train()` gives the file's train pairs (one pass over it; DPO only)."""
        pcfg, fast = cfg.preference, lm.fast or FastPaths(False, False)
        held = list(plan.held_out)
        t0 = time.monotonic()
        pairs = itertools.chain(held, train() if pcfg.loss == "sigmoid" else ())  # streamed: a file may be large
        ref = Reference(sha256, pcfg.loss, score_pairs(lm, pairs, cfg.training.micro_batch_size, fast.label_only, tick))
        ref.save(folder)
        seconds = time.monotonic() - t0
        log.info("preference reference: %d pair(s) scored in %.1f s", len(ref.scores), seconds)
        trainer = cls(lm, pcfg, fast, cfg.training.micro_batch_size, held, ref)
        trainer.reference_seconds = seconds
        return trainer

    @classmethod
    def resumed(cls, lm: LoadedModel, cfg: Config, plan: FilePlan, folder: Path, sha256: str) -> Trainer | None:
        """The trainer of a file resumed from a checkpoint: its reference read back from `folder`; None when none
        was kept for this file and loss (the caller trains the file from its start)."""
        ref = Reference.load(folder, sha256, cfg.preference.loss)
        if ref is None:
            return None
        return cls(lm, cfg.preference, lm.fast or FastPaths(False, False), cfg.training.micro_batch_size,
                   list(plan.held_out), ref)

    def _loss(self, mb: list[Pair]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pc, pr, nc, nr = pair_logps(self.lm, mb, self.label_only)
        rc, rr = self.reference.tensors(mb, self.lm.device) if self.pcfg.loss == "sigmoid" else (None, None)
        return pair_loss(pc, pr, nc, nr, rc, rr, self.pcfg)

    def step(self, group: list[list[Pair]], opt: Any, sched: Any, scaler: Any, max_norm: float,
             probe: Any = None, after_backward: Callable[[], None] | None = None) -> tuple[StepStats, dict[str, float]]:
        """One optimizer step on a group of micro-batches of pairs: the gradient of the group's pair-mean loss
        (each micro-batch's summed loss divided by the group's pairs), clipped as a supervised step's.
        `after_backward()` runs once the gradients are in, before anything reads them (daemon.train.freezing)."""
        n_pairs = sum(len(mb) for mb in group)
        total, chosen, rejected = 0.0, [], []
        for mb in group:
            losses, rc, rr = self._loss(mb)
            s = losses.sum()
            scaler.scale(s / n_pairs).backward()
            total += float(s.detach())
            chosen.append(rc)
            rejected.append(rr)
        if after_backward is not None:
            after_backward()
        params = [p for g in opt.param_groups for p in g["params"]]
        scaler.unscale_(opt)
        lora_grads = _lora_grads(probe) if probe is not None else None
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
        loss = total / n_pairs
        lr = apply_step(opt, sched, scaler, loss, grad_norm)
        gap = torch.cat(chosen) - torch.cat(rejected)
        tokens = sum(len(p.input_ids) for mb in group for p in mb)
        slots = sum(2 * len(mb) * max(len(e.input_ids) for p in mb for e in (p.chosen, p.rejected)) for mb in group)
        figures = {"reward_accuracy": float((gap > 0).float().mean()), "reward_margin": float(gap.mean())}
        return StepStats(loss, float(grad_norm), lr, tokens, slots, lora_grads), figures

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
        now = score_pairs(self.lm, self.held_out, self.mbs, self.label_only)
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


def refuse_distributed(ranks_many: bool) -> None:
    """Preference files train in one process for now (the pairs are not sharded across ranks)."""
    if ranks_many:
        raise DataError("preference files are trained by one trainer process; set distributed.nproc_per_node "
                        "and distributed.nnodes to 1 to train them")
