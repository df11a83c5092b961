"""The status schema, defined once: what `status/training_status.json` holds.

    from daemon.schema import TrainingStatus
    st = TrainingStatus(status=ServiceStatus.TRAINING, current_step=3)
    st.to_dict()                      # the JSON body: enums as strings, times as ISO 8601 UTC

The service fills and writes it (daemon.status.StatusWriter), the CLI reads
the JSON, and the monitor builds its response model and OpenAPI schema from
these fields (monitor/models.py), so a field added here reaches the writer,
every reader and the API docs at once. Each field carries its help text; a
field marked `unix_time` is Unix seconds here and an ISO 8601 UTC string in
the JSON. Standard library only.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from daemon.states import DesiredState, PauseReason, ServiceStatus

SCHEMA_VERSION = 1


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A field with its help text (`metadata["help"]`); lists and dicts get a factory."""
    if isinstance(default, (list, dict)):
        return field(default_factory=type(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


def iso(t: float | None) -> str | None:
    """Unix seconds as the status' ISO 8601 UTC string ("2026-11-22T02:03:01.123Z")."""
    if t is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int((t % 1) * 1000):03d}Z"


@dataclass
class Mover:
    """One LoRA module among the most active ones."""

    layer: int = _f(0, "layer index (-1: outside the numbered layers)")
    kind: str = _f("", "module kind (q_proj, down_proj, ...)")
    measure: str = _f("", "what `value` is: relative_change (recent change / ‖W₀‖), or relative at a first sample")
    value: float | None = _f(None, "its value")


@dataclass
class LayerActivitySummary:
    """Per-layer LoRA activity at the latest sample, compact: totals per layer and per kind, top movers.

    Its size grows with the number of layers only (5 numbers per layer, 4
    significant digits); the full per-module grid is in history.db.
    """

    job_id: str | None = _f(None, "the file in training when it was sampled")
    step: int = _f(0, "the file's optimizer step it was sampled at")
    global_step: int = _f(0, "the adapter's global step it was sampled at")
    sampled_at: str | None = _f(None, "when it was sampled (ISO 8601 UTC)")
    layers: list[int] = _f([], "layer indices, in the order of the per-layer lists (-1: outside the numbered layers)")
    kinds: list[str] = _f([], "module kinds, in the order of the per-kind lists")
    per_layer: dict[str, list[float | None]] = _f({}, "per measure (update, relative, change, grad_a, grad_b) one "
                                                      "total per layer: sqrt of the sum of squares over its modules")
    per_kind: dict[str, list[float | None]] = _f({}, "per measure one total per module kind")
    top_movers: list[Mover] = _f([], "the modules that changed most since the previous sample, relative to ‖W₀‖")


@dataclass
class DiskFullStatus:
    """Why and where the daemon paused for disk space (while `pause_reason` is disk_full)."""

    folder: str = _f("", "the folder whose filesystem is full, or below service.min_free_bytes")
    free_bytes: int = _f(0, "bytes free there at the last check")
    min_free_bytes: int = _f(0, "the threshold (service.min_free_bytes; 0: none)")
    site: str = _f("", "what could not be written: checkpoint, adapter, status, history, queue, intake, "
                       "or threshold (nothing failed: free space fell below min_free_bytes)")
    message: str = _f("", "the error, as the writer got it")
    since: str | None = _f(None, "when the pause began (ISO 8601 UTC)")
    kind: str = _f("full", "full: no space, or below the threshold (pause_reason disk_full); unwritable: the folder "
                           "cannot be written at all, read-only or not permitted (pause_reason unwritable)")


@dataclass
class RankFigures:
    """One trainer process (rank) in the latest optimizer step, as rank 0 reported it."""

    rank: int = _f(0, "the process' rank (rank 0 talks to the service)")
    node: int = _f(0, "index of the machine (node) it runs on")
    host: str = _f("", "host name of that machine")
    device: str = _f("", "cpu or cuda:N")
    tokens: int = _f(0, "real (non-pad) tokens it computed in the step")
    compute_seconds: float | None = _f(None, "its forward and backward time in the step, without the wait for the others")
    tokens_per_sec: float | None = _f(None, "its tokens over its compute_seconds")
    rss_bytes: int | None = _f(None, "its resident memory")
    gpu_memory_bytes: int | None = _f(None, "its peak CUDA memory allocated (torch.cuda.max_memory_allocated); null on CPU")


@dataclass
class DistributedSetup:
    """How the ranks train together (from the trainer's `ready`)."""

    strategy: str | None = _f(None, "ddp or fsdp")
    backend: str | None = _f(None, "torch.distributed backend: gloo or nccl")
    nnodes: int = _f(1, "machines (nodes) the ranks run on")


@dataclass
class TrainingStatus:
    """The live snapshot of one traind instance, rewritten atomically by the service."""

    schema_version: int = _f(SCHEMA_VERSION, "version of this layout; bumped when a field changes meaning")
    status: ServiceStatus = _f(ServiceStatus.IDLE, "what the daemon is doing")
    detail: str = _f("", "free text: 'loading model', 'waiting for files', ...")
    current_file: str | None = _f(None, "original name of the file in training")
    job_id: str | None = _f(None, "queue name of the file in training")
    current_step: int = _f(0, "optimizer steps done in the current file")
    total_steps: int = _f(0, "optimizer steps the current file takes")
    global_step: int = _f(0, "optimizer steps the adapter has taken over all files")
    epoch: float = _f(0.0, "epochs of the current file done, as a fraction")
    loss: float | None = _f(None, "mean loss of the last optimizer step over its trainable tokens")
    lr: float | None = _f(None, "learning rate of the last step")
    tokens_per_sec: float | None = _f(None, "input tokens per second, recent average")
    eta_seconds: float | None = _f(None, "estimated seconds until the current file is done")
    eval_loss: float | None = _f(None, "last held-out loss of the current file")
    preference: dict | None = _f(None, "a preference file in training: `reward_accuracy` and `reward_margin` of "
                                      "the last step, `before` and `held_out` (the held-out pairs as the file began "
                                      "and at its last eval: `pairs`, `loss`, `accuracy`, `margin`, "
                                      "`reward_accuracy`, `reward_margin`); null otherwise")
    queue: dict[str, int] = _f({}, "files per queue folder: pending_high, pending_normal, pending_low, pending, "
                                   "processing, done, failed")
    device: str | None = _f(None, "cpu or cuda")
    compute_dtype: str | None = _f(None, "float32, bfloat16 or float16")
    quantization: str | None = _f(None, "nf4, fp4 or none (model.quantization auto resolved)")
    base_model: str | None = _f(None, "the base in use: the configured one (generation 0) or a consolidated folder")
    generation: int = _f(0, "the base's generation: 0 for the configured base, N after N consolidations")
    adapter_version: int | None = _f(None, "the adapter version published last (adapters/current.json)")
    settings_notes: list[str] = _f([], "settings traind chose for this base and why: model.quantization auto's choice, "
                                      "what nf4 costs on the CPU, the embedded model's own learning rate")
    desired_state: DesiredState = _f(DesiredState.RUNNING, "the desired state the daemon has seen")
    pause_reason: PauseReason | None = _f(None, "why training is held: user (desired state paused), forgetting "
                                                "(the forgetting gate held a version or rolled a file back), disk_full "
                                                "(resumes by itself once space is back) or unwritable (a runtime "
                                                "folder cannot be written; resumes once it can); null when not held")
    disk_full: DiskFullStatus | None = _f(None, "folder, free bytes and failed write of a disk_full or unwritable "
                                                "pause; null otherwise")
    pid: int | None = _f(None, "the service's process id")
    trainer_pid: int | None = _f(None, "the trainer child's process id")
    started_at: float | None = _f(None, "when the service started", unix_time=True)
    updated_at: float | None = _f(None, "when this snapshot was written", unix_time=True)
    write_interval_seconds: float = _f(2.0, "the service rewrites this file at least this often")
    last_error: str | None = _f(None, "the latest error, until a file next trains through")
    micro_batch_split: int = _f(1, "pieces each micro-batch runs in: more than 1 after the trainer ran out of memory "
                                   "(gradient accumulation doubled each time; the effective batch is the same)")
    auto_generate: dict | None = _f(None, "the idle-time generator (auto_generate.enabled): state (waiting, generating, "
                                          "backing_off, daily_cap), source, files_today, records_total, last_file, "
                                          "last_at, last_error, next_try_at; null when off")
    world_size: int = _f(1, "trainer processes (ranks) training together; 1 = a single process")
    distributed: DistributedSetup | None = _f(None, "strategy, backend and nodes of a multi-process trainer; "
                                                    "null with one process")
    ranks: list[RankFigures] | None = _f(None, "per-rank figures of the latest step, ordered by rank; null with one "
                                               "process, and cleared with the other live figures")
    slowest_rank: int | None = _f(None, "the rank with the longest compute_seconds in the latest step (the others "
                                        "wait for it); null with one process")
    held: dict | None = _f(None, "the adapter version the forgetting gate holds (forgetting.action hold): version, "
                                 "job_id, file, message; `trainctl adapters accept|reject VERSION` decides; null "
                                 "when none")
    layer_activity_summary: LayerActivitySummary | None = _f(None, "per-layer LoRA activity at the latest sample "
                                                                   "(every activity.every_steps steps and at each file's end)")
    forgetting: dict | None = _f(None, "what the last file's forgetting scoring found (daemon/forgetting_view.py summary): "
                                       "job_id, original_name, version, generation, outcome (done, held, failed), "
                                       "worst {id, change}, backward_transfer {loss, accuracy}, gate {action, "
                                       "tripped, over, message}, probes [{id, name, loss, change, drift, over}] "
                                       "(at most 20), probes_over, sets_over, sampled; null before the first")

    def to_dict(self) -> dict[str, Any]:
        """The JSON body: enums as their values, `unix_time` fields as ISO 8601 UTC strings."""
        out = dataclasses.asdict(self)  # a deep copy: the caller may go on changing this status
        for f in dataclasses.fields(self):
            if f.metadata.get("unix_time"):
                out[f.name] = iso(out[f.name])
            elif isinstance(out[f.name], Enum):
                out[f.name] = out[f.name].value
        return out
