"""Typed, frozen config: load `config.json`, validate everything at once.

    from daemon.config import load_config
    cfg = load_config("config.json")          # raises ConfigError listing every problem
    cfg.paths.inbox                           # absolute Path, resolved against the config's folder

Relative runtime paths resolve against the folder of the config file, so a copy
of `config.json` in an empty folder is a complete, separate instance. Every key
has a help text (`trainctl config explain` prints them; the README table is
made from them). Standard library only.
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from daemon.bases import PACKAGE_PREFIX, package_file, problems_with
from daemon.errors import ConfigError

EMBEDDED_MODEL = "embedded:tiny-qwen3"


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with a help text; lists/dicts get a factory."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass(frozen=True)
class PathsConfig:
    inbox: str = _f("inbox", "Drop JSONL files here; sub-folders high/ and low/ set the priority.")
    queue: str = _f("queue", "Queue folders pending/{high,normal,low}, processing, done, failed.")
    status: str = _f("status", "Live status JSON, history database, control files, locks.")
    adapters: str = _f("adapters", "The adapter trained so far (adapters/current) and archived ones.")
    checkpoints: str = _f("checkpoints", "Mid-file checkpoints used to resume after a crash or stop.")
    logs: str = _f("logs", "Daily logs: daemon_YYYYMMDD.log, trainer_YYYYMMDD.log.")
    models: str = _f("models", "Cache for the embedded base model built on first start, and for GGUF bases converted to Hugging Face folders.")
    consolidated: str = _f("consolidated_models", "Bases made by consolidation, one folder each with lineage.json (never deleted by traind).")
    preferences: str = _f("preferences", "Preference pairs saved from the dashboard's playground, one JSONL file per day: drop one into inbox/ to train on it.")


@dataclass(frozen=True)
class IntakeConfig:
    settle_seconds: float = _f(1.0, "A file is taken once its size and mtime held still this long (and no process holds it open for writing, where /proc tells).")
    recreated_settle_seconds: float = _f(30.0, "A name taken in the last 10 minutes that appears again (a writer appending with >>) is taken once it held still this long.")
    scan_interval_seconds: float = _f(2.0, "The main loop rescans folders at least this often (watchdog only wakes it early).")
    ignore_suffixes: list = _f([".tmp", ".part", ".partial", ".crdownload", ".swp"], "Names ending so are never taken from inbox/.")
    max_file_bytes: int = _f(0, "Refuse files larger than this many bytes (0: no limit).")


@dataclass(frozen=True)
class DataConfig:
    max_length: int = _f(256, "Tokens per example; longer examples are truncated (locked key).", locked=True)
    bad_line_policy: Literal["skip", "reject"] = _f("skip", "skip: train the good lines if bad ones stay under the limits; reject: any bad line fails the file.")
    max_bad_lines: int = _f(10, "With skip: more bad lines than this fails the file.")
    max_bad_fraction: float = _f(0.1, "With skip: a larger fraction of bad lines fails the file.")
    max_line_bytes: int = _f(1_048_576, "A line longer than this is a bad line (over-long).")
    eval_fraction: float = _f(0.05, "Fraction of each file's examples held out for eval loss (0: no eval).")
    eval_max_examples: int = _f(64, "At most this many eval examples per file.")
    shuffle_buffer: int = _f(1024, "Examples shuffled within a window of this size (streaming, seeded).")
    group_by_length: bool = _f(True, "Within each shuffle window, put examples of similar length in the same micro-batch (almost no padding); the order is seeded and kept in checkpoints.")
    packing: bool = _f(True, "Pack a micro-batch's examples into rows as wide as its longest, with no attention across examples (same loss as padding, less compute).")
    replay_fraction: float = _f(0.0, "Share of each optimizer step's examples replayed from files the adapter learnt before (their train lines, never their held-out ones; bytes from queue/done/), added to the file's own: 0.25 adds one replayed example per three of the file's; 0: off.")


@dataclass(frozen=True)
class ModelConfig:
    quantization: Literal["auto", "nf4", "fp4", "none"] = _f("auto", "4-bit base through bitsandbytes (nf4/fp4), or none; auto: nf4 on CUDA, and on the CPU none where the base fits memory (nf4 there is slower and saves little; docs/PERFORMANCE.md), nf4 where it does not; resolved once per adapter and kept in its manifest (locked key).", locked=True)
    double_quant: bool = _f(True, "Quantise the quantisation constants too (QLoRA double quantisation).")
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = _f("auto", "auto: bfloat16 on CUDA that supports it, float16 on older CUDA; on the CPU bfloat16 where it has native bf16 (AVX512-BF16, AMX), else float32.")
    device: Literal["auto", "cpu", "cuda"] = _f("auto", "auto: CUDA when available, else CPU.")
    gradient_checkpointing: bool = _f(False, "Trade compute for memory on large bases.")
    attention: Literal["auto", "sdpa", "eager", "flash_attention_2"] = _f("auto", "auto: flash_attention_2 on CUDA where the flash-attn package is installed (packed rows run as variable-length attention), else the model's default (sdpa where it has it); on a CPU computing in bf16, SDPA runs rows of up to 512 tokens in fp32, where the CPU kernel is faster (speed.fp32_short_attention).")


@dataclass(frozen=True)
class LoraConfig:
    r: int = _f(8, "LoRA rank (locked key).", locked=True)
    alpha: int = _f(16, "LoRA alpha; the update is scaled by alpha/r.")
    dropout: float = _f(0.05, "Dropout on the LoRA input.")
    target_modules: list = _f(["q_proj", "k_proj", "v_proj", "o_proj"], "Module names that get LoRA (locked key).", locked=True)
    freeze_stalled: bool = _f(False, "Freeze what stopped moving (daemon/train/freezing.py): a layer (or module, freeze_unit) whose LoRA change between checks stays under freeze_threshold x the median of the trainable ones for freeze_patience checks stops taking gradients; frozen layers below every trainable one are skipped in the backward pass; each new file's first step re-tests the frozen ones and thaws those its gradients need. Not with several processes. See docs/PERFORMANCE.md for what it measured.")
    freeze_unit: Literal["layer", "module"] = _f("layer", "What freezes as one: a whole layer (its LoRA modules together), or each module alone.")
    freeze_scope: Literal["bottom", "any"] = _f("bottom", "bottom: a layer freezes only once every layer below it is frozen (the frozen run is skipped in the backward pass: the saving); any: wherever it stalls (saves the LoRA gradients of the frozen modules only).")
    freeze_every_steps: int = _f(10, "Check for stalled layers every N optimizer steps (deterministic: a resume checks at the same steps).")
    freeze_threshold: float = _f(0.5, "Stalled: the change since the previous check, relative to the base weight, under this fraction of the median over the trainable layers (modules of the same kind, with freeze_unit module).")
    freeze_patience: int = _f(3, "Checks in a row a layer must stall before it freezes.")
    freeze_max_fraction: float = _f(0.5, "At most this fraction of the layers (modules) frozen at once.")
    thaw_ratio: float = _f(1.0, "A new file's first step computes every gradient: a frozen layer thaws when its gradient, relative to its base weight, reaches this fraction of the median over the trainable ones.")


@dataclass(frozen=True)
class TrainingConfig:
    micro_batch_size: int = _f(4, "Examples per forward pass (locked key).", locked=True)
    grad_accum_steps: int = _f(1, "Micro-batches per optimizer step (locked key).", locked=True)
    learning_rate: float = _f(2e-4, "Peak AdamW learning rate (with the embedded base, the default becomes 0.002: that tiny model needs it to learn within a minute).")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    warmup_steps: int = _f(5, "Linear warmup steps at the start of each file.")
    schedule: Literal["cosine", "constant"] = _f("cosine", "Learning-rate schedule after warmup, per file.")
    min_lr_ratio: float = _f(0.1, "Cosine ends at learning_rate * min_lr_ratio.")
    epochs_per_file: int = _f(1, "Passes over each file.")
    max_grad_norm: float = _f(1.0, "Clip gradients to this norm (0: no clipping).")
    seed: int = _f(1234, "Seed for LoRA init, data order, eval split and dropout.")
    checkpoint_every_steps: int = _f(20, "Write a resumable checkpoint every N optimizer steps (and at stop).")
    keep_checkpoints: int = _f(2, "Checkpoints kept per file in progress.")
    eval_every_steps: int = _f(0, "Eval loss every N steps (0: once at the end of each file).")
    cpu_threads: int = _f(0, "Torch CPU threads in the trainer; 0: every core, one fewer while other processes want CPU (speed.thread_governor).")
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit"] = _f("adamw", "AdamW; or bitsandbytes' 8-bit AdamW (CUDA), paged to host memory under pressure (large bases) (locked key).", locked=True)
    compile: bool = _f(False, "Compile the model's decoder blocks with torch.compile once per loaded model (about a minute of compiling on a small CPU; see docs/PERFORMANCE.md for when it pays).")


@dataclass(frozen=True)
class SpeedConfig:
    """The trainer's speed levers. Each is on by default and changes the numbers by rounding at most, so none is
    locked; the trainer's log says at start what each did (`speed levers on ...`) and so does its `ready`."""

    fused_lora: bool = _f(True, "Each LoRA layer adds its product to the base's output in the same pass (one addmm; on an fp32 base, with its backward written out); false: PEFT's own forward.")
    norms_backward: bool = _f(True, "The base's RMSNorms keep their output, bit for bit, but take a closed-form backward (fewer passes, no fp32 copy kept); not with training.compile. false: transformers' own.")
    label_only_logits: bool = _f(True, "The LM head only at positions that have a label, not at every position (checked against the full forward on each loaded model).")
    last_block: bool = _f(True, "With label_only_logits: the last decoder block computes its queries, attention and MLP only where the loss reads (checked on each loaded model).")
    lora_in_compute_dtype: bool = _f(True, "Where the model computes in bf16/fp16, the LoRA factors multiply in that dtype too (their weights and AdamW stay fp32); false: PEFT's fp32 route.")
    fp32_short_attention: bool = _f(True, "On a CPU computing in bf16/fp16 with model.attention auto, rows of up to 512 tokens attend in fp32, where the CPU kernel is faster; false: SDPA in the compute dtype.")
    width_pieces: bool = _f(True, "On the CPU with packed rows, a micro-batch whose lengths spread runs in pieces of similar length where that saves more padding than a forward costs (same gradient).")
    thread_governor: bool = _f(True, "With training.cpu_threads 0: one thread fewer while other processes want the CPU; false: every core, always.")


