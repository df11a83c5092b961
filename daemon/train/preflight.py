"""Before the trainer says `ready`: can this config run on this machine? Every problem at once.

    problems = preflight.problems(cfg, capabilities())
    if problems:    # the trainer answers `config_refused` and exits; the service holds the queue

`config validate` checks what the config says; whether it can run depends on the
machine (a GPU, bitsandbytes, flash-attn, a compiler). Found only when a file
trains, such a problem would fail every queued file in turn (`training_error`)
for a fault that is the config's: so the trainer checks it first, before
minutes of loading, and the service holds the queue with the reasons in the
status instead (README, "When the config cannot run here").
"""

from __future__ import annotations

import importlib.util
import shutil
from typing import Any

from daemon.config import Config

EXIT_CONFIG = 78  # sysexits.h EX_CONFIG: the trainer refused the config; not restarted, not a crash
COMPILERS = ("g++", "c++", "clang++")  # what torch.compile's CPU backend (inductor) builds its kernels with


def problems(cfg: Config, caps: Any) -> list[str]:
    """What keeps `cfg` from training on this machine (`caps`: daemon.train.model.Capabilities)."""
    mc, tc, dc = cfg.model, cfg.training, cfg.distributed
    out: list[str] = []
    if mc.device == "cuda" and not caps.cuda:
        out.append("`model.device` = 'cuda' but no CUDA GPU is available here; use 'auto' or 'cpu'")
    device = "cuda" if caps.cuda and mc.device != "cpu" else "cpu"
    if tc.optimizer != "adamw" and device != "cuda":
        out.append(f"`training.optimizer` = {tc.optimizer!r} runs on CUDA only (bitsandbytes' 8-bit states) and this "
                   "trainer runs on the CPU; use 'adamw'")
    if mc.quantization not in ("none", "auto") and not caps.bitsandbytes:  # auto is none without bitsandbytes
        out.append(f"`model.quantization` = {mc.quantization!r} needs bitsandbytes, which is not installed; "
                   "install it or use 'none'")
    if mc.compute_dtype == "bfloat16" and device == "cuda" and not caps.bf16:
        out.append(f"`model.compute_dtype` = 'bfloat16' is not supported by this GPU ({caps.cuda_name}); "
                   "use 'float16' or 'auto'")
    if mc.attention == "flash_attention_2":
        if device != "cuda":
            out.append("`model.attention` = 'flash_attention_2' needs a CUDA GPU; use 'auto' or 'sdpa'")
        elif importlib.util.find_spec("flash_attn") is None:
            out.append("`model.attention` = 'flash_attention_2' needs the flash-attn package; install it or use 'auto'")
    if dc.backend == "nccl" and device != "cuda":
        out.append("`distributed.backend` = 'nccl' needs CUDA GPUs; use 'auto' (gloo on the CPU)")
    if dc.strategy == "fsdp" and mc.quantization not in ("none", "auto") and device != "cuda":
        out.append(f"`distributed.strategy` = 'fsdp' with a 4-bit base (`model.quantization` = {mc.quantization!r}) "
                   "runs on CUDA only; on the CPU use strategy 'ddp', or quantization 'none'")
    if tc.compile and device == "cpu" and not any(shutil.which(c) for c in COMPILERS):
        out.append("`training.compile` = true on the CPU needs a C++ compiler (g++ or clang++) for torch.compile's "
                   "kernels, and none is on the PATH; install one or set it to false")
    return out
