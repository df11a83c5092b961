"""`trainctl activity` as people run it: `python -m daemon.cli --config PATH activity ...` against temporary instances.

No daemon and no model: history.db is written through the service's own
`HistoryDB.record_activity` / `upsert_job`, and a finished file is placed with
`JobQueue`. Expected numbers are computed here straight from the grids written.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from daemon import activity_summary
from daemon.config import Config, load_config
from daemon.jobqueue import JobQueue, QueueEntry
from daemon.states import FailReason, Priority
from daemon.history_db import HistoryDB
from bench.harness import REPO, write_instance

KINDS7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NO_DATA = ("trainctl activity: no activity sampled yet "
           "(the daemon samples every activity.every_steps steps and at the end of each file)\n")
SHADES = set("·░▒▓█")


@pytest.fixture
def cfg(tmp_path: Path) -> Config:
    return load_config(write_instance(tmp_path / "inst"))


def trainctl(cfg: Config, *args: str, columns: int = 200) -> subprocess.CompletedProcess:
    env = dict(os.environ, COLUMNS=str(columns))  # the width trainctl draws for (stdout is a pipe here)
    return subprocess.run([sys.executable, "-m", "daemon.cli", "--config", str(cfg.root / "config.json"), "activity", *args],
                          capture_output=True, text=True, cwd=REPO, timeout=60, env=env)


def history(cfg: Config) -> HistoryDB:
    return HistoryDB(cfg.path("status") / "history.db")


def sample_values(layers: list[int], kinds: list[str], seed: int, first: bool = False) -> dict[str, list[list]]:
    """A sample's measures as the trainer lays them out: values[measure][layer][kind]; the last
    kind has no LoRA in layer 0, and layer -1 (if any) holds only the last kind, as lm_head would."""
    rnd = random.Random(seed)

    def cell(i: int, j: int) -> bool:
        return (layers[i] < 0) == (j == len(kinds) - 1) if -1 in layers else not (i == 0 and j == len(kinds) - 1)

    def grid(lo: float, hi: float, none: bool = False) -> list[list]:
        return [[(None if none else rnd.uniform(lo, hi)) if cell(i, j) else None for j in range(len(kinds))]
                for i in range(len(layers))]

    base, update = grid(5.0, 50.0), grid(0.001, 0.5)
    rel = [[u / b if u is not None else None for u, b in zip(ru, rb)] for ru, rb in zip(update, base)]
    return {"update": update, "relative": rel, "change": grid(1e-4, 1e-2, none=first),
            "grad_a": grid(0.0, 1.0), "grad_b": grid(0.0, 1.0), "base": base}


def record_sample(cfg: Config, job_id: str, layers: list[int], kinds: list[str], seed: int, global_step: int,
                  first: bool = False) -> dict[str, list[list]]:
    values = sample_values(layers, kinds, seed, first)
    msg = {"layers": layers, "kinds": kinds, "values": values}
    db = history(cfg)
    db.record_activity(job_id, global_step, global_step, time.time() - 90, False, layers, kinds,
                       activity_summary.per_layer(msg), values)
    db.close()
    return values


def expected_top(layers: list[int], kinds: list[str], cells: list[list], k: int) -> list[dict]:
    flat = [(v, layers[i], kinds[j]) for i, row in enumerate(cells) for j, v in enumerate(row) if v is not None]
    return [{"layer": layer, "kind": kind, "value": v} for v, layer, kind in sorted(flat, reverse=True)[:k]]


def json_of(r: subprocess.CompletedProcess) -> dict:
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout)


def tops(body: dict) -> list[dict]:
    assert {m["measure"] for m in body["top"]} <= {body["measure"]}
    return [{k: m[k] for k in ("layer", "kind", "value")} for m in body["top"]]


def grid_rows(text: str, kinds: list[str]) -> dict[str, list[str]]:
    """Each kind's cell strings, one per block of columns."""
    rows: dict[str, list[str]] = {}
    label = max(len(s) for s in [*kinds, "layer", "total"]) + 2
    for line in text.splitlines():
        name = line[:label].strip()
        if name in kinds and line[:label] == name.ljust(label):
            rows.setdefault(name, []).append(line[label:])
    return rows


# ---------------------------------------------------------------- no data