@dataclass(frozen=True)
class ActivityConfig:
    every_steps: int = _f(50, "Sample per-layer LoRA activity every N optimizer steps, and always at the end of each file (0: only there).")
    min_interval_seconds: float = _f(10.0, "...but not more often than this, so fast steps on a small model do not fill the history.")
    intruders: bool = _f(False, "With each sample, count intruder dimensions per module (daemon/train/intruders.py): top singular directions of the LoRA update as strong as the base's k-th (intruders_min_strength) and unlike all of the base's top intruders_top_k singular vectors (cosine under intruders_threshold). The base's vectors are computed once per loaded base.")
    intruders_top_k: int = _f(16, "The base's top singular vectors (per module) an update direction is compared with.")
    intruders_threshold: float = _f(0.5, "An update direction whose largest cosine similarity with those is under this is an intruder (\"LoRA vs full fine-tuning: an illusion of equivalence\" uses 0.5 and below).")
    intruders_min_strength: float = _f(0.1, "...and whose singular value reaches this fraction of the base's k-th (intruders_top_k) singular value: weaker ones do not change what the layer does.")


@dataclass(frozen=True)
class AdaptersConfig:
    keep_last: int = _f(50, "Adapter versions kept in adapters/ (the newest N, plus the current one and every pinned one; 0: keep all).")


