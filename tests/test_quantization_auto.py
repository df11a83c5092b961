"""model.quantization auto: the faster path where the base fits (none on a CPU), nf4 on CUDA or where it does not fit,
and the same answer for an adapter's whole life."""

import json
import struct
from pathlib import Path

import pytest

from daemon.config import ModelConfig
from daemon.train import model as m

CPU = m.Capabilities(cuda=False, bf16=False, bitsandbytes=True, cuda_name=None, cpu_bf16=True)
GPU = m.Capabilities(cuda=True, bf16=True, bitsandbytes=True, cuda_name="test", cpu_bf16=False)


def base_of(tmp_path: Path, params: int) -> Path:
    """A folder whose safetensors header declares `params` parameters (no weights: only the header is read)."""
    header = json.dumps({"w": {"dtype": "BF16", "shape": [params], "data_offsets": [0, 0]}}).encode()
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    return tmp_path


def test_auto_is_none_on_a_cpu_where_the_base_fits_and_says_why(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(m, "total_memory", lambda: 24 * 2**30)
    quant, note = m.resolve_quantization(ModelConfig(), "cpu", CPU, base_of(tmp_path, 135_000_000), torch.bfloat16)
    assert quant == "none" and "auto: none on the CPU" in note and "slower" in note


def test_auto_is_nf4_on_a_cpu_where_the_base_would_not_fit(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(m, "total_memory", lambda: 16 * 2**30)
    quant, note = m.resolve_quantization(ModelConfig(), "cpu", CPU, base_of(tmp_path, 8_000_000_000), torch.bfloat16)
    assert quant == "nf4" and "over 50% of 16 GiB" in note


def test_auto_is_nf4_on_cuda_and_keeps_what_the_adapter_was_trained_with(tmp_path):
    import torch

    base = base_of(tmp_path, 1000)
    assert m.resolve_quantization(ModelConfig(), "cuda", GPU, base, torch.bfloat16)[0] == "nf4"
    # an adapter trained on nf4 (moved from a GPU machine) goes on with nf4 on the CPU: auto never changes under it
    quant, note = m.resolve_quantization(ModelConfig(), "cpu", CPU, base, torch.float32, recorded="nf4")
    assert quant == "nf4" and "as the current adapter was trained" in note


@pytest.mark.parametrize("chosen", ["nf4", "fp4"])
def test_a_4bit_base_chosen_on_a_cpu_is_kept_and_its_cost_said(tmp_path, chosen):
    import torch

    quant, note = m.resolve_quantization(ModelConfig(quantization=chosen), "cpu", CPU, base_of(tmp_path, 1000), torch.float32)
    assert quant == chosen and "slower than none" in note
    assert m.resolve_quantization(ModelConfig(quantization="none"), "cpu", CPU, base_of(tmp_path, 1000), torch.float32) == ("none", None)


def test_auto_needs_no_bitsandbytes_on_a_cpu(tmp_path):
    from daemon.config import config_from_dict
    from daemon.train.preflight import problems

    no_bnb = m.Capabilities(cuda=False, bf16=False, bitsandbytes=False, cuda_name=None)
    assert problems(config_from_dict({}, tmp_path), no_bnb) == []  # auto: none there
    assert any("needs bitsandbytes" in p for p in problems(config_from_dict({"model": {"quantization": "nf4"}}, tmp_path), no_bnb))
