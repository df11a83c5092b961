"""The base model and its LoRA adapter: capabilities, loading, LoRA state, adapter folders.

    from daemon.train.model import capabilities, load_for_training, save_adapter, load_adapter
    caps = capabilities()                                  # cheap: no CUDA context, no import error
    lm = load_for_training(cfg, seed=cfg.training.seed)   # base (4-bit or not) + a seeded LoRA
    lm.model(input_ids=...)                                # a peft.PeftModel, LoRA trainable only
    save_adapter(lm.model, folder)                         # adapter_model.safetensors + adapter_config.json
    load_adapter(lm.model, folder)                         # weights of a saved adapter into the live LoRA

torch, transformers, peft and bitsandbytes are imported inside functions, so
importing this module costs nothing (the service and the CLI never import torch).
The 4-bit path (bitsandbytes nf4/fp4, double quantisation) is the real QLoRA
path on CUDA and on the CPU alike (bitsandbytes >= 0.45 has CPU kernels).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from daemon import adapters, atomic
from daemon.bases import is_gguf
from daemon.config import Config, LoraConfig, ModelConfig, SpeedConfig
from daemon.errors import TraindError

if TYPE_CHECKING:  # pragma: no cover
    import torch

log = logging.getLogger(__name__)

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


class ModelError(TraindError):
    """The base model or adapter cannot be loaded as configured."""


@dataclass(frozen=True)
class Capabilities:
    """What this machine can do; computed without allocating anything on a GPU."""

    cuda: bool
    bf16: bool  # CUDA device with native bfloat16 (Ampere or newer)
    bitsandbytes: bool
    cuda_name: str | None
    cpu_bf16: bool = False  # CPU with native bfloat16 matrix instructions (AVX512-BF16 or AMX)


CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def capabilities() -> Capabilities:
    """Probe CUDA, bfloat16 support (GPU and CPU) and bitsandbytes (importability only)."""
    import torch

    cuda = torch.cuda.is_available()
    return Capabilities(
        cuda=cuda,
        bf16=bool(cuda and torch.cuda.is_bf16_supported()),
        bitsandbytes=importlib.util.find_spec("bitsandbytes") is not None,
        cuda_name=torch.cuda.get_device_name(0) if cuda else None,
        cpu_bf16=cpu_has_native_bf16(),
    )


def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether the CPU multiplies bfloat16 matrices natively (AVX512-BF16 or AMX): there oneDNN's bf16
    matmul runs about twice fp32's (docs/PERFORMANCE.md); elsewhere torch emulates bf16 and it is slower
    than fp32. False where the flags cannot be read (not Linux)."""
    try:
        with open(cpuinfo, encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return any(flag in line.split() for flag in CPU_BF16_FLAGS)
    except OSError:
        pass
    return False


def choose_device(mc: ModelConfig, caps: Capabilities) -> str:
    """'cuda' or 'cpu' as `model.device` asks; refuses cuda without a GPU."""
    if mc.device == "cuda" and not caps.cuda:
        raise ModelError("`model.device` = 'cuda' but no CUDA GPU is available; use 'auto' or 'cpu'")
    if mc.device == "auto":
        return "cuda" if caps.cuda else "cpu"
    return mc.device


def choose_dtype(mc: ModelConfig, device: str, caps: Capabilities) -> "torch.dtype":
    """Compute dtype: as configured, or auto (bf16 on capable CUDA, fp16 on older CUDA; on the CPU bf16 where
    it has native bf16 matrix instructions, else fp32). The LoRA weights and the optimizer stay fp32 either
    way (PEFT keeps adapters in fp32); bf16 is the frozen base and the activations, as in QLoRA."""
    import torch

    named = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if mc.compute_dtype != "auto":
        if mc.compute_dtype == "bfloat16" and device == "cuda" and not caps.bf16:
            raise ModelError("`model.compute_dtype` = 'bfloat16' is not supported by this GPU; use 'float16' or 'auto'")
        return named[mc.compute_dtype]
    if device == "cuda":
        return torch.bfloat16 if caps.bf16 else torch.float16
    return torch.bfloat16 if caps.cpu_bf16 else torch.float32


def resolve_base(cfg: Config, progress: Callable[[str], None] | None = None) -> Path:
    """The base model folder: the configured one, the folder converted from a configured .gguf file (converted
    on first use, `progress` told how it goes), or the embedded model (built on first use)."""
    path = cfg.base_model_path
    if path is not None and is_gguf(path):
        from daemon.train.convert import ensure_converted

        return ensure_converted(path, cfg.path("models"), progress)
    if path is not None:
        return path
    from daemon.train.tinymodel import ensure_embedded

    return ensure_embedded(cfg.path("models"))


# model.quantization auto on the CPU: the base stays in full precision while its weights in the compute dtype take at
# most this share of the machine's memory (the rest: activations, the optimizer, the OS, a consolidation's merge).
AUTO_FIT_FRACTION = 0.5
QUANT_NOTE_CPU = ("nf4 on the CPU dequantizes every weight at every step: measured on SmolLM2-135M here, slower than "
                  "none and no memory saved (docs/PERFORMANCE.md); model.quantization auto picks none where the base fits")


def base_weight_bytes(base: Path, dtype: "torch.dtype") -> int:
    """The base's weights in `dtype`, from the safetensors headers (the files' sizes for other formats)."""
    import torch

    from daemon.train.consolidate import ConsolidationRefused, base_params

    try:
        return base_params(base) * torch.finfo(dtype).bits // 8
    except (ConsolidationRefused, OSError, ValueError):
        return sum(p.stat().st_size for p in base.glob("*.bin"))


def total_memory() -> int:
    import psutil

    return int(psutil.virtual_memory().total)


def resolve_quantization(mc: ModelConfig, device: str, caps: Capabilities, base: Path, dtype: "torch.dtype",
                         recorded: str | None = None) -> tuple[str, str | None]:
    """(quantization to load with, a note for the status) for `model.quantization`.

    auto resolves to what the current adapter was trained with (`recorded`, from its manifest), so it stays
    the same for the adapter's life whatever the machine; for a new adapter: nf4 on CUDA (with bitsandbytes),
    and on the CPU none where the base's weights take at most AUTO_FIT_FRACTION of the memory, else nf4."""
    if mc.quantization != "auto":
        cpu_4bit = device == "cpu" and mc.quantization != "none"
        return mc.quantization, (f"model.quantization {mc.quantization}: {QUANT_NOTE_CPU}" if cpu_4bit else None)
    if recorded in ("nf4", "fp4", "none"):
        return recorded, f"model.quantization auto: {recorded}, as the current adapter was trained"
    if device == "cuda":
        if caps.bitsandbytes:
            return "nf4", "model.quantization auto: nf4 on CUDA (QLoRA)"
        return "none", "model.quantization auto: none (bitsandbytes is not installed)"
    need, have = base_weight_bytes(base, dtype), total_memory()
    if need <= AUTO_FIT_FRACTION * have:
        return "none", (f"model.quantization auto: none on the CPU: the base takes {need / 2**30:.2f} GiB in "
                        f"{str(dtype).removeprefix('torch.')} of {have / 2**30:.0f} GiB; {QUANT_NOTE_CPU}")
    return "nf4", (f"model.quantization auto: nf4 on the CPU: the base would take {need / 2**30:.1f} GiB in "
                   f"{str(dtype).removeprefix('torch.')}, over {AUTO_FIT_FRACTION:.0%} of {have / 2**30:.0f} GiB")


def quantization_config(mc: ModelConfig, dtype: "torch.dtype", sharded: bool = False) -> Any | None:
    """A BitsAndBytesConfig for 4-bit nf4/fp4 (QLoRA), or None when quantization is 'none'. `sharded` (FSDP):
    the packed 4-bit weights are stored in the compute dtype, so FSDP can flatten them with the rest."""
    if mc.quantization == "none":
        return None
    if mc.quantization == "auto":
        raise ModelError("model.quantization 'auto' must be resolved first (resolve_quantization)")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelError(f"`model.quantization` = {mc.quantization!r} needs bitsandbytes; install it or use 'none'")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=mc.quantization,
        bnb_4bit_use_double_quant=mc.double_quant,
        bnb_4bit_compute_dtype=dtype,
        **({"bnb_4bit_quant_storage": dtype} if sharded else {}),
    )


