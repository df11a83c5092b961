"""The trainer's speed levers: each has a switch (`speed.*` in the config), is applied in one place, and is reported.

    from daemon.train import levers
    lm.levers = levers.apply_to_model(model, cfg, device, dtype)   # in model.load_for_training: the model's levers
    governor, threads = levers.thread_governor(cfg, n, sharing)     # in the trainer's session
    wire = levers.at_start(lm, cfg, threads)                          # probes the step's shortcuts, logs one line

A lever makes training faster and changes the numbers by rounding at most, so none is a
locked key: a run may stop with a lever on and resume with it off. (With LoRA dropout, the
levers that change the shapes it draws its masks over, label-only logits, the last block and
width pieces, then draw other masks: the same distribution, other numbers.) All are on by
default.
Where each is applied:
- here, on the loaded model: the fused LoRA forward (daemon.train.fused), the norms'
  closed-form backward (daemon.train.norms), the LoRA factors in the compute dtype and
  fp32 attention for short rows (daemon.train.precision);
- in daemon.train.step.fast_paths, each checked against the plain path on the loaded
  model: logits only where labels are, the last block only there (daemon.train.lastblock),
  packed rows (their switch is `data.packing`), width pieces (daemon.train.batching);
- here, for the session: the thread governor (daemon.train.threads).

The trainer logs at start, once the model is loaded and the shortcuts probed, one line
(`speed levers on <base>: fused LoRA 8/8 layers, ...`) with "off (speed.x = false)" for a
lever switched off and "not used (why)" where it does not apply or its probe refused it;
the `ready` message carries the same as `levers`. What each lever is worth, measured, is in
docs/PERFORMANCE.md.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any

from daemon.config import Config

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from daemon.train.model import LoadedModel
    from daemon.train.threads import ThreadGovernor

log = logging.getLogger(__name__)


class State(str, Enum):
    ON = "on"
    OFF = "off"  # switched off in the config
    NOT_USED = "not_used"  # switched on, but it does not apply here or its check refused it


@dataclass(frozen=True)
class Lever:
    """What one lever did on the loaded model: its state, what it changed out of how many, and why not."""

    label: str  # how the report names it: "fused LoRA"
    state: State
    applied: int | None = None  # modules changed, where it counts them
    of: int | None = None  # ... out of this many that it could change
    detail: str = ""  # on: what is counted ("layers") or more ("2 threads"); otherwise why

    def text(self) -> str:
        if self.state is State.OFF:
            return f"{self.label} off ({self.detail})"
        if self.state is State.NOT_USED:
            return f"{self.label} not used ({self.detail})"
        if self.applied is not None:
            return f"{self.label} {self.applied}/{self.of}" + (f" {self.detail}" if self.detail else "")
        return f"{self.label} on" + (f" ({self.detail})" if self.detail else "")

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"state": self.state.value}
        if self.state is State.ON and self.applied is not None:
            out.update(applied=self.applied, of=self.of)
        out["text"] = self.text()
        return out


def _off(label: str, switch: str) -> Lever:
    return Lever(label, State.OFF, detail=f"{switch} = false")


def _not_used(label: str, why: str) -> Lever:
    return Lever(label, State.NOT_USED, detail=why)


# ---------------------------------------------------------------- on the loaded model


def apply_to_model(model: Any, cfg: Config, device: str, dtype: "torch.dtype") -> dict[str, Lever]:
    """Apply the model's levers to `model` (a PeftModel with its LoRA attached), each as its switch says, in
    the order they need: the LoRA factors' dtype before the fused forward (which reads the input's cast)."""
    base = model.get_base_model()
    why_fp32 = _why_fp32_activations(base, cfg, dtype)  # the precision levers act only on bf16/fp16 activations
    out = {"fp32_short_attention": _fp32_short_attention(base, cfg, device, dtype, why_fp32)}

    compute = str(dtype).removeprefix("torch.")
    label, layers = f"LoRA in {compute if why_fp32 is None else 'the compute dtype'}", _lora_layer_count(model)
    if not cfg.speed.lora_in_compute_dtype:
        out["lora_in_compute_dtype"] = _off(label, "speed.lora_in_compute_dtype")
    elif why_fp32 is not None:
        out["lora_in_compute_dtype"] = _not_used(label, why_fp32)
    else:
        from daemon.train.precision import lora_in_activation_dtype

        out["lora_in_compute_dtype"] = Lever(label, State.ON, lora_in_activation_dtype(model), layers, "layers")

    label = "fused LoRA"
    if not cfg.speed.fused_lora:
        out["fused_lora"] = _off(label, "speed.fused_lora")
    elif why_fp32 is None and out["lora_in_compute_dtype"].state is not State.ON:
        # bf16/fp16 activations that PEFT casts up for its fp32 factors: the fused forward would hand every call
        # to PEFT's own (fp32 activations need no cast, and fuse)
        out["fused_lora"] = _not_used(label, "PEFT casts the LoRA input to fp32: speed.lora_in_compute_dtype = false")
    else:
        from daemon.train.fused import fuse_lora

        out["fused_lora"] = Lever(label, State.ON, fuse_lora(model), layers, "layers")

    label, norms = "closed-form norms", sum("RMSNorm" in type(m).__name__ for m in model.modules())
    if not cfg.speed.norms_backward:
        out["norms_backward"] = _off(label, "speed.norms_backward")
    elif cfg.training.compile:
        out["norms_backward"] = _not_used(label, "training.compile = true: inductor fuses them")
    elif not norms:
        out["norms_backward"] = _not_used(label, "the model has no RMSNorm")
    else:
        from daemon.train.norms import fuse_rms_norms

        out["norms_backward"] = Lever(label, State.ON, fuse_rms_norms(model), norms)
    return {key: out[key] for key in MODEL_LEVERS}


MODEL_LEVERS = ("fused_lora", "norms_backward", "lora_in_compute_dtype", "fp32_short_attention")


def _why_fp32_activations(base: Any, cfg: Config, dtype: "torch.dtype") -> str | None:
    """Why the decoder's activations are fp32 (then the precision levers have nothing to do), or None. They are
    the input embeddings' dtype: the compute dtype, except on a 4-bit base, whose embeddings and norms PEFT's
    k-bit preparation keeps in fp32 (its LoRA layers then see fp32 inputs, and its attention fp32 queries)."""
    import torch

    if dtype == torch.float32:
        return "the model computes in float32"
    embeddings = base.get_input_embeddings()
    if getattr(embeddings, "weight", None) is not None and embeddings.weight.dtype == torch.float32:
        kbit = ": a 4-bit base after PEFT's k-bit preparation" if cfg.model.quantization != "none" else ""
        return f"its activations are float32{kbit}"
    return None


def _fp32_short_attention(base: Any, cfg: Config, device: str, dtype: "torch.dtype", why_fp32: str | None) -> Lever:
    label = "fp32 short-row attention"
    if not cfg.speed.fp32_short_attention:
        return _off(label, "speed.fp32_short_attention")
    if cfg.model.attention != "auto":
        return _not_used(label, f"model.attention = {cfg.model.attention!r}")
    if device != "cpu":
        return _not_used(label, "not on a CPU")
    if why_fp32 is not None:
        return _not_used(label, why_fp32)
    if (own := base.config._attn_implementation) != "sdpa":
        return _not_used(label, f"the model's attention is {own}, not sdpa")
    from daemon.train.precision import fp32_attention_for_short_rows

    if not fp32_attention_for_short_rows(base, device, dtype):
        return _not_used(label, f"{type(base).__name__} keeps sdpa (trainer log)")
    return Lever(label, State.ON)


def _lora_layer_count(model: Any) -> int:
    """PEFT's LoRA layers holding an adapter: what the LoRA levers could change."""
    return sum(1 for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer") and len(m.lora_A))


# ---------------------------------------------------------------- the session


def thread_governor(cfg: Config, threads: int, sharing: int) -> tuple["ThreadGovernor | None", Lever]:
    """The governor of the trainer's `threads` CPU threads, where it applies and is switched on; `sharing`:
    the trainer ranks on this machine (they share its cores: none trims its threads for the others)."""
    label = "thread governor"
    if not cfg.speed.thread_governor:
        return None, _off(label, "speed.thread_governor")
    if cfg.training.cpu_threads > 0:
        return None, _not_used(label, f"training.cpu_threads = {cfg.training.cpu_threads}")
    if sharing > 1:
        return None, _not_used(label, f"{sharing} ranks share this machine's cores")
    if threads < 2:
        return None, _not_used(label, "one core: nothing to trim")
    from daemon.train.threads import ThreadGovernor

    return ThreadGovernor(threads), Lever(label, State.ON, detail=f"{threads} threads")


# ---------------------------------------------------------------- the report


def report(lm: "LoadedModel", cfg: Config, threads: Lever) -> dict[str, Lever]:
    """Every lever of the loaded model `lm` (its shortcuts probed: lm.fast), in the report's order. The step's
    switches are those `lm` was loaded with (lm.speed); packed rows' is `cfg.data.packing`."""
    fast, speed = lm.fast, lm.speed
    out = dict(lm.levers)

    def probed(label: str, used: bool, key: str) -> Lever:
        return Lever(label, State.ON) if used else _not_used(label, fast.why.get(key, "its check refused it"))

    label = "label-only logits"
    out["label_only_logits"] = (_off(label, "speed.label_only_logits") if not speed.label_only_logits
                                else probed(label, fast.label_only, "label_only_logits"))
    label = "label-only last block"
    if not speed.last_block:
        out["last_block"] = _off(label, "speed.last_block")
    elif not fast.label_only:
        out["last_block"] = _not_used(label, "it needs label-only logits")
    else:
        out["last_block"] = probed(label, fast.last_block, "last_block")
    label = "packed rows"
    out["packed_rows"] = _off(label, "data.packing") if not cfg.data.packing else probed(label, fast.pack, "packed_rows")
    label = "width pieces"
    if not speed.width_pieces:
        out["width_pieces"] = _off(label, "speed.width_pieces")
    elif out["packed_rows"].state is not State.ON:
        out["width_pieces"] = _not_used(label, "packed rows are off" if not cfg.data.packing else "packed rows are not used")
    else:
        out["width_pieces"] = probed(label, fast.width_pieces, "width_pieces")
    out["thread_governor"] = threads
    return out


def line(base_name: str, levers: dict[str, Lever]) -> str:
    return f"speed levers on {base_name}: " + ", ".join(lever.text() for lever in levers.values())


def at_start(lm: "LoadedModel", cfg: Config, threads: Lever) -> dict[str, dict[str, Any]]:
    """Probe the step's shortcuts on `lm` (once per loaded model), log the one line, and return the levers as
    the `ready` message carries them."""
    if lm.fast is None:
        from daemon.train.step import fast_paths

        lm.fast = fast_paths(lm)
    levers = report(lm, cfg, threads)
    log.info("%s", line(lm.base_path.name, levers))
    return {key: lever.to_wire() for key, lever in levers.items()}
