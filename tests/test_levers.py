"""daemon.train.levers: every speed lever has a switch (`speed.*`), is applied in one place and reported with counts.

Each switch must turn its lever off on the loaded model (its modules as PEFT and transformers
make them), the start report must say what each did with its counts, and the numbers with
every lever off must equal those with every lever on to the rounding the levers' own tests
allow: a lever is a speed choice, never a change of what is trained.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from multiprocessing import Pipe
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from daemon.config import ConfigError, SpeedConfig, config_from_dict, explain, locked_values  # noqa: E402
from daemon.train import checkpoint as ckpt  # noqa: E402
from daemon.train import fused, levers, precision, step  # noqa: E402
from daemon.train.data import IGNORE, Example  # noqa: E402
from daemon.train.loop import Job  # noqa: E402
from daemon.train.model import load_for_training, lora_max_abs_diff, lora_state  # noqa: E402
from tests.test_loop import MAX_RESUME_DIFF, Crash, losses, make_cfg, run, sha, small_file  # noqa: E402
from tests.test_loop import one_thread  # noqa: E402, F401 - autouse

SWITCHES = [f.name for f in dataclasses.fields(SpeedConfig)]
ALL_OFF = {name: False for name in SWITCHES}


def with_speed(cfg, compute_dtype: str = "float32", **switches: bool):  # noqa: ANN001, ANN201
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, compute_dtype=compute_dtype),
                               speed=dataclasses.replace(cfg.speed, **switches))


def lora_layers(model) -> list:  # noqa: ANN001
    return [m for m in model.modules() if hasattr(m, "lora_A") and len(m.lora_A)]


def switched_norms(model) -> list:  # noqa: ANN001
    return [m for m in model.modules() if isinstance(vars(m).get("forward"), functools.partial)]


def rms_norms(model) -> list:  # noqa: ANN001
    return [m for m in model.modules() if "RMSNorm" in type(m).__name__]


def test_every_lever_has_a_documented_switch_on_by_default_and_none_is_locked(tmp_path: Path) -> None:
    cfg = config_from_dict({}, tmp_path)
    assert SWITCHES and all(getattr(cfg.speed, name) is True for name in SWITCHES)
    assert {f"speed.{name}" for name in SWITCHES} <= {key for key, _, _ in explain()}
    assert not any(key.startswith("speed.") for key in locked_values(cfg))  # a lever never changes what is trained
    off = config_from_dict({"speed": {"fused_lora": False, "thread_governor": False}}, tmp_path)
    assert off.speed.fused_lora is False and off.speed.thread_governor is False and off.speed.last_block is True
    with pytest.raises(ConfigError) as e:
        config_from_dict({"speed": {"fused_lora": "no", "warp_drive": True}}, tmp_path)
    assert "`speed.fused_lora` = 'no'" in str(e.value) and "`speed.warp_drive` is not a known key" in str(e.value)


def test_each_model_lever_is_applied_counted_and_turned_off_by_its_switch(models_dir: Path, tmp_path: Path) -> None:
    cfg = with_speed(make_cfg(models_dir, tmp_path), "bfloat16")  # the precision levers act in bf16/fp16 only
    lm = load_for_training(cfg, seed=1)
    layers, norms = lora_layers(lm.model), rms_norms(lm.model)
    n, m = len(layers), len(norms)
    assert n == 2 * len(cfg.lora.target_modules) and m == 4 * 2 + 1  # two blocks; Qwen3: four norms a block, one after
    assert all(type(x) in fused.fused_classes() for x in layers)
    assert all(type(f) is precision.ActivationDtypeLinear for x in layers for f in (*x.lora_A.values(), *x.lora_B.values()))
    assert len(switched_norms(lm.model)) == m
    assert lm.model.get_base_model().config._attn_implementation == precision.ATTENTION
    assert {k: v.text() for k, v in lm.levers.items()} == {
        "fused_lora": f"fused LoRA {n}/{n} layers", "norms_backward": f"closed-form norms {m}/{m}",
        "lora_in_compute_dtype": f"LoRA in bfloat16 {n}/{n} layers", "fp32_short_attention": "fp32 short-row attention on"}
    assert lm.levers["fused_lora"].to_wire() == {"state": "on", "applied": n, "of": n, "text": f"fused LoRA {n}/{n} layers"}

    off = load_for_training(with_speed(cfg, "bfloat16", fused_lora=False), seed=1)
    assert not any(type(x) in fused.fused_classes() for x in lora_layers(off.model))
    assert off.levers["fused_lora"].text() == "fused LoRA off (speed.fused_lora = false)"
    assert off.levers["fused_lora"].to_wire() == {"state": "off", "text": "fused LoRA off (speed.fused_lora = false)"}
    assert off.levers["norms_backward"].state is levers.State.ON  # the others stay on

    off = load_for_training(with_speed(cfg, "bfloat16", norms_backward=False), seed=1)
    assert switched_norms(off.model) == [] and off.levers["norms_backward"].state is levers.State.OFF

    off = load_for_training(with_speed(cfg, "bfloat16", lora_in_compute_dtype=False), seed=1)
    assert all(type(f) is torch.nn.Linear and x.cast_input_dtype_enabled
               for x in lora_layers(off.model) for f in (*x.lora_A.values(), *x.lora_B.values()))
    assert off.levers["lora_in_compute_dtype"].state is levers.State.OFF
    # PEFT then casts each LoRA input up to fp32, which the fused forward leaves to PEFT on every call: not installed
    assert not any(type(x) in fused.fused_classes() for x in lora_layers(off.model))
    assert off.levers["fused_lora"].text() == ("fused LoRA not used (PEFT casts the LoRA input to fp32: "
                                               "speed.lora_in_compute_dtype = false)")

    off = load_for_training(with_speed(cfg, "bfloat16", fp32_short_attention=False), seed=1)
    assert off.model.get_base_model().config._attn_implementation == "sdpa"
    assert off.levers["fp32_short_attention"].text() == "fp32 short-row attention off (speed.fp32_short_attention = false)"


def test_where_a_model_lever_does_not_apply_the_report_says_why(models_dir: Path, tmp_path: Path) -> None:
    fp32 = load_for_training(with_speed(make_cfg(models_dir, tmp_path)), seed=1)
    assert fp32.model.get_base_model().config._attn_implementation == "sdpa"
    assert fp32.levers["lora_in_compute_dtype"].text() == "LoRA in the compute dtype not used (the model computes in float32)"
    assert fp32.levers["fp32_short_attention"].to_wire() == {
        "state": "not_used", "text": "fp32 short-row attention not used (the model computes in float32)"}
    compiled = load_for_training(dataclasses.replace(
        fp32_cfg := with_speed(make_cfg(models_dir, tmp_path)), training=dataclasses.replace(fp32_cfg.training, compile=True)), seed=1)
    assert switched_norms(compiled.model) == []
    assert compiled.levers["norms_backward"].text() == "closed-form norms not used (training.compile = true: inductor fuses them)"
    explicit = load_for_training(dataclasses.replace(
        bf := with_speed(make_cfg(models_dir, tmp_path), "bfloat16"), model=dataclasses.replace(bf.model, attention="sdpa")), seed=1)
    assert explicit.levers["fp32_short_attention"].text() == "fp32 short-row attention not used (model.attention = 'sdpa')"


def test_on_a_4bit_base_the_precision_levers_say_its_activations_are_fp32(models_dir: Path, tmp_path: Path) -> None:
    """PEFT's k-bit preparation keeps a 4-bit base's embeddings and norms in fp32: its LoRA inputs and attention are
    fp32 whatever the compute dtype, so the precision levers have nothing to do and are not installed."""
    pytest.importorskip("bitsandbytes")
    lm = load_for_training(with_speed(make_cfg(models_dir, tmp_path, "nf4"), "bfloat16"), seed=1)
    why = "its activations are float32: a 4-bit base after PEFT's k-bit preparation"
    assert lm.levers["lora_in_compute_dtype"].text() == f"LoRA in the compute dtype not used ({why})"
    assert lm.levers["fp32_short_attention"].text() == f"fp32 short-row attention not used ({why})"
    assert lm.model.get_base_model().config._attn_implementation == "sdpa"
    n = len(lora_layers(lm.model))
    assert lm.levers["fused_lora"].text() == f"fused LoRA {n}/{n} layers"  # fp32 inputs: nothing to cast, it fuses
    assert all(type(x).__name__ == "FusedLinear4bit" for x in lora_layers(lm.model))


def levers_in_use(lm) -> dict[str, bool]:  # noqa: ANN001
    """What the loaded model (after a file) really runs, read from its modules and the step's fast paths."""
    layers = lora_layers(lm.model)
    return {"fused_lora": any(type(x) in fused.fused_classes() for x in layers),
            "norms_backward": bool(switched_norms(lm.model)),
            "lora_in_compute_dtype": any(type(f) is precision.ActivationDtypeLinear for x in layers for f in x.lora_A.values()),
            "fp32_short_attention": lm.model.get_base_model().config._attn_implementation == precision.ATTENTION,
            "label_only_logits": lm.fast.label_only, "last_block": lm.fast.last_block,
            "width_pieces": lm.fast.width_pieces}


