"""bin/install_service.sh (#12): a systemd unit that runs the daemon in the foreground with its own
single-instance guard and restarts it on failure, but not on the exits a restart cannot mend."""

from __future__ import annotations

import configparser
import os
import shlex
import subprocess

from daemon.config import load_config
from daemon.lock import acquire
from bench.harness import REPO, write_instance

SCRIPT = REPO / "bin" / "install_service.sh"


def unit(text: str) -> configparser.ConfigParser:
    p = configparser.ConfigParser(strict=False, interpolation=None)
    p.optionxform = str  # systemd keys are case-sensitive
    p.read_string(text)
    return p


def test_the_unit_runs_the_guarded_daemon_and_restarts_only_what_a_restart_mends(tmp_path):
    config = write_instance(tmp_path / "inst")
    r = subprocess.run([str(SCRIPT), "--config", str(config), "--print"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    u = unit(r.stdout)
    svc = u["Service"]
    assert svc["Restart"] == "on-failure" and set(svc["RestartPreventExitStatus"].split()) == {"1", "2", "3"}
    assert svc["KillSignal"] == "SIGTERM" and int(svc["TimeoutStopSec"]) > load_config(config).service.stop_timeout_seconds
    assert svc["KillMode"] == "mixed"  # SIGTERM to the service alone: the trainer checkpoints when it is told
    argv = shlex.split(svc["ExecStart"])
    assert argv[1:] == ["-m", "daemon", "--config", str(config)] and os.access(argv[0], os.X_OK)
    # the guard: with the instance's lock held (a daemon already running), the unit's command exits 3 at once
    cfg = load_config(config)
    cfg.path("status").mkdir(parents=True, exist_ok=True)
    fd = acquire(cfg.path("status") / "daemon.lock")
    try:
        run = subprocess.run(argv, cwd=svc["WorkingDirectory"], capture_output=True, text=True, timeout=60)
        assert run.returncode == 3 and "already running" in run.stderr
    finally:
        os.close(fd)


def test_a_user_install_writes_the_units(tmp_path):
    config = write_instance(tmp_path / "inst")
    home = tmp_path / "home"
    r = subprocess.run([str(SCRIPT), "--config", str(config), "--user", "--with-monitor", "--port", "8123"],
                       capture_output=True, text=True, timeout=120, env=dict(os.environ, HOME=str(home)))
    assert r.returncode == 0, r.stderr
    folder = home / ".config" / "systemd" / "user"
    assert unit((folder / "traind.service").read_text())["Install"]["WantedBy"] == "default.target"
    assert "--port 8123" in unit((folder / "traind-monitor.service").read_text())["Service"]["ExecStart"]
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    assert subprocess.run([str(SCRIPT), "--config", str(bad), "--print"], capture_output=True, timeout=60).returncode == 1
