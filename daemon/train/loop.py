"""The training loop: one file in, LoRA weights updated, one explicit function to read.

    from daemon.train.loop import Job, train_file
    outcome = train_file(lm, cfg, Job.for_file(job_id, path, "chat", sha256), global_step=120,
                         ckpt_folder=cfg.path("checkpoints") / job_id,
                         report=events.append, control=lambda: "continue")
    outcome.status        # "done" | "stopped" | "skipped"

`train_file` knows nothing of pipes or queue folders. It talks to its caller
through two callbacks: `report(msg)` receives the child's `started`, `step`,
`steps_again`, `eval`, `checkpoint` and `activity` messages (daemon.protocol), and
`control()` is asked between optimizer steps and answers "continue", "stop" or
"skip" (a pause is the callback blocking until it may answer).

Why a fresh AdamW and schedule per file: every file is its own job with its own
warmup and decay, and a job's result must depend only on (adapter weights
before the file, file bytes, seed). Moments carried over from earlier files
would make a job resumed after a crash, or run after a skipped file, train
differently from the same job run straight through, and the checkpoint of a
job would have to hold another job's history.

Resume: the checkpoint holds LoRA, optimizer, scheduler, RNG states, the data
position (epoch, micro-batches consumed) and the ledger of the samples those
steps consumed (daemon.sample_ledger; the published adapter's manifest keeps it). The data iterator is deterministic
per (seed, epoch), so it is re-created and the consumed micro-batches skipped;
the steps after the checkpoint then repeat exactly what an uninterrupted run does.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal

import torch

from daemon import protocol
from daemon.config import Config, TrainingConfig
from daemon.diskspace import DiskFull, disk_full_from, require_space
from daemon.errors import DataError, GuardTripped
from daemon.protocol import Job
from daemon.sample_ledger import SampleLedger
from daemon.train import checkpoint as ckpt
from daemon.train import preference
from daemon.train.activity_probe import ActivityProbe, Sampler
from daemon.train.batching import batches, micro_batches
from daemon.train.data import plan_file, train_examples
from daemon.train.freezing import Freezer
from daemon.train.model import LoadedModel, ModelError, lora_state, set_lora_state
from daemon.train.ranks import Ranks
from daemon.train.replay import ReplayPlan, ReplaySource, plan_replay
from daemon.train.step import evaluate, fast_paths, optimizer_step
from daemon.validate import DataFormat

log = logging.getLogger(__name__)

Verdict = Literal["continue", "stop", "skip"]
ControlFn = Callable[[], Verdict]
ReportFn = Callable[[protocol.Message], None]
WaitForSpaceFn = Callable[[DiskFull], Verdict]  # holds until space is back: "continue", or a stop/skip meanwhile


PREP_POLL_SECONDS = 0.2  # how often control is asked while a file is read before (or skipped to) its steps


INTERRUPTS = ("stop", "skip")  # what rank 0 sends the other ranks where they wait for something else


class _Interrupted(Exception):
    """Stop or skip answered while the file was being read, before any step of this run, or while a
    checkpoint waited for disk space (then the file resumes from its last checkpoint written)."""

    def __init__(self, verdict: Verdict) -> None:
        super().__init__(verdict)
        self.verdict = verdict


def polling(control: ControlFn, clock: Callable[[], float]) -> Callable[[], None]:
    """A tick for long passes over the data: asks `control()` every PREP_POLL_SECONDS
    (a pause blocks in there) and raises _Interrupted on stop or skip. Only used where
    no RNG or gradient state is in flight, so a stop there changes nothing a resume sees."""
    last = clock()

    def tick() -> None:
        nonlocal last
        if clock() - last >= PREP_POLL_SECONDS:
            last = clock()
            verdict = control()
            if verdict != "continue":
                raise _Interrupted(verdict)

    return tick


@dataclass(frozen=True)
class Outcome:
    """How train_file ended."""

    status: Literal["done", "stopped", "skipped"]
    steps: int  # optimizer steps done in this file
    global_step: int
    final_loss: float | None
    eval_loss: float | None
    checkpoint_step: int | None  # the checkpoint written at stop
    ledger: dict[str, Any] | None = None  # done: the samples every step of the file consumed (daemon.sample_ledger)
    freezing: dict[str, Any] | None = None  # done, with lora.freeze_stalled: what froze and thawed (Freezer.summary)
    preference: dict[str, Any] | None = None  # done, a preference file: its held-out figures before and after


class Steering:
    """The verdicts every rank acts on (daemon.train.ranks): rank 0 asks `control` and broadcasts its answer;
    the other ranks take it. A stop or skip rank 0 meets elsewhere (while the file is read, or while a
    checkpoint waits for space) reaches them at their next meeting point, in place of what they expected."""

    def __init__(self, ranks: Ranks, control: ControlFn) -> None:
        self.ranks, self.control = ranks, control
        self.released = False  # the other ranks have had their last verdict of this file

    def verdict(self) -> Verdict:
        if not self.ranks.many:
            return self.control()
        verdict = self.ranks.broadcast(self.control() if self.ranks.main else None)
        self.released = verdict != "continue"
        return verdict

    def share(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank; raises _Interrupted where rank 0 was interrupted instead."""
        got = self.ranks.broadcast(obj)
        if isinstance(got, str) and got in INTERRUPTS:
            self.released = True
            raise _Interrupted(got)  # type: ignore[arg-type]
        return got

    def release(self, verdict: Verdict) -> None:
        """Rank 0 leaves the file early: tell the others, where they wait, unless they already know."""
        if self.ranks.many and self.ranks.main and not self.released:
            self.ranks.broadcast(verdict)
            self.released = True


