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

from transformers.models.falcon_h1.modeling_falcon_h1 import FalconH1RMSNormGated  # noqa: E402
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRMSNorm  # noqa: E402
from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm  # noqa: E402
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


# (input dtype, weight dtype): the model's compute dtype, fp32, and a 4-bit base's fp32 norms under bf16/fp16 activations
DTYPES = [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32), (torch.float16, torch.float16),
          (torch.bfloat16, torch.float32), (torch.float16, torch.float32)]


@pytest.mark.parametrize("dtype, weight_dtype", DTYPES)
@pytest.mark.parametrize("cls, shape", [(Qwen3RMSNorm, (3, 37, 96)), (Qwen3RMSNorm, (2, 11, 4, 64)), (LlamaRMSNorm, (5, 200))])
def test_the_output_is_the_module_s_own_and_the_gradients_as_exact(cls: type, shape: tuple, dtype: torch.dtype,
                                                                    weight_dtype: torch.dtype) -> None:
    norm = a_norm(cls, shape[-1], weight_dtype)
    x, g = the_input(shape, dtype), the_input(shape, torch.promote_types(dtype, weight_dtype), seed=2)
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
        step = {torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10, torch.float32: 1e-6}[dtype]
        assert err <= their_err + scale * step, (err, their_err, scale)


def test_autocast_changes_nothing_and_a_second_derivative_raises() -> None:
    norm = a_norm(Qwen3RMSNorm, 96, torch.float32)
    x = the_input((3, 37, 96), torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        own = norm(x)
        norms.fuse_rms_norms(norm)
        ours = norm(x)
    assert torch.equal(ours, own)

    x.requires_grad_()
    (dx,) = torch.autograd.grad(norm(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):  # never a silently wrong second derivative
        dx.sum().backward()


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
    # Olmo2 casts after the product: the same output while its weight is ones (as loaded here) with the input
    # in the weight's dtype, or while the weight is fp32 and the input too
    for dtype in (torch.bfloat16, torch.float32):
        olmo = Olmo2RMSNorm(64).to(dtype)
        assert norms.fuse_rms_norms(olmo) == 0 and "forward" not in vars(olmo)
    with pytest.MonkeyPatch.context() as mp:  # in its weight's dtype only, the probe's random weight shows it
        mp.setattr(norms, "PROBE_DTYPES", (torch.bfloat16,))
        olmo = Olmo2RMSNorm(64).to(torch.bfloat16)
        assert norms.fuse_rms_norms(olmo) == 0
        assert norms.fuse_rms_norms(a_norm(LlamaRMSNorm, 64, torch.bfloat16)) == 1
    falcon = FalconH1RMSNormGated(64)  # forward(hidden_states, gate=None)
    assert norms.fuse_rms_norms(falcon) == 0 and "forward" not in vars(falcon)

    class GatedRMSNorm(LlamaRMSNorm):  # without a gate exactly the formula; the probe alone would pass it
        def forward(self, hidden_states: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
            out = super().forward(hidden_states)
            return out if gate is None else out * torch.nn.functional.silu(gate)

    gated = GatedRMSNorm(64)
    assert norms._matches(gated, gated.variance_epsilon)  # what the signature check is there for
    assert norms.fuse_rms_norms(gated) == 0 and "forward" not in vars(gated)

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


@pytest.mark.parametrize("compute_dtype", ["bfloat16", "float32"])  # auto picks bf16 on a CPU with native bf16
def test_the_loaded_model_switches_its_norms_and_trains_the_same(models_dir: Path, tmp_path: Path,
                                                                 compute_dtype: str) -> None:
    cfg = make_cfg(models_dir, tmp_path)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, compute_dtype=compute_dtype))
    lm = load_for_training(cfg, seed=1)
    assert str(lm.dtype) == f"torch.{compute_dtype}"
    switched = [m for m in lm.model.modules() if isinstance(vars(m).get("forward"), functools.partial)]
    layers = lm.model.get_base_model().config.num_hidden_layers
    assert len(switched) == 4 * layers + 1  # Qwen3: two per block, the query and key norms, the final one
    assert norms.fuse_rms_norms(lm.model) == len(switched)  # idempotent: nothing wrapped twice
    assert all(vars(m)["forward"].func is norms._forward and vars(m)["forward"].args[0] is m for m in switched)
    # transformers 5.25 (with `kernels` installed) re-kernelizes on every train()/eval() unless loaded without
    # hub kernels, and that re-binds every norm's forward: the switch has to survive the loop's mode changes
    assert not getattr(lm.model.get_base_model(), "use_kernels", False)
    lm.model.eval()
    lm.model.train()
    assert [m for m in lm.model.modules() if isinstance(vars(m).get("forward"), functools.partial)] == switched

    buffer = io.BytesIO()
    torch.save(lm.model, buffer)  # a switched norm pickles: its forward is a partial of a module-level function
    buffer.seek(0)
    reloaded = torch.load(buffer, weights_only=False)
    again = [m for m in reloaded.modules() if isinstance(vars(m).get("forward"), functools.partial)]
    assert len(again) == len(switched) and all(vars(m)["forward"].args[0] is m for m in again)
    assert reloaded.state_dict().keys() == lm.model.state_dict().keys()

    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(3, len(lm.tokenizer), (2, 48), generator=gen)
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
    lora = [p for p in lm.model.parameters() if p.requires_grad]
    with torch.no_grad():  # B starts at zero, and with it A's gradient: give the branches something to carry
        for name, p in lm.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=gen)

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
    assert all(b.norm() > 0 for b in own_g)
    for a, b in zip(ours_g, own_g):
        assert (a - b).norm() <= tol * b.norm()


def test_a_compiled_model_keeps_transformers_norms(models_dir: Path, tmp_path: Path) -> None:
    cfg = make_cfg(models_dir, tmp_path)
    cfg = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, compile=True))
    lm = load_for_training(cfg, seed=1)  # compiling itself happens at the first forward, not here
    assert not any("forward" in vars(m) for m in lm.model.modules() if "RMSNorm" in type(m).__name__)
