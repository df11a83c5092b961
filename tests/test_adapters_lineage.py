"""Adapter versions as a user keeps them (#11): list, pin, retention, rollback, and folders PEFT loads.

A real daemon on the embedded model; `trainctl` as a user runs it.
"""

from __future__ import annotations

import json

import pytest

from daemon.adapters import read_current
from bench.harness import lines_of, write_instance
from bench.harness import Daemon

pytestmark = pytest.mark.e2e


def text(n: int) -> str:
    return lines_of("text.jsonl", n)  # a different line count, a different content: no duplicates


@pytest.fixture
def daemon(tmp_path, models_dir):
    d = Daemon(write_instance(tmp_path / "inst", models_dir, training={"epochs_per_file": 1},
                              adapters={"keep_last": 2}))
    yield d.start()
    d.close()


def train(d: Daemon, name: str, content: str, version: int) -> None:
    d.drop(name, content)
    d.wait_for(lambda s: s.get("adapter_version") == version and s["status"] == "idle", timeout=180, what=f"v{version}")


def listed(d: Daemon) -> list[dict]:
    r = d.ctl("adapters", "list", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout)


def weights(folder) -> dict:
    from safetensors.torch import load_file
    return load_file(str(folder / "adapter_model.safetensors"))


def test_pin_retention_and_rollback(daemon):
    d = daemon
    train(d, "one.jsonl", text(12), 1)
    assert_loads_with_peft(d)
    r = d.ctl("adapters", "pin", "1")
    assert r.returncode == 0 and "v1 pinned" in r.stdout, r.stdout + r.stderr
    assert d.ctl("adapters", "pin", "9").returncode == 1  # no such version
    v1 = weights(d.cfg.path("adapters") / "v0001")
    for k, name in enumerate(("two.jsonl", "three.jsonl", "four.jsonl")):
        train(d, name, text(13 + k), 2 + k)
    rows = listed(d)
    # keep_last 2 keeps v3 and v4; v1 is pinned; v2 went
    assert [(r["version"], r["pinned"], r["current"]) for r in rows] == [(1, True, False), (3, False, False), (4, False, True)]
    assert rows[0]["file"] == "one.jsonl" and rows[0]["steps"] > 0 and rows[0]["bytes"] > 0
    table = d.ctl("adapters", "list").stdout
    assert "one.jsonl" in table and "retention keeps the newest 2" in table

    r = d.ctl("rollback", "1")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "as v5" in r.stdout and "two.jsonl, three.jsonl, four.jsonl" in r.stdout
    cur = read_current(d.cfg.path("adapters"))
    assert cur.version == 5 and cur.manifest.rollback_of == 1
    assert [e["original_name"] for e in cur.manifest.dataset] == ["one.jsonl"]
    assert all((weights(cur.path)[k] == v).all() for k, v in v1.items())  # exactly v1's weights
    assert any(e["kind"] == "rollback" for e in d.history().events())
    assert d.ctl("rollback", "2").returncode == 1  # pruned: refused before asking the daemon

    # what the rollback undid is no longer learnt: the same bytes train again, on top of v1
    train(d, "two-again.jsonl", text(13), 6)
    cur = read_current(d.cfg.path("adapters"))
    assert [e["original_name"] for e in cur.manifest.dataset] == ["one.jsonl", "two-again.jsonl"]
    assert not d.queue.read_duplicate(d.queue.find("two-again.jsonl").job_id)


