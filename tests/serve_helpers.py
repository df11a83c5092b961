"""Adapter versions for the serve tests: real PEFT adapter folders on the embedded base, each with its own seeded
LoRA weights large enough that every version answers differently, published as the trainer publishes them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from daemon import adapters
from daemon.config import Config


def publish_version(cfg: Config, version: int, seed: int | None = None, make_current: bool = True, **manifest: Any) -> Path:
    """Publish `adapters/v000N/` with LoRA weights drawn from `seed` (default: the version) and make it current."""
    import torch

    from daemon.train.model import attach_lora, load_base, resolve_base, save_adapter

    base = resolve_base(cfg)
    model, _ = load_base(base, cfg.model, "cpu", torch.float32)
    peft_model = attach_lora(model, cfg.lora, seed=seed if seed is not None else version)
    gen = torch.Generator().manual_seed(1000 + (seed if seed is not None else version))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    record = {"version": version, "parent_version": version - 1 if version > 1 else None, "generation": 0,
              "job_id": f"job{version}", "original_name": f"file{version}.jsonl", "steps": 1,
              "quantization": cfg.model.quantization, **manifest}
    return adapters.publish(cfg.path("adapters"), record, lambda folder: save_adapter(peft_model, folder),
                            make_current=make_current).path


def expected_answer(cfg: Config, version: int | None, messages: list[dict[str, str]], max_tokens: int) -> str:
    """What `traind:vN` (the base for None) answers greedily, computed here with PEFT and transformers' generate."""
    import torch
    from peft import PeftModel

    from daemon.train.model import load_base, resolve_base

    model, tok = load_base(resolve_base(cfg), cfg.model, "cpu", torch.float32)
    if version is not None:
        model = PeftModel.from_pretrained(model, str(cfg.path("adapters") / adapters.version_dir_name(version)))
    model.eval()
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
