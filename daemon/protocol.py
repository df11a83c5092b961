"""The messages between the service and its trainer, and between the trainer's ranks: one frozen dataclass each.

    from daemon import protocol as p
    conn.send(p.Skip(job_id="...").to_wire())               # the service asks
    msg = p.decode(raw, p.TO_SERVICE)                       # the service hears: a typed message, or ProtocolError
    match msg:
        case p.Step(): ...

The wire is a plain dict (`type` plus the fields), pickled by multiprocessing's
connection; nothing else crosses the seam. A message of an unknown type, or
one missing a field, or one whose field has the wrong type, is a
`ProtocolError` naming it, never a KeyError three calls later. Every field
has a help text: the message tables in docs/internals.md are generated from
here (`python -m daemon.protocol`), and a test fails when they drift. A new
capability adds its messages here first. Standard library only: the service
imports it, and it never imports torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from daemon.wire import ProtocolError, Record, checked, opt, req

TO_TRAINER, TO_SERVICE, RANK = "to_trainer", "to_service", "rank"
DIRECTIONS = {TO_TRAINER: "Service → trainer", TO_SERVICE: "Trainer → service",
              RANK: "Rank 0 → the other ranks (torch.distributed broadcast, under torchrun)"}
_REGISTRY: dict[str, dict[str, type[Message]]] = {TO_TRAINER: {}, TO_SERVICE: {}, RANK: {}}


@dataclass(frozen=True)
class Message:
    """Base of every message; `TYPE` is its `type` on the wire, `DIRECTION` which way it goes."""

    TYPE: ClassVar[str] = ""
    DIRECTION: ClassVar[str] = ""
    DOC: ClassVar[str] = ""  # what the receiver does with it (the tables' last column)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.TYPE:
            _REGISTRY[cls.DIRECTION][cls.TYPE] = cls

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.TYPE}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.to_wire() if isinstance(v, Record) else v
        return out

    @classmethod
    def from_wire(cls, raw: dict[str, Any]) -> Message:
        return cls(**checked(cls, {k: v for k, v in raw.items() if k != "type"}, f"{cls.TYPE!r} message"))


def decode(raw: Any, direction: str) -> Message:
    """The typed message `raw` is, for a receiver of `direction`; ProtocolError when it is none."""
    if not isinstance(raw, dict):
        raise ProtocolError(f"a message must be an object with a 'type', got {type(raw).__name__}")
    kind = raw.get("type")
    cls = _REGISTRY[direction].get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ProtocolError(f"unknown message type {kind!r} ({DIRECTIONS[direction].lower()})")
    return cls.from_wire(raw)


def messages(direction: str) -> list[type[Message]]:
    return list(_REGISTRY[direction].values())


# ---------------------------------------------------------------- what is handed over


@dataclass(frozen=True)
class Job(Record):
    """The file the service hands to the trainer: one shape on both sides (the tracker's job in training,
    the trainer loop's job)."""

    job_id: str = req("the queue name `<UTC stamp>-<seq>--<original name>`")
    path: str = req("absolute path of the file in `queue/processing/`")
    original_name: str = req("the name it arrived with")
    sha256: str = req("of the whole file, as validated at intake")
    format: str = req("`chat`, `prompt_completion`, `text`, `alpaca`, `preference` or `preference_chat`")
    n_records: int = req("valid records found at intake")
    recorded_through: int = opt(0, "steps 1..n of the file are in the service's history (a resume sends what is missing)")

    @classmethod
    def for_file(cls, job_id: str, path: Any, format: str, sha256: str, recorded_through: int = 0,  # noqa: A002
                 n_records: int = 0) -> Job:
        """A job for a file trained outside the queue (`traind train`, tests): named after the file itself."""
        return cls(job_id, str(path), str(path).rstrip("/").rsplit("/", 1)[-1], sha256, format, n_records, recorded_through)


# ---------------------------------------------------------------- service -> trainer


@dataclass(frozen=True)
class Train(Message):
    TYPE, DIRECTION = "train", TO_TRAINER
    DOC = ("train this file (resume from `checkpoints/<job_id>/` if a checkpoint exists; answer `done` with "
           "`already_trained` if the current adapter's manifest lists this job)")
    job: Job = req("the file (fields of `Job`: job_id, path, original_name, sha256, format, n_records, recorded_through)")


@dataclass(frozen=True)
class Pause(Message):
    TYPE, DIRECTION = "pause", TO_TRAINER
    DOC = "hold between steps with the model resident; answer `paused`"


@dataclass(frozen=True)
class Resume(Message):
    TYPE, DIRECTION = "resume", TO_TRAINER
    DOC = "carry on (also ends a hold after `disk_full`); answer `resumed`"


@dataclass(frozen=True)
class Skip(Message):
    TYPE, DIRECTION = "skip", TO_TRAINER
    DOC = ("abandon the file: restore the adapter to its state before the file, delete the job's checkpoints, "
           "answer `skipped` (also for a job not in training: its checkpoints go)")
    job_id: str | None = opt(None, "the file to abandon (null: the one in training)")


@dataclass(frozen=True)
class Stop(Message):
    TYPE, DIRECTION = "stop", TO_TRAINER
    DOC = "checkpoint the job in progress at the next step boundary, answer `stopped`, exit 0"


@dataclass(frozen=True)
class Shutdown(Message):
    TYPE, DIRECTION = "shutdown", TO_TRAINER
    DOC = "exit 0 (sent when idle)"


@dataclass(frozen=True)
class Consolidate(Message):
    TYPE, DIRECTION = "consolidate", TO_TRAINER
    DOC = ("merge the adapter into a new base (`daemon/train/consolidate.py`), publish it under "
           "`consolidated_models/`, reload on it with a fresh adapter published as the next version (the commit "
           "point), answer `consolidated` or `consolidation_refused`. Sent only between files; no `train` until "
           "the answer")
    description: str = req("the person's words for it, kept in lineage.json")
    adapter_version: int | None = opt(None, "the version to merge; kept when the request is sent again to a "
                                           "restarted trainer, which then answers from the record if the switch "
                                           "already happened")
    force: bool = opt(False, "merge even while a probe is over `forgetting.max_probe_increase` since the "
                             "generation began (refused otherwise)")


@dataclass(frozen=True)
class Rollback(Message):
    TYPE, DIRECTION = "rollback", TO_TRAINER
    DOC = ("make that adapter version current again as a new version (`rollback_of`, `undone`: the ledger entries "
           "it drops); a refusal changes nothing (`rollback_refused`, checked before a file in training is touched); "
           "otherwise a file in training ends at the next step boundary, loses its checkpoints and stays in "
           "`processing/` to train again from its start; answer `rolled_back`. No `train` until the answer")
    version: int = req("the adapter version to go back to")


@dataclass(frozen=True)
class Accept(Message):
    TYPE, DIRECTION = "accept", TO_TRAINER
    DOC = ("make the version the forgetting gate held (`held`) current: its file is learnt; answer `done` for its "
           "file, or `held_refused` when that version is not held")
    version: int = req("the held version")


@dataclass(frozen=True)
class Reject(Message):
    TYPE, DIRECTION = "reject", TO_TRAINER
    DOC = ("drop the version the forgetting gate held: its folder goes, the adapter stays as it was before the "
           "file; answer `failed` with reason `forgetting` for its file")
    version: int = req("the held version")


# ---------------------------------------------------------------- trainer -> service


@dataclass(frozen=True)
class Loading(Message):
    TYPE, DIRECTION = "loading", TO_SERVICE
    DOC = "progress of a long load before `ready` (a GGUF base converted on first use): said in the status's detail"
    detail: str = req("what it is doing, for a person (\"converting SmolLM2...gguf: 120/272 tensors\")")


@dataclass(frozen=True)
class Ready(Message):
    TYPE, DIRECTION = "ready", TO_SERVICE
    DOC = "the model is loaded: files may be sent"
    device: str = req("`cpu` or `cuda`")
    compute_dtype: str = req("`float32`, `bfloat16` or `float16`")
    quantization: str = req("`nf4`, `fp4` or `none`")
    base_model: str = req("the base trained on: the config's, or a consolidated generation's folder")
    adapter_version: int | None = req("the current adapter version (null: none published yet)")
    trainable_params: int = req("LoRA parameters")
    total_params: int = req("all parameters")
    load_seconds: float = req("time to load base and adapter")
    world_size: int = opt(1, "trainer processes (ranks); 1 = a single process")
    strategy: str | None = opt(None, "`ddp`, `fsdp`, or null")
    backend: str | None = opt(None, "`gloo`, `nccl`, or null")
    nnodes: int = opt(1, "machines training together")
    eval_set_examples: int = opt(0, "examples of `eval.file` scored before and after every file (0: none)")
    eval_set_error: str | None = opt(None, "why `eval.file` is not used (training goes on without it)")
    generation: int = opt(0, "the base's generation: 0 for the configured base, N after N consolidations")
    notes: list[str] = opt([], "settings the trainer chose for this base and why (`model.quantization` auto's "
                              "choice, what nf4 costs on the CPU)")
    levers: dict = opt({}, "each speed lever by its `speed.*` key (`packed_rows`: `data.packing`), in the start "
                          "report's order: `{state: on, off or not_used, text, applied, of}` (`daemon/train/levers.py`)")


@dataclass(frozen=True)
class Started(Message):
    TYPE, DIRECTION = "started", TO_SERVICE
    DOC = "the file's first step (or its resumed one) is next"
    job_id: str = req("the file")
    total_steps: int = req("optimizer steps the file takes over its epochs")
    resumed_from_step: int = req("the checkpoint's step it resumes from (0: from the start)")
    n_train: int = req("examples trained per epoch")
    n_eval: int = req("examples held out for its eval loss")
    n_dropped: int = req("valid records with no trainable token after truncation")
    epochs: int = req("passes over the file")


@dataclass(frozen=True)
class Step(Message):
    TYPE, DIRECTION = "step", TO_SERVICE
    DOC = "one optimizer step done (also kept in the file's step log, and sent again by `steps_again`)"
    job_id: str = req("the file")
    step: int = req("the file's step, from 1")
    total_steps: int = req("the file's steps")
    global_step: int = req("the adapter's step over every file")
    epoch: float = req("epochs done, as a fraction (1.5: half-way through the second)")
    loss: float = req("the step's token-mean training loss")
    lr: float = req("the learning rate it used")
    grad_norm: float | None = req("the gradient norm before clipping")
    tokens: int = req("tokens trained in the step")
    slots: int = req("token slots computed (tokens plus padding)")
    tokens_per_sec: float = req("tokens / the step's wall time")
    elapsed: float = req("seconds since the file (or its resume) began")
    micro_batch_split: int = opt(1, "pieces each micro-batch runs in (more than 1 after running out of memory)")
    reward_accuracy: float | None = opt(None, "a preference file: share of the step's pairs whose chosen answer's "
                                              "implicit reward is above the rejected one's (null: not a preference file)")
    reward_margin: float | None = opt(None, "a preference file: the step's mean reward gap, chosen minus rejected")
    world_size: int | None = opt(None, "only with several ranks: how many")
    ranks: list[dict] | None = opt(None, "only with several ranks: each rank's figures in the step (rank, node, host, "
                                  "device, tokens, compute_seconds, tokens_per_sec, rss_bytes, gpu_memory_bytes)")


@dataclass(frozen=True)
class StepsAgain(Message):
    TYPE, DIRECTION = "steps_again", TO_SERVICE
    DOC = ("the `step` messages up to a resumed checkpoint's step after `recorded_through`, from the file's step "
           "log: a service that died while behind the trainer gets them again; it records those it is missing")
    job_id: str = req("the file")
    steps: list[dict] = req("the `step` messages, as they were sent")


@dataclass(frozen=True)
class Eval(Message):
    TYPE, DIRECTION = "eval", TO_SERVICE
    DOC = "the held-out loss of the file's eval examples (a preference file: also at step 0, as it begins)"
    job_id: str = req("the file")
    step: int = req("the file's step")
    global_step: int = req("the adapter's step")
    eval_loss: float = req("token-mean loss on the held-out examples (a preference file: the pair-mean preference loss)")
    preference: dict | None = opt(None, "a preference file's held-out pairs (daemon/train/preference.py): `pairs`, "
                                        "`loss`, `accuracy` (chosen scored above rejected), `margin`, "
                                        "`reward_accuracy`, `reward_margin`; null otherwise")


@dataclass(frozen=True)
class Activity(Message):
    TYPE, DIRECTION = "activity", TO_SERVICE
    DOC = "a per-layer LoRA activity sample (docs/internals.md, \"Layer activity\")"
    job_id: str = req("the file")
    step: int = req("the file's step")
    global_step: int = req("the adapter's step")
    final: bool = req("the file's last step")
    layers: list[int] = req("layer indices, in order")
    kinds: list[str] = req("module kinds (q_proj, ...), in order")
    values: dict = req("measure -> layers x kinds grid")


@dataclass(frozen=True)
class Checkpoint(Message):
    TYPE, DIRECTION = "checkpoint", TO_SERVICE
    DOC = "a resumable checkpoint is written"
    job_id: str = req("the file")
    step: int = req("the step it resumes from")
    path: str = req("its folder")


@dataclass(frozen=True)
class Paused(Message):
    TYPE, DIRECTION = "paused", TO_SERVICE
    DOC = "it holds between steps, model resident"
    job_id: str | None = opt(None, "the file it holds in (null: between files)")


@dataclass(frozen=True)
class Resumed(Message):
    TYPE, DIRECTION = "resumed", TO_SERVICE
    DOC = "it carries on"
    job_id: str | None = opt(None, "the file (null: between files)")


@dataclass(frozen=True)
class Done(Message):
    TYPE, DIRECTION = "done", TO_SERVICE
    DOC = "the file is learnt: its adapter version is published (the commit point); the service moves it to done/"
    job_id: str = req("the file")
    steps: int | None = req("steps it trained (null: an already-trained file that is not the newest)")
    final_loss: float | None = req("its last step's loss")
    eval_loss: float | None = req("its held-out loss at the end")
    adapter_version: int | None = req("the version it published")
    adapter_path: str = req("that version's folder")
    already_trained: bool = req("it was in the adapter already (a crash after the publication): not trained again")
    activity_moved: dict | None = req("what the file moved, per module (null where not measured)")
    eval_set: dict | None = opt(None, "eval.file's loss before and after it (`file`, `examples`, `before`, `after`)")
    global_step: int | None = opt(None, "the adapter's step after it")
    forgetting: dict | None = opt(None, "the forgetting report after it (daemon/train/forgetting.py: the probes' and "
                                        "earlier keep-sets' scores, backward transfer, the gate); null when not scored")
    replay: dict | None = opt(None, "with `data.replay_fraction`: `fraction`, `samples` replayed, `steps`, `sources` "
                                    "(`original_name`, `samples` each) and `left_out`; null without replay")
    preference: dict | None = opt(None, "a preference file: the settings it trained with (`loss_type`, `beta`, "
                                        "`simpo_gamma`, `sft_weight`: those it began with, on a resume), the "
                                        "held-out figures (as `eval`'s) `before` and `after` it (null without "
                                        "held-out pairs), and `reference_seconds` (its reference pass; null when "
                                        "read back on a resume); null otherwise")


@dataclass(frozen=True)
class Held(Message):
    TYPE, DIRECTION = "held", TO_SERVICE
    DOC = ("the file trained but the forgetting gate (`forgetting.action` hold) kept its version aside: published, "
           "not current; the adapter is as before the file. The service pauses (reason `forgetting`) and keeps the "
           "file in `processing/` until `accept` (then `done`) or `reject` (then `failed`). Sent again for the same "
           "file after a restart, without training it")
    job_id: str = req("the file")
    version: int = req("the held version")
    forgetting: dict = req("the forgetting report (as in `done`)")
    message: str = req("what was forgotten, by how much, for a person")


@dataclass(frozen=True)
class HeldRefused(Message):
    TYPE, DIRECTION = "held_refused", TO_SERVICE
    DOC = "an `accept` or `reject` for a version that is not held: nothing changed"
    version: int = req("the version asked for")
    message: str = req("why")


@dataclass(frozen=True)
class Skipped(Message):
    TYPE, DIRECTION = "skipped", TO_SERVICE
    DOC = "the file was abandoned: adapter restored, checkpoints dropped"
    job_id: str = req("the file")
    steps_discarded: int = opt(0, "steps of it that the adapter no longer holds")


@dataclass(frozen=True)
class Failed(Message):
    TYPE, DIRECTION = "failed", TO_SERVICE
    DOC = "the file could not be trained: adapter restored; the service moves it to failed/"
    job_id: str = req("the file")
    reason: str = req("`invalid_data`, `training_error`, `guard` (a guard stopped it) or `forgetting` (the "
                      "forgetting gate rolled it back, or its held version was rejected): the last two pause")
    message: str = req("why, for a person")
    traceback: str | None = opt(None, "where a training error came from")
    errors: list[dict] = opt([], "bad lines: `{line, field, reason}` each")
    step: int | None = opt(None, "with `guard`: the step it stopped at")
    loss: float | None = opt(None, "with `guard`: that step's loss")
    forgetting: dict | None = opt(None, "with `forgetting`: the report (as in `done`)")


@dataclass(frozen=True)
class DiskFullReport(Message):
    TYPE, DIRECTION = "disk_full", TO_SERVICE
    DOC = ("a write failed for lack of space (or free space is below `service.min_free_bytes`), or the folder "
           "cannot be written; the trainer now holds as paused (no `paused` message) until `resume`, then writes "
           "again from scratch")
    job_id: str = req("the file")
    site: str = req("`checkpoint`, `adapter`, or `trainer` for any other write of the file")
    folder: str = req("where it wrote")
    free_bytes: int = req("free there")
    message: str = req("the error, as the writer got it")
    kind: str = opt("full", "`full` or `unwritable`")


@dataclass(frozen=True)
class Stopped(Message):
    TYPE, DIRECTION = "stopped", TO_SERVICE
    DOC = "it checkpointed (when a file was in training) and exits 0"
    job_id: str | None = req("the file it stopped in (null: none)")
    checkpoint_step: int | None = req("the step that file resumes from")


@dataclass(frozen=True)
class RolledBack(Message):
    TYPE, DIRECTION = "rolled_back", TO_SERVICE
    DOC = "the version rolled back to is current again, as a new version"
    version: int = req("the new version")
    rollback_of: int = req("the version it copies")
    job_id: str | None = req("the file it interrupted (null: none)")
    undone: list[str] = req("names of the files no longer in the adapter")


@dataclass(frozen=True)
class RollbackRefused(Message):
    TYPE, DIRECTION = "rollback_refused", TO_SERVICE
    DOC = "nothing changed"
    version: int = req("the version asked for")
    job_id: str | None = req("a file it interrupted before refusing (null: none)")
    message: str = req("why")


@dataclass(frozen=True)
class Consolidated(Message):
    TYPE, DIRECTION = "consolidated", TO_SERVICE
    DOC = "training goes on from the new base with a fresh adapter"
    generation: int = req("the new base's generation")
    path: str = req("its folder under `consolidated_models/`")
    adapter_version: int = req("the fresh adapter's version")
    consolidated_version: int = req("the version merged")
    max_logit_diff: float = req("merged against base + adapter on the probe batch")
    reload_logit_diff: float = req("the saved folder reloaded against the merged model")
    seconds: float = req("how long it took")
    files: int = req("files the merged adapter had learnt")
    description: str = req("as asked")


@dataclass(frozen=True)
class ConsolidationRefused(Message):
    TYPE, DIRECTION = "consolidation_refused", TO_SERVICE
    DOC = "nothing changed"
    message: str = req("why: memory or disk short (with the numbers), a failed check, nothing learnt to merge")


@dataclass(frozen=True)
class ConfigRefused(Message):
    TYPE, DIRECTION = "config_refused", TO_SERVICE
    DOC = ("the config cannot run on this machine (`daemon/train/preflight.py`, before the model loads; or a "
           "`ModelError` met while a file trains): the trainer exits 78; the service neither restarts it nor counts "
           "a crash, says every reason in the status (`error`) and holds the queue until the daemon restarts")
    problems: list[str] = req("every reason, for a person")
    job_id: str | None = opt(None, "the file in training when it was met (it stays in `processing/`)")


# ---------------------------------------------------------------- rank 0 -> the other ranks


@dataclass(frozen=True)
class TrainOrder(Message):
    TYPE, DIRECTION = "train", RANK
    DOC = "train your share of each step of this file; rank 0 reports and decides"
    job: Job = req("the file")
    global_step: int = req("the adapter's step before it")


@dataclass(frozen=True)
class SyncLora(Message):
    TYPE, DIRECTION = "sync_lora", RANK
    DOC = "take rank 0's LoRA weights (after a rollback)"


@dataclass(frozen=True)
class Reload(Message):
    TYPE, DIRECTION = "reload", RANK
    DOC = "load this base again (a consolidation made it)"
    base: str = req("the consolidated base's folder")


@dataclass(frozen=True)
class Exit(Message):
    TYPE, DIRECTION = "exit", RANK
    DOC = "leave"


# ---------------------------------------------------------------- the docs' tables


def markdown(direction: str) -> str:
    """The message table of one direction, as docs/internals.md has it."""
    rows = ["| type | fields | what the receiver does |", "| --- | --- | --- |"]
    for cls in messages(direction):
        fields_ = "; ".join(f"`{f.name}`: {f.metadata['help']}" for f in dataclasses.fields(cls)) or "—"
        rows.append(f"| `{cls.TYPE}` | {fields_} | {cls.DOC} |")
    return "\n".join(rows)


def job_markdown() -> str:
    rows = ["| field | meaning |", "| --- | --- |"]
    rows += [f"| `{f.name}` | {f.metadata['help']} |" for f in dataclasses.fields(Job)]
    return "\n".join(rows)


def tables() -> dict[str, str]:
    """Each generated block of docs/internals.md by its marker name."""
    return {**{f"protocol:{d}": markdown(d) for d in DIRECTIONS}, "protocol:job": job_markdown()}


if __name__ == "__main__":  # python -m daemon.protocol: the tables, for docs/internals.md
    for name, text in tables().items():
        print(f"<!-- {name} -->\n{text}\n<!-- /{name} -->\n")
