"""The base's RMSNorm layers as one autograd function with a written-out backward: the same sums, fewer passes.

    from daemon.train.norms import fuse_rms_norms
    fuse_rms_norms(model)      # after the LoRA is attached; not with training.compile (inductor fuses them itself)

transformers' RMSNorm (Llama, Qwen2/3, Mistral and most decoders since) is

    y = weight * (x32 * rsqrt(mean(x32²) + eps)).to(x.dtype),   x32 = x.to(float32)

written as six tensor operations. Eager autograd records each of them, keeps an fp32
copy of the input for the backward and differentiates the chain one operation at a
time: about twenty passes over the activations per norm and step, in fp32 where the
model computes in bf16. A decoder block has two norms over the hidden states and, in
Qwen3, two more over every head's queries and keys; on the 25M model on this CPU they
took about a tenth of a realistic step (a norm over 936 x 512 bf16 activations: 5.9 ms
forward and backward as transformers writes it, 2.0 ms here; `bench/norms.py`).

Here the forward is the same expression (the output is bit for bit the module's own:
checked on each module before it is switched), and the backward is its closed form,

    dx = r * (g' - x̂ * mean(g' * x̂)),   g' = (g * weight) in fp32, x̂ = x32 * r, r = rsqrt(mean(x32²) + eps)

which needs only the input (kept by the autograd graph anyway) and r, one number per row.

Which modules: those whose class name says RMSNorm, with a one-dimensional weight and an
epsilon (`variance_epsilon` or `eps`), and whose own forward gives exactly this output on
a probe input. A variant that computes something else (Gemma's 1 + weight, a norm that
casts before the product) fails the probe and keeps its forward. Only the instance's
forward is replaced (what accelerate's hooks do): class, parameters, state-dict keys and
pickling stay transformers'.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x32 = x.to(torch.float32)
        r = torch.rsqrt(torch.linalg.vecdot(x32, x32).unsqueeze(-1).div_(x.shape[-1]).add_(eps))  # mean(x32²): one pass
        ctx.save_for_backward(x, weight, r)
        return weight * (x32 * r).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, weight, r = ctx.saved_tensors
        x_hat = x.to(torch.float32) * r
        dx = dw = None
        if ctx.needs_input_grad[0]:
            g_w = (g * weight).to(torch.float32)  # rounded as the module's own backward rounds it
            minus_mean = torch.linalg.vecdot(g_w, x_hat).unsqueeze(-1).div_(-x.shape[-1])
            dx = torch.addcmul(g_w, x_hat, minus_mean).mul_(r).to(x.dtype)
        if ctx.needs_input_grad[1]:
            dw = (g.to(torch.float32) * x_hat.to(x.dtype)).reshape(-1, weight.shape[-1]).sum(0).to(weight.dtype)
        return dx, dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x32 * rsqrt(mean(x32²) + eps)).to(x.dtype), with the closed-form backward."""
    return _RMSNorm.apply(x, weight, eps)


def _epsilon(module: nn.Module) -> float | None:
    for name in ("variance_epsilon", "eps"):
        eps = getattr(module, name, None)
        if isinstance(eps, float):
            return eps
    return None


def _forward(module: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    return rms_norm(hidden_states, module.weight, _epsilon(module))


def _matches(module: nn.Module, eps: float) -> bool:
    """The module's own forward equals rms_norm, bit for bit, on a probe in its weight's dtype and in fp32."""
    weight = module.weight
    gen = torch.Generator(device="cpu").manual_seed(0)
    probe = torch.randn(2, 3, weight.shape[-1], generator=gen) * 3
    with torch.no_grad():
        for dtype in {weight.dtype, torch.float32}:
            x = probe.to(device=weight.device, dtype=dtype)
            try:
                own = type(module).forward(module, x)
                if not isinstance(own, torch.Tensor) or own.shape != x.shape or not torch.equal(own, rms_norm(x, weight, eps)):
                    return False
            except Exception:  # a forward that wants more than the hidden states (or a weight not yet materialised)
                return False
    return True


def fuse_rms_norms(model: nn.Module) -> int:
    """Give every RMSNorm of `model` whose forward is the formula above the closed-form backward. Returns how many."""
    changed = kept = 0
    for module in model.modules():
        if "RMSNorm" not in type(module).__name__:
            continue
        if "forward" in vars(module):  # switched already, or wrapped by someone else (a hook): left as it is
            own = vars(module)["forward"]
            changed += isinstance(own, functools.partial) and own.func is _forward
            continue
        weight, eps = getattr(module, "weight", None), _epsilon(module)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or eps is None or not weight.is_floating_point():
            kept += 1
            continue
        if not _matches(module, eps):
            kept += 1
            continue
        module.forward = functools.partial(_forward, module)
        changed += 1
    if changed or kept:
        log.info("rms norms: %d with the closed-form backward, %d keep their own forward", changed, kept)
    return changed
