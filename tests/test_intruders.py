"""daemon.train.intruders (activity.intruders): intruder directions of ΔW from r × r products, equal to a direct
SVD of ΔW; counted in the activity samples, and in the forgetting report with its warning."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from daemon.config import ActivityConfig, LoraConfig  # noqa: E402
from daemon.train.activity_probe import ActivityProbe  # noqa: E402
from daemon.train.intruders import Intruders, intruder_count, top_left  # noqa: E402
from daemon.train.loop import Job, train_file  # noqa: E402
from daemon.train.model import load_for_training  # noqa: E402
from tests.test_loop import make_cfg, one_thread, sha, small_file  # noqa: E402, F401 - one_thread: autouse

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def direct_count(a, b, scaling, u0, sigma_k, threshold, strength) -> int:
    """The same count from ΔW formed out × in and its full SVD."""
    u, s, _ = torch.linalg.svd(scaling * b @ a, full_matrices=False)
    n = 0
    for i in range(min(a.shape[0], s.numel())):
        if s[i] >= strength * sigma_k and float((u0.T @ u[:, i]).abs().max()) < threshold:
            n += 1
    return n


def test_the_count_equals_a_direct_svd_of_the_update() -> None:
    gen = torch.Generator().manual_seed(0)
    out, inn, r, k = 48, 40, 4, 6
    u0 = torch.linalg.qr(torch.randn(out, k, generator=gen, dtype=torch.float64))[0]
    for trial in range(20):
        # a mix: some directions inside the base's top-k span, some outside, of assorted strengths
        inside = u0 @ torch.randn(k, r, generator=gen, dtype=torch.float64)
        outside = torch.randn(out, r, generator=gen, dtype=torch.float64)
        w = torch.rand(r, generator=gen, dtype=torch.float64)
        b = inside * w + outside * (1 - w) * (trial % 3)
        a = torch.randn(r, inn, generator=gen, dtype=torch.float64) * torch.rand(r, 1, generator=gen, dtype=torch.float64)
        for threshold, strength in ((0.5, 0.1), (0.3, 1.0), (0.9, 0.0)):
            assert intruder_count(a, b, 2.0, u0, 1.0, threshold, strength) == direct_count(a, b, 2.0, u0, 1.0, threshold, strength)


def test_the_base_top_vectors_match_a_full_svd() -> None:
    """A weight with a decaying spectrum, as pretrained weights have: the subspace iteration's top-k vectors are the
    SVD's (up to sign) and σ_k is right, and the training's RNG is left alone."""
    gen = torch.Generator().manual_seed(1)
    out, inn, k = 96, 160, 8
    u = torch.linalg.qr(torch.randn(out, out, generator=gen))[0]
    v = torch.linalg.qr(torch.randn(inn, out, generator=gen))[0]
    s = 10.0 * torch.arange(1, out + 1, dtype=torch.float32) ** -0.7
    w = (u * s) @ v.T
    state = torch.get_rng_state()
    got, sigma_k = top_left(w, k)
    assert torch.equal(torch.get_rng_state(), state)
    want_u, want_s, _ = torch.linalg.svd(w, full_matrices=False)
    assert abs(sigma_k - float(want_s[k - 1])) < 1e-3 * float(want_s[k - 1])
    cos = (got.T @ want_u[:, :k]).abs().diagonal()
    assert float(cos.min()) > 0.99, cos


def test_a_strong_new_direction_is_an_intruder_and_a_base_one_is_not() -> None:
    out, inn = 32, 24
    u0 = torch.eye(out, dtype=torch.float64)[:, :4]  # the base's top 4: the first 4 axes
    a = torch.zeros(2, inn, dtype=torch.float64)
    a[0, 0] = a[1, 1] = 1.0
    b = torch.zeros(out, 2, dtype=torch.float64)
    b[0, 0] = 3.0   # along the base's first direction
    b[10, 1] = 3.0  # along an axis the base's top 4 do not have
    assert intruder_count(a, b, 1.0, u0, 1.0, 0.5, 1.0) == 1
    assert intruder_count(a, b, 1.0, u0, 10.0, 0.5, 1.0) == 0  # too weak against σ_k = 10


def test_samples_carry_the_intruder_grid(models_dir: Path, tmp_path: Path) -> None:
    cfg = make_cfg(models_dir, tmp_path, epochs_per_file=1)
    cfg = dataclasses.replace(cfg, lora=LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=ALL_LINEAR),
                              activity=ActivityConfig(every_steps=1, min_interval_seconds=0.0, intruders=True,
                                                      intruders_top_k=4, intruders_min_strength=0.0))
    path = small_file(tmp_path, n=16)
    lm = load_for_training(cfg, seed=cfg.training.seed)
    probe = ActivityProbe(lm.model)
    intruders = Intruders(probe, cfg.activity)
    probe.extra["intruders"] = intruders.counts
    samples: list[dict] = []
    train_file(lm, cfg, Job.for_file("j", path, "alpaca", sha(path)), global_step=0, ckpt_folder=tmp_path / "ck",
               report=lambda e: samples.append(e.to_wire()) if e.TYPE == "activity" else None,
               control=lambda: "continue", activity=probe)
    last = samples[-1]["values"]["intruders"]
    assert len(last) == 2 and all(len(row) == 7 for row in last)
    # with no strength floor, every direction of a moved module unlike the base's top 4 counts: r = 4 at most
    assert all(0 <= v <= 4 for row in last for v in row) and sum(v for row in last for v in row) > 0
    assert intruders.base_seconds is not None


def test_damping_removes_the_intruder_directions_and_the_merge_check_holds(models_dir: Path, tmp_path: Path) -> None:
    """consolidation.damp_intruders 1: the intruding directions leave ΔW (what leaves is exactly their Σ²), the
    others stay, and merge_in_fp32's logit check compares with base + the damped adapter (it passes)."""
    from daemon.train.consolidate import MERGE_TOLERANCE, merge_in_fp32
    from daemon.train.intruders import damp_model
    from daemon.train.tinymodel import ensure_embedded

    cfg = make_cfg(models_dir, tmp_path, epochs_per_file=1)
    ac = ActivityConfig(intruders=True, intruders_top_k=4, intruders_min_strength=0.0, intruders_threshold=0.5)
    cfg = dataclasses.replace(cfg, lora=LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=ALL_LINEAR), activity=ac)
    path = small_file(tmp_path, n=16)
    lm = load_for_training(cfg, seed=cfg.training.seed)
    train_file(lm, cfg, Job.for_file("j", path, "alpaca", sha(path)), global_step=0, ckpt_folder=tmp_path / "ck",
               report=lambda e: None, control=lambda: "continue")
    adapter = tmp_path / "adapter"
    lm.model.save_pretrained(adapter)
    probe = ActivityProbe(lm.model)

    def delta(i: int) -> torch.Tensor:
        m = probe.modules[i]
        return float(probe.scaling[i]) * m.lora_B["default"].weight.double() @ m.lora_A["default"].weight.double()

    with torch.no_grad():
        before = [delta(i) for i in range(len(probe.modules))]
    intruders = Intruders(probe, ac)
    count = sum(intruders.counts())
    assert count > 0
    # the base's vectors here come from the 4-bit-free fp32 weights of the trainer's model (cfg: quantization none)
    expected_gone = []
    for i, m in enumerate(probe.modules):
        u, s, _ = torch.linalg.svd(before[i], full_matrices=False)
        u0, sigma_k = intruders.base_vectors()[i]
        r = m.lora_A["default"].weight.shape[0]
        gone = [float(s[j]) ** 2 for j in range(r)
                if float(s[j]) > 1e-12 * sigma_k and float((u0.double().T @ u[:, j]).abs().max()) < ac.intruders_threshold]
        expected_gone.append(sum(gone))
    report = damp_model(lm.model, ac, 1.0)
    assert report["directions"] == count
    for i in range(len(probe.modules)):
        removed = float((before[i] - delta(i)).pow(2).sum())
        assert abs(removed - expected_gone[i]) <= 1e-6 * max(1.0, float(before[i].pow(2).sum()))
    assert sum(intruders.counts()) == 0
    base = ensure_embedded(models_dir)
    merged, _, _, got, check = merge_in_fp32(base, adapter, cfg, 1.0)
    assert check["intruders_damped"]["directions"] > 0
    assert check["max_abs_logit_diff"] <= check["tolerance"] == MERGE_TOLERANCE * check["logit_scale"]
