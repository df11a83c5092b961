"""The LoRA layer's forward as one accumulating product: base(x) + (x·Aᵀ)·(s·B)ᵀ through addmm.

    from daemon.train.fused import fuse_lora
    fuse_lora(model)        # after the LoRA is attached (and after daemon.train.precision, if used)

PEFT computes a LoRA layer as `result + lora_B(lora_A(x)) * scaling`. Besides the two
rank-r products that is two full passes over the layer's output (the scaling, then the
sum), and a third in backward (the scaling's gradient), each as large as the base
product's output and, at rank 8, slower than both rank-r products together (one
25M-model layer, 936 tokens, bf16 on this CPU: 0.29 ms for the scaling, 0.31 ms for the
sum, 0.28 ms for A and B). Here the scaling is folded into B, an out x r matrix, and
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
    result = self.base_layer(x)
    if result.dtype != x.dtype:  # a base that answers in another dtype than it was given: not the plain case
        return self._peft_forward(x, *args, **kwargs)
    h = F.linear(self.lora_dropout[adapter](xin), a.to(xin.dtype))
    b_scaled_t = (b * self.scaling[adapter]).to(h.dtype).t()  # r x out: the scaling costs r per output, not a pass
    if b_scaled_t.dtype == torch.float32:
        # Row-major, so that autograd takes B's gradient as hᵀ·g ((r x tokens) @ (tokens x out)); for the
        # transposed view it takes (gᵀ·h)ᵀ, which MKL's fp32 product runs 4-5x slower at rank 8 (a 25M realistic
        # step 1.07x faster on an AVX2 CPU). bf16/fp16 go through oneDNN, not measured: left as they were.
        b_scaled_t = b_scaled_t.contiguous()
    out = torch.addmm(result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]), b_scaled_t)
    return out.view(result.shape)


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