def spread_micro_batch() -> list[Example]:
    """Lengths that spread far enough for width pieces to cut (tests/test_batching.py has the cost model's cases)."""
    return [Example(k, list(range(3, 3 + n)), [IGNORE] * (n // 2) + list(range(3 + n // 2, 3 + n)))
            for k, n in enumerate([20] * 7 + [300])]


def test_each_step_lever_is_turned_off_by_its_switch(models_dir: Path, tmp_path: Path) -> None:
    cfg = with_speed(make_cfg(models_dir, tmp_path))
    lm = load_for_training(cfg, seed=1)
    fast = step.fast_paths(lm)
    assert fast.pack and fast.label_only and fast.last_block and fast.width_pieces
    last = lm.model.get_base_model().get_decoder().layers[-1]
    assert getattr(last, "_traind_last_block", False)
    mb = spread_micro_batch()
    assert len(step._by_width(lm, mb, True, fast)) > 1

    lm = load_for_training(with_speed(cfg, label_only_logits=False), seed=1)
    fast = step.fast_paths(lm)
    assert fast.pack and not fast.label_only and not fast.last_block
    assert not getattr(lm.model.get_base_model().get_decoder().layers[-1], "_traind_last_block", False)

    lm = load_for_training(with_speed(cfg, last_block=False), seed=1)
    fast = step.fast_paths(lm)
    assert fast.label_only and not fast.last_block
    assert not getattr(lm.model.get_base_model().get_decoder().layers[-1], "_traind_last_block", False)

    lm = load_for_training(with_speed(cfg, width_pieces=False), seed=1)
    fast = step.fast_paths(lm)
    assert fast.pack and not fast.width_pieces and step._by_width(lm, mb, True, fast) == [mb]


def test_the_thread_governor_has_its_switch_and_says_why_it_is_not_used(models_dir: Path, tmp_path: Path) -> None:
    cfg = make_cfg(models_dir, tmp_path)  # training.cpu_threads 0: auto
    governor, lever = levers.thread_governor(cfg, threads=2, sharing=1)
    assert governor is not None and governor.cores == 2 and lever.text() == "thread governor on (2 threads)"
    governor, lever = levers.thread_governor(with_speed(cfg, thread_governor=False), threads=2, sharing=1)
    assert governor is None and lever.text() == "thread governor off (speed.thread_governor = false)"
    governor, lever = levers.thread_governor(dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, cpu_threads=2)),
                                             threads=2, sharing=1)
    assert governor is None and lever.text() == "thread governor not used (training.cpu_threads = 2)"
    governor, lever = levers.thread_governor(cfg, threads=1, sharing=2)
    assert governor is None and lever.text() == "thread governor not used (2 ranks share this machine's cores)"