def test_no_history_yet(cfg: Config) -> None:
    for args in ([], ["--json"], ["--measure", "update"]):
        r = trainctl(cfg, *args)
        assert (r.returncode, r.stdout, r.stderr) == (1, NO_DATA, "")


def test_history_without_samples_and_from_before_activity(cfg: Config) -> None:
    history(cfg).close()  # the daemon ran, but sampled nothing yet
    r = trainctl(cfg)
    assert (r.returncode, r.stdout) == (1, NO_DATA)
    db = history(cfg)
    db.conn.execute("DROP TABLE activity")  # a history.db written by a traind without activity
    db.conn.commit()
    db.close()
    r = trainctl(cfg)
    assert (r.returncode, r.stdout, r.stderr) == (1, NO_DATA, "")


# ---------------------------------------------------------------- the latest sample


def test_two_layer_sample(cfg: Config) -> None:
    layers, kinds = [-1, 0, 1], ["q_proj", "v_proj", "lm_head"]
    record_sample(cfg, "20261122T020301Z-000001--old.jsonl", layers, kinds, seed=1, global_step=10)
    values = record_sample(cfg, "20261122T020301Z-000002--tiny.jsonl", layers, kinds, seed=2, global_step=20)
    body = json_of(trainctl(cfg, "--json", "--top", "3"))
    assert (body["source"], body["job_id"], body["original_name"], body["measure"]) == (
        "sample", "20261122T020301Z-000002--tiny.jsonl", "tiny.jsonl", "relative")  # the newest sample
    assert body["sample"]["grid"] == values and body["sample"]["global_step"] == 20
    assert tops(body) == expected_top(layers, kinds, values["relative"], 3)
    for i in range(3):  # a layer's relative update is that of its modules together
        u = [v for v in values["update"][i] if v is not None]
        b = [v for v in values["base"][i] if v is not None]
        assert body["layer_totals"][i] == pytest.approx(math.sqrt(sum(x * x for x in u) / sum(x * x for x in b)))

    r = trainctl(cfg)
    assert r.returncode == 0, r.stderr
    assert "activity of tiny.jsonl" in r.stdout and re.search(r"step 20 \(global step 20\), 1m 3\ds ago", r.stdout)
    rows = grid_rows(r.stdout, kinds)
    assert list(rows) == kinds and all(len(blocks) == 1 for blocks in rows.values())
    gap = len(str(max(layers)))
    assert rows["lm_head"][0][:2 + gap].strip() == "" and rows["lm_head"][0][2 + gap] in SHADES  # only in "other"
    assert set(rows["q_proj"][0][:2]) <= SHADES and rows["q_proj"][0][2:].strip() == ""
    assert "\nlayer    0  other\n" in r.stdout  # the ruler: layer 0 over the first column, "other" over its own
    assert "top 5 modules by relative" in r.stdout


def test_eighty_layers_fit_or_wrap(cfg: Config) -> None:
    layers = list(range(80))
    values = record_sample(cfg, "20261122T020301Z-000001--big.jsonl", layers, KINDS7, seed=3, global_step=500)
    wide = trainctl(cfg, columns=200)
    assert wide.returncode == 0, wide.stderr
    rows = grid_rows(wide.stdout, KINDS7)
    assert list(rows) == KINDS7  # one row per module kind
    for kind, blocks in rows.items():
        assert len(blocks) == 1 and len(blocks[0]) == 80 and set(blocks[0]) <= SHADES | {" "}
    assert rows["down_proj"][0][0] == " " and set(rows["down_proj"][0][1:]) <= SHADES  # no LoRA there: blank
    ruler = next(line for line in wide.stdout.splitlines() if line.startswith("layer "))
    assert ruler.split()[1:] == [str(n) for n in range(0, 80, 5)]

    narrow = trainctl(cfg, columns=60)  # 11 columns of labels leave room for 40 layers a block
    rows = grid_rows(narrow.stdout, KINDS7)
    assert all([len(b) for b in blocks] == [40, 40] for blocks in rows.values())
    assert "".join(rows["q_proj"]) == rows_of(wide, "q_proj")

    for measure in ("update", "grad_b", "relative_change"):
        body = json_of(trainctl(cfg, "--json", "--measure", measure))
        cells = values[measure] if measure in values else [
            [c / b if c is not None else None for c, b in zip(rc, rb)] for rc, rb in zip(values["change"], values["base"])]
        assert body["measure"] == measure and tops(body) == expected_top(layers, KINDS7, cells, 5)