def step_seed(seed: int, step: int, rank: int) -> int:
    """The dropout seed of one rank at one step (several processes): a resume needs no RNG state,
    and each rank draws its own masks."""
    digest = hashlib.sha256(f"{seed}:{step}:{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def job_seed(seed: int, sha256: str) -> int:
    """The seed of one job: the same file with the same config always trains the same way."""
    digest = hashlib.sha256(f"{seed}:{sha256}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1  # 63 bits: fits torch.manual_seed


def seed_everything(seed: int) -> None:
    """Seed python, numpy (if present) and torch (all devices)."""
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)  # numpy takes 32-bit seeds only
    except ImportError:
        pass


def lr_factor(tc: TrainingConfig, total_steps: int) -> Callable[[int], float]:
    """LambdaLR factor for 0-based step s: linear warmup, then cosine to min_lr_ratio, or constant."""

    def factor(s: int) -> float:
        if s < tc.warmup_steps:
            return (s + 1) / (tc.warmup_steps + 1)  # +1: the first step already learns a little
        if tc.schedule == "constant":
            return 1.0
        decay_steps = max(1, total_steps - tc.warmup_steps - 1)
        progress = min(1.0, (s - tc.warmup_steps) / decay_steps)
        return tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def build_optimizer(model: Any, tc: TrainingConfig, total_steps: int, device: str = "cpu") -> tuple[Any, Any]:
    """A fresh AdamW (`training.optimizer`) over the trainable (LoRA) parameters and its per-file schedule."""
    params = [p for p in model.parameters() if p.requires_grad]
    if tc.optimizer == "adamw":
        optimizer = torch.optim.AdamW(params, lr=tc.learning_rate, weight_decay=tc.weight_decay)
    else:
        if device != "cuda":
            raise ModelError(f"`training.optimizer` = {tc.optimizer!r} runs on CUDA only (bitsandbytes' 8-bit states); "
                             "use 'adamw' on the CPU")
        import bitsandbytes as bnb

        cls = bnb.optim.PagedAdamW8bit if tc.optimizer == "paged_adamw_8bit" else bnb.optim.AdamW8bit
        optimizer = cls(params, lr=tc.learning_rate, weight_decay=tc.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(tc, total_steps))
    return optimizer, scheduler


class SpikeGuard:
    """A loss far above the file's recent mean (guard.loss_spike_factor x its exponential mean) stops the file."""

    def __init__(self, factor: float, min_steps: int, weight: float = 0.9) -> None:
        self.factor, self.min_steps, self.weight = factor, min_steps, weight
        self.mean: float | None = None
        self.seen = 0

    def judge(self, loss: float, grad_norm: float, step: int) -> None:
        """Take this step's loss into the mean; raises GuardTripped on a spike."""
        before = self.mean
        if self.factor > 0 and before is not None and self.seen >= self.min_steps and loss > self.factor * before:
            raise GuardTripped(f"loss spike: {loss / before:.1f}x the recent mean {before:.4g}", loss, grad_norm, step)
        self.mean = loss if before is None else self.weight * before + (1 - self.weight) * loss
        self.seen += 1


def make_scaler(lm: LoadedModel) -> Any:
    """Loss scaling for float16 compute on CUDA (bf16/fp32 need none; disabled it is a no-op)."""
    return torch.amp.GradScaler("cuda", enabled=lm.device == "cuda" and lm.dtype == torch.float16)


def steps_per_epoch(n_train: int, micro_batch_size: int, grad_accum: int) -> int:
    """Optimizer steps per epoch; the last group of an epoch may hold fewer micro-batches."""
    return math.ceil(math.ceil(n_train / micro_batch_size) / grad_accum)


def groups(micro_batches: Iterable[list], grad_accum: int) -> Iterator[list[list]]:
    """Micro-batches in accumulation groups of grad_accum (the last one may be short)."""
    it = iter(micro_batches)
    while group := list(itertools.islice(it, grad_accum)):
        yield group


def restore(lm: LoadedModel, ck: ckpt.Checkpoint, opt: Any, sched: Any, scaler: Any) -> None:
    """Put a checkpoint's weights, optimizer, schedule, scaler and RNG states back."""
    set_lora_state(lm.model, ck.lora)
    opt.load_state_dict(ck.optimizer)
    sched.load_state_dict(ck.scheduler)
    if ck.scaler:
        scaler.load_state_dict(ck.scaler)
    ckpt.restore_rng(ck.rng)


def train_file(
    lm: LoadedModel, cfg: Config, job: Job, *, global_step: int, ckpt_folder: Path,
    report: ReportFn, control: ControlFn, clock: Callable[[], float] = time.monotonic,
    activity: ActivityProbe | None = None, wait_for_space: WaitForSpaceFn | None = None,
    ranks: Ranks | None = None, replay_from: list[ReplaySource] | None = None, freezer: Freezer | None = None,
) -> Outcome:
    """Train the LoRA of `lm` on one file (resuming from `ckpt_folder` if it holds a checkpoint).

    With `data.replay_fraction` > 0, examples of the earlier files in `replay_from` (daemon.train.replay:
    rank 0's list, the lineage's dataset ledger) are added to each step; the ledger says which.

    With an `activity` probe, per-layer LoRA activity is reported (`activity`
    messages) every `activity.every_steps` steps and at the file's last step.
    A checkpoint that cannot be written for lack of space (or below
    `service.min_free_bytes`) calls `wait_for_space`, then is written again: the
    weights in memory are untouched, so the file trains on as it would have.
    Without `wait_for_space` the DiskFull is raised.

    With several `ranks` (daemon.train.ranks) every rank calls this for the same
    file: rank 0 with the service's `report` and `control`, the others with a
    no-op report (their `control` is not asked: rank 0's verdicts reach them).
    Rank 0 alone reads and writes checkpoints and the step log, and samples activity.

    With a `freezer` (lora.freeze_stalled, one process only: daemon.train.freezing), stalled LoRA layers
    stop taking gradients; the file starts from `freezer.carry`, and its checkpoints keep the frozen set.
    """
    ranks = ranks or Ranks()
    if freezer is not None and ranks.many:
        log.warning("lora.freeze_stalled is not used with several processes")
        freezer = None
    steer = Steering(ranks, control)
    steplog = ckpt.StepLog(ckpt_folder) if ranks.main else _NoStepLog()
    try:
        return _train_file(lm, cfg, job, global_step=global_step, ckpt_folder=ckpt_folder,
                           report=report, control=control, clock=clock, probe=activity if ranks.main else None,
                           steplog=steplog, wait_for_space=wait_for_space, ranks=ranks, steer=steer,
                           replay_from=replay_from or [], freezer=freezer)
    except _Interrupted as e:  # nothing of this run is in the adapter yet; a checkpoint on disk stays
        steer.release(e.verdict)
        log.info("%s: %s while its data was being read", job.job_id, e.verdict)
        status: Literal["stopped", "skipped"] = "stopped" if e.verdict == "stop" else "skipped"
        kept = ckpt.latest_step(ckpt_folder) if status == "stopped" else None
        return Outcome(status, kept or 0, global_step + (kept or 0), None, None, kept)
    finally:
        steplog.close()


def _replay_plan(cfg: Config, job: Job, tok: Any, n_own: int, ledger: SampleLedger, resumed: bool,
                 sources: list[ReplaySource], tick: Callable[[], None], ranks: Ranks,
                 steer: Steering) -> ReplayPlan | None:
    """The file's replay (daemon.train.replay), made by rank 0 and shared with the others; None: no replay.

    A fresh file replays at `data.replay_fraction`; a resumed one as it began (the ledger its checkpoint
    kept says with what, or that it did not replay), whatever the config says now."""
    plan = None
    on = ledger.replay is not None if resumed else cfg.data.replay_fraction > 0
    if ranks.main and on:
        plan, ledger.replay = plan_replay(sources, job.sha256, tok, cfg.data,
                                          lambda sha: job_seed(cfg.training.seed, sha),
                                          job_seed(cfg.training.seed, job.sha256), n_own,
                                          ledger.replay, tick)
    if ranks.many:  # the same replayed examples on every rank (the others cannot read rank 0's done/)
        plan = steer.share(plan)
    return plan


def _preference_trainer(lm: LoadedModel, cfg: Config, job: Job, plan: Any, ckpt_folder: Path,
                        ck: ckpt.Checkpoint | None, ranks: Ranks, tick: Callable[[], None],
                        train: Callable[[], Iterable[Any]],
                        steer: Steering) -> tuple[preference.Trainer, ckpt.Checkpoint | None]:
    """A preference file's trainer (daemon/train/preference.py) and the checkpoint to resume from: none where
    the checkpoints lack the reference they trained against (they cannot resume exactly: the file starts over).

    With several ranks the reference pass is shared (each rank scores its part), and after each of its rounds
    every rank meets rank 0, which has asked `control` meanwhile: a stop or skip there reaches the others
    (Steering.share), and a pause holds them on the control channel, not inside a sharded layer's collective."""
    if ck is not None:
        prefs = preference.Trainer.resumed(lm, cfg, plan, ckpt_folder, job.sha256, ranks)
        if prefs is not None:
            return prefs, ck
        log.warning("%s: its checkpoints have no reference scores; training the file from its start", job.job_id)
        if ranks.main:
            ckpt.delete_checkpoints(ckpt_folder)

    def meet() -> None:
        tick()
        steer.share(None)

    return preference.Trainer.fresh(lm, cfg, plan, train, ckpt_folder, job.sha256, meet if ranks.many else tick,
                                    ranks), None


class _NoStepLog:
    """The other ranks keep no step log (rank 0's is the file's)."""

    def reset(self) -> None: ...
    def resume(self, step: int) -> list[dict[str, Any]]: return []
    def append(self, msg: dict[str, Any]) -> None: ...
    def sync(self) -> None: ...
    def close(self) -> None: ...


def _train_file(
    lm: LoadedModel, cfg: Config, job: Job, *, global_step: int, ckpt_folder: Path,
    report: ReportFn, control: ControlFn, clock: Callable[[], float], probe: ActivityProbe | None,
    steplog: ckpt.StepLog,
    wait_for_space: WaitForSpaceFn | None, ranks: Ranks, steer: Steering, replay_from: list[ReplaySource],
    freezer: Freezer | None = None,
) -> Outcome:
    tc, dc = cfg.training, cfg.data
    tok = lm.tokenizer
    fmt, seed = DataFormat(job.format), job_seed(tc.seed, job.sha256)
    path = Path(job.path)
    tick = polling(control, clock) if ranks.main else (lambda: None)
    if lm.fast is None:  # once per loaded model: which exact shortcuts hold for it
        lm.fast = fast_paths(lm)

    # --- data plan and the step budget of this file (a big file takes a while: control is asked meanwhile)
    plan = plan_file(path, fmt, tok, dc, seed, tick)
    if plan.n_train == 0:
        raise DataError(f"{path.name}: none of its {plan.n_dropped} examples keeps a token to learn from within "
                        f"data.max_length = {dc.max_length} tokens (assistant/completion text cut off, or none at all); "
                        "raise data.max_length or shorten the prompts")
    per_epoch = steps_per_epoch(plan.n_train, tc.micro_batch_size, tc.grad_accum_steps)
    total_steps = per_epoch * tc.epochs_per_file
    mb_per_epoch = math.ceil(plan.n_train / tc.micro_batch_size)
    held_out = list(plan.held_out)

    # --- fresh optimizer + schedule, seeded RNG; then a checkpoint overrides both if one exists
    lm.model.zero_grad(set_to_none=True)  # a job that failed mid-backward may have left gradients
    if freezer is not None:  # every LoRA parameter in the optimizer's list; the frozen ones get no gradient
        freezer.begin(freezer.carry)
    opt, sched = build_optimizer(lm.model, tc, total_steps, lm.device)
    scaler = make_scaler(lm)
    seed_everything(seed)
    order = "grouped" if dc.group_by_length else "shuffled"
    pos = ckpt.Position(job.job_id, job.sha256, 0, global_step, total_steps, 0, 0, order=order)
    ledger = SampleLedger()
    ck = ckpt.load_latest(ckpt_folder, job.sha256, start_global_step=global_step) if ranks.main else None
    if ranks.main and ck is None and ckpt.step_dirs(ckpt_folder):
        # unusable ones would otherwise outrank (by step number) and prune the new ones
        log.warning("%s: no usable checkpoint; training the file from its start", job.job_id)
        ckpt.delete_checkpoints(ckpt_folder)
    if ranks.many:  # rank 0's checkpoint on every rank (the other nodes cannot read its folder)
        ck = steer.share(ck if ranks.main else None)
    prefs = None
    if fmt.is_preference:  # its reference is scored now, before any checkpoint's weights are put back
        prefs, ck = _preference_trainer(lm, cfg, job, plan, ckpt_folder, ck, ranks, tick,
                                        lambda: train_examples(path, fmt, tok, dc, seed, 0), steer)
    if ck is not None:
        restore(lm, ck, opt, sched, scaler)
        pos = ck.position  # with the order its file began with, whatever data.group_by_length says now
        # The ledger of the steps these weights hold; a checkpoint from before ledgers: marked incomplete.
        ledger = SampleLedger.from_dict(ck.ledger) if ck.ledger is not None else SampleLedger(complete=False)
        log.info("%s: resuming from step %d (%s)", job.job_id, pos.step, ck.path.name)
    if freezer is not None and ck is not None and ck.freezing is not None:
        freezer.resume(ck.freezing)
    elif freezer is not None:
        freezer.baseline()
    replay = _replay_plan(cfg, job, tok, plan.n_train * tc.epochs_per_file, ledger, ck is not None, replay_from,
                          tick, ranks, steer)
    saved_step = pos.step if ck is not None else None
    # Reports of steps the checkpoint keeps that the service never recorded (it died while behind): sent again.
    missed = [m for m in steplog.resume(pos.step) if m["step"] > job.recorded_through] if ck is not None else []
    if ck is None:
        steplog.reset()
    report(protocol.Started(job_id=job.job_id, total_steps=total_steps, resumed_from_step=pos.step,
                            n_train=plan.n_train, n_eval=plan.n_eval, n_dropped=plan.n_dropped,
                            epochs=tc.epochs_per_file))
    if missed:
        report(protocol.StepsAgain(job_id=job.job_id, steps=missed))
    before = prefs.before() if prefs is not None else (None, None)
    if before[1] is not None and ck is None:  # the held-out pairs as the file begins (from the reference pass)
        report(protocol.Eval(job_id=job.job_id, step=0, global_step=pos.global_step, eval_loss=before[0],
                             preference=before[1]))

    def save() -> int:
        if not ranks.main:  # the checkpoint is rank 0's: the weights are the same on every rank
            return pos.step
        while True:
            try:
                require_space(ckpt_folder, cfg.service.min_free_bytes, "checkpoint")
                steplog.sync()  # durable before the checkpoint: the log always reaches its step
                path = ckpt.save_checkpoint(ckpt_folder, pos, lora_state(lm.model), opt.state_dict(),
                                            sched.state_dict(), scaler.state_dict(), tc.keep_checkpoints,
                                            ledger.to_dict(), freezer.state_dict() if freezer is not None else None)
                break
            except Exception as e:
                full = disk_full_from(e, ckpt_folder, "checkpoint", writing_unnamed=True)
                if full is None or wait_for_space is None:
                    raise full or e
                log.warning("%s: checkpoint at step %d not written: %s", job.job_id, pos.step, full)
                verdict = wait_for_space(full)  # then the whole checkpoint is written again, from scratch
                if verdict != "continue":
                    raise _Interrupted(verdict) from None
        report(protocol.Checkpoint(job_id=job.job_id, step=pos.step, path=str(path)))
        return pos.step

    sampler = Sampler(probe, cfg.activity.every_steps, cfg.activity.min_interval_seconds, clock, report, job.job_id)
    if probe is not None and freezer is not None:
        probe.extra["frozen"] = freezer.per_module
    elif probe is not None:
        probe.extra.pop("frozen", None)
    spike = SpikeGuard(cfg.guard.loss_spike_factor, cfg.guard.min_steps)

    after: dict[str, Any] | None = None

    def run_eval() -> float | None:
        nonlocal after
        if prefs is not None:
            loss, after = prefs.evaluate()
        else:
            loss = evaluate(lm, held_out, tc.micro_batch_size, lm.fast, dc.packing, ranks)
        if loss is not None:
            report(protocol.Eval(job_id=job.job_id, step=pos.step, global_step=pos.global_step, eval_loss=loss,
                                 **({"preference": after} if after is not None else {})))
        return loss

    # --- the loop: epochs -> accumulation groups of micro-batches -> one optimizer step each
    lm.model.train()
    started, eval_loss = clock(), None
    for epoch in range(pos.epoch, tc.epochs_per_file):
        skip = pos.micro_batches if epoch == pos.epoch else 0
        stream = micro_batches(train_examples(path, fmt, tok, dc, seed, epoch), tc.micro_batch_size,
                               pos.order, dc.shuffle_buffer, seed, epoch)
        for _ in range(skip):  # a resume reads up to where its checkpoint was; control is asked meanwhile
            next(stream)
            tick()
        consumed = skip
        for group in groups(stream, tc.grad_accum_steps):
            verdict = steer.verdict()  # between optimizer steps: pause blocks inside, stop/skip end the file
            if verdict == "stop":
                step = saved_step if saved_step == pos.step else save()
                return Outcome("stopped", pos.step, pos.global_step, pos.last_loss, None, step)
            if verdict == "skip":
                return Outcome("skipped", pos.step, pos.global_step, pos.last_loss, None, None)

            t0 = clock()
            sample = sampler.due(pos.step + 1, total_steps)
            if ranks.many:
                torch.manual_seed(step_seed(seed, pos.step + 1, ranks.rank))
            own = [ex.line for mb in group for ex in mb]
            picks = replay.picks(ledger.samples, ledger.samples + len(own)) if replay is not None else []
            # replayed examples are added after the file's own micro-batches, in micro-batches of the same size
            replayed = list(batches([replay.examples[p] for p in picks], tc.micro_batch_size)) if replay else []
            figures: dict[str, float] = {}  # a preference step's reward accuracy and margin
            after_backward = (lambda: freezer.after_backward(pos.step + 1, pos.global_step + 1)) if freezer else None
            try:
                if prefs is not None:
                    stats, figures = prefs.step(group, opt, sched, scaler, tc.max_grad_norm, probe if sample else None,
                                                after_backward, replayed)
                else:
                    stats = optimizer_step(lm, group + replayed, lm.fast, dc.packing, opt, sched, scaler,
                                           tc.max_grad_norm, probe if sample else None, ranks, after_backward)
            except GuardTripped as e:
                e.step = pos.step + 1
                raise GuardTripped(e.what, e.loss, e.grad_norm, e.step) from None
            spike.judge(stats.loss, stats.grad_norm, pos.step + 1)
            consumed += len(group)
            ledger.add_step(epoch, own)
            if ledger.replay is not None:
                ledger.replay.add_step(picks)
            pos = ckpt.Position(job.job_id, job.sha256, pos.step + 1, pos.global_step + 1,
                                total_steps, epoch, consumed, stats.loss, pos.order)
            dt = max(clock() - t0, 1e-9)
            step_msg = protocol.Step(
                job_id=job.job_id, step=pos.step, total_steps=total_steps, global_step=pos.global_step,
                epoch=epoch + consumed / mb_per_epoch, loss=stats.loss, lr=stats.lr, grad_norm=stats.grad_norm,
                tokens=stats.tokens, slots=stats.slots, tokens_per_sec=stats.tokens / dt,
                elapsed=clock() - started, micro_batch_split=stats.split, **figures,
                **({"world_size": ranks.world_size, "ranks": stats.ranks} if stats.ranks is not None else {}))
            steplog.append(step_msg.to_wire())
            report(step_msg)
            if freezer is not None:
                freezer.after_step(pos.step, pos.global_step)
            if sample:
                sampler.sample(pos.step, pos.global_step, total_steps, stats.lora_grads)

            if tc.eval_every_steps and pos.step % tc.eval_every_steps == 0 and pos.step < total_steps:
                eval_loss = run_eval()
            if pos.step % tc.checkpoint_every_steps == 0 and pos.step < total_steps:
                saved_step = save()

    # --- end of file: final eval; the caller publishes the adapter
    eval_loss = run_eval()
    if ledger.replay is not None:
        log.info("%s: replayed %d example(s) from %d earlier file(s)", job.job_id, ledger.replay.samples,
                 sum(1 for s in ledger.replay.sources if s["samples"]))
    pref_figures = (preference.figures_record(prefs.pcfg, before[1], after, prefs.reference_seconds)
                    if prefs is not None else None)
    return Outcome("done", pos.step, pos.global_step, pos.last_loss, eval_loss, None, ledger.to_dict(),
                   freezer.summary() if freezer is not None else None, pref_figures)