def choose_attention(mc: ModelConfig, device: str) -> str | None:
    """`model.attention`, with auto resolved: flash-attn's varlen kernels on CUDA where installed, else
    transformers' own default for the architecture (SDPA where it has it, eager otherwise): None."""
    if mc.attention == "flash_attention_2" and device != "cuda":
        raise ModelError("`model.attention` = 'flash_attention_2' needs a CUDA GPU; use 'auto' or 'sdpa'")
    if mc.attention == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ModelError("`model.attention` = 'flash_attention_2' needs the flash-attn package; install it or use 'auto'")
    if mc.attention != "auto":
        return mc.attention
    return "flash_attention_2" if device == "cuda" and importlib.util.find_spec("flash_attn") else None


def load_base(path: Path, mc: ModelConfig, device: str, dtype: "torch.dtype", sharded: bool = False) -> tuple[Any, Any]:
    """(model, tokenizer) of the base in `path`, 4-bit or not, on `device`, frozen, ready for a LoRA."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:  # many bases ship without one; padding is masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    quant = quantization_config(mc, dtype, sharded)
    # use_kernels: transformers (5.25 on, with the `kernels` package it now depends on) swaps layers for kernels
    # fetched from the Hugging Face Hub at run time and re-swaps them on every train()/eval(), which also
    # undoes our own norms (daemon.train.norms). traind fetches nothing at run time and keeps its own layers.
    kwargs: dict[str, Any] = {"dtype": dtype, "use_kernels": False}
    if (attention := choose_attention(mc, device)) is not None:
        kwargs["attn_implementation"] = attention
    if quant is not None:
        # bitsandbytes quantises while loading onto the target device: device_map places it.
        kwargs.update(quantization_config=quant, device_map={"": device})
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if quant is None:
        model.to(device)
    elif device == "cpu":
        keep_cpu_4bit_layout(model)
    model.config.use_cache = False  # the KV cache is useless in training and clashes with checkpointing
    return model, tokenizer


def keep_cpu_4bit_layout(model: Any) -> None:
    """Stop bitsandbytes repacking 4-bit weights for CPU inference (eval) while we train.

    bitsandbytes 0.50 repacks a Linear4bit's weight in place into an AVX512-BF16
    layout on its first no-grad forward in eval mode (our eval loss). That layout
    needs out_features divisible by 32 (the tiny model's MLP has 176) and would
    make eval and training run different kernels; the plain 4-bit path serves both.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def prepare_for_lora(model: Any, mc: ModelConfig) -> Any:
    """Freeze the base; k-bit preparation for 4-bit bases; gradient checkpointing per config."""
    gc_kwargs = {"use_reentrant": False}  # the reentrant variant needs inputs that require grad
    if mc.quantization != "none":
        from peft import prepare_model_for_kbit_training

        return prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=mc.gradient_checkpointing, gradient_checkpointing_kwargs=gc_kwargs
        )
    for p in model.parameters():
        p.requires_grad_(False)
    if mc.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
        model.enable_input_require_grads()
    return model