@dataclass(frozen=True)
class EvalConfig:
    file: str = _f("", "Kept for older configs: a probe file (see forgetting.probe_files), scored before and after every file; empty: none.")
    max_examples: int = _f(200, "Kept for older configs: examples of eval.file scored (its first N).")


@dataclass(frozen=True)
class ForgettingConfig:
    enabled: bool = _f(True, "After every file, before its version becomes current, score the probe files and the keep-sets of the files learnt before it (loss and token accuracy on the same tokens each time): the forgetting matrix.")
    keep_examples: int = _f(16, "Each trained file leaves its first N held-out examples (data.eval_fraction picks them; never trained on) as its keep-set: what the model must keep of it.")
    probe_files: list = _f([], "JSONL files the model must not get worse on (general knowledge, style, safety), scored after every file (relative paths from the config's folder); eval.file is one too.")
    probe_max_examples: int = _f(200, "Examples of each probe file scored (its first N).")
    budget_fraction: float = _f(0.15, "Scoring may take at most this share of the file's training time; when the sets outgrow it, the same first examples of every set are scored (said in the figures).")
    min_budget_seconds: float = _f(10.0, "...but never less than this many seconds (a file that trains in a second may still be scored whole).")
    max_probe_increase: float = _f(0.10, "The gate: a probe whose loss rose by more than this fraction against the version before the file trips it.")
    max_keep_increase: float = _f(0.25, "The gate: an earlier file's keep-set whose loss rose by more than this fraction against right after it was learnt trips it.")
    max_intruders_increase: int = _f(0, "With activity.intruders: a warning event when the file raised the intruder count by more than this (0: no warning). A warning only: it never holds or rolls back.")
    action: Literal["warn", "hold", "rollback"] = _f("warn", "What a tripped gate does: warn (the version becomes current; an event, a webhook and the status say what was forgotten); hold (the version is kept aside, training pauses until `trainctl adapters accept|reject VERSION`); rollback (the adapter goes back, the file fails with reason forgetting, training pauses).")


@dataclass(frozen=True)
class TensorBoardConfig:
    enabled: bool = _f(False, "Write TensorBoard event files (loss, lr, tokens/s, eval loss, per-layer activity); needs `pip install traind[tensorboard]`.")
    dir: str = _f("logs/tensorboard", "Where the event files go (relative paths from the config's folder).")


@dataclass(frozen=True)
class AutoGenerateConfig:
    enabled: bool = _f(False, "Ask a generator for data once the queue has been empty for idle_seconds.")
    source: Literal["builtin", "http", "command"] = _f("builtin", "builtin (puzzles with checkable answers), http (GET url) or command (stdout JSONL).")
    idle_seconds: float = _f(300.0, "How long the queue must stay empty before a request.")
    count: int = _f(200, "Records asked for per request (http gets ?count=N, a command $TRAIND_COUNT).")
    url: str = _f("", "For source http: a loopback URL answering JSONL or a JSON list of records.")
    command: list = _f([], "For source command: the argv to run; its stdout is JSONL.")
    timeout_seconds: float = _f(60.0, "A request that takes longer has failed (then back-off: 30 s doubling to 1 h).")
    max_files_per_day: int = _f(50, "At most this many generated files per day (UTC).")
    priority: Literal["high", "normal", "low"] = _f("low", "The inbox folder generated files go to.")


@dataclass(frozen=True)
class GuardConfig:
    loss_spike_factor: float = _f(0.0, "A step whose loss is above this many times the file's recent mean loss stops the file (adapter restored, file failed, daemon paused); 0: off. Non-finite losses and gradients always stop it.")
    min_steps: int = _f(20, "Steps into a file before the spike guard judges (its recent mean needs them).")


@dataclass(frozen=True)
class PreferenceConfig:
    loss: Literal["sigmoid", "simpo"] = _f("sigmoid", "Loss of preference files ({prompt, chosen, rejected}): sigmoid is DPO (Rafailov et al. 2023) against the adapter as it was at the file's start (its log-probabilities computed in a first pass, kept with the checkpoints); simpo is SimPO (Meng et al. 2024), reference-free: length-normalised log-probabilities, no first pass.")
    beta: float = _f(0.1, "How sharply the loss rewards the gap: DPO's beta (0.1 in the paper; TRL's default), SimPO's beta (the paper uses 2 to 10).")
    simpo_gamma: float = _f(0.5, "With simpo: the target reward margin gamma (TRL's simpo_gamma; the paper 0.5 to 1.5).")
    sft_weight: float = _f(1.0, "Weight of a supervised term added to each pair's loss: the chosen answer's negative log-likelihood per token (RPO, Pang et al. 2024: 1.0; TRL's rpo_alpha, CPO's cpo_alpha). It keeps the chosen answers likely while the pair's gap grows: on SmolLM2 plain DPO taught a style and broke every answer, with this term it taught the style and kept them (README, Preference files). 0: the plain loss of the paper.")


