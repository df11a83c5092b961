"""daemon.train.activity_probe: per-layer LoRA activity equals a direct computation, on the plain and the nf4 base.

The direct computation forms ΔW = scaling·B·A (out × in) and takes its norms;
the probe never forms it. Also: when samples are taken, what a file moved
across a resume, and the size of the status block for an 80-layer model.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from daemon import activity_summary  # noqa: E402
from daemon.config import ActivityConfig, LoraConfig  # noqa: E402
from daemon.schema import TrainingStatus  # noqa: E402
from daemon.status import StatusWriter  # noqa: E402
from daemon.train.activity_probe import ADAPTER, ActivityProbe, locate  # noqa: E402
from daemon.train.loop import Job, train_file  # noqa: E402
from daemon.train.model import load_for_training, lora_state  # noqa: E402
from tests.test_loop import Crash, make_cfg, one_thread, sha, small_file  # noqa: E402, F401 - one_thread: autouse

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
REL_TOL = 1e-5


def activity_cfg(models: Path, tmp: Path, quantization: str = "none", every: int = 1, min_interval: float = 0.0, **tc):
    cfg = make_cfg(models, tmp, quantization, **tc)
    return dataclasses.replace(cfg, lora=LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=ALL_LINEAR),
                               activity=ActivityConfig(every_steps=every, min_interval_seconds=min_interval))


def direct(lm, site, state: dict) -> tuple[torch.Tensor, float]:
    """ΔW of one module formed in float64 from a LoRA state, and ‖W₀‖_F of its base."""
    module = lm.model.get_submodule(site.name)
    a, b = state[f"{site.name}.lora_A.weight"].double(), state[f"{site.name}.lora_B.weight"].double()
    w = module.get_base_layer().weight
    if getattr(w, "quant_state", None) is not None:
        import bitsandbytes as bnb

        w = bnb.functional.dequantize_4bit(w.data, w.quant_state)
    return module.scaling[ADAPTER] * (b @ a), float(w.double().norm().cpu())


def rel_err(got: float, want: float) -> float:
    return abs(got - want) / max(abs(want), 1e-30)


@pytest.mark.parametrize("quantization,device", [("none", "cpu"), ("nf4", "cpu"),
                                                 pytest.param("nf4", "cuda", marks=pytest.mark.gpu)])
def test_every_measure_equals_the_direct_computation(models_dir: Path, tmp_path: Path, quantization: str, device: str) -> None:
    cfg = activity_cfg(models_dir, tmp_path, quantization, epochs_per_file=1)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, device=device))
    path = small_file(tmp_path, n=24)
    lm = load_for_training(cfg, seed=cfg.training.seed)
    probe = ActivityProbe(lm.model)
    samples: list[tuple[dict, dict]] = []  # (message, LoRA weights when it was sampled)
    train_file(lm, cfg, Job.for_file("j", path, "alpaca", sha(path)), global_step=0, ckpt_folder=tmp_path / "ck",
               report=lambda e: samples.append((e.to_wire(), lora_state(lm.model))) if e.TYPE == "activity" else None,
               control=lambda: "continue", activity=probe)
    assert len(samples) >= 4 and [m["step"] for m, _ in samples] == list(range(1, len(samples) + 1))
    assert len(probe.sites) == 2 * 7 and probe.kinds == ALL_LINEAR and probe.layers == [0, 1]
    worst, prev = 0.0, None
    for msg, state in samples:
        for site in probe.sites:
            i, j = probe.layers.index(site.layer), probe.kinds.index(site.kind)
            dw, base = direct(lm, site, state)
            cell = {m: msg["values"][m][i][j] for m in ("update", "relative", "change", "base", "grad_a", "grad_b")}
            worst = max(worst, rel_err(cell["update"], float(dw.norm())), rel_err(cell["base"], base),
                        rel_err(cell["relative"], float(dw.norm()) / base))
            if prev is None:
                assert cell["change"] is None  # nothing to compare the first sample with
            else:
                worst = max(worst, rel_err(cell["change"], float((dw - direct(lm, site, prev)[0]).norm())))
            # B starts at zero, so A's first gradient is zero too (∂L/∂A = s·Bᵀ·∂L/∂ΔW)
            assert cell["grad_b"] > 0 and (cell["grad_a"] > 0 or msg["step"] == 1)
        prev = state
    assert worst <= REL_TOL, worst


def test_gradient_norms_are_read_before_they_are_cleared(models_dir: Path, tmp_path: Path) -> None:
    cfg = activity_cfg(models_dir, tmp_path)
    lm = load_for_training(cfg, seed=3)
    with torch.no_grad():  # B starts at zero; give both factors a gradient
        for p in lm.model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    probe = ActivityProbe(lm.model)
    ids = torch.randint(0, 200, (2, 12))
    lm.model(input_ids=ids, labels=ids).loss.backward()
    grad_a, grad_b = probe.grad_norms()
    for k, module in enumerate(probe.modules):
        assert rel_err(grad_a[k], float(module.lora_A[ADAPTER].weight.grad.double().norm())) <= REL_TOL
        assert rel_err(grad_b[k], float(module.lora_B[ADAPTER].weight.grad.double().norm())) <= REL_TOL


def test_sampled_every_n_steps_at_most_so_often_and_always_at_the_end(models_dir: Path, tmp_path: Path) -> None:
    path = small_file(tmp_path, n=40)
    # (every, min interval, expected): every 3rd; only the last; the first due one, then none until the last
    for every, min_interval, want in ((3, 0.0, None), (0, 0.0, "last"), (2, 1e9, "first and last")):
        cfg = activity_cfg(models_dir, tmp_path / f"{every}-{min_interval}", every=every, min_interval=min_interval)
        lm = load_for_training(cfg, seed=cfg.training.seed)
        events: list[dict] = []
        out = train_file(lm, cfg, Job.for_file("j", path, "alpaca", sha(path)), global_step=0, ckpt_folder=tmp_path / "ck",
                         report=lambda m: events.append(m.to_wire()), control=lambda: "continue", activity=ActivityProbe(lm.model))
        steps = [e["step"] for e in events if e["type"] == "activity"]
        if want == "last":
            expected = [out.steps]
        elif want == "first and last":
            expected = [every, out.steps]
        else:
            expected = list(range(every, out.steps, every)) + [out.steps]
        assert steps == expected, (every, min_interval, steps)
        assert [e["final"] for e in events if e["type"] == "activity"] == [False] * (len(steps) - 1) + [True]


def test_what_a_file_moved_is_the_same_after_a_resume(models_dir: Path, tmp_path: Path) -> None:
    """The worker measures a file against the adapter before it, so a crash and resume count nothing twice."""
    cfg = activity_cfg(models_dir, tmp_path, checkpoint_every_steps=3, dropout=0.0)
    path = small_file(tmp_path)
    job = Job.for_file("r", path, "alpaca", sha(path))

    def moved_by(control, ckpt: Path):  # noqa: ANN001, ANN202 - (moved grid, lm, probe, LoRA before, LoRA after)
        lm = load_for_training(cfg, seed=cfg.training.seed)
        probe, before = ActivityProbe(lm.model), lora_state(lm.model)
        try:
            train_file(lm, cfg, job, global_step=0, ckpt_folder=ckpt, report=lambda e: None, control=control,
                       activity=probe)
        except Crash:
            return [], lm, probe, before, {}
        return probe.moved_since(before).values["moved"], lm, probe, before, lora_state(lm.model)

    straight, lm, probe, before, after = moved_by(lambda: "continue", tmp_path / "straight")
    calls = iter(range(10_000))

    def crash_at_step_7() -> str:
        if next(calls) == 7:
            raise Crash()
        return "continue"

    assert moved_by(crash_at_step_7, tmp_path / "crashed")[0] == []
    resumed, *_ = moved_by(lambda: "continue", tmp_path / "crashed")
    flat = [(a, b) for ra, rb in zip(straight, resumed) for a, b in zip(ra, rb)]
    assert len(flat) == 14 and max(rel_err(b, a) for a, b in flat) <= REL_TOL
    for site in probe.sites:  # and it is ‖ΔW after − ΔW before‖, formed directly
        i, j = probe.layers.index(site.layer), probe.kinds.index(site.kind)
        want = float((direct(lm, site, after)[0] - direct(lm, site, before)[0]).norm())
        assert rel_err(straight[i][j], want) <= REL_TOL


def test_layer_and_kind_come_from_the_module_path() -> None:
    sites = locate(["base_model.model.model.layers.0.self_attn.q_proj", "base_model.model.model.layers.11.mlp.down_proj",
                    "base_model.model.lm_head"])
    assert [(s.layer, s.kind) for s in sites] == [(0, "q_proj"), (11, "down_proj"), (-1, "lm_head")]
    clash = locate(["m.layers.0.self_attn.q_proj", "m.layers.0.cross_attn.q_proj"])
    assert [s.kind for s in clash] == ["self_attn.q_proj", "cross_attn.q_proj"]  # short names would collide
    towers = locate(["base_model.model.vision.blocks.3.attn.q_proj", "base_model.model.model.layers.3.attn.q_proj"])
    assert [(s.layer, s.kind) for s in towers] == [(3, "vision.blocks.attn.q_proj"), (3, "model.layers.attn.q_proj")]


def test_status_block_stays_small_for_an_80_layer_model(tmp_path: Path) -> None:
    """80 layers x 7 LoRA modules (a 70B-class layout, tiny widths): the status file stays a few KB."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, Qwen3Config

    config = Qwen3Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=80,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=64)
    model = get_peft_model(AutoModelForCausalLM.from_config(config),
                           PeftLoraConfig(r=8, lora_alpha=16, target_modules=ALL_LINEAR, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    probe = ActivityProbe(model)
    probe.sample()
    grid = probe.sample()  # the second has `change` too
    msg = {"job_id": "20261201T000000Z-000001--x.jsonl", "step": 40, "global_step": 1040, **grid.to_dict()}
    block = activity_summary.summary(msg, 1.8e9)
    assert len(block.layers) == 80 and all(len(v) == 80 for v in block.per_layer.values())
    writer = StatusWriter(tmp_path)
    writer.write(TrainingStatus(layer_activity_summary=block))
    size = len(json.dumps(block.__dict__, default=lambda o: o.__dict__))
    total = writer.path.stat().st_size
    print(f"80 layers x 7 kinds: layer_activity_summary {size} bytes, status file {total} bytes")
    assert size < 6_000 and total < 8_000
