"""The dataset ledger: the adapter never learns the same bytes twice unless asked to (#11).

A real daemon on the embedded model: a second copy of a learnt file goes to done/ as a
duplicate naming the first, without a step; `trainctl queue add --force` trains it; two
copies queued together train once.
"""

from __future__ import annotations

import json

import pytest

from daemon.adapters import read_current
from bench.harness import lines_of, write_instance
from bench.harness import Daemon

pytestmark = pytest.mark.e2e

DATA = lines_of("text.jsonl", 24)
OTHER = lines_of("chat.jsonl", 16)


@pytest.fixture
def daemon(tmp_path, models_dir):
    d = Daemon(write_instance(tmp_path / "inst", models_dir, training={"epochs_per_file": 1}))
    yield d.start()
    d.close()


def versions(d: Daemon) -> int:
    cur = read_current(d.cfg.path("adapters"))
    return cur.version if cur else 0


def test_a_learnt_file_is_not_trained_again_unless_forced(daemon, tmp_path):
    d = daemon
    d.drop("first.jsonl", DATA)
    d.wait_counts(done=1)
    d.wait_for(lambda s: s["status"] == "idle", what="idle")
    steps_before = d.losses()
    ledger = read_current(d.cfg.path("adapters")).manifest.dataset
    assert [(e["original_name"], e["version"]) for e in ledger] == [("first.jsonl", 1)]

    d.drop("again.jsonl", DATA)  # the same bytes under another name
    d.wait_counts(done=2)
    d.wait_for(lambda s: s["status"] == "idle", what="idle")
    assert versions(d) == 1 and d.losses() == steps_before  # not a step trained
    dup = [e for e in d.queue.done() if e.original_name == "again.jsonl"][0]
    note = d.queue.read_duplicate(dup.job_id)
    assert note["duplicate_of"]["original_name"] == "first.jsonl" and "first.jsonl" in note["message"]
    assert dup.path.read_text() == DATA  # kept as it came
    listed = d.ctl("queue", "list")
    assert "duplicate of first.jsonl" in listed.stdout, listed.stdout
    body = json.loads(d.ctl("queue", "list", "--json").stdout)
    assert [x["duplicate_of"]["job_id"] for x in body["done"] if x["duplicate_of"]] == [ledger[0]["job_id"]]
    assert any(e["kind"] == "job_duplicate" for e in d.history().events())

    src = tmp_path / "forced.jsonl"
    src.write_text(DATA)
    r = d.ctl("queue", "add", str(src), "--force")
    assert r.returncode == 0 and "forced" in r.stdout, r.stdout + r.stderr
    d.wait_counts(done=3)
    d.wait_for(lambda s: s["status"] == "idle" and s.get("adapter_version") == 2, what="v2")
    assert len(d.losses()) > len(steps_before)  # trained
    assert not list(d.cfg.path("inbox").glob(".*.force"))  # the marker went with the file
    job = [j for j in d.history().jobs() if j["original_name"] == "forced.jsonl"][0]
    assert job["forced"] == 1 and job["duplicate_of"] is None
    assert not (d.cfg.path("logs") / "tensorboard").exists()  # TensorBoard files only when configured


@pytest.mark.slow  # the default run keeps under 15 min; `pytest -m slow` runs it
def test_two_copies_queued_together_train_once(daemon):
    d = daemon
    assert d.ctl("pause").returncode == 0
    d.drop("a.jsonl", OTHER)
    d.drop("b.jsonl", OTHER)
    d.wait_counts(pending=2)
    assert d.ctl("resume").returncode == 0
    d.wait_counts(done=2, pending=0)
    d.wait_for(lambda s: s["status"] == "idle", what="idle")
    assert versions(d) == 1
    dups = [e.original_name for e in d.queue.done() if d.queue.read_duplicate(e.job_id)]
    assert dups == ["b.jsonl"]
