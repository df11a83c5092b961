"""daemon.train.precision: in bf16 the LoRA factors compute in the activations' dtype, and short rows attend in fp32.

Each shortcut must compute what it says, exactly (the same operations, compared bit for bit),
stay within bf16's rounding of PEFT's fp32 route, let the gradient reach the fp32 LoRA
weights, and leave fp32 models, explicit choices and the adapter's files as they were.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from daemon.train import precision  # noqa: E402
from daemon.train.model import load_adapter, load_for_training, lora_state, save_adapter  # noqa: E402
from tests.test_loop import make_cfg, one_thread  # noqa: E402, F401 - one_thread: autouse

ADAPTER = "default"


def loaded(models_dir: Path, tmp_path: Path, quantization: str = "none", **model: str):
    cfg = make_cfg(models_dir, tmp_path, quantization)
    return load_for_training(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **model)), seed=1)


def lora_layers(model) -> list:
    return [m for m in model.modules() if hasattr(m, "lora_A") and len(m.lora_A)]


def test_in_bf16_the_lora_product_runs_in_the_activation_dtype_and_trains_fp32_weights(models_dir: Path,
                                                                                       tmp_path: Path) -> None:
    lm = loaded(models_dir, tmp_path, compute_dtype="bfloat16")
    layers = lora_layers(lm.model)
    assert len(layers) == 2 * len(make_cfg(models_dir, tmp_path).lora.target_modules)  # each target of both blocks
    assert all(type(f) is precision.ActivationDtypeLinear and f.weight.dtype == torch.float32
               for m in layers for f in (m.lora_A[ADAPTER], m.lora_B[ADAPTER]))
    layer = layers[0]
    a, b, s = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight, layer.scaling[ADAPTER]
    with torch.no_grad():
        b.normal_(0, 0.05)  # B starts at zero: give the branch something to add
    x = torch.randn(3, 5, a.shape[1], generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    out = layer._peft_forward(x)  # PEFT's forward with these factors; the fused one: tests/test_fused.py
    assert out.dtype == torch.bfloat16
    with torch.no_grad():
        base = layer.base_layer(x)
        in_bf16 = base + F.linear(F.linear(x, a.to(torch.bfloat16)), b.to(torch.bfloat16)) * s
        peft_fp32 = (base + F.linear(F.linear(x.float(), a), b) * s).to(torch.bfloat16)  # PEFT's own route
    assert torch.equal(out, in_bf16)
    branch = (peft_fp32.float() - base.float()).abs().max()
    assert (out.float() - peft_fp32.float()).abs().max() <= 0.02 * branch + 1e-2 * base.float().abs().max()
    out.float().square().sum().backward()
    assert a.grad is not None and b.grad is not None
    assert a.grad.dtype == b.grad.dtype == torch.float32 and a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0


def test_fp32_keeps_peft_lora_and_sdpa_and_the_adapter_files_do_not_change(models_dir: Path, tmp_path: Path) -> None:
    fp32 = loaded(models_dir, tmp_path / "a", compute_dtype="float32")
    assert all(type(f) is nn.Linear and m.cast_input_dtype_enabled
               for m in lora_layers(fp32.model) for f in (m.lora_A[ADAPTER], m.lora_B[ADAPTER]))
    assert fp32.model.get_base_model().config._attn_implementation == "sdpa"
    bf16 = loaded(models_dir, tmp_path / "b", compute_dtype="bfloat16")
    assert lora_state(bf16.model).keys() == lora_state(fp32.model).keys()
    with torch.no_grad():
        for p in bf16.model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    save_adapter(bf16.model, tmp_path / "adapter")
    load_adapter(fp32.model, tmp_path / "adapter")  # a bf16-trained adapter loads where fp32 runs, and back
    assert all(torch.equal(v, lora_state(bf16.model)[k]) for k, v in lora_state(fp32.model).items())


def test_a_4bit_base_keeps_fp32_lora_products_where_its_activations_are_fp32(models_dir: Path, tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """PEFT's k-bit preparation keeps the norms in fp32, so the LoRA layers see fp32 inputs: the factors follow them."""
    pytest.importorskip("bitsandbytes")
    lm = loaded(models_dir, tmp_path, "nf4", compute_dtype="bfloat16")
    seen: list[torch.dtype] = []
    # the LoRA products themselves: daemon.train.fused's addmm of h = x Aᵀ (in its input's dtype) and s B into
    # the base's output, once per LoRA layer
    real_addmm = torch.addmm

    def addmm(inp, m1, m2, *args, **kwargs):
        seen.extend([inp.dtype, m1.dtype, m2.dtype])
        return real_addmm(inp, m1, m2, *args, **kwargs)

    monkeypatch.setattr(torch, "addmm", addmm)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    lm.model(input_ids=ids, labels=ids).loss.backward()
    monkeypatch.undo()
    assert len(seen) == 3 * len(lora_layers(lm.model)) and all(d == torch.float32 for d in seen)
    assert all(f.weight.dtype == torch.float32 for m in lora_layers(lm.model) for f in (m.lora_A[ADAPTER], m.lora_B[ADAPTER]))
    assert all(p.grad is not None for p in lm.model.parameters() if p.requires_grad)


def test_short_rows_attend_in_fp32_and_long_rows_in_the_compute_dtype(models_dir: Path, tmp_path: Path) -> None:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    lm = loaded(models_dir, tmp_path, compute_dtype="bfloat16")
    base = lm.model.get_base_model()
    assert base.config._attn_implementation == precision.ATTENTION
    attn = base.model.layers[0].self_attn
    cfg = base.config
    gen = torch.Generator().manual_seed(0)
    for length, inside in ((16, torch.float32), (precision.FP32_ROWS_UP_TO, torch.float32),
                           (precision.FP32_ROWS_UP_TO + 1, torch.bfloat16)):
        q = torch.randn(2, cfg.num_attention_heads, length, attn.head_dim, generator=gen).to(torch.bfloat16)
        k, v = (torch.randn(2, cfg.num_key_value_heads, length, attn.head_dim, generator=gen).to(torch.bfloat16)
                for _ in range(2))
        kwargs = {"dropout": 0.0, "scaling": attn.scaling}
        want = sdpa_attention_forward(attn, q.to(inside), k.to(inside), v.to(inside), None, **kwargs)[0].to(torch.bfloat16)
        got = precision._attention(attn, q, k, v, None, **kwargs)[0]
        assert got.dtype == torch.bfloat16 and torch.equal(got, want), length
        with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast does not put a short row back in bf16
            assert torch.equal(precision._attention(attn, q, k, v, None, **kwargs)[0], want), length


def test_an_explicit_attention_choice_is_kept(models_dir: Path, tmp_path: Path) -> None:
    lm = loaded(models_dir, tmp_path, compute_dtype="bfloat16", attention="sdpa")
    assert lm.model.get_base_model().config._attn_implementation == "sdpa"
