"""daemon.train.model: capabilities, dtype choice, 4-bit and plain loading, seeded LoRA, adapter folders.

`models_dir` (conftest) builds the embedded tiny model once per session.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from daemon.config import Config, LoraConfig, ModelConfig, PathsConfig  # noqa: E402
from daemon.train.model import (  # noqa: E402
    Capabilities, ModelError, capabilities, choose_device, choose_dtype, load_adapter,
    load_for_training, lora_max_abs_diff, lora_state, save_adapter, set_lora_state,
)

CPU = Capabilities(cuda=False, bf16=False, bitsandbytes=True, cuda_name=None)
AMPERE = Capabilities(cuda=True, bf16=True, bitsandbytes=True, cuda_name="fake")
TURING = Capabilities(cuda=True, bf16=False, bitsandbytes=True, cuda_name="fake")


@pytest.fixture(autouse=True, scope="module")
def one_thread():  # noqa: ANN201
    """One intra-op thread: on 2 shared cores, 2 OpenMP threads spin-wait on each other (10-50x slower steps)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)



def make_cfg(models: Path, quantization: str = "none", dropout: float = 0.0) -> Config:
    return Config(
        paths=PathsConfig(models=str(models)),
        model=ModelConfig(quantization=quantization, device="cpu"),
        lora=LoraConfig(r=4, alpha=8, dropout=dropout),
    )


def test_dtype_choice_per_device() -> None:
    auto = ModelConfig()
    assert choose_dtype(auto, "cpu", CPU) == torch.float32
    assert choose_dtype(auto, "cpu", dataclasses.replace(CPU, cpu_bf16=True)) == torch.bfloat16
    assert choose_dtype(dataclasses.replace(auto, compute_dtype="float32"), "cpu",
                        dataclasses.replace(CPU, cpu_bf16=True)) == torch.float32
    assert choose_dtype(auto, "cuda", AMPERE) == torch.bfloat16
    assert choose_dtype(auto, "cuda", TURING) == torch.float16
    assert choose_dtype(dataclasses.replace(auto, compute_dtype="float16"), "cuda", AMPERE) == torch.float16
    with pytest.raises(ModelError, match="bfloat16"):
        choose_dtype(dataclasses.replace(auto, compute_dtype="bfloat16"), "cuda", TURING)


def test_native_cpu_bf16_is_read_from_the_cpu_flags(tmp_path: Path) -> None:
    from daemon.train.model import cpu_has_native_bf16

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_vnni\n")
    assert not cpu_has_native_bf16(str(info))
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 avx512_vnni\n")
    assert cpu_has_native_bf16(str(info))
    info.write_text("processor\t: 0\nflags\t\t: fpu amx_bf16 amx_tile\n")
    assert cpu_has_native_bf16(str(info))
    assert not cpu_has_native_bf16(str(tmp_path / "missing"))


def test_device_choice() -> None:
    assert choose_device(ModelConfig(device="auto"), CPU) == "cpu"
    assert choose_device(ModelConfig(device="auto"), AMPERE) == "cuda"
    with pytest.raises(ModelError, match="no CUDA"):
        choose_device(ModelConfig(device="cuda"), CPU)
    caps = capabilities()
    assert caps.bitsandbytes and (caps.cuda_name is None) == (not caps.cuda)


def test_nf4_base_is_really_4bit(models_dir: Path) -> None:
    import bitsandbytes as bnb

    lm = load_for_training(make_cfg(models_dir, "nf4"), seed=1)
    base = lm.model.get_base_model()
    q = base.model.layers[0].self_attn.q_proj
    assert isinstance(q.base_layer, bnb.nn.Linear4bit)
    assert q.base_layer.weight.quant_type == "nf4"
    mlp = base.model.layers[0].mlp.up_proj  # not a LoRA target, still quantised
    assert isinstance(mlp, bnb.nn.Linear4bit)
    trainable, total = lm.param_counts()
    assert 0 < trainable < total
    assert all("lora_" in n for n, p in lm.model.named_parameters() if p.requires_grad)
    out = lm.model(input_ids=torch.tensor([[1, 2, 3, 4]]))
    assert torch.isfinite(out.logits).all()


def test_lora_init_is_seeded_and_state_round_trips(models_dir: Path, tmp_path: Path) -> None:
    cfg = make_cfg(models_dir)
    a = load_for_training(cfg, seed=7)
    b = load_for_training(cfg, seed=7)
    c = load_for_training(cfg, seed=8)
    assert lora_max_abs_diff(lora_state(a.model), lora_state(b.model)) == 0.0
    assert lora_max_abs_diff(lora_state(a.model), lora_state(c.model)) > 0.0
    # perturb a, save it, load into b: b must equal a exactly
    with torch.no_grad():
        for n, p in a.model.named_parameters():
            if "lora_B" in n:
                p.add_(0.25)
    save_adapter(a.model, tmp_path / "ad")
    assert (tmp_path / "ad" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "ad" / "adapter_config.json").is_file()
    load_adapter(b.model, tmp_path / "ad")
    assert lora_max_abs_diff(lora_state(a.model), lora_state(b.model)) == 0.0
    set_lora_state(b.model, lora_state(c.model))
    assert lora_max_abs_diff(lora_state(b.model), lora_state(c.model)) == 0.0
    with pytest.raises(ModelError, match="incomplete"):
        load_adapter(b.model, tmp_path / "missing")
