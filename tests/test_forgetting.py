"""daemon.train.forgetting: probes and keep-sets scored after every file, the matrix's figures, and the gate.

The arithmetic (quota, backward transfer, the gate's verdict) is checked on rows
the test writes; the scoring against the training code's own evaluation on the
embedded model; the gate's actions with the real daemon.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bench.harness import Daemon, lines_of, write_instance
from daemon import adapters
from daemon.config import Config, DataConfig, ModelConfig, PathsConfig
from daemon.train import forgetting
from daemon.train.data import Example


def rows_of(*triples: tuple[float, int, int]) -> list[tuple[float, int, int]]:
    return list(triples)


def test_a_summary_is_the_token_mean_over_the_same_first_examples() -> None:
    rows = rows_of((2.0, 2, 1), (6.0, 3, 3), (100.0, 1, 0))
    assert forgetting.summary(rows) == {"loss": 108.0 / 6, "accuracy": 4 / 6}
    assert forgetting.summary(rows, 2) == {"loss": 8.0 / 5, "accuracy": 4 / 5}
    assert forgetting.summary([]) is None


def sset(sid: str, lengths: list[int]) -> forgetting.ScoreSet:
    return forgetting.ScoreSet(sid, "keep", sid, tuple(Example(i, [1] * n, [1] * n) for i, n in enumerate(lengths)))


def test_the_quota_is_every_example_within_the_budget_and_fewer_beyond_it() -> None:
    sets = [sset("a", [10] * 8), sset("b", [10] * 4)]
    # 120 tokens of sets and 20 of the file's own keep-set at 0.01 s a token: 1.4 s
    assert forgetting.per_set_quota(sets, 20, 0.01, 1.41) is None
    n = forgetting.per_set_quota(sets, 20, 0.01, 0.9)
    assert n == 3  # (20 + 30 + 30) * 0.01 = 0.8 <= 0.9; 4 each would be 1.0
    assert forgetting.per_set_quota(sets, 20, 0.01, 0.0) == 1  # never fewer than one example a set
    assert forgetting.per_set_quota(sets, 20, None, 0.5) is None  # no estimate yet: everything


def keep_entry(sid: str, now: tuple, learnt: tuple, limit: float = 0.25) -> dict:
    s = forgetting.ScoreSet(sid, "keep", sid, (), job_id=sid, learnt=(learnt,))
    return forgetting.keep_entry(s, [now], None, limit)


def test_backward_transfer_is_the_mean_change_since_learnt_over_earlier_files_only() -> None:
    sets = [keep_entry("a", (3.0, 2, 1), (2.0, 2, 2)),  # loss 1.5 from 1.0, accuracy 0.5 from 1.0
            keep_entry("b", (2.0, 2, 2), (2.0, 2, 1)),  # loss 1.0 as it was, accuracy 1.0 from 0.5
            {**keep_entry("c", (9.0, 1, 0), (9.0, 1, 0)), "job_id": "this"}]  # the file's own set: not earlier
    bwt = forgetting.backward_transfer(sets, "this")
    assert bwt == {"accuracy": 0.0, "loss": 0.25, "sets": 2}
    assert forgetting.worst(sets, "this")["id"] == "a"


def test_the_gate_names_each_set_over_its_limit_with_the_figures() -> None:
    over = keep_entry("a.jsonl", (3.0, 2, 1), (2.0, 2, 2), limit=0.25)  # +50%
    under = keep_entry("b.jsonl", (2.2, 2, 1), (2.0, 2, 2), limit=0.25)  # +10%
    verdict = forgetting.gate([over, under], "hold")
    assert verdict["tripped"] and verdict["over"] == ["a.jsonl"] and verdict["action"] == "hold"
    assert "a.jsonl" in verdict["message"] and "+50.0%" in verdict["message"] and "limit 25%" in verdict["message"]
    assert not forgetting.gate([under], "hold")["tripped"]


def test_consolidation_is_judged_on_probe_drift_since_the_generation_began() -> None:
    report = {"sets": [{"kind": "probe", "name": "general.jsonl", "drift": 0.4},
                       {"kind": "probe", "name": "style.jsonl", "drift": 0.05},
                       {"kind": "keep", "name": "a.jsonl", "drift": None}]}
    over = forgetting.probes_over_since_generation(report, 0.1)
    assert len(over) == 1 and "general.jsonl" in over[0] and "+40.0%" in over[0]
    assert forgetting.probes_over_since_generation(None, 0.1) == []


def test_the_scores_are_the_training_codes_own_loss_on_the_embedded_model(tmp_path: Path, models_dir: Path) -> None:
    from daemon.train.data import train_examples
    from daemon.train.model import load_for_training
    from daemon.train.step import evaluate, fast_paths
    from daemon.validate import validate_file

    cfg = Config(paths=PathsConfig(models=str(models_dir)), data=DataConfig(max_length=64, eval_fraction=0.0),
                 model=ModelConfig(quantization="none", device="cpu", compute_dtype="float32"))
    lm = load_for_training(cfg, seed=3)
    path = tmp_path / "p.jsonl"
    path.write_text(lines_of("chat.jsonl", 9), encoding="utf-8")
    report = validate_file(path, cfg.data, 0)
    examples = list(train_examples(path, report.format, lm.tokenizer, cfg.data, 0, 0))
    rows = forgetting.score_examples(lm, examples, 4)
    assert len(rows) == len(examples) and all(r[1] > 0 for r in rows)
    reference = evaluate(lm, examples, 4, fast_paths(lm), pack=False)
    assert forgetting.summary(rows)["loss"] == pytest.approx(reference, rel=1e-5)
    # one example alone scores as it does among others (padding never leaks into a row)
    alone = forgetting.score_examples(lm, examples[2:3], 1)[0]
    assert alone[0] == pytest.approx(rows[2][0], rel=1e-5) and alone[1:] == rows[2][1:]
    # accuracy counts right next-token predictions over the scored tokens
    with torch.no_grad():
        ids = torch.tensor([examples[0].input_ids])
        logits = lm.model(input_ids=ids).logits[0, :-1]
    labels = torch.tensor(examples[0].labels[1:])
    keep = labels != -100
    assert rows[0][2] == int((logits.argmax(-1)[keep] == labels[keep]).sum())


# ---------------------------------------------------------------- with the real daemon



def forgetting_instance(tmp_path: Path, models_dir: Path, env: dict[str, str] | None = None,
                        notify: dict | None = None, **fg: object) -> Daemon:
    tmp_path.mkdir(parents=True, exist_ok=True)
    probe = tmp_path / "probe.jsonl"
    probe.write_text("".join(lines_of("chat.jsonl").splitlines(keepends=True)[200:224]), encoding="utf-8")
    return Daemon(write_instance(tmp_path / "inst", models_dir,
                                 data={"eval_fraction": 0.2},
                                 training={"epochs_per_file": 3},
                                 forgetting={"probe_files": [str(probe)], "keep_examples": 4, **fg},
                                 **({"notify": notify} if notify else {})), env=env)


def chat_then_text(d: Daemon) -> None:
    """File a (chat) learnt, then file b (text) dropped: what the gate judges, b forgetting a."""
    d.drop("a.jsonl", lines_of("chat.jsonl", 40))
    d.wait_counts(done=1)
    d.drop("b.jsonl", lines_of("text.jsonl", 40))


def failed_reason(d: Daemon) -> str:
    (error,) = d.cfg.path("queue").glob("failed/*.error.json")
    return json.loads(error.read_text())["reason"]


def manifest(d: Daemon, version: int) -> adapters.AdapterManifest:
    return adapters.read_manifest(d.cfg.path("adapters") / adapters.version_dir_name(version))


@pytest.mark.e2e
def test_every_file_is_scored_on_the_probes_and_the_earlier_keep_sets(tmp_path: Path, models_dir: Path) -> None:
    d = forgetting_instance(tmp_path, models_dir, max_probe_increase=10.0, max_keep_increase=10.0)
    try:
        d.start()
        for k, (name, src) in enumerate((("a.jsonl", "chat.jsonl"), ("b.jsonl", "text.jsonl"),
                                          ("c.jsonl", "alpaca.jsonl")), 1):
            d.drop(name, lines_of(src, 40))
            d.wait_counts(done=k)
        reports = [manifest(d, v).forgetting for v in (1, 2, 3)]
        ids = [[s["id"] for s in r["sets"]] for r in reports]
        jobs = [r["job_id"] for r in reports]
        assert ids[0] == ["probe:probe.jsonl", f"keep:{jobs[0]}"]
        assert ids[2] == ["probe:probe.jsonl", f"keep:{jobs[0]}", f"keep:{jobs[1]}", f"keep:{jobs[2]}"]
        # a keep-set's reference is its score right after it was learnt: the diagonal, on the same examples
        learnt_a = next(s for s in reports[0]["sets"] if s["id"] == f"keep:{jobs[0]}")
        later_a = next(s for s in reports[2]["sets"] if s["id"] == f"keep:{jobs[0]}")
        assert later_a["reference"]["loss"] == pytest.approx(learnt_a["loss"]) and later_a["examples"] == 4
        assert later_a["change"] == pytest.approx((later_a["loss"] - learnt_a["loss"]) / learnt_a["loss"])
        # a probe's reference is the version before the file: the previous file's score
        p2 = next(s for s in reports[1]["sets"] if s["kind"] == "probe")
        p3 = next(s for s in reports[2]["sets"] if s["kind"] == "probe")
        assert p3["reference"]["loss"] == pytest.approx(p2["loss"])
        assert p3["baseline"] == next(s for s in reports[0]["sets"] if s["kind"] == "probe")["baseline"]
        bwt = reports[2]["backward_transfer"]
        earlier = [s for s in reports[2]["sets"] if s["kind"] == "keep" and s["job_id"] != jobs[2]]
        assert bwt["sets"] == 2 and bwt["loss"] == pytest.approx(
            sum(s["loss"] - s["reference"]["loss"] for s in earlier) / 2)
        assert not any(r["gate"]["tripped"] for r in reports) and reports[2]["sampled"] is False
        kept = json.loads(forgetting.keep_path(d.cfg, jobs[0]).read_text())
        assert len(kept["examples"]) == 4 and kept["version"] == 1
    finally:
        d.close()


@pytest.mark.e2e
def test_a_held_version_survives_a_kill_and_reject_fails_its_file(tmp_path: Path, models_dir: Path) -> None:
    # no probe limit to speak of; any rise of an earlier file's keep-set holds the version
    d = forgetting_instance(tmp_path, models_dir, action="hold", max_probe_increase=100.0, max_keep_increase=1e-9)
    try:
        d.start(new_session=True)
        chat_then_text(d)
        st = d.wait_for(lambda s: s.get("held"), what="the gate holding b's version")
        assert st["held"]["version"] == 2 and st["pause_reason"] == "forgetting" and st["status"] == "paused"
        assert "the keep-set of a.jsonl" in st["held"]["message"] and "accept 2" in st["held"]["message"]
        assert adapters.read_current(d.cfg.path("adapters")).version == 1
        listed = json.loads(d.ctl("adapters", "list", "--json").stdout)
        assert [(r["version"], r["held"], r["current"]) for r in listed] == [(1, False, True), (2, True, False)]
        steps_b = len(d.history().steps(st["held"]["job_id"]))
        d.ctl("rollback", "1")  # refused while a version is held: nothing changes
        assert adapters.read_current(d.cfg.path("adapters")).version == 1

        import os
        import signal

        os.killpg(d.proc.pid, signal.SIGKILL)  # the daemon and its trainer, as a power cut would
        d.proc.wait(10)
        d.start(new_session=True)
        old = st["pid"]
        st = d.wait_for(lambda s: s["pid"] != old and s.get("held") and s.get("trainer_pid"),
                        what="held again after the restart")
        assert st["held"]["version"] == 2 and len(d.history().steps(st["held"]["job_id"])) == steps_b  # not retrained
        r = d.ctl("adapters", "reject", "2")
        assert r.returncode == 0 and "dropped" in r.stdout, r.stdout + r.stderr
        d.wait_counts(done=1, failed=1)
        assert [failed_reason(d)] == ["forgetting"]
        assert adapters.read_current(d.cfg.path("adapters")).version == 1
        assert not (d.cfg.path("adapters") / "v0002").exists()
        st = d.wait_for(lambda s: s["status"] == "idle" and not s.get("held"), what="training resumed")
        assert st["pause_reason"] is None
        kinds = [e["kind"] for e in d.history().events(limit=100)]
        assert kinds.count("forgetting") == 1  # said once, not again by the restarted trainer
    finally:
        d.close()


@pytest.mark.e2e
def test_accept_makes_the_held_version_current(tmp_path: Path, models_dir: Path) -> None:
    d = forgetting_instance(tmp_path, models_dir, action="hold", max_probe_increase=100.0, max_keep_increase=1e-9)
    try:
        d.start()
        chat_then_text(d)
        d.wait_for(lambda s: s.get("held"), what="the gate holding b's version")
        r = d.ctl("adapters", "accept", "v2")
        assert r.returncode == 0 and "current" in r.stdout, r.stdout + r.stderr
        d.wait_counts(done=2)
        current = adapters.read_current(d.cfg.path("adapters"))
        assert current.version == 2 and not current.manifest.held and current.manifest.forgetting["gate"]["tripped"]
        d.wait_for(lambda s: s["status"] == "idle" and not s.get("held"), what="training resumed")
    finally:
        d.close()


@pytest.mark.e2e
def test_the_rollback_action_puts_the_adapter_back_fails_the_file_and_pauses(tmp_path: Path, models_dir: Path) -> None:
    from tests.test_notify import Receiver, wait_until

    rx = Receiver()
    d = forgetting_instance(tmp_path, models_dir, notify={"webhooks": [rx.url], "events": ["forgetting"]},
                            action="rollback", max_probe_increase=100.0, max_keep_increase=1e-9)
    try:
        d.start()
        chat_then_text(d)
        d.wait_counts(done=1, failed=1)
        st = d.wait_for(lambda s: s["status"] == "paused", what="paused by the gate")
        assert st["pause_reason"] == "forgetting" and failed_reason(d) == "forgetting"
        assert adapters.read_current(d.cfg.path("adapters")).version == 1
        assert [v.version for v in adapters.versions(d.cfg.path("adapters"))] == [1]
        wait_until(lambda: len(rx.got) == 1)  # the forgetting webhook, with what was forgotten
        body = rx.got[0][0]
        assert body["event"] == "forgetting" and "the keep-set of a.jsonl" in json.dumps(body), body
        assert d.ctl("resume").returncode == 0
        d.wait_for(lambda s: s["status"] == "idle" and s["pause_reason"] is None, what="resumed")
    finally:
        d.close()
        rx.close()


@pytest.mark.e2e
def test_a_skipped_held_file_drops_its_version_and_the_next_file_takes_the_number(tmp_path: Path,
                                                                                   models_dir: Path) -> None:
    d = forgetting_instance(tmp_path, models_dir, action="hold", max_probe_increase=100.0, max_keep_increase=1e-9)
    try:
        d.start()
        chat_then_text(d)
        d.wait_for(lambda s: s.get("held"), what="the gate holding b's version")
        assert d.ctl("skip").returncode == 0
        d.wait_counts(done=1, failed=1)
        assert failed_reason(d) == "skipped" and not (d.cfg.path("adapters") / "v0002").exists()
        d.wait_for(lambda s: s["status"] == "idle" and not s.get("held"), what="training goes on")
        d.drop("c.jsonl", lines_of("chat.jsonl", 80)[len(lines_of("chat.jsonl", 40)):])  # like a: nothing to hold
        d.wait_counts(done=2, failed=1)
        current = adapters.read_current(d.cfg.path("adapters"))
        assert current.version == 2 and current.manifest.original_name == "c.jsonl" and not current.manifest.held
    finally:
        d.close()


@pytest.mark.e2e
def test_a_trainer_killed_after_scoring_scores_the_same_again(tmp_path: Path, models_dir: Path) -> None:
    """The trainer dies right after it wrote b's keep-set (scored, not yet published): the restarted one trains
    b's last steps again from its checkpoint and publishes the same report as a run that never crashed."""
    def run(where: Path, env: dict[str, str] | None) -> dict:
        d = forgetting_instance(where, models_dir, env, max_probe_increase=100.0, max_keep_increase=100.0)
        try:
            d.start()
            chat_then_text(d)
            d.wait_counts(done=2)
            return manifest(d, 2).forgetting
        finally:
            d.close()

    calm = run(tmp_path / "calm", None)
    marker = tmp_path / "crashed-once"
    crashed = run(tmp_path / "crash", {"TRAIND_TRAINER_CRASH_AFTER_OP": "match:--b.jsonl.json",
                                       "TRAIND_CRASH_ONCE": str(marker)})
    assert marker.read_text().startswith("write ") and "--b.jsonl.json" in marker.read_text()  # it did die there
    assert [s["id"].split("--")[-1] for s in crashed["sets"]] == [s["id"].split("--")[-1] for s in calm["sets"]]
    for c, k in zip(crashed["sets"], calm["sets"]):
        assert c["examples"] == k["examples"] and c["tokens"] == k["tokens"]
        assert c["loss"] == pytest.approx(k["loss"], rel=1e-3) and c["accuracy"] == pytest.approx(k["accuracy"], abs=0.02)