@dataclass(frozen=True)
class NotifyConfig:
    webhooks: list = _f([], "URLs that get a JSON POST for each event below (empty: none).")
    events: list = _f(["file_done", "file_failed", "paused", "daemon_error", "consolidation_done", "rollback", "forgetting"], "Which events are posted (forgetting: the gate tripped).")
    secret: str = _f("", "Signs each body: X-Traind-Signature: sha256=HMAC-SHA256(secret, body) (empty: unsigned).")
    timeout_seconds: float = _f(5.0, "A delivery that takes longer has failed.")
    max_attempts: int = _f(5, "Tries per delivery, with back-off (1, 2, 4... s); then it is logged and dropped.")


@dataclass(frozen=True)
class ConsolidationConfig:
    save_dtype: Literal["auto", "float32", "bfloat16", "float16"] = _f("auto", "dtype of a consolidated base's weights (the merge itself is fp32); auto: the base's own.")
    damp_intruders: float = _f(0.0, "Scale the adapter's intruder directions (daemon/train/intruders.py, with activity.intruders_* as the thresholds) by 1 - this before merging: 0 merges the adapter as trained, 1 leaves them out. The logit check compares with base + the damped adapter, what is merged; lineage.json says how many were damped.")


@dataclass(frozen=True)
class DistributedConfig:
    nproc_per_node: int = _f(1, "Trainer processes (ranks) on this machine; 1: one plain process, more: started through torchrun, data-parallel.")
    nnodes: int = _f(1, "Machines training together; this one (node_rank 0) runs the service; the others run `traind worker` (README).")
    node_rank: int = _f(0, "This machine's rank among the nodes: 0 on the machine that runs the service (`traind worker --node-rank` sets it on the others).")
    master_addr: str = _f("127.0.0.1", "Address of node 0 that the other nodes reach for the rendezvous (loopback for one machine).")
    master_port: int = _f(29500, "TCP port of the rendezvous on node 0.")
    backend: Literal["auto", "gloo", "nccl"] = _f("auto", "Collectives: auto: nccl on CUDA, gloo on the CPU.")
    strategy: Literal["ddp", "fsdp"] = _f("ddp", "ddp: every rank holds the whole model, gradients are averaged; fsdp: the base's weights are sharded across ranks (CUDA; a base that does not fit one GPU).")
    timeout_seconds: float = _f(600.0, "A collective (gradient all-reduce) that waits longer than this ends the group: a hung rank becomes a crash the service restarts.")


@dataclass(frozen=True)
class ServeConfig:
    enabled: bool = _f(True, "bin/start_all.sh starts `traind serve` beside the daemon: an OpenAI-compatible endpoint that answers with the current version (and the dashboard's playground).")
    host: str = _f("127.0.0.1", "Address `traind serve` binds; off loopback is reachable from other machines (every call needs the token in any case).")
    port: int = _f(8090, "Port of `traind serve` (`--port` overrides it).")
    device: Literal["auto", "cpu", "cuda"] = _f("auto", "Where it generates: auto is CUDA when a GPU is present (a second copy of the base beside the trainer's), else the CPU.")
    cpu_threads: int = _f(1, "CPU threads for generation (0: every core). One leaves the cores to a training daemon beside it.")
    nice: int = _f(10, "CPU niceness increment of the serving process: on a busy CPU the trainer comes first.")
    max_concurrent: int = _f(2, "Requests generating at once (their tokens interleave); more wait in the queue.")
    max_queue: int = _f(16, "Requests waiting for a slot; beyond this a request is refused at once (429).")
    queue_timeout_seconds: float = _f(120.0, "A request that waited this long for a slot is refused (503).")
    max_tokens: int = _f(1024, "The largest max_tokens a request may ask for (400 above it).")
    default_max_tokens: int = _f(256, "Tokens generated when a request names no max_tokens.")
    max_prompt_tokens: int = _f(4096, "The longest prompt accepted, in tokens after the chat template (400 above it; never beyond the model's context).")
    follow_seconds: float = _f(1.0, "How often it looks at adapters/current.json for a newly published version (a request also looks when it starts).")
    max_bases: int = _f(2, "Bases held in memory at once: the current generation's, and one more for a version of another generation asked by name.")
    max_adapters: int = _f(8, "Adapter versions held in memory at once (the least recently used idle ones are let go).")


