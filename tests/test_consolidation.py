"""Consolidation (#11): an nf4-trained adapter is merged into a new base that matches base + adapter,
training goes on from it with a fresh adapter, and a kill -9 at any point leaves one whole generation in use.

A real daemon on the embedded model (nf4, the QLoRA path), `trainctl consolidate` as a user runs it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from daemon import control
from daemon.adapters import read_current
from daemon.states import ControlAction, DesiredState
from daemon.train.consolidate import LINEAGE, MERGE_TOLERANCE
from bench.harness import lines_of, write_instance
from bench.harness import Daemon

pytestmark = pytest.mark.e2e

SETTINGS = {"training": {"epochs_per_file": 1}, "model": {"quantization": "nf4"}, "adapters": {"keep_last": 1}}


def text(n: int) -> str:
    return lines_of("text.jsonl", n)


def make(tmp_path: Path, models_dir: Path, name: str = "inst", env: dict | None = None) -> Daemon:
    return Daemon(write_instance(tmp_path / name, models_dir, **SETTINGS), env=env)


def train(d: Daemon, name: str, content: str, version: int) -> None:
    d.drop(name, content)
    d.wait_for(lambda s: s.get("adapter_version") == version and s["status"] == "idle", timeout=180, what=f"v{version}")


def consolidated(d: Daemon) -> list[Path]:
    root = d.cfg.path("consolidated")
    return sorted(p for p in root.iterdir() if not p.name.startswith(".")) if root.is_dir() else []


def logits(model_dir: Path, adapter: Path | None = None):  # noqa: ANN201
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    ids = tok(["a probe the test chose", "and another, longer one to check"], return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**ids).logits


def test_consolidate_then_train_on_the_new_base(tmp_path, models_dir):
    from daemon.train.model import resolve_base

    d = make(tmp_path, models_dir)
    try:
        d.start()
        train(d, "one.jsonl", text(12), 1)
        assert d.ctl("consolidate", "--description", " ").returncode == 1  # a description is required
        r = d.ctl("consolidate", "--description", "the first file", timeout=600)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "generation 1" in r.stdout
        [new_base] = consolidated(d)
        lineage = json.loads((new_base / LINEAGE).read_text())
        base0 = resolve_base(d.cfg)
        assert lineage["generation"] == 1 and lineage["description"] == "the first file"
        assert lineage["parent_base"]["path"] == str(base0) and len(lineage["parent_base"]["sha256"]) == 64
        assert [f["original_name"] for f in lineage["files"]] == ["one.jsonl"] and lineage["files"][0]["steps"] > 0
        assert lineage["adapter"]["version"] == 1 and lineage["config"]["model"]["quantization"] == "nf4"
        assert {"torch", "transformers", "peft"} <= set(lineage["versions"])
        assert lineage["verification"]["max_abs_logit_diff"] <= MERGE_TOLERANCE
        # the merged folder is a plain Hugging Face model whose outputs are base + adapter's (fp32)
        merged, expected = logits(new_base), logits(base0, d.cfg.path("adapters") / "v0001")
        diff = float((merged - expected).abs().max())
        print(f"merged vs base + adapter, fp32: max |logit diff| {diff:.3e}")
        assert diff <= MERGE_TOLERANCE
        assert (new_base / "tokenizer_config.json").is_file()

        cur = read_current(d.cfg.path("adapters"))
        assert (cur.version, cur.manifest.generation, cur.manifest.consolidated_from) == (2, 1, 1)
        assert cur.manifest.base_path == str(new_base) and d.status()["base_model"] == str(new_base)

        # nothing learnt on generation 1 yet: another consolidation would only copy its base (#26)
        r = d.ctl("consolidate", "--description", "again", timeout=120)
        assert r.returncode == 1 and "no file has trained on generation 1's base yet" in r.stdout, r.stdout
        assert consolidated(d) == [new_base] and read_current(d.cfg.path("adapters")).version == 2

        # a rollback to generation 0 that reaches the daemon (left as a request file, as trainctl leaves one while
        # the daemon is down) while a file trains on generation 1: refused, and the file trains on (#26)
        d.drop("long.jsonl", lines_of("chat.jsonl") * 4)  # ~200 steps: time to pause it mid-file, and a checkpoint
        d.wait_for(lambda s: s["status"] == "training" and s["current_step"] >= 6, what="step 6 on the new base")
        control.set_desired_state(d.cfg, DesiredState.PAUSED)
        held = d.wait_for(lambda s: s["status"] == "paused" and s["current_file"] == "long.jsonl",
                          what="paused mid-file")["current_step"]
        job = d.queue.processing()[0].job_id
        control.request(d.cfg, ControlAction.ROLLBACK, by="test", version=1)
        d.wait_for(lambda s: _refused(d, "rollback"), what="the rollback refused")
        assert "a rollback stays within a generation" in _refused(d, "rollback")
        st = d.status()
        assert (st["current_file"], st["current_step"], st["status"]) == ("long.jsonl", held, "paused")
        assert list((d.cfg.path("checkpoints") / job).glob("step_*"))  # its checkpoints stay
        control.set_desired_state(d.cfg, DesiredState.RUNNING)
        d.wait_for(lambda s: s["current_file"] == "long.jsonl" and s["current_step"] > held + 2, what="on from its step")
        db = d.history()
        try:
            assert [e["kind"] for e in db.events(limit=200) if e["job_id"] == job].count("job_started") == 1
        finally:
            db.close()
        assert d.ctl("skip").returncode == 0  # the rest of it is not this test's business

        train(d, "two.jsonl", text(13), 3)  # on the new base, with the fresh adapter
        cur = read_current(d.cfg.path("adapters"))
        assert cur.manifest.base_path == str(new_base) and cur.manifest.generation == 1
        assert [(e["original_name"], e["generation"]) for e in cur.manifest.dataset] == [("one.jsonl", 0), ("two.jsonl", 1)]
        kept = [r["version"] for r in json.loads(d.ctl("adapters", "list", "--json").stdout)]
        assert kept == [1, 3]  # keep_last 1 keeps the current; v1 fed the consolidation and stays
        d.drop("one-again.jsonl", text(12))  # learnt by generation 0: still a duplicate
        d.wait_counts(done=3)
        assert d.queue.read_duplicate(d.queue.find("one-again.jsonl").job_id)
        r = d.ctl("rollback", "1")  # generation 0's adapter does not fit generation 1's base
        assert r.returncode == 1 and "generation" in r.stdout, r.stdout

        # a restart loads the new base and the adapter trained on it
        assert d.stop() == 0
        d.start()
        st = d.wait_for(lambda s: s["status"] == "idle" and s.get("trainer_pid"), what="ready again")
        assert st["base_model"] == str(new_base) and st["adapter_version"] == 3
        [done] = [e["message"] for e in d.history().events(limit=200) if e["kind"] == "consolidated"]
        print(f"consolidation: {done}")
    finally:
        d.close()


@pytest.mark.slow  # the default run keeps under 15 min; the parts are tested in-process in tests/test_lineage_control.py
def test_approve_of_another_rank_after_a_consolidation_trains_on_the_consolidated_base(tmp_path, models_dir):
    d = make(tmp_path, models_dir)
    d2 = Daemon(write_instance(tmp_path / "inst", models_dir, **SETTINGS))
    try:
        d.start()
        train(d, "one.jsonl", text(12), 1)
        r = d.ctl("consolidate", "--description", "the first file", timeout=600)
        assert r.returncode == 0, r.stdout + r.stderr
        [new_base] = consolidated(d)
        train(d, "two.jsonl", text(13), 3)
        assert d.stop() == 0

        d2 = Daemon(write_instance(tmp_path / "inst", models_dir, **{**SETTINGS, "lora": {"r": 8}}))
        r = d2.ctl("config", "approve")
        assert r.returncode == 0, r.stdout
        print(r.stdout)
        assert f"training continues on generation 1's base {new_base} with a fresh adapter" in r.stdout
        d2.start()
        st = d2.wait_for(lambda s: s["status"] == "idle" and s.get("trainer_pid"), what="ready on the carried base")
        assert st["base_model"] == str(new_base)
        train(d2, "three.jsonl", text(14), 1)
        cur = read_current(d2.cfg.path("adapters"))
        assert (cur.version, cur.manifest.generation, cur.manifest.base_path) == (1, 1, str(new_base))
        # one.jsonl is in the base's weights and stays learnt; two.jsonl went with the archived adapter
        assert [(e["original_name"], e["generation"]) for e in cur.manifest.dataset] == [("one.jsonl", 0), ("three.jsonl", 1)]
        d2.drop("one-again.jsonl", text(12))
        d2.wait_counts(done=4)
        assert d2.queue.read_duplicate(d2.queue.find("one-again.jsonl").job_id)
        three = d2.queue.find("three.jsonl").job_id
        db = d2.history()
        try:
            assert {r["job_id"] for r in db.steps()} == {three}  # the chart's series: the new adapter's steps alone
            assert [s["id"] for s in db.series_list()] == [0, 1] and db.steps(series=0)
        finally:
            db.close()
        history = json.loads((d2.cfg.path("status") / "locked_keys.json").read_text())["history"]
        assert [next(iter(k for k in h if k in ("consolidation", "changes"))) for h in history] == ["consolidation", "changes"]
    finally:
        d.close()
        d2.close()


@pytest.mark.parametrize("point", [pytest.param("lineage.json", marks=pytest.mark.slow),
                                   pytest.param("publish 20", marks=pytest.mark.slow),
                                   pytest.param("publish v0002", marks=pytest.mark.slow),
                                   pytest.param("current.json", marks=pytest.mark.slow)])
def test_kill9_during_consolidation_leaves_one_whole_generation(tmp_path, models_dir, point):
    # The trainer dies once, right after the named durable operation of the consolidation (the lineage in
    # the temp folder, the merged folder's publication, the fresh adapter's folder, the switch to it); the
    # service restarts it and sends the consolidation again. The marker file disarms the crash until the
    # first file is trained (its publication writes current.json too).
    marker = tmp_path / "crash-disarmed"
    marker.write_text("")
    d = make(tmp_path, models_dir, env={"TRAIND_TRAINER_CRASH_AFTER_OP": f"match:{point}", "TRAIND_CRASH_ONCE": str(marker)})
    try:
        d.start()
        train(d, "one.jsonl", text(12), 1)
        marker.unlink()  # armed: the next matching operation is the consolidation's
        r = d.ctl("consolidate", "--description", f"crash after {point}", timeout=600)
        assert marker.exists(), "the crash point was never reached"
        assert r.returncode == 0, r.stdout + r.stderr + d.log_tail()
        assert any(e["kind"] == "trainer_crash" for e in d.history().events())
        cur = read_current(d.cfg.path("adapters"))
        assert cur.manifest.generation == 1 and cur.manifest.consolidated_from == 1
        in_use = Path(cur.manifest.base_path)
        assert (in_use / LINEAGE).is_file() and (in_use / "model.safetensors").is_file()
        assert not list(d.cfg.path("consolidated").glob(".*.tmp"))  # swept
        folders = consolidated(d)  # one folder published before the crash may stay (never deleted), whole
        assert in_use in folders and len(folders) <= 2
        for folder in folders:
            assert json.loads((folder / LINEAGE).read_text())["generation"] == 1
        diff = float((logits(in_use) - logits(_base0(d), d.cfg.path("adapters") / "v0001")).abs().max())
        assert diff <= MERGE_TOLERANCE
    finally:
        d.close()


def _refused(d: Daemon, action: str) -> str | None:
    """The message of the daemon's refusal of a request (`control_refused` event), or None."""
    db = d.history()
    try:
        return next((e["message"] for e in db.events(limit=200)
                     if e["kind"] == "control_refused" and e["message"].startswith(action)), None)
    finally:
        db.close()


