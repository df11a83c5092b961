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


def expected_answer(cfg: Config, version: int | None, messages: list[dict[str, str]] | str, max_tokens: int) -> str:
    """What `traind:vN` (the base for None) answers greedily, computed here with PEFT and transformers' generate:
    to chat `messages` through the chat template, or to a raw prompt string as /v1/completions takes it."""
    import torch
    from peft import PeftModel

    from daemon.train.model import load_base, resolve_base

    model, tok = load_base(resolve_base(cfg), cfg.model, "cpu", torch.float32)
    if version is not None:
        model = PeftModel.from_pretrained(model, str(cfg.path("adapters") / adapters.version_dir_name(version)))
    model.eval()
    if isinstance(messages, str):
        ids = tok(messages, return_tensors="pt")
    else:
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tok(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


class ServeProcess:
    """`traind serve` as a real process on a free loopback port, for a `with` block: `.url` ("http://127.0.0.1:N"),
    `.token`, `.client()` (an OpenAI client), `.log()` (its stderr so far)."""

    def __init__(self, config_path: Path, ready_timeout: float = 120.0, args: tuple[str, ...] = ()) -> None:
        self.config_path = Path(config_path)
        self.ready_timeout = ready_timeout
        self.args = args
        self.proc: Any = None

    def __enter__(self) -> "ServeProcess":
        import os
        import subprocess
        import sys
        import time
        import urllib.request

        from bench.harness import time_scale
        from daemon.config import load_config
        from tests.monitor_helpers import free_port

        cfg = load_config(self.config_path)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.err_path = cfg.path("logs").parent / f"serve-{self.port}.stderr"
        self.err_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "daemon", "serve", "--config", str(self.config_path),
                                      "--port", str(self.port), *self.args],
                                     stdout=subprocess.DEVNULL, stderr=open(self.err_path, "wb"), env=env,
                                     cwd=Path(__file__).resolve().parent.parent)
        deadline = time.monotonic() + self.ready_timeout * time_scale()
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"traind serve exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if b'"ready"' in r.read():
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise AssertionError(f"traind serve was not ready in time:\n{self.log()}")
            time.sleep(0.2)
        self.token = (cfg.path("status") / "monitor_token").read_text().strip()
        return self

    def client(self, **kw: Any) -> Any:
        from openai import OpenAI

        return OpenAI(**{"base_url": f"{self.url}/v1", "api_key": self.token, **kw})

    def log(self) -> str:
        try:
            return self.err_path.read_text(errors="replace")
        except OSError:
            return ""

    def __exit__(self, *exc: Any) -> None:
        import subprocess

        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
