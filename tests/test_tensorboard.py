"""TensorBoard event files (#12): off unless configured; with it on, the trainer's curves are there."""

from __future__ import annotations

import pytest

from bench.harness import lines_of, write_instance
from bench.harness import Daemon

pytestmark = pytest.mark.e2e


def scalars(folder) -> dict[str, list[tuple[int, float]]]:  # noqa: ANN001
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.slow  # the default run keeps under 15 min; `pytest -m slow` runs it
def test_event_files_hold_loss_lr_eval_and_activity(tmp_path, models_dir):
    pytest.importorskip("tensorboard", reason="install the test extras (bin/setup.sh --test) for this check")
    d = Daemon(write_instance(tmp_path / "inst", models_dir, training={"epochs_per_file": 2},
                              tensorboard={"enabled": True}))
    try:
        d.start()
        d.drop("a.jsonl", lines_of("chat.jsonl", 24))
        d.wait_counts(done=1)
        d.wait_for(lambda s: s["status"] == "idle", what="idle")
        assert d.stop() == 0
        got = scalars(d.cfg.path("logs") / "tensorboard")
        steps = [g for g, _ in got["train/loss"]]
        assert steps == [g for g, _ in d.losses()] and [v for _, v in got["train/loss"]] == pytest.approx([v for _, v in d.losses()])
        assert {"train/lr", "train/tokens_per_sec", "train/grad_norm", "eval/loss"} <= set(got)
        assert any(t.startswith("activity/relative/layer_") for t in got)
    finally:
        d.close()

