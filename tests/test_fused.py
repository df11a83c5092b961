"""daemon.train.fused: the LoRA layer's forward as one addmm, against PEFT's own forward on the same layer.

The fused path must compute PEFT's function (to fp32 rounding in fp32; to bf16 rounding in
bf16), give A, B and the input the same gradients, apply dropout with the same mask, leave
every non-plain call (merged, adapters disabled, per-call adapter names) to PEFT, and keep
parameter names, the state dict and the adapter's files as they were.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402

from daemon.train import fused  # noqa: E402
from daemon.train.model import load_for_training, lora_state  # noqa: E402
from tests.test_loop import make_cfg, one_thread  # noqa: E402, F401 - one_thread: autouse

ADAPTER = "default"


def loaded(models_dir: Path, tmp_path: Path, quantization: str = "none", dropout: float = 0.0, **model: str):
    cfg = make_cfg(models_dir, tmp_path, quantization)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **model),
                              lora=dataclasses.replace(cfg.lora, dropout=dropout))
    return load_for_training(cfg, seed=1)


def lora_layers(model) -> list:
    return [m for m in model.modules() if hasattr(m, "lora_A") and len(m.lora_A)]


def nonzero_b(layer) -> None:
    with torch.no_grad():  # B starts at zero: give the branch something to add
        layer.lora_B[ADAPTER].weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(3))


def forward_and_grads(layer, x: torch.Tensor, peft: bool, seed: int = 0):
    """Output and the gradients of (A, B, x) for one call, fused or PEFT's own forward."""
    x = x.detach().clone().requires_grad_()
    torch.manual_seed(seed)  # the same dropout mask for both
    out = layer._peft_forward(x) if peft else layer(x)
    out.float().square().sum().backward()
    a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
    grads = (a.grad.clone(), b.grad.clone(), x.grad.clone())
    a.grad = b.grad = None
    return out.detach(), grads


@pytest.fixture
def addmm_dtypes(monkeypatch: pytest.MonkeyPatch) -> list:
    """The (input, mat1, mat2) dtypes of every torch.addmm call: the fused path is the only caller here."""
    calls: list = []
    real = torch.addmm

    def spy(inp, mat1, mat2, *args, **kwargs):
        calls.append((inp.dtype, mat1.dtype, mat2.dtype))
        return real(inp, mat1, mat2, *args, **kwargs)

    monkeypatch.setattr(fused.torch, "addmm", spy)
    return calls


def close(got: torch.Tensor, want: torch.Tensor, rel: float) -> bool:
    return bool((got.float() - want.float()).abs().max() <= rel * want.float().abs().max() + 1e-12)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fp32_fused_forward_and_gradients_equal_peft(models_dir: Path, tmp_path: Path, dropout: float,
                                                    addmm_dtypes: list) -> None:
    lm = loaded(models_dir, tmp_path, dropout=dropout, compute_dtype="float32")
    layers = lora_layers(lm.model)
    assert layers and all(type(m) in fused.fused_classes() for m in layers)
    lm.model.train()
    for layer in layers:
        nonzero_b(layer)
        x = torch.randn(2, 7, layer.lora_A[ADAPTER].weight.shape[1], generator=torch.Generator().manual_seed(1))
        calls = len(addmm_dtypes)
        out, grads = forward_and_grads(layer, x, peft=False)
        assert len(addmm_dtypes) == calls + 1  # the fused path, not a fallback
        want, want_grads = forward_and_grads(layer, x, peft=True)
        with torch.enable_grad():  # no dropout: one autograd function with its backward written out
            node = layer(x.requires_grad_()).grad_fn.next_functions[0][0]
        assert (type(node).__name__ == "_DenseLoraBackward") == (dropout == 0.0), type(node).__name__
        assert out.shape == want.shape and out.dtype == want.dtype == torch.float32
        assert close(out, want, 1e-6)
        for g, w in zip(grads, want_grads):
            assert g.abs().sum() > 0 and close(g, w, 1e-5)