def rows_of(r: subprocess.CompletedProcess, kind: str) -> str:
    return "".join(grid_rows(r.stdout, KINDS7)[kind])


def test_first_sample_has_no_change(cfg: Config) -> None:
    record_sample(cfg, "20261122T020301Z-000001--a.jsonl", [0, 1], ["q_proj", "v_proj"], seed=4, global_step=1, first=True)
    body = json_of(trainctl(cfg, "--json", "--measure", "change"))
    assert body["top"] == [] and body["layer_totals"] == [None, None]
    r = trainctl(cfg, "--measure", "change")
    assert r.returncode == 0 and "no module has a value of it here" in r.stdout
    assert all(block.strip() == "" for blocks in grid_rows(r.stdout, ["q_proj", "v_proj"]).values() for block in blocks)


def test_measure_that_needs_a_job(cfg: Config) -> None:
    record_sample(cfg, "20261122T020301Z-000001--a.jsonl", [0, 1], ["q_proj", "v_proj"], seed=5, global_step=1)
    r = trainctl(cfg, "--measure", "moved")
    assert r.returncode == 1 and "give it with --job NAME" in r.stdout


# ---------------------------------------------------------------- one finished file


def moved_grid(layers: list[int], kinds: list[str], seed: int, with_base: bool) -> dict:
    values = sample_values(layers, kinds, seed)
    moved = {"moved": values["update"], "moved_relative": values["relative"]}
    return {"layers": layers, "kinds": kinds, "values": {**moved, **({"base": values["base"]} if with_base else {})}}


def place(cfg: Config, tmp_path: Path, name: str, state: str) -> QueueEntry:
    q = JobQueue(cfg.path("queue"))
    q.ensure()
    src = tmp_path / name
    src.write_text('{"text": "hello"}\n', encoding="utf-8")
    e = q.admit(src, Priority.NORMAL, time.time())
    if state == "pending":
        return e
    e = q.start(e)
    if state == "done":
        return q.finish(e.job_id)
    return q.fail(e.job_id, FailReason.TRAINING_ERROR, "CUDA out of memory", time.time())


def test_job_what_a_file_moved(cfg: Config, tmp_path: Path) -> None:
    layers = list(range(80))
    grid = moved_grid(layers, KINDS7, seed=6, with_base=True)
    e = place(cfg, tmp_path, "big.jsonl", "done")
    db = history(cfg)  # as the tracker records a finished file
    db.upsert_job(e.job_id, state="done", steps=120, adapter_version=4, finished_at=time.time() - 3600,
                  activity=activity_summary.file_moved(grid))
    db.close()
    body = json_of(trainctl(cfg, "--job", "big.jsonl", "--json", "--top", "7"))
    assert (body["source"], body["job_id"], body["measure"]) == ("file", e.job_id, "moved_relative")
    assert body["moved"]["values"] == grid["values"]
    assert tops(body) == expected_top(layers, KINDS7, grid["values"]["moved_relative"], 7)
    body = json_of(trainctl(cfg, "--job", e.job_id, "--json", "--measure", "moved"))
    assert tops(body) == expected_top(layers, KINDS7, grid["values"]["moved"], 5)
    assert body["layer_totals"] == pytest.approx([math.sqrt(sum(v * v for v in row if v is not None))
                                                  for row in grid["values"]["moved"]])

    r = trainctl(cfg, "--job", "big.jsonl", columns=100)
    assert r.returncode == 0 and "what big.jsonl moved" in r.stdout
    assert "120 steps, into adapter v4, finished 1h 00m ago" in r.stdout
    rows = grid_rows(r.stdout, KINDS7)
    assert list(rows) == KINDS7 and all([len(b) for b in blocks] == [80] for blocks in rows.values())
    assert "top 5 modules by moved_relative" in r.stdout


