"""daemon.train.tinymodel: the embedded base is built once, whoever asks for it at the same time (#26 item 15)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from daemon.train import tinymodel
from bench.harness import REPO

# One process that asks for the embedded model: ready once imported, it waits for "go" on stdin (so that
# all of them ask at the same moment), then loads what it got and reports it. The warm-up is cut short:
# the lock and the marker are under test, not the pretraining (the build stays deterministic).
CHILD = r"""
import hashlib, json, logging, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from daemon.train import tinymodel
torch.set_num_threads(1)
tinymodel.PRETRAIN_STEPS = 1
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(process)d %(name)s: %(message)s")
print("ready", flush=True)
sys.stdin.readline()
dest = tinymodel.ensure_embedded(sys.argv[1])
tok = AutoTokenizer.from_pretrained(dest)
model = AutoModelForCausalLM.from_pretrained(dest)
with torch.no_grad():
    logits = model(tok("The quick brown fox", return_tensors="pt").input_ids).logits
files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(dest.iterdir()) if p.is_file()}
print(json.dumps({"dest": str(dest), "files": files, "logits": logits.double().sum().item()}), flush=True)
"""


def _ask_at_once(models: Path, n: int) -> list[tuple[int, dict | None, str]]:
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(models)], cwd=REPO, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(n)]
    try:
        for p in procs:
            assert p.stdout.readline() == "ready\n", p.stderr.read()
        for p in procs:  # the same moment for all of them, as the ranks of a new instance
            p.stdin.write("go\n")
            p.stdin.flush()
        results = []
        for p in procs:
            out, err = p.communicate(timeout=300)
            results.append((p.returncode, json.loads(out) if p.returncode == 0 else None, err))
        return results
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_processes_asking_at_once_get_one_identical_loadable_build(tmp_path: Path) -> None:
    models = tmp_path / "models"  # empty: a new instance
    results = _ask_at_once(models, 3)
    assert [rc for rc, _, _ in results] == [0, 0, 0], [err[-2000:] for _, _, err in results]
    builds = sum(err.count("building embedded base model") for _, _, err in results)
    assert builds == 1, [err[-1000:] for _, _, err in results]
    reports = [r for _, r, _ in results]
    assert all(r == reports[0] for r in reports)  # the same folder, the same bytes, the same outputs
    assert (models / tinymodel.NAME / tinymodel.MARKER).is_file()
    # no builder's temp folder or a replaced folder left behind
    assert sorted(p.name for p in models.iterdir()) == sorted([tinymodel.NAME, f".{tinymodel.NAME}.lock"])


def _copy_of_embedded(models_dir: Path, into: Path) -> Path:
    import shutil

    dest = into / tinymodel.NAME
    shutil.copytree(models_dir / tinymodel.NAME, dest)
    return dest


def test_a_half_built_folder_is_rebuilt_and_a_dead_builders_leftovers_go(models_dir: Path, tmp_path: Path,
                                                                        monkeypatch, caplog) -> None:
    """A folder with config.json but without its weights (a copy cut short, a build from before the marker
    that was never finished) is not taken for the model; a dead builder's temp folder is swept."""
    from transformers import AutoModelForCausalLM

    models = tmp_path / "models"
    dest = _copy_of_embedded(models_dir, models)
    (dest / "model.safetensors").unlink()
    (dest / tinymodel.MARKER).unlink(missing_ok=True)
    (models / f".{tinymodel.NAME}.dead1234").mkdir()  # what a builder killed mid-build leaves
    (models / f".{tinymodel.NAME}.dead1234" / "config.json").write_text("{}")
    monkeypatch.setattr(tinymodel, "PRETRAIN_STEPS", 1)  # the folder handling is under test, not the warm-up
    caplog.set_level("INFO", logger=tinymodel.__name__)
    assert tinymodel.ensure_embedded(models) == dest
    assert "building embedded base model" in caplog.text
    AutoModelForCausalLM.from_pretrained(dest)  # loadable
    assert sorted(p.name for p in models.iterdir()) == sorted([tinymodel.NAME, f".{tinymodel.NAME}.lock"])


def test_a_complete_folder_from_before_the_marker_is_kept(models_dir: Path, tmp_path: Path, caplog) -> None:
    """An instance upgraded with its embedded model already built keeps it (no rebuild, the same bytes)."""
    dest = _copy_of_embedded(models_dir, tmp_path / "models")
    (dest / tinymodel.MARKER).unlink(missing_ok=True)
    weights = (dest / "model.safetensors").read_bytes()
    caplog.set_level("INFO", logger=tinymodel.__name__)
    assert tinymodel.ensure_embedded(tmp_path / "models") == dest
    assert "building" not in caplog.text and (dest / "model.safetensors").read_bytes() == weights
    assert (dest / tinymodel.MARKER).is_file()
