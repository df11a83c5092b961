"""Response models: the API's typed contract (and its OpenAPI schema at /docs).

The status fields are not written here: `StatusFile` is built from the one
definition in daemon/schema.py, so the service's writer, these readers and the
OpenAPI schema cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from enum import Enum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from daemon.schema import TrainingStatus


class PendingRequest(BaseModel):
    action: str
    at: float | None = None
    job_id: str | None = None


def _reader_field(f: dataclasses.Field, hint: Any) -> tuple[Any, Any]:
    """One field of the status file as the monitor reads it: (type, pydantic Field).

    Every field may be null or missing (an older or newer daemon's file, or none at
    all); enums are read as plain strings, so a state this monitor does not know
    still passes. With no status file a field reads as its empty default (0, "",
    {}, null); one whose default would claim something (a state, an interval, the
    schema version) reads as null.
    """
    help_text = f.metadata.get("help")
    if f.metadata.get("unix_time"):
        return str | None, Field(None, description=f"{help_text} (ISO 8601 UTC)")
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # an optional enum is read as the enum is
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1 and isinstance(args[0], type) and issubclass(args[0], Enum):
            hint = args[0]
    if isinstance(hint, type) and issubclass(hint, Enum):
        values = ", ".join(m.value for m in hint)
        return str | None, Field(None, description=f"{help_text}: one of {values}")
    if f.default_factory is not dataclasses.MISSING:
        return hint | None, Field(default_factory=f.default_factory, description=help_text)
    empty = f.default if f.default in (None, 0, "") and not isinstance(f.default, bool) else None
    return hint | None, Field(empty, description=help_text)


def status_file_model(schema: type = TrainingStatus) -> type[BaseModel]:
    """The pydantic model of the status file, from its dataclass (daemon.schema)."""
    hints = typing.get_type_hints(schema)
    fields = {f.name: _reader_field(f, hints[f.name]) for f in dataclasses.fields(schema)}
    # Fields a newer service adds pass through unchanged.
    return create_model("StatusFile", __config__=ConfigDict(extra="allow"), __doc__=schema.__doc__, **fields)


StatusFile = status_file_model()


class Status(StatusFile):  # type: ignore[misc,valid-type]  # a model built at import, from daemon.schema
    """`training_status.json` as the service wrote it (daemon.schema.TrainingStatus), plus what the monitor concluded."""

    # -- the monitor's view --
    stale: bool = Field(description="true when the daemon is not responding: no status, status too old, or its pid is gone")
    stale_reason: str | None = None
    stale_cause: Literal["full", "unwritable"] | None = Field(None, description="why a running daemon's status is "
                                                               "stale, where its folder shows it: its disk is full, "
                                                               "or it cannot be written")
    age_seconds: float | None = Field(None, description="seconds since updated_at")
    daemon_alive: bool = False
    requested_state: Literal["running", "paused"] = Field(description="desired state last asked for (control file); differs from `desired_state` until the daemon acts")
    pending_requests: list[PendingRequest] = Field(default_factory=list, description="skip/stop/retry/remove not yet consumed by the daemon")
    now: float = Field(description="the monitor's clock (Unix seconds)")


class Health(BaseModel):
    ok: bool = Field(description="the monitor is serving")
    daemon: Literal["running", "not_responding", "absent"]
    status: str | None
    stale: bool
    stale_reason: str | None
    age_seconds: float | None
    monitor_uptime_seconds: float
    checks: list[dict] | None = Field(None, description="with deep=true: trainctl health's checks (name, level ok/warning/problem, detail)")
    exit_code: int | None = Field(None, description="with deep=true: 0 healthy, 1 warnings, 2 a problem (as trainctl health)")


class HistoryPoint(BaseModel):
    global_step: int
    job_id: str
    step: int
    epoch: float | None
    loss: float | None
    lr: float | None
    grad_norm: float | None
    tokens_per_sec: float | None
    t: float


class EvalPoint(BaseModel):
    global_step: int
    job_id: str
    step: int
    eval_loss: float | None
    t: float


class EvalSetPoint(BaseModel):
    global_step: int = Field(description="the global step at which the file ended")
    job_id: str
    original_name: str | None
    before: float | None = Field(description="eval.file's loss before the file")
    after: float = Field(description="eval.file's loss after it")
    t: float | None


class SeriesInfo(BaseModel):
    id: int = Field(description="0 for the first series; a new one begins when `config approve` starts a new adapter")
    started_at: float | None = Field(None, description="when it began (None: the first series)")
    reason: str | None = Field(None, description="why it began (the approved change)")


class Marker(BaseModel):
    global_step: int = Field(description="the last step trained before it (the charts draw a line there)")
    kind: str = Field(description="consolidation or rollback")
    message: str = Field(description="what the event said")
    t: float = Field(description="when it happened (unix seconds)")


class History(BaseModel):
    series: SeriesInfo = Field(default_factory=lambda: SeriesInfo(id=0),
                               description="the series of steps these points belong to (one adapter's, from global step 0)")
    all_series: list[SeriesInfo] = Field(default_factory=lambda: [SeriesInfo(id=0)],
                                         description="every series, oldest first; the last is the current one")
    points: list[HistoryPoint]
    evals: list[EvalPoint]
    eval_set: list[EvalSetPoint] = Field(default_factory=list, description="the fixed eval set (eval.file) before/after each file")
    markers: list[Marker] = Field(default_factory=list, description="every consolidation and rollback, at its global step")
    total_rows: int = Field(description="metric rows in the requested range before downsampling")
    downsampled: bool
    bucket_width: int = Field(description="global steps per bucket (1: every row)")
    first_global_step: int | None
    last_global_step: int | None


class QueueItem(BaseModel):
    job_id: str
    original_name: str
    state: str
    priority: str | None
    size: int
    mtime: float
    reason: str | None = None
    message: str | None = None
    errors: list[dict] | None = None
    failed_at: str | None = None
    # from the daemon's job record in history.db (absent for files it has not recorded yet)
    format: str | None = Field(None, description="chat, prompt_completion, text, alpaca, preference or preference_chat")
    n_records: int | None = Field(None, description="records trained (good lines)")
    n_bad: int | None = Field(None, description="bad lines; on a done file, the ones skipped under bad_line_policy=skip")
    bad_lines: list[dict] | None = Field(None, description="the first bad lines: line, field, reason")
    steps: int | None = None
    total_steps: int | None = None
    final_loss: float | None = None
    eval_loss: float | None = None
    crashes: int | None = None
    adapter_version: int | None = Field(None, description="adapter version published when the file was done")
    has_activity: bool = Field(False, description="a record of what the file moved is kept (GET /api/activity/jobs/{job_id})")
    started_at: float | None = None
    finished_at: float | None = None
    eval_set_before: float | None = Field(None, description="eval.file's loss before this file (when configured)")
    eval_set_after: float | None = Field(None, description="...and after it")
    changed: str | None = Field(None, description="the file was written to in place while it trained, or after it "
                                "finished while a process still held it open: what the adapter learnt is not all of it")
    duplicate_of: dict | None = Field(None, description="done without training: the ledger entry of the earlier "
                                      "file with the same content (sha256, job_id, original_name, version)")
    forced: bool = Field(False, description="added with `trainctl queue add --force`: trained even if its content was learnt before")
    preference: dict | None = Field(None, description="a preference file: loss_type, beta, sft_weight, and its held-out pairs "
                                    "`before` and `after` it (pairs, loss, accuracy, margin, reward_accuracy, reward_margin)")
    forgetting: dict | None = Field(None, description="what its forgetting scoring found: outcome, version, generation, "
                                    "backward_transfer, worst, gate, sampled, seconds (every set: GET "
                                    "/api/forgetting/jobs/{job_id})")


class QueueView(BaseModel):
    pending: dict[str, list[QueueItem]] = Field(description="by priority, in run order")
    processing: list[QueueItem]
    done: list[QueueItem] = Field(description="most recent first, at most `done_limit` from `done_offset` on "
                                              "(counts.done says how many there are)")
    failed: list[QueueItem] = Field(description="most recent first, with the reason from the .error.json")
    counts: dict[str, int]
    done_offset: int = Field(0, description="done files before the first one listed (most recent first)")


class GpuProcess(BaseModel):
    pid: int
    name: str | None = None
    used_memory_bytes: int | None = None


class Gpu(BaseModel):
    index: int
    name: str
    uuid: str | None = None
    utilization_percent: float | None = None
    memory_utilization_percent: float | None = None
    memory_used_bytes: int | None = None
    memory_total_bytes: int | None = None
    temperature_c: float | None = None
    power_watts: float | None = None
    power_limit_watts: float | None = None
    clock_sm_mhz: int | None = None
    clock_mem_mhz: int | None = None
    processes: list[GpuProcess] = Field(default_factory=list)


class GpuView(BaseModel):
    available: bool
    reason: str | None = Field(None, description="why no GPU data (e.g. no NVIDIA driver)")
    driver_version: str | None = None
    gpus: list[Gpu] = Field(default_factory=list)


class ProcessStats(BaseModel):
    role: Literal["daemon", "trainer", "trainer launcher", "trainer rank", "monitor"] = Field(
        description="trainer launcher: torch's launcher when the trainer runs as several ranks, each a `trainer rank`")
    rank: int | None = Field(None, description="the rank of a `trainer rank` row")
    pid: int | None
    running: bool
    rss_bytes: int | None = None
    cpu_percent: float | None = None
    num_threads: int | None = None


class DiskStats(BaseModel):
    folders: list[str] = Field(description="runtime folders (config names) on this filesystem")
    free_bytes: int
    total_bytes: int
    used_percent: float


class MemoryView(BaseModel):
    ram_total_bytes: int
    ram_available_bytes: int
    ram_used_percent: float
    swap_total_bytes: int
    swap_used_bytes: int
    swap_used_percent: float
    cpu_percent: float
    cpu_count: int
    load_average: list[float]
    processes: list[ProcessStats]
    disks: list[DiskStats]


class ControlResult(BaseModel):
    action: str
    accepted: bool = True
    requested_state: Literal["running", "paused"]
    request_id: str | None = Field(None, description="name of the one-shot request; it disappears once the daemon acted")
    note: str | None = None


class UploadResult(BaseModel):
    name: str = Field(description="file name written into the inbox")
    priority: Literal["high", "normal", "low"]
    size: int


Grid = dict[str, list[list[float | None]]]  # measure -> one list per layer, one value per kind (null: no LoRA there)
Totals = dict[str, list[float | None]]  # measure -> one value per layer (or per kind)


class MoverModel(BaseModel):
    layer: int = Field(description="layer index (-1: outside the numbered layers)")
    kind: str
    measure: str = Field(description="what `value` is")
    value: float | None


class ActivitySample(BaseModel):
    job_id: str
    step: int
    global_step: int
    t: float
    final: bool = Field(description="the sample at a file's last step")
    layers: list[int]
    kinds: list[str]
    values: Grid = Field(description="update (‖ΔW‖_F), relative (/‖W₀‖_F), change (since the previous sample), "
                                     "relative_change, grad_a, grad_b per module")
    per_layer: Totals = Field(description="sqrt of the sum of squares over each layer's modules (relative: of the update over ‖W₀‖)")
    per_kind: Totals
    top_movers: list[MoverModel]


class ActivitySeries(BaseModel):
    layers: list[int] = Field(description="the layers the series holds (all, or the top ones at the latest sample)")
    measure: str
    global_steps: list[int]
    t: list[float]
    job_ids: list[str]
    values: list[list[float | None]] = Field(description="per sample, the per-layer total of `measure` for each of `layers`")


class ActivityView(BaseModel):
    latest: ActivitySample | None = Field(description="the newest sample with its full grid; null before the first")
    series: ActivitySeries
    total_rows: int = Field(description="samples in the requested range before downsampling")
    downsampled: bool


class FileActivity(BaseModel):
    job_id: str
    original_name: str | None
    steps: int | None
    adapter_version: int | None
    layers: list[int]
    kinds: list[str]
    values: Grid = Field(description="moved (‖ΔW after − ΔW before‖_F), moved_relative (/‖W₀‖_F), base (‖W₀‖_F) per module")
    per_layer: Totals
    per_kind: Totals
    top: list[MoverModel] = Field(description="the modules the file moved most, relative to ‖W₀‖")