def test_the_start_report_is_one_line_and_the_ready_message_carries_it(models_dir: Path, tmp_path: Path,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    from daemon.train.session import load_session

    cfg = dataclasses.replace(with_speed(make_cfg(models_dir, tmp_path), "bfloat16", width_pieces=False), root=tmp_path)
    service, trainer = Pipe()
    with caplog.at_level(logging.INFO, logger="daemon.train.levers"):
        sess = load_session(cfg, trainer, threads=2)
    ready = service.recv()
    assert ready["type"] == "ready" and sess.lm.fast is not None  # the probes ran before `ready`, once
    n, m = len(lora_layers(sess.lm.model)), len(rms_norms(sess.lm.model))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("speed levers")]
    assert lines == [
        f"speed levers on {sess.lm.base_path.name}: fused LoRA {n}/{n} layers, closed-form norms {m}/{m}, "
        f"LoRA in bfloat16 {n}/{n} layers, fp32 short-row attention on, label-only logits on, "
        "label-only last block on, packed rows on, width pieces off (speed.width_pieces = false), "
        "thread governor on (2 threads)"]
    assert list(ready["levers"]) == ["fused_lora", "norms_backward", "lora_in_compute_dtype", "fp32_short_attention",
                                     "label_only_logits", "last_block", "packed_rows", "width_pieces", "thread_governor"]
    assert ready["levers"]["fused_lora"] == {"state": "on", "applied": n, "of": n, "text": f"fused LoRA {n}/{n} layers"}
    assert ready["levers"]["width_pieces"] == {"state": "off", "text": "width pieces off (speed.width_pieces = false)"}
    assert ready["levers"]["packed_rows"]["state"] == "on"
    packing_off = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, packing=False))
    report = levers.report(sess.lm, packing_off, levers.thread_governor(packing_off, 2, 1)[1])
    assert report["packed_rows"].text() == "packed rows off (data.packing = false)"
    assert report["width_pieces"].text() == "width pieces off (speed.width_pieces = false)"
    pieces_on = dataclasses.replace(sess.lm, speed=SpeedConfig())
    assert levers.report(pieces_on, packing_off, levers.thread_governor(packing_off, 2, 1)[1])["width_pieces"].text() \
        == "width pieces not used (packed rows are off)"