@pytest.mark.e2e
def test_consolidation_is_refused_while_a_probe_is_over_its_limit_unless_forced_and_exports_after_it(tmp_path: Path,
                                                                                models_dir: Path) -> None:
    """The embedded model is too small to damage a probe on purpose, so the current version's report is given a
    probe 40% above its generation baseline by hand (the daemon stopped), as a damaging file would leave it."""
    d = forgetting_instance(tmp_path, models_dir, max_probe_increase=0.1)
    try:
        d.start()
        d.drop("a.jsonl", lines_of("chat.jsonl", 40))
        d.wait_counts(done=1)
        d.stop()
        path = d.cfg.path("adapters") / "v0001" / "manifest.json"
        raw = json.loads(path.read_text())
        probe = next(s for s in raw["forgetting"]["sets"] if s["kind"] == "probe")
        probe["drift"] = 0.4
        path.write_text(json.dumps(raw))
        d.start()
        d.wait_for(lambda s: s["status"] == "idle" and s.get("trainer_pid"), what="ready again")
        r = d.ctl("consolidate", "--description", "the chat file")
        assert r.returncode == 1 and "probe.jsonl (+40.0% since the generation began" in r.stdout, r.stdout
        assert "--force" in r.stdout and d.status()["generation"] == 0
        r = d.ctl("consolidate", "--description", "the chat file", "--force", timeout=600)
        assert r.returncode == 0, r.stdout + r.stderr
        d.wait_for(lambda s: s["generation"] == 1, what="generation 1")
        d.drop("b.jsonl", lines_of("text.jsonl", 40))
        d.wait_counts(done=2)
        exported_from_a_consolidated_base(d, tmp_path / "export")
    finally:
        d.close()


