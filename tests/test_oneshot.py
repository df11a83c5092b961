"""`traind train FILE --output-dir DIR`: one run of the daemon's trainer without the daemon (#11)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bench.harness import REPO, lines_of, write_instance

pytestmark = pytest.mark.e2e


def traind(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "daemon", *args], cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.mark.slow  # the default run keeps under 15 min; `pytest -m slow` runs it
def test_one_file_in_a_peft_adapter_out(tmp_path, models_dir):
    config = write_instance(tmp_path / "inst", models_dir)
    data = tmp_path / "data.jsonl"
    data.write_text(lines_of("alpaca.jsonl", 24))
    out = tmp_path / "run"
    r = traind("train", str(data), "--output-dir", str(out), "--config", str(config), "--epochs", "2")
    assert r.returncode == 0, r.stderr
    assert "done:" in r.stderr and "step 1/" in r.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    assert manifest["steps"] == len(steps) > 0 and manifest["format"] == "alpaca"
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert not (out / "checkpoints").exists()
    again = traind("train", str(data), "--output-dir", str(out), "--config", str(config))
    assert again.returncode == 1 and "already holds a trained adapter" in again.stderr


def test_a_bad_file_is_named_with_its_line(tmp_path, models_dir):
    config = write_instance(tmp_path / "inst", models_dir, data={"bad_line_policy": "reject"})
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "fine"}\n{"text": \n')
    r = traind("train", str(data), "--output-dir", str(tmp_path / "run"), "--config", str(config))
    assert r.returncode == 1 and "bad.jsonl" in r.stderr and "line 2" in r.stderr, r.stderr
    assert not (tmp_path / "run").exists()