def test_a_refused_shortcut_is_reported_with_the_probe_s_reason(models_dir: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = with_speed(make_cfg(models_dir, tmp_path))
    lm = load_for_training(cfg, seed=1)
    monkeypatch.setattr(step.lastblock, "install", lambda model: False)  # a block it does not know
    lm.fast = step.fast_paths(lm)
    report = levers.report(lm, cfg, levers.thread_governor(cfg, 2, 1)[1])
    assert report["last_block"].to_wire() == {"state": "not_used",
                                              "text": "label-only last block not used (not a block it knows)"}
    assert report["label_only_logits"].state is levers.State.ON


# The tolerances of the levers' own tests: fp32 as exact as a resume (tests/test_loop.py), bf16 within the relative
# rounding the step's probes and tests/test_lastblock.py allow (daemon.train.step.PROBE_TOLERANCE).
@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_every_lever_off_trains_the_same_losses_as_every_lever_on(models_dir: Path, tmp_path: Path,
                                                                  compute_dtype: str) -> None:
    path = small_file(tmp_path)
    job = Job.for_file("j", path, "alpaca", sha(path))
    _, on_events, on_lm = run(with_speed(make_cfg(models_dir, tmp_path / "on", epochs_per_file=1), compute_dtype), job)
    _, off_events, off_lm = run(with_speed(make_cfg(models_dir, tmp_path / "off", epochs_per_file=1), compute_dtype,
                                           **ALL_OFF), job)
    reduced = compute_dtype != "float32"  # the precision levers act in bf16/fp16 only
    assert levers_in_use(on_lm) == {"fused_lora": True, "norms_backward": True, "lora_in_compute_dtype": reduced,
                                    "fp32_short_attention": reduced, "label_only_logits": True, "last_block": True,
                                    "width_pieces": True}
    assert not any(levers_in_use(off_lm).values())
    on, off = losses(on_events), losses(off_events)
    assert sorted(on) == sorted(off) and len(on) >= 5
    print(f"every lever off against on, {compute_dtype}: max abs step-loss diff "
          f"{max(abs(on[s] - off[s]) for s in on):.3g}, relative {max(abs(on[s] - off[s]) / on[s] for s in on):.3g}")
    for s in on:
        if compute_dtype == "float32":
            assert abs(on[s] - off[s]) <= MAX_RESUME_DIFF, (s, on[s], off[s])
        else:
            assert abs(on[s] - off[s]) <= step.PROBE_TOLERANCE[torch.bfloat16] * on[s], (s, on[s], off[s])


# Each changes the shapes the LoRA dropout draws its masks over (rows computed, pieces), so with lora.dropout above 0
# it changes which masks are drawn after it is switched: the same distribution, other numbers (README, Speed levers).
SHAPES_DRAWS = ("label_only_logits", "last_block", "width_pieces")


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_a_resume_with_levers_switched_off_continues_exactly(models_dir: Path, tmp_path: Path, dropout: float) -> None:
    """Switching levers off between a stop and a restart (none is locked) resumes as the uninterrupted run: every
    lever without LoRA dropout, and with it those that do not change the shapes it draws over."""
    cfg = with_speed(make_cfg(models_dir, tmp_path, dropout=dropout, checkpoint_every_steps=3))
    path = small_file(tmp_path)
    job = Job.for_file("j", path, "alpaca", sha(path))
    full, full_events, full_lm = run(cfg, dataclasses.replace(job, job_id="straight"))
    calls = {"n": 0}

    def crash_after_5() -> str:
        calls["n"] += 1
        if calls["n"] > 5:
            raise Crash()
        return "continue"

    with pytest.raises(Crash):
        run(cfg, job, control=crash_after_5)
    assert ckpt.latest_step(cfg.path("checkpoints") / "j") == 3
    switched = {k: v for k, v in ALL_OFF.items() if not dropout or k not in SHAPES_DRAWS}
    resumed, events, lm = run(with_speed(cfg, **switched), job)
    assert not any(v for k, v in levers_in_use(lm).items() if k in switched)
    assert next(e for e in events if e["type"] == "started")["resumed_from_step"] == 3
    a, b = losses(full_events), losses(events)
    loss_diff = max(abs(a[s] - b[s]) for s in b)
    weight_diff = lora_max_abs_diff(lora_state(full_lm.model), lora_state(lm.model))
    print(f"resume with {sorted(switched)} off: max abs diff loss {loss_diff:.3g}, lora {weight_diff:.3g}")
    assert loss_diff <= MAX_RESUME_DIFF and weight_diff <= MAX_RESUME_DIFF
