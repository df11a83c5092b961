"""A fixed eval set (eval.file): scored before and after every file, kept with the job, served for the chart (#11)."""

from __future__ import annotations


import pytest

from daemon.adapters import read_current
from monitor.history import read_history
from monitor.history_index import HistoryIndex
from bench.harness import EXAMPLES, lines_of, write_instance
from bench.harness import Daemon

pytestmark = pytest.mark.e2e


def test_each_file_is_scored_on_the_eval_set_before_and_after(tmp_path, models_dir):
    d = Daemon(write_instance(tmp_path / "inst", models_dir, training={"epochs_per_file": 2},
                              eval={"file": str(EXAMPLES / "chat.jsonl"), "max_examples": 12}))
    try:
        d.start()
        d.drop("a.jsonl", lines_of("chat.jsonl", 16))
        d.wait_counts(done=1)
        d.drop("b.jsonl", lines_of("text.jsonl", 16))
        d.wait_counts(done=2)
        d.wait_for(lambda s: s["status"] == "idle", what="idle")
        jobs = {j["original_name"]: j for j in d.history().jobs()}
        a, b = jobs["a.jsonl"], jobs["b.jsonl"]
        print(f"eval set: a {a['eval_set_before']:.4f} -> {a['eval_set_after']:.4f}, "
              f"b {b['eval_set_before']:.4f} -> {b['eval_set_after']:.4f}")
        assert a["eval_set_after"] < a["eval_set_before"]  # a trained on the eval set's own kind of data
        assert b["eval_set_before"] == a["eval_set_after"]  # the same adapter, scored once
        assert b["end_global_step"] > a["end_global_step"] > 0
        manifest = read_current(d.cfg.path("adapters")).manifest
        assert manifest.eval_set["examples"] == 12 and manifest.eval_set["after"] == b["eval_set_after"]
        h = read_history(d.cfg.path("status") / "history.db", HistoryIndex(), -1, None, 2000)
        assert [(p.original_name, p.after) for p in h.eval_set] == [("a.jsonl", a["eval_set_after"]), ("b.jsonl", b["eval_set_after"])]
        r = d.ctl("queue", "status", "b.jsonl")
        assert "eval_set_after" in r.stdout
    finally:
        d.close()


@pytest.mark.slow  # the default run keeps under 15 min; `pytest -m slow` runs it
def test_an_unusable_eval_file_is_reported_and_training_goes_on(tmp_path, models_dir):
    bad = tmp_path / "eval.jsonl"
    bad.write_text("not json at all\n")
    d = Daemon(write_instance(tmp_path / "inst", models_dir, training={"epochs_per_file": 1}, eval={"file": str(bad)}))
    try:
        d.start()
        st = d.wait_for(lambda s: s.get("last_error"), what="the eval file's error")
        assert "eval.file" in st["last_error"] and str(bad) in st["last_error"]
        d.drop("a.jsonl", lines_of("text.jsonl", 12))
        d.wait_counts(done=1)
        job = d.history().jobs()[0]
        assert job["eval_set_after"] is None and job["steps"] > 0
    finally:
        d.close()
