"""trainctl health and /api/health?deep=true (#12): one report with exit codes scripts can use."""

from __future__ import annotations

import json

import pytest

from daemon.health import run_checks
from bench.harness import lines_of, write_instance
from bench.harness import Daemon

pytestmark = pytest.mark.e2e


def levels(r) -> dict[str, str]:  # noqa: ANN001
    return {c["name"]: c["level"] for c in json.loads(r.stdout)["checks"]}


def test_health_while_training_stopped_killed_and_with_a_changed_key(tmp_path, models_dir):
    d = Daemon(write_instance(tmp_path / "inst", models_dir, training={"epochs_per_file": 8},
                              service={"min_free_bytes": 0}))
    try:
        d.start()
        d.drop("long.jsonl", lines_of("chat.jsonl", 60))
        d.wait_for(lambda s: s["status"] == "training" and s["current_step"] >= 7, what="a checkpoint")
        assert d.ctl("pause").returncode == 0
        d.wait_for(lambda s: s["status"] == "paused", what="paused")
        r = d.ctl("health", "--deep", "--json")
        assert r.returncode == 0, r.stdout + r.stderr
        checks = {c["name"]: c for c in json.loads(r.stdout)["checks"]}
        assert {c["level"] for c in checks.values()} == {"ok"}
        assert "loads" in checks["checkpoint"]["detail"] and "step_0000" in checks["checkpoint"]["detail"]
        text = d.ctl("health")
        assert text.returncode == 0 and "healthy" in text.stdout and "ok    daemon" in text.stdout

        # a note left without its file: a warning, not a failure
        (d.cfg.path("queue") / "failed" / "gone.jsonl.error.json").write_text("{}")
        r = d.ctl("health", "--json")
        assert r.returncode == 1 and levels(r)["queue"] == "warning"
        (d.cfg.path("queue") / "failed" / "gone.jsonl.error.json").unlink()

        d.kill9()  # a dead daemon with a file in processing/: a problem, and the file's fate is said
        r = d.ctl("health", "--json")
        assert r.returncode == 2 and levels(r)["daemon"] == "problem" and levels(r)["queue"] == "warning"

        # a locked key changed in the config: the daemon would refuse to start
        raw = json.loads(d.config_path.read_text())
        raw["lora"]["r"] = 16
        d.config_path.write_text(json.dumps(raw))
        r = d.ctl("health", "--json")
        assert r.returncode == 2 and levels(r)["config"] == "problem"
        assert "lora.r" in [c for c in json.loads(r.stdout)["checks"] if c["name"] == "config"][0]["detail"]
    finally:
        d.close()


def test_a_disk_below_the_threshold_is_a_problem(tmp_path, models_dir):
    from daemon.config import load_config

    cfg = load_config(write_instance(tmp_path / "inst", models_dir, service={"min_free_bytes": 2**60}))
    checks = {c.name: c for c in run_checks(cfg)}
    assert checks["disk"].level == "problem" and "MiB free" in checks["disk"].detail
    assert checks["daemon"].level == "problem"  # never started
