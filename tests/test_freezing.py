"""daemon.train.freezing (lora.freeze_stalled): frozen layers keep their weights bit for bit, get no backward
pass below the lowest trainable block, thaw when a new file's gradients need them, and resume exactly."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from daemon.config import ConfigError, LoraConfig, load_config  # noqa: E402
from daemon.train import checkpoint as ckpt  # noqa: E402
from daemon.train.freezing import Freezer  # noqa: E402
from daemon.train.loop import Job, train_file  # noqa: E402
from daemon.train.model import load_for_training, lora_state  # noqa: E402
from tests.test_loop import Crash, crash_after, make_cfg, one_thread, sha, small_file  # noqa: E402, F401 - one_thread: autouse

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def freeze_cfg(models: Path, tmp: Path, **lora):
    cfg = make_cfg(models, tmp, weight_decay=0.1, epochs_per_file=2)
    lc = dict(r=4, alpha=8, dropout=0.0, target_modules=ALL_LINEAR, freeze_stalled=True, freeze_every_steps=1,
              freeze_patience=1, freeze_threshold=0.99, freeze_max_fraction=0.5)
    lc.update(lora)
    return dataclasses.replace(cfg, lora=LoraConfig(**lc))


def train(cfg, path: Path, lm, freezer, job_id: str = "j", control=lambda: "continue"):  # noqa: ANN001, ANN201
    events: list[dict] = []
    out = train_file(lm, cfg, Job.for_file(job_id, path, "alpaca", sha(path)), global_step=0,
                     ckpt_folder=cfg.path("checkpoints") / job_id, report=lambda m: events.append(m.to_wire()),
                     control=control, freezer=freezer)
    return out, events


def layer_state(lm, layer: int) -> dict[str, torch.Tensor]:
    return {k: v for k, v in lora_state(lm.model).items() if f".layers.{layer}." in k}


def test_a_frozen_bottom_layer_keeps_its_weights_bitwise_and_gets_no_backward(models_dir: Path, tmp_path: Path) -> None:
    cfg = freeze_cfg(models_dir, tmp_path, thaw_ratio=1e9, freeze_threshold=1e-9)  # never thaws, nothing new freezes
    path = small_file(tmp_path, n=24)
    lm = load_for_training(cfg, seed=cfg.training.seed)
    block0 = lm.model.get_base_model().model.layers[0]
    backward_calls = []
    block0.register_full_backward_hook(lambda *a: backward_calls.append(1))
    before0, before1 = layer_state(lm, 0), layer_state(lm, 1)
    freezer = Freezer(lm.model, cfg.lora)
    freezer.carry = ["layer 0"]
    out, _ = train(cfg, path, lm, freezer)
    assert out.status == "done" and out.freezing["frozen"] == ["layer 0"] and out.freezing["skipped_layers"] == [0]
    after0, after1 = layer_state(lm, 0), layer_state(lm, 1)
    # weight decay 0.1 would shrink A of layer 0 at every step if AdamW touched it
    assert all(torch.equal(before0[k], after0[k]) for k in before0)
    assert any(not torch.equal(before1[k], after1[k]) for k in before1)
    # the first step computed every gradient (the re-test), the others not block 0's
    assert len(backward_calls) == 1, backward_calls
    # and without freezing, block 0 gets its backward at every step
    backward_calls.clear()
    freezer.release()
    train(dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, freeze_stalled=False)), path, lm, None, "k")
    assert len(backward_calls) == out.steps


def test_a_new_file_whose_gradients_need_a_frozen_layer_thaws_it(models_dir: Path, tmp_path: Path) -> None:
    cfg = freeze_cfg(models_dir, tmp_path, thaw_ratio=1e-6, freeze_threshold=1e-9)
    path = small_file(tmp_path, n=24)
    lm = load_for_training(cfg, seed=cfg.training.seed)
    before0 = layer_state(lm, 0)
    freezer = Freezer(lm.model, cfg.lora)
    freezer.carry = ["layer 0"]
    out, _ = train(cfg, path, lm, freezer)
    assert out.freezing["frozen"] == [] and out.freezing["carried"] == ["layer 0"]
    assert out.freezing["events"] == [{"step": 1, "global_step": 1, "action": "thaw", "units": ["layer 0"]}]
    assert any(not torch.equal(before0[k], v) for k, v in layer_state(lm, 0).items())


def test_the_stalled_layer_freezes_and_a_resume_is_bitwise_the_same(models_dir: Path, tmp_path: Path) -> None:
    cfg = freeze_cfg(models_dir, tmp_path, freeze_patience=2, freeze_threshold=0.99)
    cfg = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, checkpoint_every_steps=2))
    path = small_file(tmp_path, n=24)
    lm = load_for_training(cfg, seed=cfg.training.seed)
    straight, _ = train(cfg, path, lm, Freezer(lm.model, cfg.lora), "straight")
    events = straight.freezing["events"]
    assert [e["action"] for e in events] == ["freeze"], events
    froze_at = events[0]["step"]
    assert 2 < froze_at < straight.steps, events
    # a crash after the freeze: the checkpoint before it holds the stall counts and the factors of the last check
    lm2 = load_for_training(cfg, seed=cfg.training.seed)
    with pytest.raises(Crash):
        train(cfg, path, lm2, Freezer(lm2.model, cfg.lora), "j", control=crash_after(froze_at + 1))
    assert ckpt.latest_step(cfg.path("checkpoints") / "j") < froze_at + 1
    lm3 = load_for_training(cfg, seed=cfg.training.seed)
    resumed, _ = train(cfg, path, lm3, Freezer(lm3.model, cfg.lora), "j")
    assert resumed.freezing["events"] == events and resumed.freezing["frozen"] == straight.freezing["frozen"]
    a, b = lora_state(lm.model), lora_state(lm3.model)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_preference_file_keeps_frozen_layers_bitwise_and_thaws_as_a_supervised_file(models_dir: Path,
                                                                                       tmp_path: Path) -> None:
    """A preference file's steps honour the frozen set: the first step's gradients decide what thaws, and a unit
    still frozen gets no update (weight decay would move it), as in a supervised file."""
    from daemon.validate import DataFormat
    from tests.test_preference import pref_lines, write

    path = write(tmp_path, "prefs.jsonl", pref_lines(24, chat=True))
    for thaw_ratio, thawed in ((1e9, False), (1e-6, True)):
        cfg = freeze_cfg(models_dir, tmp_path / str(thaw_ratio), thaw_ratio=thaw_ratio, freeze_threshold=1e-9)
        lm = load_for_training(cfg, seed=cfg.training.seed)
        before0 = layer_state(lm, 0)
        freezer = Freezer(lm.model, cfg.lora)
        freezer.carry = ["layer 0"]
        job = Job.for_file("p", path, DataFormat.PREFERENCE_CHAT.value, sha(path))
        out = train_file(lm, cfg, job, global_step=0, ckpt_folder=cfg.path("checkpoints") / "p",
                         report=lambda m: None, control=lambda: "continue", freezer=freezer)
        assert out.status == "done" and out.preference is not None
        moved = any(not torch.equal(before0[k], v) for k, v in layer_state(lm, 0).items())
        assert moved == thawed, (thaw_ratio, out.freezing)
        assert out.freezing["frozen"] == ([] if thawed else ["layer 0"])


@pytest.mark.parametrize("key,value", [("freeze_threshold", 1.5), ("freeze_max_fraction", 1.0),
                                       ("freeze_patience", 0), ("freeze_every_steps", 0), ("freeze_unit", "block")])
def test_freezing_thresholds_are_validated(tmp_path: Path, key: str, value: object) -> None:
    (tmp_path / "config.json").write_text(f'{{"lora": {{"freeze_stalled": true, "{key}": {value!r}}}}}'.replace("'", '"'))
    with pytest.raises(ConfigError, match=f"lora.{key}"):
        load_config(tmp_path / "config.json")


@pytest.mark.slow  # two trainer children on 2 shared cores: 40-80 s
def test_the_frozen_set_carries_to_the_next_file_through_the_manifest_across_a_restart(models_dir: Path,
                                                                                          tmp_path: Path) -> None:
    """The real trainer child: the first file freezes layer 0; a new child (the trainer restarted) starts the next
    file from v1's frozen set, keeps it (its gradients do not ask for it: thaw_ratio high), and v2's layer 0 is
    v1's bit for bit. The job record (done's activity_moved) says what froze; intruders go into the report."""
    import json

    from tests.test_trainer_child import Child, adapter_weights, data_file, train_msg, write_config

    root = tmp_path / "inst"
    config = write_config(root, models_dir, epochs_per_file=2, weight_decay=0.1)
    raw = json.loads(config.read_text())
    raw["lora"].update(target_modules=ALL_LINEAR, freeze_stalled=True, freeze_every_steps=1, freeze_patience=1,
                       freeze_threshold=0.99, freeze_max_fraction=0.5, thaw_ratio=1e9)
    raw["activity"] = {"intruders": True, "intruders_min_strength": 0.0}
    config.write_text(json.dumps(raw))
    a, sha_a = data_file(root, "a.jsonl", 24)
    b, sha_b = data_file(root, "b.jsonl", 24, "text.jsonl")
    for job, path, sha, fmt in (("j-a", a, sha_a, "alpaca"), ("j-b", b, sha_b, "text")):
        child = Child(config)
        try:
            child.until("ready")
            child.conn.send(train_msg(job, path, sha, fmt))
            msgs = child.until("done")
        finally:
            child.close()
        done = msgs[-1]
        freezing = done["activity_moved"]["freezing"]
        assert freezing["frozen"] == ["layer 0"], freezing
        samples = [m for m in msgs if m["type"] == "activity"]
        assert samples[-1]["values"]["frozen"] == [[1.0] * 7, [0.0] * 7]
        report = done["forgetting"]["intruders"]
        assert report["count"] == sum(report["per_layer"]) and report["layers"] == [0, 1]
        if job == "j-a":
            assert freezing["carried"] == [] and [e["action"] for e in freezing["events"]] == ["freeze"]
            assert report["before"] is None
        else:
            assert freezing["carried"] == ["layer 0"] and freezing["events"] == [] and freezing["skipped_layers"] == [0]
            assert report["before"] is not None
    v1, v2 = adapter_weights(root, 1), adapter_weights(root, 2)
    layer0 = [k for k in v1 if ".layers.0." in k]
    assert layer0 and all(torch.equal(v1[k], v2[k]) for k in layer0)
    assert any(not torch.equal(v1[k], v2[k]) for k in v1 if ".layers.1." in k)
