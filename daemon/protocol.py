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
import functools
import sys
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

from daemon.errors import TraindError

TO_TRAINER, TO_SERVICE, RANK = "to_trainer", "to_service", "rank"
DIRECTIONS = {TO_TRAINER: "Service → trainer", TO_SERVICE: "Trainer → service",
              RANK: "Rank 0 → the other ranks (torch.distributed broadcast, under torchrun)"}


class ProtocolError(TraindError):
    """A message that is not one of the protocol's, or not well formed."""


def _f(default: Any = dataclasses.MISSING, help: str = "") -> Any:  # noqa: A002 - the field's help text
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def _req(help: str) -> Any:  # noqa: A002
    return field(metadata={"help": help})


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
        return cls(**_checked(cls, {k: v for k, v in raw.items() if k != "type"}, f"{cls.TYPE!r} message"))


@dataclass(frozen=True)
class Record:
    """A typed value carried inside messages (a job)."""

    def to_wire(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_wire(cls, raw: Any, what: str = "") -> Record:
        if isinstance(raw, cls):
            return raw
        if not isinstance(raw, dict):
            raise ProtocolError(f"{what or cls.__name__}: expected an object, got {type(raw).__name__}")
        return cls(**_checked(cls, raw, what or cls.__name__))


def _basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, vars(sys.modules[__name__]))


def _checked(cls: type, raw: dict[str, Any], what: str) -> dict[str, Any]:
    """`raw` as keyword arguments of `cls`, every field of the right type; ProtocolError naming what is wrong."""
    hints = _hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    extra = sorted(set(raw) - set(known))
    if extra:
        raise ProtocolError(f"{what}: unknown field(s) {', '.join(extra)}")
    out: dict[str, Any] = {}
    for name, f in known.items():
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ProtocolError(f"{what}, field {name!r} is missing")
            continue
        out[name] = _value(hints[name], raw[name], f"{what}, field {name!r}")
    return out


