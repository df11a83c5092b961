"""One optimizer step, and the held-out loss: forward, loss where the labels are, backward, clip, update.

    fast = fast_paths(lm)                          # once per loaded model: which exact shortcuts hold for it
    stats = optimizer_step(lm, group, fast, pack, opt, sched, scaler, max_norm)
    loss = evaluate(lm, examples, micro_batch_size, fast, pack)

Shortcuts, each checked on the loaded model before it is used (a model
whose forward does something they do not reproduce gets the plain path, with
a warning in the trainer log), each with its switch (`speed.*`, `data.packing`;
daemon.train.levers reports what each did):
- packed rows (daemon.train.batching): no compute on padding, no attention
  across examples; checked by comparing a packed probe batch's loss with its
  examples' losses one by one;
- logits only where labels are: the decoder's hidden states at the trainable
  positions go through the LM head, not every position (a prompt-heavy batch
  spends much of its time on logits nobody uses, and with a large vocabulary
  the head is a large part of the model); checked against the model's own
  forward, which also catches a final softcap or logit scale;
- and with it, the last block only where labels are (daemon.train.lastblock):
  keys and values at every position, the rest of the block only at the rows
  the loss reads; checked against logits only where labels are;
- and, with packed rows on the CPU, width pieces (batching.width_pieces).
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from daemon.errors import GuardTripped
from daemon.train import lastblock
from daemon.train.activity_probe import ActivityProbe
from daemon.train.batching import batches, collate, width_pieces
from daemon.train.data import IGNORE, Example
from daemon.train.model import LoadedModel
from daemon.train.ranks import Ranks, memory_now, step_figures
from daemon.train.sharding import reshard


log = logging.getLogger(__name__)

PROBE_LENGTHS = (13, 9, 4)  # packed: a row of the longest alone, and a row of the other two (one attends past the other)
PROBE_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-3, torch.float16: 5e-3}  # relative, on summed losses (a leak: ~4e-2)
# Config attributes of architectures that change the logits after the LM head (Gemma 2's softcap, Cohere's
# scale, Granite's divisor). A probe with a freshly initialised model has logits too small to show a softcap,
# so these are refused by name as well as by the numeric check.
AFTER_HEAD = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


@dataclass(frozen=True)
class FastPaths:
    """Which exact shortcuts hold for a loaded model and are switched on (see the module docstring)."""

    pack: bool
    label_only: bool
    one_row: bool = False  # flash attention: the packed micro-batch as one row (varlen attention)
    last_block: bool = False  # with label_only: the last block computes only the rows the loss reads
    width_pieces: bool = False  # with packed rows: a micro-batch runs in pieces of similar length (batching.width_pieces)
    why: dict[str, str] = field(default_factory=dict, compare=False)  # lever key -> why its probe refused it


@dataclass(frozen=True)
class StepStats:
    loss: float  # mean over the group's trainable tokens
    grad_norm: float  # before clipping
    lr: float
    tokens: int  # input tokens of the examples in the step (no padding)
    slots: int  # token positions computed (tokens + padding)
    lora_grads: Any = None  # per-module gradient norms of A and B, when the activity probe asked for them
    split: int = 1  # the out-of-memory split: each micro-batch (or width piece) ran in this many pieces
    ranks: list[dict[str, Any]] | None = None  # each rank's throughput and memory (several processes)


def to_device(batch: dict[str, torch.Tensor], device: str) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the model gets: input ids, and the attention mask (padded) or position ids (packed)."""
    return {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}