def attach_lora(model: Any, lc: LoraConfig, seed: int) -> Any:
    """Wrap `model` in a PeftModel with a fresh LoRA whose init depends only on `seed`."""
    import torch
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_cfg = PeftLoraConfig(
        r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
        target_modules=list(lc.target_modules), bias="none", task_type="CAUSAL_LM",
    )
    # fork_rng: the seed decides the LoRA init without disturbing anyone else's RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(model, peft_cfg)


@dataclass
class LoadedModel:
    """A base with a LoRA attached, and what the `ready` message reports about it."""

    model: Any  # peft.PeftModel
    tokenizer: Any
    device: str
    dtype: "torch.dtype"
    base_path: Path
    quantization: str  # as loaded: model.quantization with auto resolved
    fast: Any = None  # daemon.train.step.FastPaths, checked on first use
    split: int = 1  # each micro-batch runs in this many pieces (doubled after an out-of-memory; see step.py)
    speed: SpeedConfig = field(default_factory=SpeedConfig)  # the levers' switches it was loaded with
    levers: dict[str, Any] = field(default_factory=dict)  # what each model lever did (daemon.train.levers.Lever)
    notes: list = field(default_factory=list)  # what was chosen for this base and why (the status shows it)

    def param_counts(self) -> tuple[int, int]:
        """(trainable, total) parameters; 4-bit weights counted as stored elements."""
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.model.parameters())
        return trainable, total


