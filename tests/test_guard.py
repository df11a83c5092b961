"""Guard rails (#12): a non-finite step or a loss spike stops the file, restores the adapter, pauses the daemon."""

from __future__ import annotations

import pytest

from daemon.errors import GuardTripped
from daemon.train.loop import SpikeGuard
from bench.harness import lines_of, write_instance
from bench.harness import Daemon


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
            train_file(lm, cfg, Job.for_file("j", path, "alpaca", sha(path)), global_step=0,
                       ckpt_folder=cfg.path("checkpoints") / "j", report=lambda m: events.append(m.to_wire()), control=lambda: "continue")
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


def test_out_of_memory_halves_the_micro_batch_and_the_result_stays(models_dir, tmp_path, monkeypatch):
    # Injected (the CPU does not run out of memory on the tiny model): a forward of more than 1 example "does not
    # fit", so each micro-batch of 4 runs in pieces of 1; the adapter matches the unsplit run's.
    import torch

    from daemon.train.loop import Job, train_file
    from daemon.train.model import load_for_training, lora_max_abs_diff, lora_state
    from tests.test_loop import make_cfg, sha, small_file

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = make_cfg(models_dir, tmp_path)
        path = small_file(tmp_path)
        job = Job.for_file("j", path, "alpaca", sha(path))
        runs = []
        for inject in (None, "1"):
            if inject:
                monkeypatch.setenv("TRAIND_INJECT_OOM_ABOVE", inject)
            lm = load_for_training(cfg, seed=cfg.training.seed)
            events: list[dict] = []
            out = train_file(lm, cfg, job, global_step=0, ckpt_folder=tmp_path / f"ck-{inject}", report=lambda m: events.append(m.to_wire()),
                             control=lambda: "continue")
            runs.append((out, lora_state(lm.model), [e for e in events if e["type"] == "step"], lm.split))
        (out0, w0, s0, split0), (out1, w1, s1, split1) = runs
        assert split0 == 1 and split1 == 4 and {e["micro_batch_split"] for e in s1} == {4}
        assert out0.steps == out1.steps
        diff = lora_max_abs_diff(w0, w1)
        print(f"micro-batch split 4 vs 1: max |adapter diff| {diff:.2e}, max |loss diff| "
              f"{max(abs(a['loss'] - b['loss']) for a, b in zip(s0, s1)):.2e}")
        assert diff <= 1e-4
    finally:
        torch.set_num_threads(threads)
