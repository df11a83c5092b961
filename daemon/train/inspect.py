"""Looking at the model: generate from base + adapter, and compare base and adapter on a file.

    from daemon.train.inspect import load_view, sample, compare_on_file
    view = load_view(cfg, "current")               # "current", "none" or a version number
    print(sample(view, "Hello", max_new_tokens=64))
    figures = compare_on_file(cfg, view, path)     # {"base": {...}, "adapter": {...}}: loss, token accuracy

These run in their own process (`trainctl sample`, `trainctl eval`), on the CPU
by default, so they work while the daemon trains: they only read the adapter
store, and the base is loaded as the trainer loads it (the base in use, the
quantization as resolved for that adapter, the trainer's compute dtype) so the
adapter sees the weights it was trained against; offline and quiet, as the
trainer is. An adapter folder is read with PEFT, as any user would. Every
answer names the base's generation (`generation_label`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon import adapters
from daemon.config import Config
from daemon.errors import TraindError

log = logging.getLogger(__name__)


@dataclass
class View:
    model: Any
    tokenizer: Any
    label: str  # "base: generation 0 (…)", "adapter v7 on generation 1, consolidated …"
    has_adapter: bool
    device: str
    base_label: str = "base"  # which base: generation_label()


def pick_adapter(cfg: Config, which: str) -> adapters.AdapterVersion | None:
    """`current`, `none`, or a kept version number (`7` or `v7`)."""
    folder = cfg.path("adapters")
    if which == "none":
        return None
    if which == "current":
        cur = adapters.peek_current(folder)
        if cur is None:
            raise TraindError("no adapter has been published yet (use --adapter none for the base alone)")
        return cur
    try:
        number = int(which.lower().removeprefix("v"))
    except ValueError:
        raise TraindError(f"--adapter must be current, none or a version number, got {which!r}") from None
    for v in adapters.versions(folder):
        if v.version == number:
            return v
    raise TraindError(f"adapter v{number} is not kept (see `trainctl adapters list`)")


def base_for(cfg: Config, adapter: adapters.AdapterVersion | None) -> Path:
    """The base an adapter trained on: its manifest's consolidated base, else the current one's, else the config's."""
    from daemon.train.model import resolve_base

    source = _manifest_source(cfg, adapter)
    if source is not None and source.manifest.base_path:
        return Path(source.manifest.base_path)
    return resolve_base(cfg)


def _manifest_source(cfg: Config, adapter: adapters.AdapterVersion | None) -> adapters.AdapterVersion | None:
    """The version whose manifest says which base is meant: the adapter's own, else (none asked) the current one."""
    return adapter if adapter is not None else adapters.peek_current(cfg.path("adapters"))


def generation_label(cfg: Config, adapter: adapters.AdapterVersion | None) -> str:
    """Which base, said plainly: "generation 0 (SmolLM2-135M-Instruct.Q4_1.gguf)", or for a consolidated one
    "generation 2, consolidated 2026-12-06T19:30:00+00:00 ("two weeks of chats")"."""
    source = _manifest_source(cfg, adapter)
    generation = source.manifest.generation if source is not None else 0
    base_path = source.manifest.base_path if source is not None else None
    if generation == 0 or not base_path:
        return f"generation 0 ({Path(cfg.base_model).name})"
    try:
        lineage = json.loads((Path(base_path) / "lineage.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return f"generation {generation} ({base_path})"
    desc = f' ("{lineage["description"]}")' if lineage.get("description") else ""
    return f"generation {generation}, consolidated {lineage.get('created_at', '?')}{desc}"


def quiet_loading() -> None:
    """As the trainer loads (daemon.train.process): offline, no progress bars, no library chatter on stderr;
    what concerns the user is printed by the command, and warnings go to the log, not to the screen."""
    from daemon.train.process import quiet_hugging_face

    quiet_hugging_face()
    for name in ("transformers", "peft", "bitsandbytes", "accelerate", "huggingface_hub", "kernels", "py.warnings"):
        logging.getLogger(name).setLevel(logging.ERROR)


def command_threads(window: float = 0.3) -> int:
    """CPU threads for `sample`/`eval`: every core on a quiet machine; one beside a busy neighbour (a training
    daemon keeps its cores busy), where OpenMP threads in lock step thrash and run many times slower
    (daemon/train/threads.py; measured here: `sample` 2m41s with 2 threads beside a loading trainer)."""
    from daemon.train.threads import BUSY_CORES, machine_busy_seconds, usable_cores

    before = machine_busy_seconds()
    time.sleep(window)
    others = (machine_busy_seconds() - before) / window  # cores in use by other processes (we were asleep)
    return 1 if others >= BUSY_CORES else usable_cores()


def load_view(cfg: Config, which: str = "current", device: str = "cpu") -> View:
    adapter = pick_adapter(cfg, which)  # a bad choice is refused before torch is even imported
    if device == "cpu":
        from daemon.train.threads import start_threads

        start_threads(cfg.training.cpu_threads or command_threads())  # before torch is imported
    quiet_loading()
    from peft import PeftModel

    model, tokenizer, base_label = load_base_as_trained(cfg, adapter, device)
    label = f"base: {base_label}"
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter.path))
        label = f"adapter v{adapter.version} on {base_label}"
    model.eval()
    return View(model, tokenizer, label, adapter is not None, device, base_label)


