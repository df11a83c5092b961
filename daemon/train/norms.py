"""The base's RMSNorm layers as one autograd function with a written-out backward: the same sums, fewer passes.

    from daemon.train.norms import fuse_rms_norms
    fuse_rms_norms(model)      # after the LoRA is attached; not with training.compile (inductor fuses them itself)

daemon.train.levers applies it when the model loads, as `speed.norms_backward` says.

transformers' RMSNorm (Llama, Qwen2/3, Mistral and most decoders since) is

    y = weight * (x32 * rsqrt(mean(x32²) + eps)).to(x.dtype),   x32 = x.to(float32)

written as six tensor operations. Eager autograd records each of them, keeps an fp32
copy of the input for the backward and differentiates the chain one operation at a
time: about twenty passes over the activations per norm and step, in fp32 where the
model computes in bf16. A decoder block has two norms over the hidden states and, in
Qwen3, two more over every head's queries and keys, so they are a visible share of a small
model's step (measured by `bench/norms.py`: docs/PERFORMANCE.md, "The norms' closed-form backward").

Here the forward is the same expression (the output is the module's own, bit for bit:
checked on each module before it is switched), and the backward is its closed form,

    dx = r * (g' - x̂ * mean(g' * x̂)),   g' = g * weight in fp32, x̂ = x32 * r, r = rsqrt(mean(x32²) + eps)

from the input in its own dtype and r, one number per row, instead of an fp32 copy. Both
run with autocast off, so autocast changes neither. The backward is not differentiable
again: a second derivative raises. Because the input itself is kept, writing into it in
place after the norm would make autograd raise "modified by an inplace operation" where
transformers' copy would not notice; the decoders' blocks in transformers 5 do not do that.

Which modules: those whose class name says RMSNorm, with a one-dimensional weight and an
epsilon (`variance_epsilon` or `eps`), whose forward takes the hidden states only (a gated
norm's other path would go unseen), and whose own forward gives exactly this output, dtype
included, on a copy of the module given a random weight, for inputs in bf16, fp16 and fp32.
A variant that computes something else (Gemma's 1 + weight; Olmo2's cast after the product,
which only a weight other than ones and an input dtype other than the weight's show) keeps
its own forward. Only the instance's forward is replaced (what accelerate's hooks do): class,
parameters, state-dict keys and pickling stay transformers'.
"""

from __future__ import annotations

import copy
import functools
import inspect
import logging
from typing import Any

import torch
from torch import nn
from torch.autograd.function import once_differentiable

log = logging.getLogger(__name__)

PROBE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # the inputs a norm is checked on, whatever its weight


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):  # autocast would run the vecdot in bf16
            x32 = x.to(torch.float32)
            r = torch.rsqrt(torch.linalg.vecdot(x32, x32).unsqueeze(-1).div_(x.shape[-1]).add_(eps))  # mean(x32²), one pass
            ctx.save_for_backward(x, weight, r)
            return weight * (x32 * r).to(x.dtype)

    @staticmethod
    @once_differentiable  # the closed form is not itself differentiated: a second derivative raises, not lies
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, weight, r = ctx.saved_tensors
        with torch.autocast(g.device.type, enabled=False):
            x_hat = x.to(torch.float32) * r
            dx = dw = None
            if ctx.needs_input_grad[0]:
                # in the output's dtype, as the module's own backward has it (which, for an fp32 weight over bf16
                # activations, then rounds it to bf16: not needed here, the rest is fp32)
                g_w = (g * weight).to(torch.float32)
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


def _forward(module: nn.Module, eps: float, hidden_states: torch.Tensor) -> torch.Tensor:
    return rms_norm(hidden_states, module.weight, eps)


def _takes_only_the_hidden_states(module: nn.Module) -> bool:
    """Its forward has one parameter: a norm with a gate or other inputs has paths the probe would not see."""
    try:
        params = list(inspect.signature(type(module).forward).parameters.values())[1:]  # after self
    except (TypeError, ValueError):
        return False
    return len(params) == 1 and params[0].kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def _matches(module: nn.Module, eps: float) -> bool:
    """The module's own forward equals rms_norm, bit for bit and in dtype, on a copy of it with a random weight
    (in the module's weight dtype) for inputs in bf16, fp16 and fp32: where it casts matters only when the two
    dtypes differ, and a weight of ones hides a cast before the product."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    try:
        probe = copy.deepcopy(module)
        with torch.no_grad():
            probe.weight.copy_(torch.randn(probe.weight.shape, generator=gen) * 0.5 + 1)
            x = torch.randn(4, 16, probe.weight.shape[-1], generator=gen) * torch.rand(4, 16, 1, generator=gen) * 8
            for dtype in PROBE_DTYPES:
                xd = x.to(device=probe.weight.device, dtype=dtype)
                own, ours = type(probe).forward(probe, xd), rms_norm(xd, probe.weight, eps)
                if not isinstance(own, torch.Tensor) or own.dtype != ours.dtype or not torch.equal(own, ours):
                    return False
    except Exception as e:  # a weight not materialised (meta), a forward that cannot run alone: keep its own
        log.debug("rms norms: %s not probed (%s: %s)", type(module).__name__, type(e).__name__, e)
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
            switched = isinstance(own, functools.partial) and own.func is _forward
            changed, kept = changed + switched, kept + (not switched)
            continue
        weight, eps = getattr(module, "weight", None), _epsilon(module)
        if (not isinstance(weight, torch.Tensor) or weight.dim() != 1 or eps is None or not weight.is_floating_point()
                or not _takes_only_the_hidden_states(module) or not _matches(module, eps)):
            kept += 1
            continue
        module.forward = functools.partial(_forward, module, eps)
        changed += 1
    if changed or kept:
        log.info("rms norms: %d with the closed-form backward, %d keep their own forward", changed, kept)
    return changed