def exported_from_a_consolidated_base(d: Daemon, out: Path) -> None:
    """trainctl export of a generation-1 version: the merged folder gives the consolidated base + the adapter's
    logits (PEFT, fp32, computed here)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    current = adapters.read_current(d.cfg.path("adapters"))
    assert current.manifest.generation == 1 and current.manifest.base_path
    r = d.ctl("export", str(current.version), "--format", "merged-hf", "--out", str(out), "--dtype", "float32")
    assert r.returncode == 0, r.stdout + r.stderr
    base = current.manifest.base_path
    tok = AutoTokenizer.from_pretrained(base)
    ids = tok(["Hello there, how are you?", "The capital of France is"], return_tensors="pt", padding=True)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                      str(current.path)).eval()
    with torch.no_grad():
        expected = model(**ids).logits
        got = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(**ids).logits
    assert float((got - expected).abs().max()) / max(1.0, float(expected.abs().max())) <= 1e-4


@pytest.mark.e2e
def test_over_budget_the_same_first_examples_of_every_set_are_scored_and_compared(tmp_path: Path,
                                                                                 models_dir: Path) -> None:
    d = forgetting_instance(tmp_path, models_dir, budget_fraction=1e-4, min_budget_seconds=0.0,
                            max_probe_increase=100.0, max_keep_increase=100.0)
    try:
        d.start()
        chat_then_text(d)
        d.wait_counts(done=2)
        r = manifest(d, 2).forgetting
        n = r["examples_per_set"]
        assert r["sampled"] and n is not None and n >= 1 and r["budget_seconds"] < 0.01
        a = next(s for s in r["sets"] if s["kind"] == "keep" and s["job_id"] != r["job_id"])
        kept = json.loads(forgetting.keep_path(d.cfg, a["job_id"]).read_text())
        assert a["examples"] == min(n, len(kept["examples"]))
        # its reference is its score right after it was learnt over the same first n examples
        assert a["reference"] == pytest.approx(forgetting.summary([tuple(x) for x in kept["learnt"]], n))
        own = next(s for s in r["sets"] if s["job_id"] == r["job_id"])
        assert own["examples"] == 4  # the file's own keep-set is always scored whole: later files compare with it
    finally:
        d.close()


def test_the_cost_estimate_follows_a_faster_reading_at_once_and_a_slower_one_half_way() -> None:
    now = [0.0]
    per_token = iter([1.0, 0.1, 0.3])  # seconds a token: cold after a load, then warm, then a busy moment

    def scored(lm: object, examples: tuple, mbs: int) -> list:
        now[0] += next(per_token) * sum(len(e.input_ids) for e in examples)
        return [(0.0, 1, 0)] * len(examples)

    scorer = forgetting.Scorer(clock=lambda: now[0], score_fn=scored)
    s = sset("a", [10, 10])
    seen = []
    for _ in range(3):
        scorer.score(None, s, None, 4)
        seen.append(scorer.seconds_per_token)
    assert seen == pytest.approx([1.0, 0.1, 0.2])  # the first; a faster one at once; a slower one half-way