def load_base_as_trained(cfg: Config, adapter: adapters.AdapterVersion | None, device: str) -> tuple[Any, Any, str]:
    """(model, tokenizer, generation label) of the base `adapter` trained on (the current one's when None), loaded
    as the trainer loaded it: the quantization resolved for that adapter and the trainer's compute dtype, so an
    adapter sees the weights it was trained against. `trainctl sample`/`eval` and `traind serve` load through it."""
    from daemon.train.model import capabilities, choose_dtype, keep_cpu_4bit_layout, load_base, resolve_quantization

    base = base_for(cfg, adapter)
    caps = capabilities()
    dtype = choose_dtype(cfg.model, device, caps)  # the trainer's: the numerics the adapter was trained in
    source = _manifest_source(cfg, adapter)
    recorded = source.manifest.quantization if source is not None else None
    quant, _ = resolve_quantization(cfg.model, device, caps, base, dtype, recorded)
    mc = dataclasses.replace(cfg.model, quantization=quant)
    model, tokenizer = load_base(base, mc, device, dtype)
    if device == "cpu" and quant != "none":
        keep_cpu_4bit_layout(model)
    return model, tokenizer, generation_label(cfg, adapter)


def sample(view: View, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0, seed: int = 0) -> str:
    """The model's continuation of `prompt` (as a user turn with the chat template when the tokenizer has one)."""
    import torch

    tok = view.tokenizer
    if getattr(tok, "chat_template", None):
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        ids = tok(text, return_tensors="pt", add_special_tokens=False)
    else:
        ids = tok(prompt, return_tensors="pt")
    ids = {k: v.to(view.device) for k, v in ids.items()}
    torch.manual_seed(seed)
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "pad_token_id": tok.pad_token_id}
    kwargs.update({"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False})
    with torch.no_grad():
        out = view.model.generate(**ids, **kwargs)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def compare_on_file(cfg: Config, view: View, path: Path, max_examples: int = 0) -> dict[str, Any]:
    """Token-mean loss and next-token accuracy on every trainable token of `path`, for the base and,
    when `view` has an adapter, for base + adapter (the same loaded weights, the adapter switched off)."""
    import dataclasses

    from daemon.train.data import supervised, train_examples
    from daemon.validate import validate_file

    report = validate_file(path, cfg.data, 0)
    if not report.accepted or report.format is None:
        raise TraindError(f"{path}: {report.reason or 'not a training file'}")
    data = dataclasses.replace(cfg.data, eval_fraction=0.0)
    examples = list(map(supervised, train_examples(path, report.format, view.tokenizer, data, cfg.training.seed, 0)))
    examples.sort(key=lambda ex: ex.line)  # file order: the figures do not depend on a shuffle
    if max_examples:
        examples = examples[:max_examples]
    if not examples:
        raise TraindError(f"{path}: no example keeps a token to score within data.max_length = {cfg.data.max_length}")
    out: dict[str, Any] = {"file": str(path), "examples": len(examples), "format": report.format.value}
    if view.has_adapter:
        with view.model.disable_adapter():
            out["base"] = _score(view, examples)
        out["adapter"] = _score(view, examples)
        out["adapter"]["label"] = view.label
    else:
        out["base"] = _score(view, examples)
    out["base"]["label"] = f"base: {view.base_label}"
    return out


def _score(view: View, examples: list) -> dict[str, float]:
    import torch
    import torch.nn.functional as F

    from daemon.train.data import IGNORE

    total, correct, count = 0.0, 0, 0
    with torch.no_grad():
        for ex in examples:
            ids = torch.tensor([ex.input_ids], device=view.device)
            labels = torch.tensor(ex.labels[1:], device=view.device)
            logits = view.model(input_ids=ids).logits[0, :-1].float()
            keep = labels != IGNORE
            if not bool(keep.any()):
                continue
            total += float(F.cross_entropy(logits[keep], labels[keep], reduction="sum"))
            correct += int((logits[keep].argmax(-1) == labels[keep]).sum())
            count += int(keep.sum())
    return {"loss": total / count, "token_accuracy": correct / count, "tokens": count}