def test_job_record_as_the_trainer_writes_it_now(cfg: Config, tmp_path: Path) -> None:
    """The trainer's moved grid has no `base`: the modules still rank, the layer totals of moved_relative are left out."""
    grid = moved_grid([0, 1], ["q_proj", "v_proj"], seed=7, with_base=False)
    e = place(cfg, tmp_path, "tiny.jsonl", "done")
    db = history(cfg)
    db.upsert_job(e.job_id, state="done", activity=activity_summary.file_moved(grid))
    db.close()
    body = json_of(trainctl(cfg, "--job", "tiny.jsonl", "--json"))
    assert body["layer_totals"] is None and tops(body) == expected_top([0, 1], ["q_proj", "v_proj"],
                                                                       grid["values"]["moved_relative"], 5)
    r = trainctl(cfg, "--job", "tiny.jsonl")
    assert r.returncode == 0 and "no per-layer totals of moved_relative" in r.stdout
    assert [len(b) for b in grid_rows(r.stdout, ["q_proj", "v_proj"])["q_proj"]] == [2]


@pytest.mark.parametrize("state, why", [("pending", "has not been trained yet"), ("failed", "it failed"),
                                        ("done", "trained before traind measured activity")])
def test_job_without_a_record(cfg: Config, tmp_path: Path, state: str, why: str) -> None:
    e = place(cfg, tmp_path, "f.jsonl", state)
    history(cfg).close()
    r = trainctl(cfg, "--job", "f.jsonl")
    assert r.returncode == 1 and f"trainctl activity: {e.job_id} has no record of what it moved: " in r.stdout
    assert why in r.stdout


def test_a_duplicate_says_it_was_not_trained(cfg: Config, tmp_path: Path) -> None:
    from daemon.intake import finish_duplicate

    first = place(cfg, tmp_path, "first.jsonl", "done")
    again = place(cfg, tmp_path, "again.jsonl", "pending")
    db = history(cfg)
    finish_duplicate(again, {"sha256": "ab" * 32, "job_id": first.job_id, "original_name": "first.jsonl",
                             "version": 2, "generation": 0}, time.time(), JobQueue(cfg.path("queue")), db)
    db.close()
    r = trainctl(cfg, "--job", "again.jsonl")
    assert r.returncode == 1 and r.stdout == (f"trainctl activity: {again.job_id} has no record of what it moved: it was "
                                              f"not trained, its content repeats first.jsonl ({first.job_id}), already "
                                              "in adapter v2\n")


def test_job_errors(cfg: Config, tmp_path: Path) -> None:
    r = trainctl(cfg, "--job", "nope.jsonl")
    assert r.returncode == 1 and "no queued file named 'nope.jsonl'" in r.stdout
    place(cfg, tmp_path, "f.jsonl", "done")
    r = trainctl(cfg, "--job", "f.jsonl", "--measure", "grad_a")
    assert r.returncode == 1 and "with --job use moved_relative or moved" in r.stdout


def test_frozen_cells_and_intruders(cfg: Config) -> None:
    """lora.freeze_stalled's `frozen` cells drawn as ×, named per layer; activity.intruders' counts per layer."""
    layers, kinds = [0, 1, 2, 3], KINDS7
    values = sample_values(layers, kinds, seed=5)
    values["frozen"] = [[1.0] * 7, [1.0] * 7, [0.0] * 7, [0.0] * 7]
    values["intruders"] = [[0.0] * 7, [0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0], [2.0] + [0.0] * 6, [0.0] * 7]
    for i in range(4):  # cells with no LoRA have no flag either
        for j in range(7):
            if values["update"][i][j] is None:
                values["frozen"][i][j] = values["intruders"][i][j] = None
    db = history(cfg)
    msg = {"layers": layers, "kinds": kinds, "values": values}
    db.record_activity("20261122T020301Z-000003--f.jsonl", 40, 40, time.time() - 5, False, layers, kinds,
                       activity_summary.per_layer(msg), values)
    db.close()
    r = trainctl(cfg)
    assert r.returncode == 0, r.stderr
    rows = grid_rows(r.stdout, kinds)
    assert all(row[0][:2] in ("××", " ×") for row in rows.values()), rows  # layers 0 and 1: frozen (no LoRA: blank)
    assert all("×" not in row[0][2:] for row in rows.values()), rows
    assert "× frozen (lora.freeze_stalled): layers 0-1" in r.stdout
    assert "intruder dimensions: 3 (most in layer 2: 2, layer 1: 1)" in r.stdout
    body = json_of(trainctl(cfg, "--json"))
    assert body["frozen_per_layer"] == [6.0, 7.0, 0.0, 0.0]  # layer 0's last kind has no LoRA
    assert body["intruders_per_layer"] == [0.0, 1.0, 2.0, 0.0]
