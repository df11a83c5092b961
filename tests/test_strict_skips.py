"""tests/conftest.py::skip_or_fail: the tests that need something outside traind (Debian's chromium, a tmpfs
mount) skip with their reason when run by hand, and FAIL under the README's test command (bin/test.sh sets
TRAIND_STRICT=1), so a missing install step or a refused mount can never pass CI as a quiet skip."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

PROBE = '''from tests.conftest import skip_or_fail


def test_needs_something_missing():
    skip_or_fail("probe: chromium is not installed")
'''


def run(cmd: list[str], probe: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRAIND_STRICT"}  # as a new shell has it
    env["PYTHONPATH"] = str(REPO)  # the probe imports tests.conftest
    return subprocess.run([*cmd, "-p", "no:cacheprovider", "-q", "-rs", str(probe)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_a_missing_requirement_fails_under_bin_test_sh_and_skips_by_hand(tmp_path: Path) -> None:
    probe = tmp_path / "test_probe.py"
    probe.write_text(PROBE, encoding="utf-8")
    strict = run([str(REPO / "bin" / "test.sh"), "-n", "0"], probe)
    assert "1 failed" in strict.stdout and "probe: chromium is not installed" in strict.stdout, strict.stdout[-2000:]
    assert strict.returncode == 1
    by_hand = run([sys.executable, "-m", "pytest", "-n", "0"], probe)
    assert "1 skipped" in by_hand.stdout and "probe: chromium is not installed" in by_hand.stdout, by_hand.stdout[-2000:]
    assert by_hand.returncode == 0
