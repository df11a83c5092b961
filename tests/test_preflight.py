"""A config that cannot run on this machine holds the queue with every reason; no file fails for it (#27, defect 2)."""

from __future__ import annotations

import time

import pytest

from daemon.config import Config, load_config
from daemon.train.model import Capabilities
from daemon.train.preflight import problems
from bench.harness import lines_of, write_instance
from bench.harness import Daemon, time_scale

CPU = Capabilities(cuda=False, bf16=False, bitsandbytes=True, cuda_name=None)
OLD_GPU = Capabilities(cuda=True, bf16=False, bitsandbytes=False, cuda_name="Tesla T4")


def cfg_with(tmp_path, **over) -> Config:
    return load_config(write_instance(tmp_path / "inst", **over))


def test_every_problem_is_listed_at_once(tmp_path):
    cfg = cfg_with(tmp_path, model={"device": "cuda", "attention": "flash_attention_2"},
                   training={"optimizer": "adamw_8bit"}, distributed={"backend": "nccl"})
    found = problems(cfg, CPU)
    assert len(found) == 4, found
    for key in ("model.device", "training.optimizer", "model.attention", "distributed.backend"):
        assert any(f"`{key}`" in p for p in found), (key, found)


def test_a_gpu_without_what_the_config_needs(tmp_path):
    cfg = cfg_with(tmp_path, model={"quantization": "nf4", "compute_dtype": "bfloat16"})
    found = problems(cfg, OLD_GPU)
    assert any("`model.quantization` = 'nf4' needs bitsandbytes" in p for p in found)
    assert any("'bfloat16' is not supported by this GPU (Tesla T4)" in p for p in found)


def test_what_runs_here_passes(tmp_path):
    assert problems(cfg_with(tmp_path), CPU) == []
    assert problems(cfg_with(tmp_path, training={"optimizer": "adamw_8bit"}), OLD_GPU) == []


@pytest.mark.e2e
def test_a_config_that_cannot_run_here_holds_the_queue_and_fails_no_file(tmp_path, models_dir):
    d = Daemon(write_instance(tmp_path / "inst", models_dir, training={"optimizer": "adamw_8bit"}))
    try:
        d.start()
        d.drop("a.jsonl", lines_of("text.jsonl", 8))
        d.drop("b.jsonl", lines_of("text.jsonl", 9))
        st = d.wait_for(lambda s: s["status"] == "error" and "cannot run on this machine" in (s.get("last_error") or ""),
                        what="the refusal in the status")
        assert "`training.optimizer` = 'adamw_8bit' runs on CUDA only" in st["last_error"]
        # The refusal is in the status as soon as the trainer says it; the trainer then leaves, and its pid goes
        # once the service has seen it exit (later on a busy machine): wait for that, not for a fixed time.
        d.wait_for(lambda s: s["trainer_pid"] is None, what="the refusing trainer gone")
        # held: watched a while (scaled like every wait here) for a restart, a file taken into training or failed
        watch_until = time.time() + 2.0 * time_scale()
        while time.time() < watch_until:
            counts = d.queue.counts()
            held = counts["failed"] == 0 and counts["done"] == 0 and counts["pending"] + counts["processing"] == 2
            assert held, counts
            assert d.status()["trainer_pid"] is None and d.proc.poll() is None
            time.sleep(0.1)
        kinds = [e["kind"] for e in d.history().events(100)]
        assert kinds.count("config_refused") == 1 and "trainer_crash" not in kinds, kinds
        out = d.ctl("status").stdout
        assert "cannot run on this machine" in out and "adamw_8bit" in out, out
        assert d.ctl("stop").returncode == 0 and d.wait_exit() == 0
    finally:
        d.close()
