"""The LoRA layer's forward as one accumulating product: base(x) + (x·Aᵀ)·(s·B)ᵀ through addmm.

    from daemon.train.fused import fuse_lora
    fuse_lora(model)        # after the LoRA is attached (and after daemon.train.precision, if used)

daemon.train.levers applies it when the model loads, as `speed.fused_lora` says.

PEFT computes a LoRA layer as `result + lora_B(lora_A(x)) * scaling`. Besides the two
rank-r products that is two full passes over the layer's output (the scaling, then the
sum), and a third in backward (the scaling's gradient), each as large as the base
product's output and, at rank 8, slower than both rank-r products together
(docs/PERFORMANCE.md, "The fused LoRA forward"). Here the scaling is folded into B, an out x r matrix, and
the product is accumulated into the base's output by one addmm, which BLAS does in the
product's own pass. The sum is rounded once instead of up to three times; the gradient
reaches A and B as before (through the fold, a product with a constant); parameters,
their names, their dtypes and the adapter's files stay PEFT's.

Only the plain case takes this path: exactly one active adapter, no variant (DoRA and
the like), no LoRA bias, not merged, no per-call adapter names or extra arguments, no
autocast, the LoRA input in the base's dtype. Any other call runs PEFT's own forward,
unchanged. Dropout on the LoRA input is applied
as PEFT applies it. The LoRA input is cast as PEFT casts it (`cast_input_dtype_enabled`,
which daemon.train.precision turns off where the model computes in bf16/fp16), and the
factors are cast to the input's dtype for the products, as autocast would.

An fp32 dense base without LoRA dropout (a CPU without native bf16 computes in fp32) goes
one step further: the layer is one autograd function with its backward written out
(`_DenseLora`), which accumulates the LoRA branch's input gradient into the base's in
the same product's pass instead of a second product and a sum (measured on a CPU without
native bf16: docs/PERFORMANCE.md, "On a CPU without native bf16").
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

_FUSED: dict[type, type] = {}  # PEFT layer class -> its fused subclass


def _fused_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    adapter = _plain_adapter(self, x, args, kwargs)
    if adapter is None:
        return self._peft_forward(x, *args, **kwargs)
    a, b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
    xin = self._cast_input_dtype(x, a.dtype)
    if xin.dtype != x.dtype:  # PEFT's fp32 route for a lower-precision base: its own forward, its own rounding
        return self._peft_forward(x, *args, **kwargs)
    base = self.base_layer
    dropout = self.lora_dropout[adapter]
    if (x.dtype == torch.float32 and type(base) is torch.nn.Linear and base.weight.dtype == torch.float32
            and not base.weight.requires_grad and not base._forward_hooks and not base._forward_pre_hooks
            and (isinstance(dropout, torch.nn.Identity) or not dropout.training or dropout.p == 0)):
        bs_t = (b * self.scaling[adapter]).t().contiguous()
        flat = x.reshape(-1, x.shape[-1])
        out = _DenseLora.apply(flat, base.weight, base.bias, a, bs_t)
        return out.view(*x.shape[:-1], out.shape[-1])
    result = base(x)
    if result.dtype != x.dtype:  # a base that answers in another dtype than it was given: not the plain case
        return self._peft_forward(x, *args, **kwargs)
    h = F.linear(self.lora_dropout[adapter](xin), a.to(xin.dtype))
    b_scaled_t = (b * self.scaling[adapter]).to(h.dtype).t()  # r x out: the scaling costs r per output, not a pass
    if b_scaled_t.dtype == torch.float32:
        # Row-major, so that autograd takes B's gradient as hᵀ·g ((r x tokens) @ (tokens x out)); for the
        # transposed view it takes (gᵀ·h)ᵀ, which MKL's fp32 product runs several times slower at rank 8
        # (docs/PERFORMANCE.md, "B row-major for its gradient"). bf16/fp16 go through oneDNN, not measured: left
        # as they were.
        b_scaled_t = b_scaled_t.contiguous()
    out = torch.addmm(result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]), b_scaled_t)
    return out.view(result.shape)


class _DenseLora(torch.autograd.Function):
    """base(x) + (x·Aᵀ)·(s·B)ᵀ for an fp32 nn.Linear base without LoRA dropout, with its backward written out.

    Autograd would take the input's gradient as g·W plus (g·(s·B))·A, two products and a sum over the
    input's size; here the thin product accumulates into the full one (addmm_), in its own pass. B's
    gradient is taken as hᵀ·g, the form MKL's fp32 product runs fast at rank r (see _fused_forward).
    In: x [tokens, in], the frozen weight [out, in] and bias, A [r, in], (s·B)ᵀ [r, out] row-major."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                bs_t: torch.Tensor) -> torch.Tensor:
        h = x @ a.t()
        ctx.save_for_backward(x, weight, a, bs_t, h)
        return torch.addmm(F.linear(x, weight, bias), h, bs_t)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, a, bs_t, h = ctx.saved_tensors
        g = g.contiguous()
        gh = g @ bs_t.t()  # [tokens, r]: the gradient reaching the LoRA branch's inner product
        dx = (g @ weight).addmm_(gh, a) if ctx.needs_input_grad[0] else None
        da = gh.t() @ x if ctx.needs_input_grad[3] else None
        dbs_t = h.t() @ g if ctx.needs_input_grad[4] else None
        return dx, None, None, da, dbs_t


