"""Generations said plainly (issue 28, item 7): `adapters list` shows a generation's start for what it is, and the
names sample/eval print for a base are the generation and its consolidation."""

from __future__ import annotations

import json
from pathlib import Path

from daemon import adapters
from daemon.cli.dispatch import main as trainctl
from bench.harness import write_instance
from daemon.config import load_config


def _store(tmp_path: Path):  # noqa: ANN202
    cfg = load_config(write_instance(tmp_path / "inst"))
    base1 = tmp_path / "consolidated" / "20261206T193000Z"
    base1.mkdir(parents=True)
    (base1 / "lineage.json").write_text(json.dumps({"generation": 1, "created_at": "2026-12-06T19:30:00+00:00",
                                                    "description": "two weeks of chats"}))
    folder = cfg.path("adapters")
    write = lambda f: (f / "adapter_model.safetensors").write_bytes(b"\0" * 10)  # noqa: E731
    adapters.publish(folder, {"version": 1, "original_name": "one.jsonl", "job_id": "j1", "steps": 12,
                              "global_step": 12, "final_loss": 1.5, "generation": 0}, write)
    adapters.publish(folder, {"version": 2, "original_name": None, "job_id": None, "steps": 0, "global_step": 12,
                              "final_loss": None, "generation": 1, "base_path": str(base1), "consolidated_from": 1,
                              "description": "two weeks of chats", "lineage": str(base1 / "lineage.json")}, write)
    return cfg


def test_adapters_list_shows_where_a_generation_starts(tmp_path, capsys):
    cfg = _store(tmp_path)
    assert trainctl(["--config", str(cfg.root / "config.json"), "adapters", "list"]) == 0
    text = capsys.readouterr().out
    [start] = [line for line in text.splitlines() if "v2" in line]
    assert 'generation 1 starts: v1 merged into the base ("two weeks of chats")' in start, text
    assert " 0 " not in start.split("generation")[0], start  # not "0 steps": it trained nothing, it is a start
    assert trainctl(["--config", str(cfg.root / "config.json"), "adapters", "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["version"], r["generation"], r["consolidated_from"]) for r in rows] == [(1, 0, None), (2, 1, 1)]


def test_the_base_is_named_by_its_generation(tmp_path):
    from daemon.train.inspect import generation_label, pick_adapter

    cfg = _store(tmp_path)
    assert generation_label(cfg, pick_adapter(cfg, "1")) == "generation 0 (embedded:tiny-qwen3)"
    assert generation_label(cfg, pick_adapter(cfg, "current")) == \
        'generation 1, consolidated 2026-12-06T19:30:00+00:00 ("two weeks of chats")'
    assert generation_label(cfg, None) == generation_label(cfg, pick_adapter(cfg, "2"))  # --adapter none: the base in use


def test_trainctl_status_says_the_generation_and_the_chosen_settings():
    from daemon.cli.status_cmds import render_status

    note = "model.quantization auto: none on the CPU: the base takes 0.25 GiB in bfloat16 of 24 GiB"
    text = render_status({"status": "idle", "base_model": "/x/consolidated_models/20261206T193000Z", "generation": 2,
                          "device": "cpu", "quantization": "none", "adapter_version": 7, "settings_notes": [note],
                          "queue": {}}, None)
    assert "/x/consolidated_models/20261206T193000Z   generation 2   cpu / none   adapter v7" in text, text
    assert f"  setting  {note}" in text, text
