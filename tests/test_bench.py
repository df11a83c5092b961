"""The benchmark suite runs: bench/perf.py on a tiny budget (figures are never asserted, only that they exist)."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def perf(tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "perf.py"), "--quick", "--work", str(tmp_path / "work"),
                           "--out", str(out), *extra], capture_output=True, text=True, cwd=REPO, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [result] = [json.loads(p.read_text()) for p in out.glob("perf-*.json")]
    assert (out / f"perf-{result['stamp']}.md").read_text().startswith("# traind performance run")
    return result


@pytest.mark.slow  # a benchmark's run: `-m slow` (the default run keeps the suite under 15 minutes)
def test_the_suite_compares_traind_with_trainer_on_a_tiny_budget(tmp_path: Path) -> None:
    result = perf(tmp_path, "--sections", "compare,flops")
    [row] = result["compare"]
    traind, trainer = row["runners"]["traind"], row["runners"]["trainer"]
    assert traind["tokens_per_sec"] > 0 and trainer["tokens_per_sec"] > 0 and trainer["traind_over_this"] > 0
    assert 0 <= traind["padding_waste"] < trainer["padding_waste"] < 1  # grouped + packed against random padded batches
    assert abs(traind["heldout_loss"] - trainer["heldout_loss"]) < 0.5  # the same training, give or take the order
    [f] = result["flops"]
    assert 0 < f["efficiency"] < 1.5 and f["matmul_peak"] > 1e9
    # each traind run against the peak measured right after it; the figure is their median
    assert len(f["matmul_peaks"]) == len(f["efficiency_runs"]) == len(traind["runs"]) and min(f["matmul_peaks"]) > 1e9
    assert f["efficiency"] == statistics.median(f["efficiency_runs"])


@pytest.mark.slow
def test_the_daemon_section_runs(tmp_path: Path) -> None:
    d = perf(tmp_path, "--sections", "daemon")["daemon"]
    assert d["daemon_over_bare"] > 0 and d["warm_inbox_to_first_step"] > 0 and d["cold_inbox_to_first_step"] > 0
    assert d["api_daemon + 10 Hz"]["/api/status"]["p99"] > 0


@pytest.mark.slow  # a benchmark's run: `-m slow` (the default run keeps the suite under 15 minutes)
def test_padding_waste_by_policy(tmp_path: Path) -> None:
    out = tmp_path / "padding.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "padding.py"), "--data", "realistic", "--sizes", "64",
                           "--json", str(out)], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [row] = json.loads(out.read_text())["rows"]
    w = row["waste"]
    assert row["examples"] == 64 and set(w) == {"traind", "traind-whole", "traind-grouped", "traind-plain", "trainer",
                                                "trainer-glen"}
    assert all(0 <= v < 1 for v in w.values())
    # width pieces and packing never add a slot to grouping's, and grouping within the window beats Trainer's
    # random batches
    assert w["traind"] < w["traind-whole"] <= w["traind-grouped"] < w["trainer"]


@pytest.mark.slow  # a benchmark's run: `-m slow` (the default run keeps the suite under 15 minutes)
def test_pieces_bench_fits_the_cost_of_a_piece(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "pieces.py"), "--models", "5m", "--reps", "1",
                           "--work", str(tmp_path / "work"), "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [path] = tmp_path.glob("pieces-*.json")
    out = json.loads(path.read_text())
    points, fit = out["models"]["5m"]["points"], out["models"]["5m"]["fit"]
    assert len(points) == 10 and all(pt["seconds"] > 0 for pt in points)
    assert fit["per_token_s"] > 0 and fit["overhead_tokens"] == fit["overhead_s"] / fit["per_token_s"]
    assert out["in_use"]["overhead_tokens"] > 0


@pytest.mark.slow  # a benchmark's run: `-m slow` (the default run keeps the suite under 15 minutes)
def test_norms_bench_times_both_norms_and_the_step(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "norms.py"), "--models", "5m", "--reps", "1",
                           "--rounds", "1", "--examples", "16", "--work", str(tmp_path / "work"), "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [path] = tmp_path.glob("norms-*.json")
    out = json.loads(path.read_text())
    assert len(out["layers"]) == 5 and all(r["own_ms"] > 0 and r["closed_form_ms"] > 0 for r in out["layers"])
    assert all(r["closed_form_kept_bytes"] <= r["own_kept_bytes"] for r in out["layers"])
    if out["dtype"] != "torch.float32":  # below fp32, transformers' norm keeps an fp32 copy of its input; the
        # closed form one number per row and the weight (in fp32 both keep about that: the gain is time only)
        assert all(r["own_kept_bytes"] >= 4 * 1024 * r["shape"][-1] > r["closed_form_kept_bytes"] for r in out["layers"])
    step = out["step"]["5m"]
    assert step["norms_switched"] == 25 and len(step["ratios"]) == 1 and step["micro_batches"] > 0
    assert step["loss_own"] == step["loss_closed_form"] > 0  # the same forward, to the bit


def test_attention_dtype_bench_runs(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "attention_dtype.py"), "--lengths", "16,48", "--rows", "2",
                           "--reps", "1", "--out", str(tmp_path)], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [path] = tmp_path.glob("attention-dtype-*.json")
    rows = json.loads(path.read_text())["results"]
    assert [(r["model"], r["length"]) for r in rows] == [("5m", 16), ("5m", 48), ("25m", 16), ("25m", 48)]
    assert all(r["bf16_ms"] > 0 and r["fp32_ms"] > 0 for r in rows)


@pytest.mark.slow  # compiling takes minutes
def test_compile_bench_runs(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "compile.py"), "--models", "5m", "--data", "fixed",
                           "--examples", "16", "--rounds", "1", "--work", str(tmp_path / "work"), "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=REPO, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [path] = tmp_path.glob("compile-*.json")
    [row] = json.loads(path.read_text())["results"]
    assert row["eager_tokens_per_sec"] > 0 and row["compiled_tokens_per_sec"] > 0 and row["compile_seconds"] > 0
    assert 0 < row["efficiency_eager"] < 1.5 and 0 < row["efficiency_compiled"] < 1.5


@pytest.mark.slow
def test_serve_load_bench_measures_training_with_and_without_requests(tmp_path: Path, models_dir: Path) -> None:
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "serve_load.py"), "--files", "2", "--lines", "24",
                           "--models", str(models_dir), "--out", str(out)], capture_output=True, text=True, cwd=REPO,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [result] = [json.loads(p.read_text()) for p in out.glob("serve-load-*.json")]
    quiet, loaded = result["files"]
    assert not quiet["under_load"] and loaded["under_load"] and loaded["failed"] == 0 and loaded["requests"] >= 1
    assert quiet["train_tokens_per_sec"] > 0 and loaded["train_tokens_per_sec"] > 0
    assert len(result["training_slowdown_by_pair"]) == 1