@dataclass(frozen=True)
class ServiceConfig:
    status_interval_seconds: float = _f(2.0, "Rewrite training_status.json at least this often.")
    max_crashes_per_file: int = _f(3, "After this many trainer crashes on one file it goes to failed/.")
    restart_backoff_seconds: float = _f(2.0, "Wait before restarting a crashed trainer (doubles per crash, max 60 s).")
    stop_timeout_seconds: float = _f(300.0, "A stop waits this long for the trainer's checkpoint before killing it.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = _f("INFO", "Log level of daemon and trainer logs.")
    log_keep_days: int = _f(30, "Daily log files older than this are deleted (0: kept for ever).")
    log_max_bytes: int = _f(1 << 30, "...and the oldest go while one kind (daemon, trainer) totals more than this (0: no limit).")
    min_free_bytes: int = _f(268_435_456, "Pause (reason disk_full) while a runtime folder's filesystem has less free than this, before writes fail; set it above a checkpoint's size (0: pause only when a write fails).")
    disk_check_seconds: float = _f(5.0, "While paused for disk, check free space this often; after a failed write, wait at least this long (doubling, max 5 min) before writing again.")


@dataclass(frozen=True)
class Config:
    base_model: str = _f(EMBEDDED_MODEL, f"A local Hugging Face model folder, a .gguf file (converted once into a cached folder under paths.models), 'pkg:<python package>/<file>' (a model shipped in an installed package), or {EMBEDDED_MODEL!r} (built locally, no download) (locked key).", locked=True)
    paths: PathsConfig = field(default_factory=PathsConfig, metadata={"help": "Runtime folders."})
    intake: IntakeConfig = field(default_factory=IntakeConfig, metadata={"help": "How files are taken from inbox/."})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "Data validation and tokenisation."})
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "Base model loading."})
    lora: LoraConfig = field(default_factory=LoraConfig, metadata={"help": "The LoRA adapter."})
    training: TrainingConfig = field(default_factory=TrainingConfig, metadata={"help": "Optimisation."})
    speed: SpeedConfig = field(default_factory=SpeedConfig, metadata={"help": "Speed levers: each on by default, each to rounding; turn one off to compare or to work around a problem."})
    activity: ActivityConfig = field(default_factory=ActivityConfig, metadata={"help": "Per-layer LoRA activity."})
    adapters: AdaptersConfig = field(default_factory=AdaptersConfig, metadata={"help": "Published adapter versions."})
    tensorboard: TensorBoardConfig = field(default_factory=TensorBoardConfig, metadata={"help": "TensorBoard event files (optional)."})
    auto_generate: AutoGenerateConfig = field(default_factory=AutoGenerateConfig, metadata={"help": "Data generated when idle."})
    guard: GuardConfig = field(default_factory=GuardConfig, metadata={"help": "Guard rails that stop a file that goes wrong."})
    preference: PreferenceConfig = field(default_factory=PreferenceConfig, metadata={"help": "Preference files (chosen/rejected pairs): DPO or SimPO."})
    notify: NotifyConfig = field(default_factory=NotifyConfig, metadata={"help": "Webhooks on events (file done, failed, paused, errors)."})
    eval: EvalConfig = field(default_factory=EvalConfig, metadata={"help": "Kept for older configs: one probe file (forgetting.probe_files)."})
    forgetting: ForgettingConfig = field(default_factory=ForgettingConfig, metadata={"help": "What the model must keep: probes and earlier files scored after every file, and a gate."})
    consolidation: ConsolidationConfig = field(default_factory=ConsolidationConfig, metadata={"help": "Merging the adapter into a new base."})
    distributed: DistributedConfig = field(default_factory=DistributedConfig, metadata={"help": "Several trainer processes and machines (torchrun)."})
    service: ServiceConfig = field(default_factory=ServiceConfig, metadata={"help": "The daemon process."})
    serve: ServeConfig = field(default_factory=ServeConfig, metadata={"help": "`traind serve`: the model as an OpenAI-compatible endpoint, following each new version."})
    # Not a key: where the config was loaded from; relative paths resolve against it.
    root: Path = field(default=Path("."), compare=False, metadata={"internal": True})
    # Not a key: values traind chose itself for this base (the embedded model's own learning rate), each said
    # in a sentence for the log and the status.
    tuned: tuple = field(default=(), compare=False, metadata={"internal": True})

    def resolve(self, text: str) -> Path:
        """A path from the config: `~` expanded, relative ones taken from the config's folder."""
        p = Path(text).expanduser()
        return p if p.is_absolute() else (self.root / p)

    def path(self, name: str) -> Path:
        """Absolute runtime folder `name` (a field of PathsConfig)."""
        return self.resolve(getattr(self.paths, name))

    @property
    def tensorboard_dir(self) -> Path:
        return self.resolve(self.tensorboard.dir)

    @property
    def eval_file(self) -> Path | None:
        """eval.file made absolute, or None when no eval set is configured."""
        if not self.eval.file:
            return None
        return self.resolve(self.eval.file)

    @property
    def probe_paths(self) -> list[Path]:
        """forgetting.probe_files then eval.file (an older config's one probe), absolute, each once."""
        paths = [self.resolve(p) for p in self.forgetting.probe_files]
        if self.eval_file is not None and self.eval_file not in paths:
            paths.append(self.eval_file)
        return paths

    @property
    def base_model_path(self) -> Path | None:
        """The base model folder or .gguf file, or None for the embedded model."""
        if self.base_model == EMBEDDED_MODEL:
            return None
        if self.base_model.startswith(PACKAGE_PREFIX):
            found = package_file(self.base_model)
            return found if isinstance(found, Path) else Path(self.base_model)  # _cross_checks says why not
        return self.resolve(self.base_model)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("root")
        d.pop("tuned")
        return d


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config) if f.name not in ("base_model", "root", "tuned")}
_SECTION_TYPES = {
    "paths": PathsConfig, "intake": IntakeConfig, "data": DataConfig, "model": ModelConfig,
    "lora": LoraConfig, "training": TrainingConfig, "speed": SpeedConfig, "activity": ActivityConfig, "adapters": AdaptersConfig,
    "eval": EvalConfig, "forgetting": ForgettingConfig, "tensorboard": TensorBoardConfig, "auto_generate": AutoGenerateConfig, "guard": GuardConfig, "preference": PreferenceConfig, "notify": NotifyConfig, "consolidation": ConsolidationConfig, "distributed": DistributedConfig, "service": ServiceConfig, "serve": ServeConfig,
}

