"""The `gpu` marker (tests/conftest.py): skipped with the reason where the GPUs are missing, a failure where a
GPU run was asked for, so a GPU box whose devices torch does not see cannot report its GPU tests as passed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from bench.harness import REPO

NEEDS_99 = '''
import pytest

@pytest.mark.gpu(count=99)
def test_on_99_gpus():
    pass
'''


def run_pytest(folder: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-o", "addopts=", "-rsf", *args,
                           str(folder)], cwd=folder, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO), **env})


def test_a_gpu_test_skips_by_default_and_fails_when_gpus_are_asked_for(tmp_path: Path) -> None:
    (tmp_path / "conftest.py").write_text("from tests.conftest import pytest_collection_modifyitems, pytest_runtest_setup  # noqa: F401\n")
    (tmp_path / "test_needs_gpus.py").write_text(NEEDS_99)
    reason = "needs 99 NVIDIA GPUs with CUDA; torch sees"
    default = run_pytest(tmp_path)
    assert default.returncode == 0 and "1 skipped" in default.stdout and reason in default.stdout, default.stdout
    for args, env in ((("-m", "gpu"), {}), ((), {"TRAIND_REQUIRE_GPU": "1"})):
        asked = run_pytest(tmp_path, *args, **env)
        assert asked.returncode == 1 and "1 error" in asked.stdout, asked.stdout  # failed in its setup
        assert reason in asked.stdout and "GPU tests were asked for" in asked.stdout


SEES_ITS_LIMIT = '''
def test_limit(request):
    assert request.config._env_timeout == 300 * 2.5, request.config._env_timeout
'''


def test_the_ini_timeout_is_scaled_with_the_load_in_one_process_and_on_workers(tmp_path: Path) -> None:
    """pytest-timeout's limit from the ini (pyproject's `timeout = 300`) grows with TRAIND_TEST_TIME_SCALE; it
    stayed 300 s before, since only a --timeout given on the command line was scaled."""
    (tmp_path / "conftest.py").write_text("from tests.conftest import pytest_configure  # noqa: F401\n")
    (tmp_path / "test_limit.py").write_text(SEES_ITS_LIMIT)
    for workers in ("0", "2"):
        r = run_pytest(tmp_path, "-o", "timeout=300", "-n", workers, TRAIND_TEST_TIME_SCALE="2.5")
        assert r.returncode == 0 and "1 passed" in r.stdout, r.stdout
