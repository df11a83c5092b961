"""The crash-point sweep can fail: seeded protocol bugs (bench/mutants/*.patch, applied to a copy
of the tree by bench/mutants.py) make the sweep's points that reach them fail. Slow: each runs the
real daemon through crashes in a mutated copy. The soak's side is `python -m bench.mutants`;
results and what each catches: docs/RELIABILITY.md."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MUTANTS = sorted(p.stem for p in (REPO / "bench" / "mutants").glob("*.patch"))


@pytest.mark.parametrize("mutant", MUTANTS)
def test_every_mutant_still_applies_to_the_tree(mutant: str) -> None:
    """A refactor that moves the code a mutant changes must bring the mutant along: one that no longer
    applies is a proof (the sweep, the soak) silently gone. Fast, so in the default suite."""
    patch = (REPO / "bench" / "mutants" / f"{mutant}.patch").read_text()
    proc = subprocess.run(["patch", "-p1", "--dry-run", "-s", "--no-backup-if-mismatch"], input=patch, text=True,
                          cwd=REPO, capture_output=True)
    assert proc.returncode == 0, f"bench/mutants/{mutant}.patch no longer applies:\n{proc.stdout}{proc.stderr}"
    assert "MUTANT" in patch  # the product never holds a mutant: each says where it is


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.parametrize("mutant, marks, select", [
    ("done-before-publish", "slow", "publish and v0002"),  # done/ before the version is current
    ("pointer-before-folder", "not slow", "current.json"),  # current.json names a folder not yet there
    ("position-apart-from-weights", "slow", "trainer_crash_sweep and (9 or 10 or 11 or 12 or 13)"),  # after the 2nd latest.json, before its position.json
])
def test_the_sweep_catches_a_seeded_protocol_bug(tmp_path: Path, mutant: str, marks: str, select: str) -> None:
    out = tmp_path / "mutants.json"
    proc = subprocess.run([sys.executable, "-m", "bench.mutants", "--mutant", mutant, "--only", "sweep",
                           "--sweep-m", marks, "--sweep-k", select, "--work", str(tmp_path / "work"), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=3600)
    row = json.loads(out.read_text())["mutants"][mutant]["sweep"]
    print(f"\n{mutant}: {row}")
    assert row["caught"] and row["counts"].get("failed"), proc.stdout[-2000:]
    assert proc.returncode == 0