def loss_sum(model: Any, batch: dict[str, torch.Tensor], label_only: bool = False,
             last_block: bool = False) -> tuple[torch.Tensor, int]:
    """(sum of next-token losses over trainable tokens, their count) for one collated micro-batch;
    `last_block` (with `label_only`): the last block only at the rows the loss reads (daemon.train.lastblock)."""
    targets = batch["labels"][:, 1:]  # labels align with input_ids; position t predicts token t+1
    if label_only:
        base = model.get_base_model()
        keep = targets != IGNORE
        if last_block:
            rows, valid = lastblock.label_rows(F.pad(keep, (0, 1)))  # the last position predicts nothing
            hidden = base.get_decoder()(**_inputs(batch), use_cache=False, label_rows=rows).last_hidden_state[valid]
            logits = base.get_output_embeddings()(hidden)
        else:
            logits = labelled_logits(model, batch, keep)
        return F.cross_entropy(logits.float(), targets[keep], reduction="sum"), int(keep.sum())
    logits = model(**_inputs(batch)).logits
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="sum")
    return loss, int((targets != IGNORE).sum())


def labelled_logits(model: Any, batch: dict[str, torch.Tensor], keep: torch.Tensor) -> torch.Tensor:
    """The LM head's logits only at the positions `keep` marks ([B, T-1]: where a label is the next token),
    from the decoder's hidden states: the head never runs over the prompt and padding (speed.label_only_logits)."""
    base = model.get_base_model()
    hidden = base.get_decoder()(**_inputs(batch), use_cache=False).last_hidden_state[:, :-1][keep]
    return base.get_output_embeddings()(hidden)


