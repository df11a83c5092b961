"""data.replay_fraction: earlier files' train lines mixed into a new file's optimizer steps (daemon.train.replay).

The earlier files sit in a `done/` folder as the queue keeps them (named by job id); the lineage's
dataset ledger (AdapterManifest.learnt) names them with their sha256. The embedded tiny model trains.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from fractions import Fraction
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from daemon.config import ConfigError, config_from_dict  # noqa: E402
from daemon.sample_ledger import check_ledger, count_lines  # noqa: E402
from daemon.train import checkpoint as ckpt  # noqa: E402
from daemon.train.data import train_lines, eval_examples  # noqa: E402
from daemon.train.loop import Job, job_seed, train_file  # noqa: E402
from daemon.train.model import load_for_training, lora_max_abs_diff, lora_state  # noqa: E402
from daemon.validate import DataFormat  # noqa: E402
from tests.test_loop import MAX_RESUME_DIFF, Crash, crash_after, make_cfg, one_thread, sha, small_file  # noqa: E402,F401

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def with_replay(cfg, fraction: float):  # noqa: ANN001, ANN201
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, replay_fraction=fraction))


def earlier_file(done: Path, job_id: str, name: str, first: int, n: int) -> tuple[Path, dict]:
    """An earlier file as the queue keeps it in done/, and its dataset-ledger entry."""
    lines = (EXAMPLES / name).read_text(encoding="utf-8").splitlines()[first:first + n]
    done.mkdir(parents=True, exist_ok=True)
    path = done / job_id
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path, {"sha256": sha(path), "job_id": job_id, "original_name": name, "version": 1, "generation": 0}


def train(cfg, job: Job, sources=None, control=lambda: "continue"):  # noqa: ANN001, ANN201
    lm = load_for_training(cfg, seed=cfg.training.seed)
    kwargs = {} if sources is None else {"replay_from": sources}
    out = train_file(lm, cfg, job, global_step=0, ckpt_folder=cfg.path("checkpoints") / job.job_id,
                     report=lambda m: None, control=control, **kwargs)
    return out, lm


def test_the_fraction_is_bounded_and_documented(tmp_path: Path) -> None:
    assert config_from_dict({"data": {"replay_fraction": 0.25}}, tmp_path).data.replay_fraction == 0.25
    assert config_from_dict({}, tmp_path).data.replay_fraction == 0.0  # off by default
    for bad in (0.95, -0.1, 1.0):
        with pytest.raises(ConfigError, match=r"data\.replay_fraction"):
            config_from_dict({"data": {"replay_fraction": bad}}, tmp_path)


def test_fraction_zero_trains_exactly_as_before(models_dir: Path, tmp_path: Path) -> None:
    from daemon.train.replay import sources_from

    cfg = make_cfg(models_dir, tmp_path, epochs_per_file=1)
    _, entry = earlier_file(tmp_path / "done", "20260101T000000Z-000001--a.jsonl", "chat.jsonl", 0, 40)
    path = small_file(tmp_path)
    job = Job.for_file("b", path, "alpaca", sha(path))
    plain, plain_lm = train(cfg, job)  # main's call: no replay at all
    off, off_lm = train(cfg, job, sources_from([entry], tmp_path / "done"))
    assert lora_max_abs_diff(lora_state(plain_lm.model), lora_state(off_lm.model)) == 0.0
    assert off.ledger == plain.ledger and "replay" not in off.ledger


def test_replayed_examples_are_earlier_train_lines_in_their_share_and_repeat(models_dir: Path, tmp_path: Path) -> None:
    from daemon.train.replay import sources_from

    f = 0.25
    cfg = with_replay(make_cfg(models_dir, tmp_path), f)
    done = tmp_path / "done"
    a_path, a = earlier_file(done, "20260101T000000Z-000001--a.jsonl", "text.jsonl", 0, 30)
    path = small_file(tmp_path)
    job = Job.for_file("b", path, "alpaca", sha(path))
    # The current file's own content in the ledger too (a forced second copy): never replayed into itself.
    b_copy, b_entry = earlier_file(done, "20260101T000000Z-000002--b.jsonl", "alpaca.jsonl", 0, 40)
    assert b_entry["sha256"] == job.sha256
    sources = sources_from([a, b_entry], done)
    out, lm = train(cfg, job, sources)
    assert out.status == "done"

    tok = lm.tokenizer
    a_seed = job_seed(cfg.training.seed, a["sha256"])  # the earlier file's own held-out split
    a_train = set(train_lines(a_path, DataFormat.TEXT, tok, cfg.data, a_seed))
    a_held = {ex.line for ex in eval_examples(a_path, DataFormat.TEXT, tok, cfg.data, a_seed)}
    assert a_held  # the check below means something: the earlier file has held-out lines
    replay = out.ledger["replay"]
    assert [s["job_id"] for s in replay["sources"]] == [a["job_id"]]  # the current file's content left out
    replayed = {x for s in replay["sources"] for lo, hi in s["lines"] for x in range(lo, hi + 1)}
    assert replayed and replayed <= a_train and not replayed & a_held
    # The share: after the file's own N samples, floor(N f / (1 - f)) replayed ones (f of all the steps' examples).
    own = out.ledger["samples"]
    ratio = Fraction(f) / (1 - Fraction(f))
    assert replay["samples"] == math.floor(own * ratio) == sum(s["samples"] for s in replay["sources"])
    assert replay["samples"] / (own + replay["samples"]) == pytest.approx(f, abs=0.02)
    assert count_lines(replay["sources"][0]["lines"]) == min(len(a_train), replay["samples"])
    # The file's own lines: still each train line once per epoch, the same number of steps as without replay.
    expected = train_lines(path, DataFormat.ALPACA, tok, cfg.data, job_seed(cfg.training.seed, job.sha256))
    assert check_ledger(out.ledger, expected, cfg.training.epochs_per_file, out.steps) == []
    # Deterministic: a second run trains the same examples in the same steps, to the same weights.
    again, lm2 = train(cfg, job, sources_from([a, b_entry], done))
    assert again.ledger == out.ledger
    assert lora_max_abs_diff(lora_state(lm.model), lora_state(lm2.model)) == 0.0
    # and replay changed the training (the same file without replay ends elsewhere)
    plain, lm3 = train(with_replay(cfg, 0.0), job, sources_from([a], done))
    assert lora_max_abs_diff(lora_state(lm.model), lora_state(lm3.model)) > 0


def test_lines_that_make_no_example_are_passed_over_and_the_share_holds(models_dir: Path, tmp_path: Path) -> None:
    """An earlier file whose every other prompt is longer than data.max_length: those lines are dropped when it
    trains (nothing left to learn), so replay passes over them when it draws them, and still replays its share."""
    import json as _json

    from daemon.train.replay import sources_from

    f = 0.5
    cfg = with_replay(make_cfg(models_dir, tmp_path, epochs_per_file=1), f)
    done = tmp_path / "done"
    done.mkdir()
    earlier = done / "20260101T000000Z-000001--long.jsonl"
    rows = [{"prompt": ("word " * 200 if i % 2 else "Say hi.") + f" ({i})", "completion": f"hi {i}"} for i in range(16)]
    earlier.write_text("".join(_json.dumps(r) + "\n" for r in rows))
    entry = {"sha256": sha(earlier), "job_id": earlier.name, "original_name": "long.jsonl"}
    path = small_file(tmp_path, n=24)
    out, lm = train(cfg, Job.for_file("b", path, "alpaca", sha(path)), sources_from([entry], done))
    trainable = set(train_lines(earlier, DataFormat.PROMPT_COMPLETION, lm.tokenizer, cfg.data,
                                job_seed(cfg.training.seed, entry["sha256"])))
    assert trainable and all(line % 2 == 1 for line in trainable)  # line i + 1 holds row i: the short prompts
    replay = out.ledger["replay"]
    replayed = {x for lo, hi in replay["sources"][0]["lines"] for x in range(lo, hi + 1)}
    assert replayed <= trainable
    assert replay["samples"] == out.ledger["samples"] > len(trainable)  # f 0.5: one per own example, with repeats


def test_resume_with_replay_is_exact(models_dir: Path, tmp_path: Path) -> None:
    from daemon.train.replay import sources_from

    cfg = with_replay(make_cfg(models_dir, tmp_path, dropout=0.1, grad_accum_steps=2, checkpoint_every_steps=3), 0.4)
    done = tmp_path / "done"
    _, a = earlier_file(done, "20260101T000000Z-000001--a.jsonl", "chat.jsonl", 0, 20)
    _, c = earlier_file(done, "20260101T000000Z-000002--c.jsonl", "text.jsonl", 0, 20)
    path = small_file(tmp_path)
    job = Job.for_file("j", path, "alpaca", sha(path))
    full, full_lm = train(cfg, dataclasses.replace(job, job_id="straight"), sources_from([a, c], done))
    assert full.steps >= 8 and full.ledger["replay"]["samples"] > 0

    with pytest.raises(Crash):
        train(cfg, job, sources_from([a, c], done), control=crash_after(5))
    assert ckpt.latest_step(cfg.path("checkpoints") / "j") == 3
    resumed, lm = train(cfg, job, sources_from([a, c], done))
    assert resumed.ledger == full.ledger
    assert lora_max_abs_diff(lora_state(full_lm.model), lora_state(lm.model)) <= MAX_RESUME_DIFF


def test_an_earlier_file_gone_before_a_resume_is_left_out_and_the_file_finishes(models_dir: Path, tmp_path: Path,
                                                                                caplog) -> None:  # noqa: ANN001
    from daemon.train.replay import sources_from

    cfg = with_replay(make_cfg(models_dir, tmp_path, checkpoint_every_steps=3), 0.4)
    done = tmp_path / "done"
    _, a = earlier_file(done, "20260101T000000Z-000001--a.jsonl", "chat.jsonl", 0, 20)
    c_path, c = earlier_file(done, "20260101T000000Z-000002--c.jsonl", "text.jsonl", 0, 20)
    path = small_file(tmp_path)
    job = Job.for_file("j", path, "alpaca", sha(path))
    with pytest.raises(Crash):
        train(cfg, job, sources_from([a, c], done), control=crash_after(5))
    c_path.unlink()  # between the kill and the resume
    with caplog.at_level(logging.WARNING):
        out, _ = train(cfg, job, sources_from([a, c], done))
    assert out.status == "done"
    replay = out.ledger["replay"]
    assert [s["original_name"] for s in replay["sources"]] == ["chat.jsonl", "text.jsonl"]  # as the file began
    assert [x["job_id"] for x in replay["left_out"]] == [c["job_id"]] and "not in done/" in replay["left_out"][0]["reason"]
    assert "replays less" in caplog.text
    assert replay["samples"] > 0


def test_a_missing_or_changed_earlier_file_is_left_out_and_said(models_dir: Path, tmp_path: Path,
                                                                caplog) -> None:  # noqa: ANN001
    from daemon.train.replay import sources_from

    cfg = with_replay(make_cfg(models_dir, tmp_path, epochs_per_file=1), 0.25)
    done = tmp_path / "done"
    _, a = earlier_file(done, "20260101T000000Z-000001--a.jsonl", "chat.jsonl", 0, 20)
    gone, g = earlier_file(done, "20260101T000000Z-000002--gone.jsonl", "text.jsonl", 0, 20)
    gone.unlink()
    changed, c = earlier_file(done, "20260101T000000Z-000003--changed.jsonl", "text.jsonl", 20, 20)
    changed.write_text(changed.read_text() + '{"text": "one more line"}\n')
    path = small_file(tmp_path)
    with caplog.at_level(logging.WARNING):
        out, _ = train(cfg, Job.for_file("b", path, "alpaca", sha(path)), sources_from([a, g, c], done))
    assert out.status == "done"
    replay = out.ledger["replay"]
    assert [s["job_id"] for s in replay["sources"]] == [a["job_id"]] and replay["samples"] > 0
    left = {x["job_id"]: x["reason"] for x in replay["left_out"]}
    assert set(left) == {g["job_id"], c["job_id"]}
    assert "not in done/" in left[g["job_id"]] and "changed" in left[c["job_id"]]
    said = caplog.text
    assert "gone.jsonl" in said and "changed.jsonl" in said


def test_the_trainer_replays_what_the_lineage_learnt_from_done_and_the_manifest_says_so(models_dir: Path,
                                                                                        tmp_path: Path) -> None:
    """The worker's wiring: the current version's dataset ledger and queue/done/ (as the queue keeps them)."""
    from multiprocessing import Pipe

    from bench.harness import write_instance
    from daemon import adapters, protocol
    from daemon.config import load_config
    from daemon.jobqueue import JobQueue
    from daemon.states import JobState
    from daemon.train import worker
    from daemon.train.activity_probe import ActivityProbe
    from daemon.train.model import publish_adapter
    from daemon.train.session import Session

    cfg = load_config(write_instance(tmp_path / "i", models_dir, data={"replay_fraction": 0.25},
                                     training={"epochs_per_file": 1}))
    queue = JobQueue(cfg.path("queue"))
    queue.ensure()
    _, a = earlier_file(queue.folder(JobState.DONE), "20260101T000000Z-000001--a.jsonl", "text.jsonl", 0, 20)
    lm = load_for_training(cfg, seed=cfg.training.seed)
    m1 = {"version": 1, "parent_version": None, "generation": 0, "job_id": a["job_id"], "sha256": a["sha256"],
          "original_name": "a.jsonl", "trained_jobs": [a["job_id"]], "global_step": 3, "dataset": [a]}
    publish_adapter(cfg.path("adapters"), lm.model, m1)
    mine, theirs = Pipe()
    sess = Session(cfg, mine, lm, 1, adapters.AdapterManifest.from_dict(m1), ActivityProbe(lm.model))
    path = queue.folder(JobState.PROCESSING) / "20260101T000000Z-000002--b.jsonl"
    path.write_bytes(small_file(tmp_path, n=24).read_bytes())
    job = protocol.Job(path.name, str(path), "b.jsonl", sha(path), "alpaca", 24)
    worker.handle_train(sess, protocol.Train(job=job))
    said = []
    while theirs.poll(0):
        said.append(theirs.recv())
    assert [m for m in said if m["type"] == "done"], said
    replay = adapters.read_current(cfg.path("adapters")).manifest.ledger["replay"]
    assert replay["fraction"] == 0.25 and replay["samples"] > 0
    assert [(s["job_id"], s["original_name"]) for s in replay["sources"]] == [(a["job_id"], "text.jsonl")]


@pytest.mark.slow  # two real daemons (one of two ranks under torchrun) each train two files: about a minute
def test_two_ranks_replay_what_one_process_replays(models_dir: Path, tmp_path: Path) -> None:
    """Rank 0 makes the plan and every rank trains the same replayed examples: the adapter and the ledger are
    one process's (daemon/train/ranks.py shards each step's micro-batches, replayed ones included)."""
    from bench.harness import Daemon, lines_of
    from daemon import adapters
    from tests.test_distributed import adapter, assert_close, instance

    def two_files(path: Path) -> Daemon:
        d = Daemon(path).start()
        try:
            d.drop("a.jsonl", lines_of("text.jsonl", 60))
            d.wait_counts(done=1, timeout=300)
            d.drop("b.jsonl", lines_of("alpaca.jsonl", 60))
            d.wait_counts(done=2, timeout=300)
            assert d.stop() == 0
        finally:
            d.close()
        return d

    def replaying(folder: Path, **distributed: object) -> Path:
        path = instance(folder, models_dir, **distributed)
        raw = json.loads(path.read_text())
        raw.setdefault("data", {})["replay_fraction"] = 0.25
        path.write_text(json.dumps(raw))
        return path

    one = two_files(replaying(tmp_path / "one"))
    two = two_files(replaying(tmp_path / "two", nproc_per_node=2))
    ledgers = [adapters.read_current(d.cfg.path("adapters")).manifest.ledger for d in (one, two)]
    assert ledgers[0]["replay"]["samples"] > 0 and ledgers[0]["replay"]["sources"][0]["original_name"] == "a.jsonl"
    for ledger in ledgers:  # the job ids name the arrival time: each daemon its own
        for source in ledger["replay"]["sources"]:
            source.pop("job_id")
    assert ledgers[1] == ledgers[0]
    assert_close(adapter(two.cfg.root, 2), adapter(one.cfg.root, 2), "two ranks with replay")


@pytest.mark.slow  # a benchmark's run: `-m slow`
def test_the_replay_bench_runs(tmp_path: Path) -> None:
    import subprocess
    import sys

    repo = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, str(repo / "bench" / "replay.py"), "--fractions", "0", "0.25", "--lines", "40",
                           "--epochs", "1", "--out", str(tmp_path)], capture_output=True, text=True, cwd=repo, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [path] = tmp_path.glob("replay-*.json")
    rows = json.loads(path.read_text())["rows"]
    assert [r["fraction"] for r in rows] == [0, 0.25] and rows[0]["replayed"] == 0 < rows[1]["replayed"]


@pytest.mark.e2e
def test_the_job_record_says_what_a_file_replayed(tmp_path, models_dir):
    """The Done message carries the file's replay figures (without the line lists) into the job record."""
    import json as _json

    from bench.harness import Daemon, lines_of, write_instance

    d = Daemon(write_instance(tmp_path / "inst", models_dir, data={"replay_fraction": 0.25}))
    try:
        d.start()
        d.drop("a.jsonl", lines_of("text.jsonl", 40))
        d.wait_counts(done=1)
        d.drop("b.jsonl", lines_of("alpaca.jsonl", 40))
        d.wait_counts(done=2)
        jobs = {j["original_name"]: j for j in d.history().jobs()}
        first = _json.loads(jobs["a.jsonl"]["replay"])  # nothing learnt before it to replay
        assert first["samples"] == 0 and first["sources"] == []
        replay = _json.loads(jobs["b.jsonl"]["replay"])
        assert replay["fraction"] == 0.25 and replay["samples"] > 0
        assert [s["original_name"] for s in replay["sources"]] == ["a.jsonl"] and "lines" not in replay["sources"][0]
        assert '"samples"' in d.ctl("queue", "status", "b.jsonl").stdout
    finally:
        d.close()
