"""Guard rails (#12): a non-finite step or a loss spike stops the file, restores the adapter, pauses the daemon."""

from __future__ import annotations

import pytest

from daemon.errors import GuardTripped
from daemon.train.loop import SpikeGuard
from tests.conftest import lines_of, write_instance
from tests.daemon_harness import Daemon


def test_the_spike_guard_judges_against_the_recent_mean_after_its_warm_up():
    g = SpikeGuard(factor=3.0, min_steps=5)
    for step, loss in enumerate([9.0, 2.0, 2.0, 2.0, 2.0], 1):  # a high first loss is no spike: too early
        g.judge(loss, 1.0, step)
    g.judge(4.0, 1.0, 6)  # 4 < 3 x the mean
    with pytest.raises(GuardTripped) as e:
        g.judge(40.0, 1.0, 7)
    assert e.value.step == 7 and "loss spike" in str(e.value)
    SpikeGuard(factor=0.0, min_steps=1).judge(1e9, 1.0, 1)  # off


def test_a_non_finite_step_is_never_applied(models_dir, tmp_path):
    # A learning rate no config accepts (the bounds stop at 1) makes the tiny model's gradients overflow.
    import torch

    from daemon.train.loop import Job
    from daemon.train.model import lora_state
    from tests.test_loop import make_cfg, sha, small_file

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = make_cfg(models_dir, tmp_path, learning_rate=1e8, epochs_per_file=3)
        path = small_file(tmp_path)
        events: list[dict] = []
        from daemon.train.loop import train_file
        from daemon.train.model import load_for_training

        lm = load_for_training(cfg, seed=cfg.training.seed)
        with pytest.raises(GuardTripped) as e:
            train_file(lm, cfg, Job("j", path, "alpaca", sha(path)), global_step=0,
                       ckpt_folder=cfg.path("checkpoints") / "j", report=events.append, control=lambda: "continue")
        assert "non-finite" in str(e.value) and e.value.step == len([x for x in events if x["type"] == "step"]) + 1
        assert all(bool(torch.isfinite(t).all()) for t in lora_state(lm.model).values())  # the bad step was not applied
    finally:
        torch.set_num_threads(threads)


@pytest.mark.e2e
def test_a_tripped_guard_fails_the_file_keeps_the_adapter_and_pauses(tmp_path, models_dir):
    # A spike factor of 1.01 trips on the first step a little above the recent mean: the handling is what is tested.
    d = Daemon(write_instance(tmp_path / "inst", models_dir, training={"epochs_per_file": 1}))
    try:
        d.start()
        d.drop("good.jsonl", lines_of("text.jsonl", 12))
        d.wait_for(lambda s: s.get("adapter_version") == 1 and s["status"] == "idle", what="v1")
        assert d.stop() == 0
        import json
        raw = json.loads(d.config_path.read_text())
        raw["training"]["epochs_per_file"] = 6
        raw["guard"] = {"loss_spike_factor": 1.01, "min_steps": 2}
        d.config_path.write_text(json.dumps(raw))
        d.start()
        d.drop("spiky.jsonl", lines_of("alpaca.jsonl", 40))
        d.wait_counts(failed=1, timeout=180)
        job = d.queue.failed()[0].job_id
        err = d.queue.read_error(job)
        assert err["reason"] == "guard" and "loss spike" in err["message"] and "at step" in err["message"], err
        st = d.wait_for(lambda s: s["desired_state"] == "paused", what="paused by the guard")
        assert st["adapter_version"] == 1  # nothing published from the file
        assert any(e["kind"] == "guard" for e in d.history().events())
        assert d.history().steps(job) == []  # its steps left the history
    finally:
        d.close()
