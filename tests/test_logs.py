"""Log retention (service.log_keep_days, log_max_bytes) and `trainctl logs` (#12)."""

from __future__ import annotations

import subprocess
import sys
import time

from daemon.config import load_config
from daemon.logs import prune_logs
from tests.conftest import REPO, write_instance


def test_old_and_oversized_logs_go_and_the_current_one_stays(tmp_path):
    day = lambda days_ago: time.strftime("%Y%m%d", time.gmtime(time.time() - days_ago * 86400))  # noqa: E731
    for ago, size in ((40, 10), (31, 10), (3, 500), (2, 500), (1, 500), (0, 500)):
        (tmp_path / f"daemon_{day(ago)}.log").write_text("x" * size)
    (tmp_path / f"trainer_{day(40)}.log").write_text("other kind")
    current = tmp_path / f"daemon_{day(0)}.log"
    gone = prune_logs(tmp_path, "daemon", keep_days=30, max_bytes=1200, current=current)
    assert sorted(p.name for p in gone) == sorted(f"daemon_{day(a)}.log" for a in (40, 31, 3, 2))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"daemon_{day(1)}.log", current.name, f"trainer_{day(40)}.log"])
    assert prune_logs(tmp_path, "daemon", keep_days=0, max_bytes=1, current=current) == [tmp_path / f"daemon_{day(1)}.log"]
    assert current.exists()  # the file in use, whatever its size


def test_trainctl_logs_shows_the_newest_lines(tmp_path):
    config = write_instance(tmp_path / "inst")
    cfg = load_config(config)
    cfg.path("logs").mkdir(parents=True)
    today = time.strftime("%Y%m%d", time.gmtime())
    (cfg.path("logs") / f"trainer_{today}.log").write_text("".join(f"line {i}\n" for i in range(100)))

    def trainctl(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "daemon.cli", "--config", str(config), *args], cwd=REPO,
                              capture_output=True, text=True, timeout=60)

    r = trainctl("logs", "--trainer", "-n", "3")
    assert r.returncode == 0 and r.stdout.splitlines() == ["line 97", "line 98", "line 99"]
    r = trainctl("logs")
    assert r.returncode == 1 and "no daemon log" in r.stdout


def test_trainctl_logs_follow_prints_what_is_appended(tmp_path):
    import signal

    config = write_instance(tmp_path / "inst")
    cfg = load_config(config)
    cfg.path("logs").mkdir(parents=True)
    log = cfg.path("logs") / f"daemon_{time.strftime('%Y%m%d', time.gmtime())}.log"
    log.write_text("before\n")
    proc = subprocess.Popen([sys.executable, "-m", "daemon.cli", "--config", str(config), "logs", "-f", "-n", "1"],
                            cwd=REPO, stdout=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert proc.stdout.readline() == "before\n"
        with open(log, "a") as f:
            f.write("appended later\n")
        assert proc.stdout.readline() == "appended later\n"
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
