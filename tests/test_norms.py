"""daemon.train.norms: the RMSNorm's closed-form backward, against transformers' own norm on the same input.

The switched norm must give the module's own output bit for bit, gradients for the input and
the weight as close to the exact (float64) ones as the module's own backward gets, keep less
for the backward than the module's chain of operations, leave a norm with another formula to
its own forward, and leave the model's names, state and pickling as they were.
"""

from __future__ import annotations

import dataclasses
import functools
import io
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from transformers.models.gemma.modeling_gemma import GemmaRMSNorm  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRMSNorm  # noqa: E402
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm  # noqa: E402

from daemon.train import norms  # noqa: E402
from daemon.train.model import load_for_training  # noqa: E402
from daemon.train.step import loss_sum  # noqa: E402
from tests.test_loop import make_cfg, one_thread  # noqa: E402, F401 - one_thread: autouse


def a_norm(cls: type, hidden: int, dtype: torch.dtype, eps: float = 1e-6, seed: int = 0):
    norm = cls(hidden, eps=eps).to(dtype)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.3, generator=torch.Generator().manual_seed(seed))
    return norm


def the_input(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)  # rows of very different scale, as residual streams have
    return (torch.randn(shape, generator=gen) * torch.rand(*shape[:-1], 1, generator=gen) * 8).to(dtype)


def grads(fn, x: torch.Tensor, weight: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = x.detach().clone().requires_grad_()
    weight.grad = None
    out = fn(x)
    out.backward(g)
    dw, weight.grad = weight.grad.clone(), None
    return out.detach(), x.grad, dw


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("cls, shape", [(Qwen3RMSNorm, (3, 37, 96)), (Qwen3RMSNorm, (2, 11, 4, 64)), (LlamaRMSNorm, (5, 200))])
def test_the_output_is_the_module_s_own_and_the_gradients_as_exact(cls: type, shape: tuple, dtype: torch.dtype) -> None:
    norm = a_norm(cls, shape[-1], dtype)
    x, g = the_input(shape, dtype), the_input(shape, dtype, seed=2)
    own, own_dx, own_dw = grads(norm, x, norm.weight, g)
    assert norms.fuse_rms_norms(norm) == 1
    ours, dx, dw = grads(norm, x, norm.weight, g)
    assert torch.equal(ours, own)  # the same expression, the same rounding

    exact = a_norm(cls, shape[-1], torch.float64)
    with torch.no_grad():
        exact.weight.copy_(norm.weight.double())
    _, ex_dx, ex_dw = grads(exact, x.double(), exact.weight, g.double())
    for got, theirs, truth in ((dx, own_dx, ex_dx), (dw, own_dw, ex_dw)):
        assert got.dtype == theirs.dtype
        err, their_err = (got.double() - truth).abs().max().item(), (theirs.double() - truth).abs().max().item()
        scale = truth.abs().max().item()
        # as close as transformers' own backward gets (each rounds to the dtype once at the end): within
        # one rounding step of the dtype beside its error, never a different function
        assert err <= their_err + scale * (2 ** -7 if dtype == torch.bfloat16 else 1e-6), (err, their_err, scale)
    assert (dx.double() - ex_dx).abs().max().item() > 0 or dtype == torch.float32  # bf16 really was rounded


def test_the_backward_keeps_less_than_the_chain_of_operations() -> None:
    norm = a_norm(Qwen3RMSNorm, 512, torch.bfloat16)
    x = the_input((4, 128, 512), torch.bfloat16).requires_grad_()

    def kept_bytes() -> int:
        storages: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            norm(x).sum().backward()
        return sum(storages.values()) - x.untyped_storage().nbytes() * (x.untyped_storage().data_ptr() in storages)

    own = kept_bytes()
    norms.fuse_rms_norms(norm)
    ours = kept_bytes()
    # transformers' chain keeps an fp32 copy of the input (twice the bf16 activations); ours keeps the
    # input itself (alive anyway, not counted) and one number per row
    assert own >= 4 * x.numel() and ours <= 4 * 4 * 128 + 4 * 512, (own, ours)


def test_a_norm_with_another_formula_or_shape_keeps_its_own_forward() -> None:
    gemma = a_norm(GemmaRMSNorm, 64, torch.float32)  # weight * (1 + w), cast after the product: not this formula
    assert norms.fuse_rms_norms(gemma) == 0 and "forward" not in vars(gemma)

    class OddRMSNorm(torch.nn.Module):  # the right name and attributes, a different function
        def __init__(self) -> None:
            super().__init__()
            self.weight, self.variance_epsilon = torch.nn.Parameter(torch.ones(16)), 1e-6

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.weight * x / x.abs().amax(-1, keepdim=True)

    class NoEpsRMSNorm(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(16))

    both = torch.nn.Sequential(OddRMSNorm(), NoEpsRMSNorm(), a_norm(LlamaRMSNorm, 16, torch.float32))
    assert norms.fuse_rms_norms(both) == 1
    assert ["forward" in vars(m) for m in both] == [False, False, True]


def test_the_loaded_model_switches_its_norms_and_trains_the_same(models_dir: Path, tmp_path: Path) -> None:
    cfg = make_cfg(models_dir, tmp_path)
    lm = load_for_training(cfg, seed=1)
    switched = [m for m in lm.model.modules() if isinstance(vars(m).get("forward"), functools.partial)]
    layers = lm.model.get_base_model().config.num_hidden_layers
    assert len(switched) == 4 * layers + 1  # Qwen3: two per block, the query and key norms, the final one
    assert norms.fuse_rms_norms(lm.model) == len(switched)  # idempotent: nothing wrapped twice
    assert all(vars(m)["forward"].func is norms._forward for m in switched)

    buffer = io.BytesIO()
    torch.save(lm.model, buffer)  # a switched norm pickles: its forward is a partial of a module-level function
    buffer.seek(0)
    reloaded = torch.load(buffer, weights_only=False)
    again = [m for m in reloaded.modules() if isinstance(vars(m).get("forward"), functools.partial)]
    assert len(again) == len(switched) and all(vars(m)["forward"].args == (m,) for m in again)
    assert reloaded.state_dict().keys() == lm.model.state_dict().keys()

    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(3, len(lm.tokenizer), (2, 48), generator=gen)
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
    lora = [p for p in lm.model.parameters() if p.requires_grad]

    def loss_and_grads() -> tuple[torch.Tensor, list[torch.Tensor]]:
        total, n = loss_sum(lm.model, batch)
        g = torch.autograd.grad(total / n, lora)
        return total.detach(), g

    ours, ours_g = loss_and_grads()
    for m in switched:
        del m.forward  # transformers' own forward again
    own, own_g = loss_and_grads()
    assert torch.equal(ours, own)  # the forward is bit for bit the same
    tol = 2e-2 if lm.dtype == torch.bfloat16 else 1e-5
    for a, b in zip(ours_g, own_g):
        assert (a - b).norm() <= tol * b.norm() + 1e-12



def test_a_compiled_model_keeps_transformers_norms(models_dir: Path, tmp_path: Path) -> None:
    cfg = make_cfg(models_dir, tmp_path)
    cfg = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, compile=True))
    lm = load_for_training(cfg, seed=1)  # compiling itself happens at the first forward, not here
    assert not any("forward" in vars(m) for m in lm.model.modules() if "RMSNorm" in type(m).__name__)