def _plain_adapter(layer: Any, x: torch.Tensor, args: tuple, kwargs: dict) -> str | None:
    """The one active adapter when this call may take the fused path, else None."""
    if args or kwargs or layer.disable_adapters or layer.merged or torch.is_autocast_enabled(x.device.type):
        return None
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    if len(active) != 1 or active[0] in layer.lora_variant or layer.lora_B[active[0]].bias is not None:
        return None  # several adapters, DoRA and the like, a LoRA bias (an adapter added after fusing)
    return active[0]


def _peft_layer_classes() -> tuple[type, ...]:
    """PEFT's dense LoRA layers whose forward is result + lora_B(lora_A(dropout(x))) * scaling."""
    from peft.tuners.lora.layer import Linear

    classes: list[type] = [Linear]
    try:
        from peft.tuners.lora import bnb
    except ImportError:  # bitsandbytes missing: PEFT has no quantized LoRA layers to fuse
        return tuple(classes)
    if hasattr(bnb, "Linear4bit"):  # the 4-bit bases traind offers (nf4, fp4); 8-bit ones it does not load
        classes.append(bnb.Linear4bit)
    return tuple(classes)


def _fused_class(cls: type) -> type:
    if cls not in _FUSED:
        name = f"Fused{cls.__name__}"
        fused = type(cls)(name, (cls,), {"forward": _fused_forward, "_peft_forward": cls.forward,
                                         "__module__": __name__, "__qualname__": name})
        globals()[name] = fused  # importable by name, so a fused model pickles (torch.save) like PEFT's
        _FUSED[cls] = fused
    return _FUSED[cls]


def __getattr__(name: str) -> type:
    """`daemon.train.fused.FusedLinear` and the like, made on first use: what unpickling a fused model looks up."""
    for cls in _peft_layer_classes():
        if name == f"Fused{cls.__name__}":
            return _fused_class(cls)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def fused_classes() -> tuple[type, ...]:
    """The fused layer classes made so far (each a direct subclass of its PEFT class)."""
    return tuple(_FUSED.values())


def fuse_lora(model: Any) -> int:
    """Give every plain LoRA layer of `model` (a PeftModel) the fused forward. Returns the layers changed.

    A layer is changed in place (its class only): same parameters, buffers, state-dict keys and isinstance
    checks. A layer whose factors are not linear (an embedding's or a convolution's LoRA) keeps PEFT's."""
    classes = _peft_layer_classes()
    changed = 0
    for module in model.modules():
        if type(module) in fused_classes():
            changed += 1
            continue
        if type(module) not in classes:
            continue
        factors = [*module.lora_A.values(), *module.lora_B.values()]
        if not factors or any(not isinstance(f, torch.nn.Linear) or f.bias is not None for f in factors):
            continue
        module.__class__ = _fused_class(type(module))
        changed += 1
    return changed