_NOTIFY_EVENTS_SORTED = ("consolidation_done", "daemon_error", "file_done", "file_failed", "forgetting", "paused", "rollback")
_NOTIFY_EVENTS = set(_NOTIFY_EVENTS_SORTED)  # daemon/service/notify.py EVENTS (it checks they agree)

# Bounds checked after types: (section, key) -> (predicate, what is allowed)
_BOUNDS: dict[tuple[str, str], tuple[typing.Callable[[Any], bool], str]] = {
    ("intake", "settle_seconds"): (lambda v: v >= 0, ">= 0"),
    ("intake", "recreated_settle_seconds"): (lambda v: v >= 0, ">= 0"),
    ("intake", "scan_interval_seconds"): (lambda v: v > 0, "> 0"),
    ("intake", "max_file_bytes"): (lambda v: v >= 0, ">= 0"),
    ("data", "max_length"): (lambda v: 8 <= v <= 1_048_576, "between 8 and 1048576"),
    ("data", "max_bad_lines"): (lambda v: v >= 0, ">= 0"),
    ("data", "max_bad_fraction"): (lambda v: 0 <= v <= 1, "between 0 and 1"),
    ("data", "max_line_bytes"): (lambda v: v >= 64, ">= 64"),
    ("data", "eval_fraction"): (lambda v: 0 <= v < 1, "in [0, 1)"),
    ("data", "eval_max_examples"): (lambda v: v >= 0, ">= 0"),
    ("data", "shuffle_buffer"): (lambda v: v >= 1, ">= 1"),
    ("data", "replay_fraction"): (lambda v: 0 <= v <= 0.9, "in [0, 0.9] (0.9 already adds nine replayed examples to each of the file's own)"),
    ("forgetting", "keep_examples"): (lambda v: v >= 0, ">= 0"),
    ("forgetting", "probe_files"): (lambda v: all(isinstance(x, str) and x for x in v), "a list of file paths"),
    ("forgetting", "probe_max_examples"): (lambda v: v >= 1, ">= 1"),
    ("forgetting", "budget_fraction"): (lambda v: 0 < v <= 1, "in (0, 1]"),
    ("forgetting", "min_budget_seconds"): (lambda v: v >= 0, ">= 0"),
    ("forgetting", "max_probe_increase"): (lambda v: v > 0, "> 0"),
    ("forgetting", "max_keep_increase"): (lambda v: v > 0, "> 0"),
    ("lora", "r"): (lambda v: v >= 1, ">= 1"),
    ("lora", "alpha"): (lambda v: v > 0, "> 0"),
    ("lora", "dropout"): (lambda v: 0 <= v < 1, "in [0, 1)"),
    ("lora", "freeze_every_steps"): (lambda v: v >= 1, ">= 1"),
    ("lora", "freeze_threshold"): (lambda v: 0 < v < 1, "in (0, 1): a fraction of the median change"),
    ("lora", "freeze_patience"): (lambda v: v >= 1, ">= 1"),
    ("lora", "freeze_max_fraction"): (lambda v: 0 < v < 1, "in (0, 1): some layers must keep training"),
    ("lora", "thaw_ratio"): (lambda v: v > 0, "> 0"),
    ("activity", "intruders_top_k"): (lambda v: 1 <= v <= 256, "between 1 and 256"),
    ("activity", "intruders_threshold"): (lambda v: 0 < v < 1, "in (0, 1)"),
    ("activity", "intruders_min_strength"): (lambda v: v >= 0, ">= 0"),
    ("forgetting", "max_intruders_increase"): (lambda v: v >= 0, ">= 0"),
    ("consolidation", "damp_intruders"): (lambda v: 0 <= v <= 1, "between 0 and 1"),
    ("lora", "target_modules"): (lambda v: len(v) > 0 and all(isinstance(x, str) and x for x in v), "a non-empty list of module names"),
    ("training", "micro_batch_size"): (lambda v: v >= 1, ">= 1"),
    ("training", "grad_accum_steps"): (lambda v: v >= 1, ">= 1"),
    ("training", "learning_rate"): (lambda v: 0 < v < 1, "in (0, 1)"),
    ("training", "weight_decay"): (lambda v: v >= 0, ">= 0"),
    ("training", "warmup_steps"): (lambda v: v >= 0, ">= 0"),
    ("training", "min_lr_ratio"): (lambda v: 0 <= v <= 1, "between 0 and 1"),
    ("training", "epochs_per_file"): (lambda v: v >= 1, ">= 1"),
    ("training", "max_grad_norm"): (lambda v: v >= 0, ">= 0"),
    ("training", "checkpoint_every_steps"): (lambda v: v >= 1, ">= 1"),
    ("training", "keep_checkpoints"): (lambda v: v >= 1, ">= 1"),
    ("adapters", "keep_last"): (lambda v: v >= 0, ">= 0"),
    ("service", "log_keep_days"): (lambda v: v >= 0, ">= 0"),
    ("service", "log_max_bytes"): (lambda v: v >= 0, ">= 0"),
    ("eval", "max_examples"): (lambda v: v >= 1, ">= 1"),
    ("guard", "loss_spike_factor"): (lambda v: v == 0 or v > 1, "0 (off) or above 1"),
    ("guard", "min_steps"): (lambda v: v >= 1, ">= 1"),
    ("preference", "beta"): (lambda v: 0 < v <= 100, "in (0, 100]"),
    ("preference", "simpo_gamma"): (lambda v: 0 <= v <= 100, "in [0, 100]"),
    ("preference", "sft_weight"): (lambda v: 0 <= v <= 100, "in [0, 100]"),
    ("auto_generate", "idle_seconds"): (lambda v: v >= 0, ">= 0"),
    ("auto_generate", "count"): (lambda v: 1 <= v <= 1_000_000, "between 1 and 1000000"),
    ("auto_generate", "url"): (lambda v: v == "" or v.startswith(("http://", "https://")), "an http:// or https:// URL"),
    ("auto_generate", "command"): (lambda v: all(isinstance(a, str) for a in v), "a list of strings (argv)"),
    ("auto_generate", "timeout_seconds"): (lambda v: v > 0, "> 0"),
    ("auto_generate", "max_files_per_day"): (lambda v: v >= 0, ">= 0"),
    ("notify", "webhooks"): (lambda v: all(isinstance(u, str) and u.startswith(("http://", "https://")) for u in v),
                             "a list of http:// or https:// URLs"),
    ("notify", "events"): (lambda v: all(e in _NOTIFY_EVENTS for e in v), "a list of: " + ", ".join(_NOTIFY_EVENTS_SORTED)),
    ("notify", "timeout_seconds"): (lambda v: v > 0, "> 0"),
    ("notify", "max_attempts"): (lambda v: v >= 1, ">= 1"),
    ("training", "eval_every_steps"): (lambda v: v >= 0, ">= 0"),
    ("training", "cpu_threads"): (lambda v: v >= 0, ">= 0"),
    ("activity", "every_steps"): (lambda v: v >= 0, ">= 0"),
    ("activity", "min_interval_seconds"): (lambda v: v >= 0, ">= 0"),
    ("distributed", "nproc_per_node"): (lambda v: 1 <= v <= 1024, "between 1 and 1024"),
    ("distributed", "nnodes"): (lambda v: 1 <= v <= 1024, "between 1 and 1024"),
    ("distributed", "node_rank"): (lambda v: v >= 0, ">= 0"),
    ("distributed", "master_port"): (lambda v: 1 <= v <= 65535, "a TCP port (1-65535)"),
    ("distributed", "timeout_seconds"): (lambda v: v >= 10, ">= 10"),
    ("service", "status_interval_seconds"): (lambda v: v > 0, "> 0"),
    ("service", "max_crashes_per_file"): (lambda v: v >= 1, ">= 1"),
    ("service", "restart_backoff_seconds"): (lambda v: v >= 0, ">= 0"),
    ("service", "stop_timeout_seconds"): (lambda v: v > 0, "> 0"),
    ("service", "min_free_bytes"): (lambda v: v >= 0, ">= 0"),
    ("service", "disk_check_seconds"): (lambda v: 0 < v <= 600, "in (0, 600]"),
    ("serve", "port"): (lambda v: 1 <= v <= 65535, "a TCP port (1-65535)"),
    ("serve", "cpu_threads"): (lambda v: v >= 0, ">= 0"),
    ("serve", "nice"): (lambda v: 0 <= v <= 19, "between 0 and 19"),
    ("serve", "max_concurrent"): (lambda v: 1 <= v <= 256, "between 1 and 256"),
    ("serve", "max_queue"): (lambda v: v >= 0, ">= 0"),
    ("serve", "queue_timeout_seconds"): (lambda v: v > 0, "> 0"),
    ("serve", "max_tokens"): (lambda v: v >= 1, ">= 1"),
    ("serve", "default_max_tokens"): (lambda v: v >= 1, ">= 1"),
    ("serve", "max_prompt_tokens"): (lambda v: v >= 1, ">= 1"),
    ("serve", "follow_seconds"): (lambda v: 0 < v <= 10, "in (0, 10] (a new version must be served within 10 s)"),
    ("serve", "max_bases"): (lambda v: v >= 1, ">= 1"),
    ("serve", "max_adapters"): (lambda v: v >= 1, ">= 1"),
}