def _value(hint: Any, v: Any, what: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if v is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _value(a, v, what)
            except ProtocolError:
                continue
        raise ProtocolError(f"{what}: {v!r} is not {_name(hint)}")
    if isinstance(hint, type) and issubclass(hint, Record):
        return hint.from_wire(v, what)
    base = origin or hint
    if base is Any:
        return v
    if base is float and isinstance(v, int) and not isinstance(v, bool):
        return float(v)
    if base is int and isinstance(v, bool) or not isinstance(v, base):
        raise ProtocolError(f"{what}: {v!r} is not {_name(hint)}")
    if base is list and args:  # list[T]: every item a T
        return [_value(args[0], item, f"{what}, item {i}") for i, item in enumerate(v)]
    return v


def _name(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_name(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    if typing.get_origin(hint) is list and typing.get_args(hint):
        return f"a list of {_name(typing.get_args(hint)[0])}"
    return getattr(typing.get_origin(hint) or hint, "__name__", str(hint))


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

    job_id: str = _req("the queue name `<UTC stamp>-<seq>--<original name>`")
    path: str = _req("absolute path of the file in `queue/processing/`")
    original_name: str = _req("the name it arrived with")
    sha256: str = _req("of the whole file, as validated at intake")
    format: str = _req("`chat`, `prompt_completion`, `text` or `alpaca`")
    n_records: int = _req("valid records found at intake")
    recorded_through: int = _f(0, "steps 1..n of the file are in the service's history (a resume sends what is missing)")

    @classmethod
    def for_file(cls, job_id: str, path: Any, format: str, sha256: str, recorded_through: int = 0,  # noqa: A002
                 n_records: int = 0) -> Job:
        """A job for a file trained outside the queue (`traind train`, tests): named after the file itself."""
        return cls(job_id, str(path), _basename(str(path)), sha256, format, n_records, recorded_through)


# ---------------------------------------------------------------- service -> trainer


@dataclass(frozen=True)
class Train(Message):
    TYPE, DIRECTION = "train", TO_TRAINER
    DOC = ("train this file (resume from `checkpoints/<job_id>/` if a checkpoint exists; answer `done` with "
           "`already_trained` if the current adapter's manifest lists this job)")
    job: Job = _req("the file (fields of `Job`: job_id, path, original_name, sha256, format, n_records, recorded_through)")


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
    job_id: str | None = _f(None, "the file to abandon (null: the one in training)")


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
    description: str = _req("the person's words for it, kept in lineage.json")
    adapter_version: int | None = _f(None, "the version to merge; kept when the request is sent again to a "
                                           "restarted trainer, which then answers from the record if the switch "
                                           "already happened")


@dataclass(frozen=True)
class Rollback(Message):
    TYPE, DIRECTION = "rollback", TO_TRAINER
    DOC = ("make that adapter version current again as a new version (`rollback_of`, `undone`: the ledger entries "
           "it drops); a refusal changes nothing (`rollback_refused`, checked before a file in training is touched); "
           "otherwise a file in training ends at the next step boundary, loses its checkpoints and stays in "
           "`processing/` to train again from its start; answer `rolled_back`. No `train` until the answer")
    version: int = _req("the adapter version to go back to")


# ---------------------------------------------------------------- trainer -> service


@dataclass(frozen=True)
class Loading(Message):
    TYPE, DIRECTION = "loading", TO_SERVICE
    DOC = "progress of a long load before `ready` (a GGUF base converted on first use): said in the status's detail"
    detail: str = _req("what it is doing, for a person (\"converting SmolLM2...gguf: 120/272 tensors\")")


@dataclass(frozen=True)
class Ready(Message):
    TYPE, DIRECTION = "ready", TO_SERVICE
    DOC = "the model is loaded: files may be sent"
    device: str = _req("`cpu` or `cuda`")
    compute_dtype: str = _req("`float32`, `bfloat16` or `float16`")
    quantization: str = _req("`nf4`, `fp4` or `none`")
    base_model: str = _req("the base trained on: the config's, or a consolidated generation's folder")
    adapter_version: int | None = _req("the current adapter version (null: none published yet)")
    trainable_params: int = _req("LoRA parameters")
    total_params: int = _req("all parameters")
    load_seconds: float = _req("time to load base and adapter")
    world_size: int = _f(1, "trainer processes (ranks); 1 = a single process")
    strategy: str | None = _f(None, "`ddp`, `fsdp`, or null")
    backend: str | None = _f(None, "`gloo`, `nccl`, or null")
    nnodes: int = _f(1, "machines training together")
    eval_set_examples: int = _f(0, "examples of `eval.file` scored before and after every file (0: none)")
    eval_set_error: str | None = _f(None, "why `eval.file` is not used (training goes on without it)")
    generation: int = _f(0, "the base's generation: 0 for the configured base, N after N consolidations")
    notes: list[str] = _f([], "settings the trainer chose for this base and why (`model.quantization` auto's "
                              "choice, what nf4 costs on the CPU)")
    levers: dict = _f({}, "each speed lever by its `speed.*` key (`packed_rows`: `data.packing`), in the start "
                          "report's order: `{state: on, off or not_used, text, applied, of}` (`daemon/train/levers.py`)")


@dataclass(frozen=True)
class Started(Message):
    TYPE, DIRECTION = "started", TO_SERVICE
    DOC = "the file's first step (or its resumed one) is next"
    job_id: str = _req("the file")
    total_steps: int = _req("optimizer steps the file takes over its epochs")
    resumed_from_step: int = _req("the checkpoint's step it resumes from (0: from the start)")
    n_train: int = _req("examples trained per epoch")
    n_eval: int = _req("examples held out for its eval loss")
    n_dropped: int = _req("valid records with no trainable token after truncation")
    epochs: int = _req("passes over the file")


@dataclass(frozen=True)
class Step(Message):
    TYPE, DIRECTION = "step", TO_SERVICE
    DOC = "one optimizer step done (also kept in the file's step log, and sent again by `steps_again`)"
    job_id: str = _req("the file")
    step: int = _req("the file's step, from 1")
    total_steps: int = _req("the file's steps")
    global_step: int = _req("the adapter's step over every file")
    epoch: float = _req("epochs done, as a fraction (1.5: half-way through the second)")
    loss: float = _req("the step's token-mean training loss")
    lr: float = _req("the learning rate it used")
    grad_norm: float | None = _req("the gradient norm before clipping")
    tokens: int = _req("tokens trained in the step")
    slots: int = _req("token slots computed (tokens plus padding)")
    tokens_per_sec: float = _req("tokens / the step's wall time")
    elapsed: float = _req("seconds since the file (or its resume) began")
    micro_batch_split: int = _f(1, "pieces each micro-batch runs in (more than 1 after running out of memory)")
    world_size: int | None = _f(None, "only with several ranks: how many")
    ranks: list[dict] | None = _f(None, "only with several ranks: each rank's figures in the step (rank, node, host, "
                                  "device, tokens, compute_seconds, tokens_per_sec, rss_bytes, gpu_memory_bytes)")


@dataclass(frozen=True)
class StepsAgain(Message):
    TYPE, DIRECTION = "steps_again", TO_SERVICE
    DOC = ("the `step` messages up to a resumed checkpoint's step after `recorded_through`, from the file's step "
           "log: a service that died while behind the trainer gets them again; it records those it is missing")
    job_id: str = _req("the file")
    steps: list[dict] = _req("the `step` messages, as they were sent")


@dataclass(frozen=True)
class Eval(Message):
    TYPE, DIRECTION = "eval", TO_SERVICE
    DOC = "the held-out loss of the file's eval examples"
    job_id: str = _req("the file")
    step: int = _req("the file's step")
    global_step: int = _req("the adapter's step")
    eval_loss: float = _req("token-mean loss on the held-out examples")


@dataclass(frozen=True)
class Activity(Message):
    TYPE, DIRECTION = "activity", TO_SERVICE
    DOC = "a per-layer LoRA activity sample (docs/internals.md, \"Layer activity\")"
    job_id: str = _req("the file")
    step: int = _req("the file's step")
    global_step: int = _req("the adapter's step")
    final: bool = _req("the file's last step")
    layers: list[int] = _req("layer indices, in order")
    kinds: list[str] = _req("module kinds (q_proj, ...), in order")
    values: dict = _req("measure -> layers x kinds grid")


@dataclass(frozen=True)
class Checkpoint(Message):
    TYPE, DIRECTION = "checkpoint", TO_SERVICE
    DOC = "a resumable checkpoint is written"
    job_id: str = _req("the file")
    step: int = _req("the step it resumes from")
    path: str = _req("its folder")


@dataclass(frozen=True)
class Paused(Message):
    TYPE, DIRECTION = "paused", TO_SERVICE
    DOC = "it holds between steps, model resident"
    job_id: str | None = _f(None, "the file it holds in (null: between files)")


@dataclass(frozen=True)
class Resumed(Message):
    TYPE, DIRECTION = "resumed", TO_SERVICE
    DOC = "it carries on"
    job_id: str | None = _f(None, "the file (null: between files)")


@dataclass(frozen=True)
class Done(Message):
    TYPE, DIRECTION = "done", TO_SERVICE
    DOC = "the file is learnt: its adapter version is published (the commit point); the service moves it to done/"
    job_id: str = _req("the file")
    steps: int | None = _req("steps it trained (null: an already-trained file that is not the newest)")
    final_loss: float | None = _req("its last step's loss")
    eval_loss: float | None = _req("its held-out loss at the end")
    adapter_version: int | None = _req("the version it published")
    adapter_path: str = _req("that version's folder")
    already_trained: bool = _req("it was in the adapter already (a crash after the publication): not trained again")
    activity_moved: dict | None = _req("what the file moved, per module (null where not measured)")
    eval_set: dict | None = _f(None, "eval.file's loss before and after it (`file`, `examples`, `before`, `after`)")
    global_step: int | None = _f(None, "the adapter's step after it")


@dataclass(frozen=True)
class Skipped(Message):
    TYPE, DIRECTION = "skipped", TO_SERVICE
    DOC = "the file was abandoned: adapter restored, checkpoints dropped"
    job_id: str = _req("the file")
    steps_discarded: int = _f(0, "steps of it that the adapter no longer holds")


@dataclass(frozen=True)
class Failed(Message):
    TYPE, DIRECTION = "failed", TO_SERVICE
    DOC = "the file could not be trained: adapter restored; the service moves it to failed/"
    job_id: str = _req("the file")
    reason: str = _req("`invalid_data`, `training_error` or `guard` (a guard stopped it: the daemon pauses)")
    message: str = _req("why, for a person")
    traceback: str | None = _f(None, "where a training error came from")
    errors: list[dict] = _f([], "bad lines: `{line, field, reason}` each")
    step: int | None = _f(None, "with `guard`: the step it stopped at")
    loss: float | None = _f(None, "with `guard`: that step's loss")


@dataclass(frozen=True)
class DiskFullReport(Message):
    TYPE, DIRECTION = "disk_full", TO_SERVICE
    DOC = ("a write failed for lack of space (or free space is below `service.min_free_bytes`), or the folder "
           "cannot be written; the trainer now holds as paused (no `paused` message) until `resume`, then writes "
           "again from scratch")
    job_id: str = _req("the file")
    site: str = _req("`checkpoint`, `adapter`, or `trainer` for any other write of the file")
    folder: str = _req("where it wrote")
    free_bytes: int = _req("free there")
    message: str = _req("the error, as the writer got it")
    kind: str = _f("full", "`full` or `unwritable`")


@dataclass(frozen=True)
class Stopped(Message):
    TYPE, DIRECTION = "stopped", TO_SERVICE
    DOC = "it checkpointed (when a file was in training) and exits 0"
    job_id: str | None = _req("the file it stopped in (null: none)")
    checkpoint_step: int | None = _req("the step that file resumes from")


@dataclass(frozen=True)
class RolledBack(Message):
    TYPE, DIRECTION = "rolled_back", TO_SERVICE
    DOC = "the version rolled back to is current again, as a new version"
    version: int = _req("the new version")
    rollback_of: int = _req("the version it copies")
    job_id: str | None = _req("the file it interrupted (null: none)")
    undone: list[str] = _req("names of the files no longer in the adapter")


@dataclass(frozen=True)
class RollbackRefused(Message):
    TYPE, DIRECTION = "rollback_refused", TO_SERVICE
    DOC = "nothing changed"
    version: int = _req("the version asked for")
    job_id: str | None = _req("a file it interrupted before refusing (null: none)")
    message: str = _req("why")


@dataclass(frozen=True)
class Consolidated(Message):
    TYPE, DIRECTION = "consolidated", TO_SERVICE
    DOC = "training goes on from the new base with a fresh adapter"
    generation: int = _req("the new base's generation")
    path: str = _req("its folder under `consolidated_models/`")
    adapter_version: int = _req("the fresh adapter's version")
    consolidated_version: int = _req("the version merged")
    max_logit_diff: float = _req("merged against base + adapter on the probe batch")
    reload_logit_diff: float = _req("the saved folder reloaded against the merged model")
    seconds: float = _req("how long it took")
    files: int = _req("files the merged adapter had learnt")
    description: str = _req("as asked")


@dataclass(frozen=True)
class ConsolidationRefused(Message):
    TYPE, DIRECTION = "consolidation_refused", TO_SERVICE
    DOC = "nothing changed"
    message: str = _req("why: memory or disk short (with the numbers), a failed check, nothing learnt to merge")


@dataclass(frozen=True)
class ConfigRefused(Message):
    TYPE, DIRECTION = "config_refused", TO_SERVICE
    DOC = ("the config cannot run on this machine (`daemon/train/preflight.py`, before the model loads; or a "
           "`ModelError` met while a file trains): the trainer exits 78; the service neither restarts it nor counts "
           "a crash, says every reason in the status (`error`) and holds the queue until the daemon restarts")
    problems: list[str] = _req("every reason, for a person")
    job_id: str | None = _f(None, "the file in training when it was met (it stays in `processing/`)")


# ---------------------------------------------------------------- rank 0 -> the other ranks


@dataclass(frozen=True)
class TrainOrder(Message):
    TYPE, DIRECTION = "train", RANK
    DOC = "train your share of each step of this file; rank 0 reports and decides"
    job: Job = _req("the file")
    global_step: int = _req("the adapter's step before it")


@dataclass(frozen=True)
class SyncLora(Message):
    TYPE, DIRECTION = "sync_lora", RANK
    DOC = "take rank 0's LoRA weights (after a rollback)"


@dataclass(frozen=True)
class Reload(Message):
    TYPE, DIRECTION = "reload", RANK
    DOC = "load this base again (a consolidation made it)"
    base: str = _req("the consolidated base's folder")


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