def test_bf16_fused_forward_is_the_addmm_it_says_and_within_rounding_of_peft(models_dir: Path, tmp_path: Path) -> None:
    lm = loaded(models_dir, tmp_path, compute_dtype="bfloat16")
    layer = lora_layers(lm.model)[0]
    nonzero_b(layer)
    a, b, s = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight, layer.scaling[ADAPTER]
    x = torch.randn(3, 5, a.shape[1], generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    out, grads = forward_and_grads(layer, x, peft=False)
    want, want_grads = forward_and_grads(layer, x, peft=True)
    with torch.no_grad():
        base = layer.base_layer(x)
        h = F.linear(x, a.to(torch.bfloat16))
        written = torch.addmm(base.reshape(-1, base.shape[-1]), h.reshape(-1, h.shape[-1]),
                              (b * s).to(torch.bfloat16).t()).view(base.shape)
    assert out.dtype == torch.bfloat16 and torch.equal(out, written)
    branch = (want.float() - base.float()).abs().max()
    assert (out.float() - want.float()).abs().max() <= 0.02 * branch + 1e-2 * base.float().abs().max()
    for g, w in zip(grads, want_grads):
        assert g.abs().sum() > 0 and close(g, w, 0.02)
    assert grads[0].dtype == grads[1].dtype == torch.float32  # AdamW keeps updating fp32 weights


def test_every_call_that_is_not_plain_runs_peft_forward(models_dir: Path, tmp_path: Path, addmm_dtypes: list) -> None:
    from peft import LoraConfig

    lm = loaded(models_dir, tmp_path, compute_dtype="float32")
    layer = lora_layers(lm.model)[0]
    nonzero_b(layer)
    x = torch.randn(2, 4, layer.lora_A[ADAPTER].weight.shape[1], generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        with lm.model.disable_adapter():
            assert torch.equal(layer(x), layer.base_layer(x))
        assert torch.equal(layer(x, adapter_names=[ADAPTER, ADAPTER]), layer._peft_forward(x, adapter_names=[ADAPTER, ADAPTER]))
        plain = layer(x)
        assert len(addmm_dtypes) == 1  # the plain call, fused
        addmm_dtypes.clear()
        layer.merge()
        try:
            assert torch.equal(layer(x), layer.base_layer(x))  # merged: the base carries the update
            assert close(layer(x), plain, 1e-5)
        finally:
            layer.unmerge()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(layer(x), layer._peft_forward(x))
        assert addmm_dtypes == []  # none of these took the fused path
        target = lm.model.peft_config[ADAPTER].target_modules
        # adapters added after fusing: DoRA, a LoRA bias, two active at once; each runs PEFT's forward
        for name, extra in (("dora", {"use_dora": True}), ("bias", {"lora_bias": True})):
            lm.model.add_adapter(name, LoraConfig(r=4, lora_alpha=8, target_modules=target, **extra))
            lm.model.base_model.set_adapter(name)
            with torch.no_grad():
                layer.lora_B[name].weight.normal_(0, 0.05)
                if layer.lora_B[name].bias is not None:
                    layer.lora_B[name].bias.normal_(0, 0.05)
            assert torch.equal(layer(x), layer._peft_forward(x)), name
        lm.model.base_model.set_adapter([ADAPTER, "bias"])
        assert layer.active_adapters == [ADAPTER, "bias"] and torch.equal(layer(x), layer._peft_forward(x))
        assert addmm_dtypes == []


def test_a_bf16_base_with_peft_fp32_route_runs_peft_forward(models_dir: Path, tmp_path: Path,
                                                            addmm_dtypes: list) -> None:
    """The LoRA input cast up to fp32 (PEFT's route; traind turns it off in bf16): PEFT's forward and rounding."""
    lm = loaded(models_dir, tmp_path, compute_dtype="bfloat16")
    layer = lora_layers(lm.model)[0]
    nonzero_b(layer)
    for f in (layer.lora_A[ADAPTER], layer.lora_B[ADAPTER]):
        f.__class__ = torch.nn.Linear
    layer.cast_input_dtype_enabled = True
    x = torch.randn(2, 4, layer.lora_A[ADAPTER].weight.shape[1], generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(layer(x.to(torch.bfloat16)), layer._peft_forward(x.to(torch.bfloat16)))
    assert addmm_dtypes == []


def test_fusing_keeps_names_state_files_and_pickles(models_dir: Path, tmp_path: Path) -> None:
    import io

    from peft.tuners.lora import LoraLayer

    from daemon.train.model import load_adapter, save_adapter

    lm = loaded(models_dir, tmp_path, compute_dtype="float32")
    layers = lora_layers(lm.model)
    keys = list(lm.model.state_dict())
    state = lora_state(lm.model)
    assert fused.fuse_lora(lm.model) == len(layers)  # again: nothing new, every layer counted once
    assert all(isinstance(m, LoraLayer) and type(m).__mro__[1].__name__ == type(m).__name__[len("Fused"):]
               for m in layers)
    assert list(lm.model.state_dict()) == keys
    with torch.no_grad():
        for p in lm.model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    state = lora_state(lm.model)
    buffer = io.BytesIO()
    torch.save(lm.model, buffer)  # whole-model pickling finds the fused classes by name
    buffer.seek(0)
    again = torch.load(buffer, weights_only=False)
    assert [type(m) for m in lora_layers(again)] == [type(m) for m in layers]
    x = torch.randint(0, 50, (1, 6))
    with torch.no_grad():
        assert torch.equal(again(input_ids=x).logits, lm.model(input_ids=x).logits)
    save_adapter(lm.model, tmp_path / "adapter")  # the adapter's files load into an unfused PEFT model
    other = loaded(models_dir, tmp_path / "other", compute_dtype="float32")
    for m in lora_layers(other.model):
        m.__class__ = type(m).__mro__[1]
    load_adapter(other.model, tmp_path / "adapter")
    assert all(torch.equal(v, state[k]) for k, v in lora_state(other.model).items())
    for m in layers:  # back to PEFT's classes: the same parameters and keys
        m.__class__ = type(m).__mro__[1]
    assert list(lm.model.state_dict()) == keys
    assert all(torch.equal(v, state[k]) for k, v in lora_state(lm.model).items())


def test_a_4bit_base_fuses_and_matches_peft(models_dir: Path, tmp_path: Path, addmm_dtypes: list) -> None:
    pytest.importorskip("bitsandbytes")
    lm = loaded(models_dir, tmp_path, "nf4", compute_dtype="bfloat16")
    layers = lora_layers(lm.model)
    assert layers and all(type(m).__name__ == "FusedLinear4bit" for m in layers)
    layer = layers[0]
    nonzero_b(layer)
    x = torch.randn(2, 6, layer.lora_A[ADAPTER].weight.shape[1], generator=torch.Generator().manual_seed(4))
    out, grads = forward_and_grads(layer, x, peft=False)  # fp32 input, as the k-bit prepared norms give it
    assert addmm_dtypes == [(torch.float32,) * 3]  # the fused path, in fp32
    want, want_grads = forward_and_grads(layer, x, peft=True)
    assert out.dtype == want.dtype == torch.float32 and close(out, want, 1e-5)
    for g, w in zip(grads, want_grads):
        assert g.abs().sum() > 0 and close(g, w, 1e-4)