_MAY_BE_EMPTY = {("eval", "file"), ("notify", "secret"), ("auto_generate", "url")}  # strings where "" means "none"


def _check_type(value: Any, hint: Any) -> str | None:
    """None when `value` fits `hint`, else what was expected."""
    if typing.get_origin(hint) is Literal:
        choices = typing.get_args(hint)
        return None if value in choices else "one of " + ", ".join(repr(c) for c in choices)
    if hint in ("bool", bool):
        return None if isinstance(value, bool) else "true or false"
    if hint in ("int", int):
        return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if hint in ("float", float):
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else "a number"
    if hint in ("str", str):
        return None if isinstance(value, str) and value else "a non-empty string"
    if hint in ("list", list):
        return None if isinstance(value, list) else "a list"
    return None


def _build_section(name: str, cls: type, raw: Any, problems: list[str]) -> Any:
    if not isinstance(raw, dict):
        problems.append(f"`{name}` must be an object, got {type(raw).__name__}")
        return cls()
    hints = typing.get_type_hints(cls, include_extras=False)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in sorted(set(raw) - known):
        problems.append(f"`{name}.{key}` is not a known key (known: {', '.join(sorted(known))})")
    values = {}
    for key in sorted(set(raw) & known):
        expected = None if (name, key) in _MAY_BE_EMPTY and raw[key] == "" else _check_type(raw[key], hints[key])
        if expected:
            problems.append(f"`{name}.{key}` = {raw[key]!r} is not valid; use {expected}")
            continue
        bound = _BOUNDS.get((name, key))
        if bound and not bound[0](raw[key]):
            problems.append(f"`{name}.{key}` = {raw[key]!r} is out of range; must be {bound[1]}")
            continue
        values[key] = float(raw[key]) if hints[key] in (float, "float") else raw[key]
    return cls(**values)


