"""Reduced-precision compute on the loaded model: the LoRA branch and attention in the dtype that is fastest.

    from daemon.train import precision
    precision.lora_in_activation_dtype(model)          # after the LoRA is attached: A and B compute like the base
    precision.fp32_attention_for_short_rows(base, device, dtype)  # CPU, bf16/fp16: rows up to 512 attend in fp32

daemon.train.levers applies both when the model loads, as `speed.lora_in_compute_dtype` and
`speed.fp32_short_attention` say (the second only with `model.attention` auto).

Both are used when the model computes in bf16 or fp16 (`model.compute_dtype`, auto: bf16
on CPUs with AVX512-BF16 or AMX, bf16/fp16 on GPUs). A model in fp32 is left as it is.

The LoRA branch. PEFT keeps the LoRA factors in fp32 (AdamW needs fp32 weights) and so
casts each LoRA layer's input up to fp32, runs A and B in fp32, and casts the sum back:
per layer and step, several passes over the activations in fp32 that the base's bf16
matmul never made, and fp32 matmuls. Here A and B run in the dtype of their input,
with the fp32 weight cast for the product (a differentiable cast: the gradient still
reaches the fp32 weight, and AdamW updates it in fp32). That is what autocast does to
a linear layer (transformers' Trainer with bf16=True), confined to the LoRA factors:
the LM head and the loss keep their precision. A base whose activations are fp32 (the
norms of a 4-bit base prepared by PEFT are fp32) keeps fp32 LoRA products.

Attention. On the CPU, torch's flash-attention kernel is slower in bf16 than in fp32 for
short rows, level at about 512 tokens and faster in bf16 beyond (`bench/attention_dtype.py`;
the figures: docs/PERFORMANCE.md, "The precision levers"). So rows of up to FP32_ROWS_UP_TO
tokens run their attention in fp32 (more precise too) and longer ones in the compute dtype. The rule
depends only on the row length, so a resume computes exactly what the first run did.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

log = logging.getLogger(__name__)

ATTENTION = "sdpa_fp32_short_rows"  # registered with transformers beside "sdpa"
FP32_ROWS_UP_TO = 512  # key length up to which CPU attention runs in fp32 (the measured crossover; see above)


class ActivationDtypeLinear(nn.Linear):
    """An nn.Linear (a LoRA factor) whose product runs in its input's dtype; its weight stays as stored."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)


def lora_in_activation_dtype(model: Any) -> int:
    """Make every LoRA layer of `model` (a PeftModel) compute A and B in its input's dtype. Returns the layers changed.

    A layer whose factors are not plain nn.Linear (an embedding's LoRA, a variant) keeps PEFT's casting."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    changed = 0
    for module in model.modules():
        if not isinstance(module, BaseTunerLayer) or not hasattr(module, "lora_A"):
            continue
        factors = [*module.lora_A.values(), *module.lora_B.values()]
        if not factors or any(type(f) not in (nn.Linear, ActivationDtypeLinear) for f in factors):
            continue
        for f in factors:
            f.__class__ = ActivationDtypeLinear  # same parameters and state-dict keys; only forward differs
        module.cast_input_dtype_enabled = False  # PEFT's upcast of the input to the factors' fp32
        changed += 1
    return changed


def _attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """transformers' SDPA attention, in fp32 for rows of up to FP32_ROWS_UP_TO tokens on the CPU."""
    if query.device.type != "cpu" or query.dtype == torch.float32 or key.shape[-2] > FP32_ROWS_UP_TO:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    mask = attention_mask if attention_mask is None or attention_mask.dtype == torch.bool else attention_mask.float()
    with torch.autocast("cpu", enabled=False):  # autocast would put SDPA back in bf16
        out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), mask, **kwargs)
    return out.to(query.dtype), weights


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, _attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)  # the masks SDPA takes (None, or boolean)


def fp32_attention_for_short_rows(model: Any, device: str, dtype: torch.dtype) -> bool:
    """Switch a base on the CPU computing in bf16/fp16 (`dtype`) from SDPA to ATTENTION. False (and unchanged)
    where it does not apply."""
    if device != "cpu" or dtype == torch.float32 or model.config._attn_implementation != "sdpa":
        return False
    _register()
    try:
        model.set_attn_implementation(ATTENTION)
    except Exception as e:  # an architecture without transformers' attention interface keeps its SDPA
        log.info("attention: %s keeps sdpa (%s: %s)", type(model).__name__, type(e).__name__, e)
        return False
    return True