def load_for_training(cfg: Config, seed: int, caps: Capabilities | None = None, base: Path | None = None,
                      recorded_quantization: str | None = None) -> LoadedModel:
    """Load the base (`base`, else the configured one) and attach a LoRA initialised from `seed`.
    `recorded_quantization`: what the current adapter was trained with (model.quantization auto keeps it)."""
    caps = caps or capabilities()
    device = choose_device(cfg.model, caps)
    dtype = choose_dtype(cfg.model, device, caps)
    base_path = base or resolve_base(cfg)
    quant, note = resolve_quantization(cfg.model, device, caps, base_path, dtype, recorded_quantization)
    mc = dataclasses.replace(cfg.model, quantization=quant)
    if note:
        log.info("%s", note)
    dc = cfg.distributed
    sharded = dc.strategy == "fsdp" and dc.nproc_per_node * dc.nnodes > 1
    model, tokenizer = load_base(base_path, mc, device, dtype, sharded)
    model = prepare_for_lora(model, mc)
    model = attach_lora(model, cfg.lora, seed)
    from daemon.train.levers import apply_to_model

    # precision, fused LoRA, norms: each as `speed.*` says (with model.quantization auto resolved)
    applied = apply_to_model(model, dataclasses.replace(cfg, model=mc), device, dtype)
    if cfg.training.compile:
        compile_blocks(model.get_base_model().get_decoder())
    log.info("loaded %s on %s (%s, quantization %s, attention %s%s)", base_path, device, dtype, quant,
             model.get_base_model().config._attn_implementation, ", compiled" if cfg.training.compile else "")
    return LoadedModel(model, tokenizer, device, dtype, base_path, quant, speed=cfg.speed, levers=applied,
                       notes=[note] if note else [])


def compile_blocks(decoder: Any) -> int:
    """torch.compile each block of `decoder` in place (dynamic shapes); the whole decoder when it has no block list.

    Block by block ("regional" compiling): the blocks share one class and code, so dynamo traces and
    inductor compiles one block's graph and every block reuses it, with one variant per input kind (see
    the recompile limit below). That compiles in a fraction of the whole decoder's time, and measured
    faster too (docs/PERFORMANCE.md, "Compiling"). In place, so every path
    (the model's own forward, the decoder alone for label-only logits) runs compiled; dynamic, because
    lengths change from batch to batch and a recompile per length would never pay. Returns the modules
    compiled."""
    import torch._dynamo
    from torch import nn

    # One block's code has several graphs: the input needing a gradient or not (the first block), a mask or
    # none (packed rows of several examples, or of one), training or evaluation (no_grad); and each model
    # loaded in the process (after a consolidation) guards anew. At dynamo's default limit of 8 per code
    # object the rest would run eager, silently.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)

    def uniform(m: Any) -> bool:
        return isinstance(m, nn.ModuleList) and len(m) > 0 and len({type(b) for b in m}) == 1

    layers = getattr(decoder, "layers", None)  # transformers' decoders keep their blocks there
    blocks = layers if uniform(layers) else next((m for m in decoder.children() if uniform(m)), None)
    targets = list(blocks) if blocks is not None else [decoder]
    for module in targets:
        module.compile(dynamic=True)
    log.info("compile: %d x %s (dynamic shapes), at the first step", len(targets), type(targets[0]).__name__)
    return len(targets)


def lora_state(model: Any) -> dict[str, "torch.Tensor"]:
    """The LoRA weights as detached CPU copies (safe to keep while training goes on)."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().to("cpu", copy=True) for k, v in get_peft_model_state_dict(model).items()}


def set_lora_state(model: Any, state: dict[str, "torch.Tensor"]) -> None:
    """Copy `state` (as from lora_state) into the live LoRA; every key must match."""
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, state)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise ModelError(f"adapter does not fit this model: missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}")


def save_adapter(model: Any, folder: Path) -> None:
    """Write adapter_model.safetensors + adapter_config.json into `folder` (callers publish it atomically)."""
    model.save_pretrained(folder, safe_serialization=True)


def load_adapter(model: Any, folder: Path) -> None:
    """Load a saved adapter's weights into the live LoRA of `model`."""
    from safetensors.torch import load_file

    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise ModelError(f"{folder} has no {ADAPTER_WEIGHTS}; the adapter folder is incomplete")
    set_lora_state(model, load_file(str(weights)))


def lora_max_abs_diff(a: dict[str, "torch.Tensor"], b: dict[str, "torch.Tensor"]) -> float:
    """Largest absolute difference between two LoRA states with the same keys."""
    if a.keys() != b.keys():
        raise ModelError("the two LoRA states have different keys")
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a) if a else 0.0


def publish_adapter(adapters_dir: Path, model: Any, manifest: adapters.AdapterManifest | dict[str, Any],
                    steps: list[dict[str, Any]] | None = None, make_current: bool = True) -> adapters.AdapterVersion:
    """Publish the live LoRA of `model` as the next adapter version (daemon.adapters.publish),
    with the file's step reports (`steps.jsonl`, its training log) beside the weights."""
    def write(folder: Path) -> None:
        save_adapter(model, folder)
        if steps:
            atomic.write_text(folder / adapters.STEP_LOG, "".join(json.dumps(m) + "\n" for m in steps))
    return adapters.publish(adapters_dir, manifest, write, make_current)