@pytest.mark.slow  # the default run keeps under 15 min; `pytest -m slow` runs it
def test_rollback_while_a_file_trains_starts_it_again_on_the_old_adapter(tmp_path, models_dir):
    d = Daemon(write_instance(tmp_path / "inst", models_dir, training={"epochs_per_file": 1}))
    try:
        d.start()
        train(d, "first.jsonl", text(12), 1)
        train(d, "second.jsonl", text(13), 2)
        d.drop("long.jsonl", lines_of("chat.jsonl", 100))
        d.wait_for(lambda s: s["status"] == "training" and s["current_step"] >= 3, what="step 3")
        assert d.ctl("pause").returncode == 0  # held mid-file, so the rollback surely finds it in training
        d.wait_for(lambda s: s["status"] == "paused", what="paused mid-file")
        r = d.ctl("rollback", "1")
        assert r.returncode == 0 and "as v3" in r.stdout, r.stdout + r.stderr
        assert [e.original_name for e in d.queue.processing()] == ["long.jsonl"]  # it stays, to train again
        assert d.ctl("resume").returncode == 0
        d.wait_for(lambda s: s.get("adapter_version") == 4 and s["status"] == "idle", timeout=240, what="long.jsonl on v3")
        v3, v4 = (json.loads((d.cfg.path("adapters") / f"v000{v}" / "manifest.json").read_text()) for v in (3, 4))
        assert v3["rollback_of"] == 1 and [e["original_name"] for e in v3["undone"]] == ["second.jsonl"]
        assert v4["original_name"] == "long.jsonl" and v4["parent_version"] == 3
        assert v4["global_step"] == v3["global_step"] + v4["steps"]  # trained from its start on v1's state
        job = d.queue.find("long.jsonl").job_id
        steps = [r["step"] for r in d.history().steps(job)]
        assert steps == list(range(1, v4["steps"] + 1))  # the interrupted run's steps went with it
        assert any("interrupted" in e["message"] for e in d.history().events() if e["kind"] == "rollback")
    finally:
        d.close()


@pytest.mark.slow  # the default run keeps under 15 min; `pytest -m slow` runs it
def test_sample_and_eval_beside_a_running_daemon(daemon, tmp_path, capsys):
    from daemon.cli.dispatch import main as trainctl
    from daemon.train.inspect import load_view, sample

    d = daemon
    data = text(24)
    train(d, "one.jsonl", data, 1)
    # two real `trainctl` processes while the daemon runs (each loads torch and the model: seconds)
    r = d.ctl("sample", "Tell me something", "--max-new-tokens", "8")
    # it names the base's generation, and says nothing else: no loading bars, warnings or hub attempts
    assert r.returncode == 0 and r.stdout.startswith("[adapter v1 on generation 0 (embedded:tiny-qwen3)]\n"), r.stdout
    assert r.stderr == "", r.stderr
    f = tmp_path / "probe.jsonl"
    f.write_text(data)
    r = d.ctl("eval", str(f), "--json")
    assert r.returncode == 0 and r.stderr == "", r.stdout + r.stderr
    figures = json.loads(r.stdout)
    base, tuned = figures["base"], figures["adapter"]
    print(f"eval on the trained file: base loss {base['loss']:.3f} acc {base['token_accuracy']:.3f}; "
          f"adapter loss {tuned['loss']:.3f} acc {tuned['token_accuracy']:.3f}")
    assert base["tokens"] == tuned["tokens"] > 0 and tuned["label"] == "adapter v1 on generation 0 (embedded:tiny-qwen3)"
    assert base["label"] == "base: generation 0 (embedded:tiny-qwen3)"
    assert tuned["loss"] < base["loss"]  # it learnt the file it trained on
    # the rest in this process (torch is loaded here already)
    assert d.ctl("sample", "x", "--adapter", "v9").returncode == 1  # refused before loading anything
    view = load_view(d.cfg, "none")
    assert view.label == "base: generation 0 (embedded:tiny-qwen3)" and isinstance(sample(view, "Tell me something", max_new_tokens=4), str)
    assert trainctl(["--config", str(d.config_path), "eval", str(f), "--max-examples", "4"]) == 0
    table = capsys.readouterr().out
    assert "adapter v1" in table and "changes the loss by" in table


def assert_loads_with_peft(d: Daemon) -> None:
    """adapters/v0001 is a standard PEFT folder: PeftModel.from_pretrained loads it onto the base, and it changes the output."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from daemon.train.model import resolve_base

    base = AutoModelForCausalLM.from_pretrained(resolve_base(d.cfg), dtype=torch.float32)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        plain = base(ids).logits
    model = PeftModel.from_pretrained(base, str(d.cfg.path("adapters") / "v0001"))
    loaded = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert len(loaded) == len(weights(d.cfg.path("adapters") / "v0001")) > 0
    with torch.no_grad():
        tuned = model(ids).logits
    assert not torch.allclose(plain, tuned)