def _base0(d: Daemon) -> Path:
    from daemon.train.model import resolve_base

    return resolve_base(d.cfg)


def test_a_base_larger_than_memory_is_refused_with_the_numbers(tmp_path):
    import struct

    from daemon.train.consolidate import ConsolidationRefused, base_params, preflight

    # A safetensors header declaring 40 billion parameters (no weights behind it: only the header is read).
    header = json.dumps({"w": {"dtype": "BF16", "shape": [200_000, 200_000], "data_offsets": [0, 0]}}).encode()
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    assert base_params(tmp_path) == 40_000_000_000
    with pytest.raises(ConsolidationRefused) as e:
        preflight(tmp_path, tmp_path / "out", 2)
    assert "not enough memory" in str(e.value) and "40,000,000,000 parameters" in str(e.value) and "GiB" in str(e.value)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_the_merge_check_scales_with_the_logits():
    import torch

    from daemon.train.consolidate import merge_check

    # SmolLM2-135M's figures (issue 28): logits up to about 35, fp32 rounding of a right merge 9.2e-5
    expected = torch.linspace(-35.0, 35.0, 1000).reshape(2, 500)
    right = merge_check(expected, expected + 9.2e-5)
    assert right["max_abs_logit_diff"] <= right["tolerance"] and right["headroom"] >= 10, right
    wrong = merge_check(expected, expected * 1.02)  # an adapter applied with the wrong scale moves logits by percents
    assert wrong["max_abs_logit_diff"] > wrong["tolerance"], wrong
    small = merge_check(torch.full((1, 4), 0.5), torch.full((1, 4), 0.5 + 5e-6))  # scale floors at 1
    assert small["tolerance"] == pytest.approx(1e-4) and small["headroom"] == pytest.approx(20, rel=0.01)