def config_from_dict(raw: Any, root: Path, source: str = "config") -> Config:
    """Build and validate a Config from parsed JSON; raise ConfigError with every problem."""
    problems: list[str] = []
    if not isinstance(raw, dict):
        raise ConfigError([f"the top level must be a JSON object, got {type(raw).__name__}"], source)
    known = {"base_model", *_SECTION_TYPES}
    for key in sorted(set(raw) - known):
        if not key.startswith("_"):  # "_comment" style keys are allowed
            problems.append(f"`{key}` is not a known key (known: {', '.join(sorted(known))})")
    base_model = raw.get("base_model", EMBEDDED_MODEL)
    if not isinstance(base_model, str) or not base_model:
        problems.append(f"`base_model` = {base_model!r} must be a local model folder, a .gguf file or {EMBEDDED_MODEL!r}")
        base_model = EMBEDDED_MODEL
    sections = {name: _build_section(name, cls, raw.get(name, {}), problems) for name, cls in _SECTION_TYPES.items()}
    sections["training"], tuned = _embedded_tuning(base_model, sections["training"])
    cfg = Config(base_model=base_model, root=root.resolve(), tuned=tuned, **sections)
    problems.extend(_cross_checks(cfg))
    if problems:
        raise ConfigError(problems, source)
    return cfg


# The embedded model (0.2M parameters, briefly pretrained) learns visibly within a minute at 10x the default learning
# rate, which suits pretrained bases (at 0.002 SmolLM2-135M answered "What is the capital of France?" with a city
# it had just been taught). So the default stays the pretrained bases' and the embedded model gets its own where
# the config leaves the default (unset, or the default written out as the shipped config.json does).
EMBEDDED_LEARNING_RATE = 2e-3


def _embedded_tuning(base_model: str, training: TrainingConfig) -> tuple[TrainingConfig, tuple]:
    """The training section with the embedded model's own learning rate where the config has the default."""
    default = TrainingConfig.learning_rate
    if base_model != EMBEDDED_MODEL or training.learning_rate != default:
        return training, ()
    note = (f"training.learning_rate {EMBEDDED_LEARNING_RATE:g} for the embedded model: the config has the default "
            f"{default:g}, which suits pretrained bases (set any other value to use it)")
    return dataclasses.replace(training, learning_rate=EMBEDDED_LEARNING_RATE), (note,)


def _cross_checks(cfg: Config) -> list[str]:
    problems = []
    bmp = cfg.base_model_path
    if cfg.base_model.startswith(PACKAGE_PREFIX) and isinstance(found := package_file(cfg.base_model), str):
        problems.append(f"`base_model` = {cfg.base_model!r}: {found}")
    elif bmp is not None:
        for problem in problems_with(bmp):  # what can be known without loading it (daemon/bases.py)
            problems.append(f"`base_model` = {cfg.base_model!r}: {problem}; use a local Hugging Face model folder, "
                            f"a .gguf file or {EMBEDDED_MODEL!r}")
    dc = cfg.distributed
    if dc.node_rank >= dc.nnodes:
        problems.append(f"`distributed.node_rank` = {dc.node_rank} must be below `distributed.nnodes` = {dc.nnodes}")
    if not dc.master_addr.strip():
        problems.append("`distributed.master_addr` must name node 0 (an address or host name)")
    if cfg.service.status_interval_seconds > 10:
        problems.append("`service.status_interval_seconds` must be <= 10 so the status never looks stale while training")
    if cfg.serve.default_max_tokens > cfg.serve.max_tokens:
        problems.append(f"`serve.default_max_tokens` = {cfg.serve.default_max_tokens} must not exceed `serve.max_tokens` = {cfg.serve.max_tokens}")
    return problems


def default_config_path() -> str:
    """The config a command uses without --config: $TRAIND_CONFIG, else ./config.json."""
    return os.environ.get("TRAIND_CONFIG", "config.json")


def load_config(path: str | Path) -> Config:
    """Read, parse and validate a config file."""
    path = Path(path).expanduser().resolve()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError([f"cannot read {path}: {e.strerror}"], str(path)) from e
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError([f"not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}"], str(path)) from e
    return config_from_dict(raw, path.parent, str(path))


def resolved_dict(cfg: Config) -> dict[str, Any]:
    """The config as JSON with every path absolute: loads the same from any folder."""
    d = cfg.to_dict()
    d["paths"] = {name: str(cfg.path(name)) for name in d["paths"]}
    if cfg.base_model_path is not None:
        d["base_model"] = str(cfg.base_model_path)
    if cfg.eval_file is not None:
        d["eval"]["file"] = str(cfg.eval_file)
    d["forgetting"]["probe_files"] = [str(cfg.resolve(p)) for p in cfg.forgetting.probe_files]
    d["tensorboard"]["dir"] = str(cfg.tensorboard_dir)
    return d


def locked_values(cfg: Config) -> dict[str, Any]:
    """The keys that shape the adapter or its data, as dotted names -> values."""
    out: dict[str, Any] = {"base_model": cfg.base_model}
    for name in _SECTION_TYPES:
        section = getattr(cfg, name)
        for f in dataclasses.fields(section):
            if f.metadata.get("locked"):
                out[f"{name}.{f.name}"] = getattr(section, f.name)
    return out


def explain() -> list[tuple[str, Any, str]]:
    """(dotted key, default, help) for every key, in file order."""
    rows: list[tuple[str, Any, str]] = [("base_model", EMBEDDED_MODEL, dataclasses.fields(Config)[0].metadata["help"])]
    for name, cls in _SECTION_TYPES.items():
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            rows.append((f"{name}.{f.name}", default, f.metadata["help"]))
    return rows
