"""The random kill -9 soak (bench/soak.py) on the real daemon: a short variant in the default run,
longer ones marked slow. The full figure (50 seeds x 20 kills) is `python -m bench.soak`; see
docs/RELIABILITY.md."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench import soak
from daemon.states import JobState

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parent.parent


def run(tmp_path: Path, models_dir: Path, seeds: list[int], kills: int) -> dict:
    summary = soak.run_soak(seeds, kills, tmp_path / "work", models_dir)
    problems = {r["seed"]: r["violations"] for r in summary["per_seed"] if r["violations"]}
    print(f"\nsoak: {summary['kills']} kills ({summary['kills_group']} group, {summary['kills_trainer']} trainer) over "
          f"{summary['seeds']} seed(s), {summary['violations']} violation(s), {summary['wall_seconds']} s; "
          f"interrupted writes {summary['interrupted_writes']}")
    assert summary["kills"] == kills * len(seeds)
    assert summary["violations"] == 0, json.dumps(problems, indent=1)
    return summary


@pytest.mark.slow  # soaks run behind -m slow (CI headroom); kill -9 and resume stay in the default run (test_resume_e2e)
def test_short_soak_survives_random_kills(tmp_path: Path, models_dir: Path) -> None:
    run(tmp_path, models_dir, seeds=[1], kills=3)


@pytest.mark.slow
def test_longer_soak_survives_random_kills(tmp_path: Path, models_dir: Path) -> None:
    run(tmp_path, models_dir, seeds=[101, 102, 103], kills=10)


def test_the_soak_checks_can_fail(tmp_path: Path, models_dir: Path) -> None:
    """check_seed on a finished instance whose state was then broken in the ways the soak looks for.
    The instance is its own reference (one daemon run, not two): what is checked against the plan of
    each file, the folders, the history and the debris is checked for real."""
    w = soak.make_workload(5)
    inst = tmp_path / "inst"
    d = soak.Daemon(soak.write_instance(inst, models_dir, **w.settings), env=soak.private_tmp(inst))
    try:
        for name, text in w.files.items():
            d.drop(name, text)
        d.start(new_session=True)
        soak.run_to_settled(d, w)
        assert d.stop() == 0
        cur = soak.adapters.read_current(d.cfg.path("adapters"))
        shutil.copy(cur.path / "adapter_model.safetensors", tmp_path / "ref.safetensors")
        ref = {"ledgers": soak.ledgers(d.cfg.path("adapters")), "adapter": str(tmp_path / "ref.safetensors")}
        assert soak.check_seed(d, w, ref, models_dir) == []

        manifest_path = cur.path / "manifest.json"
        manifest = json.loads(manifest_path.read_text())
        epoch = manifest["ledger"]["epochs"][0]
        epoch["samples"] += 1  # a sample consumed twice
        manifest_path.write_text(json.dumps(manifest))
        (d.cfg.path("status") / ".training_status.json.x1.tmp").write_text("{")
        done = d.queue.done()[0]
        shutil.copy(done.path, d.queue.folder(JobState.FAILED) / done.job_id)  # a file in two places
        tensors = soak.adapter_tensors(d.cfg.path("adapters"))
        from safetensors.torch import save_file
        save_file({k: v + 1e-3 for k, v in tensors.items()}, str(cur.path / "adapter_model.safetensors"))
        found = "\n".join(soak.check_seed(d, w, ref, models_dir))
        for what in ("consumed twice", "ledger differs from the uninterrupted run's",
                     "temp debris", "byte-identical in 2 places", "final adapter differs"):
            assert what in found, f"{what!r} not reported:\n{found}"
    finally:
        d.close()
        soak.drop_private_tmp(inst)


@pytest.mark.slow
def test_the_command_writes_its_figures(tmp_path: Path, models_dir: Path) -> None:
    """`python -m bench.soak` end to end on the smallest budget: one seed, one kill."""
    out = tmp_path / "soak.json"
    work = tmp_path / "work"
    shutil.copytree(models_dir, work / "models")
    proc = subprocess.run([sys.executable, "-m", "bench.soak", "--seeds", "1", "--first-seed", "2", "--kills-per-seed", "1",
                           "--work", str(work), "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["finished"] and result["kills"] == 1 and result["seeds"] == 1 and result["violations"] == 0
    assert result["versions"]["torch"] and result["wall_seconds"] > 0