def trainable_tokens(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def example_targets(ex: Example) -> int:
    """Tokens `ex` is trained on: however it is batched (padded or packed), its first label is never a target."""
    return sum(1 for t in ex.labels[1:] if t != IGNORE)


def apply_step(opt: Any, sched: Any, scaler: Any, loss: float, grad_norm: Any) -> float:
    """Take the optimizer step of an accumulated, clipped gradient; the learning rate it used. Never from a
    non-finite loss or gradient: with fp16 loss scaling an inf gradient is the scaler's business (it skips the
    step and lowers the scale); without it, it is a broken step (GuardTripped)."""
    if not math.isfinite(loss) or (not scaler.is_enabled() and not math.isfinite(float(grad_norm))):
        opt.zero_grad(set_to_none=True)
        raise GuardTripped("non-finite loss" if not math.isfinite(loss) else "non-finite gradient", loss, float(grad_norm))
    lr = sched.get_last_lr()[0]
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    sched.step()
    return lr


def optimizer_step(lm: LoadedModel, group: list[list[Example]], fast: FastPaths, pack: bool, opt: Any, sched: Any,
                   scaler: Any, max_norm: float, probe: ActivityProbe | None = None,
                   ranks: Ranks | None = None, after_backward: Any = None) -> StepStats:
    """Forward/backward every micro-batch of the group, then one clipped optimizer step.

    Each micro-batch's summed loss is divided by the trainable tokens of the WHOLE
    group, so the gradient is that of the group's token-mean loss whatever the
    split into micro-batches (dividing per micro-batch would over-weight short ones).
    With several `ranks`, each computes its share of the group (daemon.train.ranks)
    and the gradients are summed over ranks before clipping: the same division makes
    that sum the single-process gradient of the group.
    With a `probe`, the LoRA gradient norms are read after unscaling, before clipping.
    `after_backward()` runs once the gradients are in, before anything reads them (daemon.train.freezing).
    """
    ranks = ranks or Ranks()
    pad_id = lm.tokenizer.pad_token_id
    n_targets = max(1, sum(example_targets(ex) for mb in group for ex in mb))
    mine = ranks.shard(group)
    while True:
        pieces = [p for mb in mine for w in _by_width(lm, mb, pack, fast) for p in _pieces(w, lm.split)]
        real = len(pieces)
        if ranks.sharded:  # the same number of forwards on every rank; a filler's loss weighs nothing
            pieces += [[_filler(ex for mb in group for ex in mb)]] * (ranks.most(real) - real)
        collated = [to_device(collate(p, pad_id, pack and fast.pack, fast.one_row), lm.device) for p in pieces]
        total = 0.0
        t0 = time.perf_counter()
        try:
            for k, (b, piece) in enumerate(zip(collated, pieces)):
                _maybe_inject_oom(len(piece))
                s, _ = loss_sum(lm.model, b, fast.label_only, fast.last_block)
                if k >= real:
                    s = s * 0.0
                scaler.scale(s / n_targets).backward()
                total += float(s.detach())
            compute = time.perf_counter() - t0
            collated = collated[:real]
            break
        except torch.OutOfMemoryError:
            # Run each micro-batch in twice as many pieces (gradient accumulation doubled; the group's
            # token-mean loss and gradient are the same) and take the step again.
            opt.zero_grad(set_to_none=True)
            del collated
            if not split_after_oom(lm, pieces[:real], ranks.sharded):
                raise
    tokens = sum(len(ex.input_ids) for mb in mine for ex in mb)
    slots = sum(b["input_ids"].numel() for b in collated)
    return finish_step(lm, opt, sched, scaler, max_norm, probe, ranks, after_backward,
                       {"loss_sum": total, "tokens": tokens, "slots": slots, "compute_seconds": compute}, n_targets)


def split_after_oom(lm: LoadedModel, pieces: list[list[Any]], sharded: bool) -> bool:
    """After an out-of-memory: each micro-batch runs in twice as many pieces from now on (`lm.split`); False
    where that cannot help: pieces of one example (or pair) already, or a sharded base (the other ranks are in
    the same forwards' collectives: a rank cannot retry alone)."""
    if lm.device == "cuda":
        torch.cuda.empty_cache()
    if sharded or all(len(p) <= 1 for p in pieces):
        return False
    lm.split *= 2
    log.warning("out of memory: each micro-batch now runs in %d pieces (the effective batch is unchanged)", lm.split)
    return True


def finish_step(lm: LoadedModel, opt: Any, sched: Any, scaler: Any, max_norm: float, probe: ActivityProbe | None,
                ranks: Ranks, after_backward: Any, mine: dict[str, float], n: float) -> StepStats:
    """The end of a step whose backward passes are in (a supervised or a preference one): `after_backward()`,
    the gradients summed over ranks, this rank's figures (`mine`: loss_sum, tokens, slots, compute_seconds)
    gathered, the LoRA gradient norms read (with a `probe`) after unscaling, the clip, the step; the loss is
    the summed loss over `n` (what each piece's loss was divided by)."""
    if after_backward is not None:
        after_backward()
    params = [p for g in opt.param_groups for p in g["params"]]
    ranks.average_grads(params)
    rss, gpu = memory_now(lm.device) if ranks.many else (0, 0)
    sums, per_rank = step_figures(ranks, {**mine, "rss_bytes": rss, "gpu_memory_bytes": gpu})
    scaler.unscale_(opt)
    lora_grads = _lora_grads(probe) if probe is not None else None
    # max_norm 0 disables clipping; inf still measures the norm for the report.
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    loss = sums["loss_sum"] / n
    lr = apply_step(opt, sched, scaler, loss, grad_norm)
    return StepStats(loss, float(grad_norm), lr, int(sums["tokens"]), int(sums["slots"]), lora_grads, lm.split, per_rank)


def _by_width(lm: LoadedModel, mb: list[Example], pack: bool, fast: FastPaths) -> list[list[Example]]:
    """`mb` in pieces of similar length where that costs less (batching.width_pieces), where fast_paths
    allows it (packed rows on the CPU)."""
    if pack and fast.pack and fast.width_pieces:
        return width_pieces(mb, packed=True)
    return [mb]


def _filler(examples: Any) -> Example:
    """The forward a rank with fewer pieces runs so that every rank runs as many (its loss weighs nothing):
    the shortest example, the cheapest."""
    return min(examples, key=lambda ex: len(ex.input_ids))


def _pieces(mb: list[Example], split: int) -> list[list[Example]]:
    """`mb` in `split` near-equal pieces (fewer when it holds fewer examples), in order."""
    n = min(split, len(mb))
    size = -(-len(mb) // n)
    return [mb[i:i + size] for i in range(0, len(mb), size)]


def _maybe_inject_oom(examples: int) -> None:
    """Fault injection for tests (inert unless set): TRAIND_INJECT_OOM_ABOVE=N makes a forward of more than N
    examples raise torch.OutOfMemoryError, as a GPU that cannot hold it does."""
    limit = os.environ.get("TRAIND_INJECT_OOM_ABOVE")
    if limit and examples > int(limit):
        raise torch.OutOfMemoryError(f"injected: {examples} examples in one forward (TRAIND_INJECT_OOM_ABOVE={limit})")


def _lora_grads(probe: ActivityProbe) -> Any:
    """The probe's gradient norms, or None when it cannot take them (a diagnostic never fails a step)."""
    try:
        return probe.grad_norms()
    except Exception:
        log.warning("layer activity: gradient norms not read", exc_info=True)
        return None


@torch.no_grad()
def evaluate(lm: LoadedModel, examples: list[Example], micro_batch_size: int, fast: FastPaths, pack: bool,
             ranks: Ranks | None = None) -> float | None:
    """Token-mean loss over the held-out examples (dropout off), or None without any; with several
    `ranks`, each scores every world_size-th example and the sums are added."""
    ranks = ranks or Ranks()
    if not examples:
        return None
    lm.model.eval()
    total, count = 0.0, 0
    mine = [p for mb in batches(examples[ranks.rank::ranks.world_size], micro_batch_size)
            for p in _by_width(lm, mb, pack, fast)]
    real = len(mine)
    if ranks.sharded:  # the same number of forwards on every rank (fillers not counted)
        mine += [[_filler(examples)]] * (ranks.most(real) - real)
    for k, mb in enumerate(mine):
        b = to_device(collate(mb, lm.tokenizer.pad_token_id, pack and fast.pack, fast.one_row), lm.device)
        s, n = loss_sum(lm.model, b, fast.label_only, fast.last_block)
        if k < real:
            total, count = total + float(s), count + n
    lm.model.train()
    if ranks.many:
        total, count = (sum(col) for col in zip(*ranks.gather_floats([total, float(count)])))
    return total / count if count else None


# ---------------------------------------------------------------- checking the shortcuts on the loaded model


def _probe_examples(vocab: int, pad_id: int) -> list[Example]:
    """Three examples of different lengths, a fixed pseudo-random content, loss on their second half."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for k, n in enumerate(PROBE_LENGTHS):
        ids = torch.randint(0, vocab, (n,), generator=gen).tolist()
        ids = [t if t != pad_id else (t + 1) % vocab for t in ids]
        out.append(Example(k, ids, [IGNORE] * (n // 2) + ids[n // 2:]))
    return out


@torch.no_grad()
def _losses(lm: LoadedModel, examples: list[Example], pack: bool, label_only: bool, one_row: bool = False,
            last_block: bool = False) -> float:
    b = to_device(collate(examples, lm.tokenizer.pad_token_id, pack, one_row), lm.device)
    return float(loss_sum(lm.model, b, label_only, last_block)[0])


def _agree(a: float, b: float, dtype: Any) -> bool:
    return abs(a - b) <= PROBE_TOLERANCE.get(dtype, 1e-2) * max(abs(a), abs(b), 1e-6)


def _after_head(lm: LoadedModel) -> str | None:
    config = lm.model.get_base_model().config
    return next((a for a in AFTER_HEAD if getattr(config, a, None) not in (None, 1, 1.0)), None)


def fast_paths(lm: LoadedModel) -> FastPaths:
    """Which shortcuts give this model's exact losses: a probe batch through each, against the plain path.
    A shortcut switched off (`lm.speed`, the config's `speed.*`) is neither probed nor installed; packed rows
    are probed whatever `data.packing` says (the step asks both). Why a probe refused one: FastPaths.why."""
    speed, why = lm.speed, {}
    examples = _probe_examples(len(lm.tokenizer), lm.tokenizer.pad_token_id)
    was_training = lm.model.training
    lm.model.eval()  # dropout off: the paths must agree exactly, not in distribution
    try:
        singles = [_losses(lm, [ex], False, False) for ex in examples]
        alone = sum(singles)
        if not speed.label_only_logits:
            label_only = False
        elif (after := _after_head(lm)) is not None:
            why["label_only_logits"] = f"its config sets {after}"
            log.warning("logits only where labels are: not used for %s (its config sets %s)", lm.base_path.name, after)
            label_only = False
        else:
            label_only = _try(lambda: _losses(lm, examples, False, True), _losses(lm, examples, False, False), lm,
                              "logits only where labels are", why, "label_only_logits")
        one_row = lm.model.get_base_model().config._attn_implementation == "flash_attention_2"
        pack = _try(lambda: _losses(lm, examples, True, label_only, one_row), alone, lm, "packed rows", why, "packed_rows")
        last_block = label_only and speed.last_block and _last_block(lm, examples, pack, one_row, singles, why)
    finally:
        lm.model.train(was_training)
        reshard(lm.model)  # a sharded base as it was before the probes, on every rank (daemon.train.sharding)
    # One row per micro-batch (flash attention) has no padding to save, and on a GPU a piece's launch overhead is
    # worth far more tokens than on the CPU, where the cost model was measured.
    pieces = speed.width_pieces and pack and not one_row and lm.device == "cpu"
    if speed.width_pieces and pack and not pieces:
        why["width_pieces"] = "one row per micro-batch (flash attention)" if one_row else f"on {lm.device}: measured for the CPU"
    log.info("fast paths on %s: packed rows %s, logits only where labels are %s, the last block only there %s",
             lm.base_path.name, *("yes" if on else "no" for on in (pack, label_only, last_block)))
    return FastPaths(pack=pack, label_only=label_only, one_row=one_row, last_block=last_block, width_pieces=pieces,
                     why=why)


def _last_block(lm: LoadedModel, examples: list[Example], pack: bool, one_row: bool, singles: list[float],
                why: dict[str, str]) -> bool:
    """Whether the last block on label rows gives the probe's losses, padded and (where used) packed."""
    what = "the last block only where labels are"
    if not lastblock.install(lm.model.get_base_model()):
        why["last_block"] = "not a block it knows"
        log.info("%s: not used for %s (not a block it knows)", what, lm.base_path.name)
        return False
    # padded rows (a mask for the padding), and packed: rows of several examples (a block-diagonal mask) and
    # rows of one example each (no mask: causal attention)
    alone, first = sum(singles), examples[0]
    return _try(lambda: _losses(lm, examples, False, True, last_block=True), alone, lm, what, why, "last_block") and (
        not pack or _try(lambda: _losses(lm, examples, True, True, one_row, last_block=True), alone, lm, what, why,
                         "last_block")
        and _try(lambda: _losses(lm, [first, first], True, True, one_row, last_block=True), 2 * singles[0], lm, what,
                 why, "last_block"))


def _try(fn: Any, reference: float, lm: LoadedModel, what: str, why: dict[str, str], key: str) -> bool:
    """Whether `fn`'s loss agrees with `reference`; if not, the reason goes to `why[key]` and the log."""
    try:
        got = fn()
    except Exception as e:  # an architecture without the parts the shortcut needs
        why[key] = f"{type(e).__name__}: {e}"
        log.warning("%s: not used for %s (%s: %s)", what, lm.base_path.name, type(e).__name__, e)
        return False
    if not _agree(got, reference, lm.dtype):
        why[key] = f"its loss {got:.6g} differs from the plain path's {reference:.6g}"
        log.warning("%s: not used for %s: its loss %.6g differs from the plain path's %.6g", what, lm.base_path.name,
                    got, reference)
        return False
    return True
