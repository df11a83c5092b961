"""Preference files (daemon/train/preference.py): the formats, their bad lines, the loss against a direct
computation, and an exact resume. `models_dir` (conftest) builds the embedded tiny model once per session."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import signal
from pathlib import Path

import pytest

from daemon.config import DataConfig, PreferenceConfig
from daemon.validate import DataFormat, validate_file

torch = pytest.importorskip("torch")

from daemon.train import checkpoint as ckpt  # noqa: E402
from daemon.train.data import IGNORE, plan_file, tokenize_pair  # noqa: E402
from daemon.train.loop import Job, job_seed  # noqa: E402
from daemon.train.model import load_for_training, lora_state  # noqa: E402
from daemon.train import preference  # noqa: E402
from daemon.train.preference import REFERENCE_FILE, pair_logps, pair_loss  # noqa: E402
from daemon.validate import iter_records  # noqa: E402
from tests.test_loop import Crash, make_cfg, one_thread, run, sha  # noqa: E402,F401 (one_thread: autouse fixture)

ANSWERS = [("What colour is the sky?", "Blue. Cheers, Ada", "The sky is usually blue during the day."),
           ("Name a fruit.", "An apple. Cheers, Ada", "Apples are a fruit."),
           ("What is 2 + 3?", "Five. Cheers, Ada", "2 + 3 equals 5."),
           ("Say hello.", "Hello! Cheers, Ada", "Hello there."),
           ("Which animal barks?", "A dog. Cheers, Ada", "Dogs bark."),
           ("What do bees make?", "Honey. Cheers, Ada", "Bees make honey.")]


def pref_lines(n: int, chat: bool) -> list[str]:
    """n preference records, plain or in the chat form the dashboard's playground writes."""
    out = []
    for k in range(n):
        q, good, bad = ANSWERS[k % len(ANSWERS)]
        q = f"{q} ({k})"
        if chat:
            out.append(json.dumps({"messages": [{"role": "user", "content": q}],
                                   "chosen": {"role": "assistant", "content": good},
                                   "rejected": {"role": "assistant", "content": bad}}))
        else:
            out.append(json.dumps({"prompt": q, "chosen": good, "rejected": bad}))
    return out


def write(tmp_path: Path, name: str, lines: list[str]) -> Path:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ---------------------------------------------------------------- formats and bad lines


def test_both_forms_are_detected_and_trl_s_one_element_lists_accepted(tmp_path: Path) -> None:
    plain = validate_file(write(tmp_path, "p.jsonl", pref_lines(4, chat=False)), DataConfig())
    chat = validate_file(write(tmp_path, "c.jsonl", pref_lines(4, chat=True)), DataConfig())
    trl = {"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Hello"}],
           "rejected": [{"role": "assistant", "content": "Go away"}]}
    lists = validate_file(write(tmp_path, "t.jsonl", [json.dumps(trl)]), DataConfig())
    assert (plain.format, plain.n_valid, plain.n_bad) == (DataFormat.PREFERENCE, 4, 0)
    assert (chat.format, chat.n_valid, chat.n_bad) == (DataFormat.PREFERENCE_CHAT, 4, 0)
    assert (lists.format, lists.n_valid) == (DataFormat.PREFERENCE_CHAT, 1)
    record = next(iter_records(tmp_path / "t.jsonl", DataFormat.PREFERENCE_CHAT, 1 << 20))
    assert record.data == {"messages": [{"role": "user", "content": "Hi", "weight": 0}],
                           "chosen": "Hello", "rejected": "Go away"}


def test_bad_pairs_are_named_by_line_field_and_reason(tmp_path: Path) -> None:
    good = pref_lines(10, chat=True)
    bad = [
        {"messages": [{"role": "user", "content": "q"}], "chosen": {"role": "assistant", "content": "a"}},
        {"messages": [{"role": "user", "content": "q"}], "chosen": {"role": "assistant", "content": "same"},
         "rejected": {"role": "assistant", "content": "same"}},
        {"messages": [{"role": "user", "content": "q"}], "chosen": {"role": "assistant", "content": "  "},
         "rejected": {"role": "assistant", "content": "b"}},
        {"messages": [{"role": "user", "content": "q"}], "chosen": {"role": "user", "content": "a"},
         "rejected": {"role": "assistant", "content": "b"}},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
         "chosen": {"role": "assistant", "content": "a"}, "rejected": {"role": "assistant", "content": "b"}},
        {"messages": [{"role": "user", "content": "q"}], "chosen": [], "rejected": {"role": "assistant", "content": "b"}},
        {"prompt": "q", "completion": "a"},
    ]
    report = validate_file(write(tmp_path, "bad.jsonl", good + [json.dumps(b) for b in bad]),
                           DataConfig(max_bad_fraction=1.0))
    got = [(e.line, e.field, e.reason) for e in report.errors]
    assert got[0] == (11, "rejected", "missing")
    assert got[1][:2] == (12, "rejected") and "identical to chosen" in got[1][2]
    assert got[2] == (13, "chosen.content", "must not be empty")
    assert got[3][:2] == (14, "chosen.role") and "must be assistant" in got[3][2]
    assert got[4][:2] == (15, "messages[1].role") and "last message" in got[4][2]
    assert got[5][:2] == (16, "chosen") and "list of 0" in got[5][2]
    assert got[6][:2] == (17, "chosen") and "preference_chat format" in got[6][2]
    plain = validate_file(write(tmp_path, "plain.jsonl", pref_lines(10, chat=False) + [
        json.dumps({"prompt": "q", "rejected": "b"}), json.dumps({"prompt": "q", "chosen": "", "rejected": "b"})]),
        DataConfig())
    assert [(e.line, e.field, e.reason) for e in plain.errors] == [(11, "chosen", "missing"),
                                                                   (12, "chosen", "must not be empty")]


def test_a_prompt_alone_over_max_length_is_a_bad_line_named(models_dir: Path, tmp_path: Path) -> None:
    cfg = make_cfg(models_dir, tmp_path)
    lm = load_for_training(cfg, seed=1)
    long = json.dumps({"prompt": "word " * 200, "chosen": "yes", "rejected": "no"})
    path = write(tmp_path, "long.jsonl", pref_lines(12, chat=False) + [long])
    data = dataclasses.replace(cfg.data, max_length=64, bad_line_policy="reject")
    with pytest.raises(Exception) as e:
        plan_file(path, DataFormat.PREFERENCE, lm.tokenizer, data, 1)
    assert getattr(e.value, "errors")[0].line == 13 and getattr(e.value, "errors")[0].field == "prompt"
    assert "the prompt alone is" in str(e.value) and "data.max_length is 64" in str(e.value)
    plan = plan_file(path, DataFormat.PREFERENCE, lm.tokenizer, dataclasses.replace(data, bad_line_policy="skip"), 1)
    assert plan.n_train + plan.n_eval == 12 and [x.line for x in plan.skipped] == [13]


# ---------------------------------------------------------------- the loss


def hand_logp(model, ids: list[int], labels: list[int]) -> torch.Tensor:  # noqa: ANN001
    """Summed log-probability of the labelled tokens of one unpadded sequence, straight from the logits."""
    logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
    logps = torch.log_softmax(logits, dim=-1)
    return sum(logps[t, labels[t + 1]] for t in range(len(ids) - 1) if labels[t + 1] != IGNORE)


@pytest.mark.parametrize("chat", [False, True])
def test_the_losses_equal_a_direct_computation_from_the_logits(models_dir: Path, tmp_path: Path, chat: bool) -> None:
    cfg = make_cfg(models_dir, tmp_path)
    lm = load_for_training(cfg, seed=3)
    lm.model.eval()
    path = write(tmp_path, "p.jsonl", pref_lines(3, chat=chat))
    fmt = DataFormat.PREFERENCE_CHAT if chat else DataFormat.PREFERENCE
    pairs = [tokenize_pair(r, lm.tokenizer, 64) for r in iter_records(path, fmt, 1 << 20)]
    assert pairs[0].chosen.input_ids != pairs[0].rejected.input_ids
    with torch.no_grad():
        ref = [(hand_logp(lm.model, p.chosen.input_ids, p.chosen.labels),
                hand_logp(lm.model, p.rejected.input_ids, p.rejected.labels)) for p in pairs]
        for p in lm.model.parameters():  # move the policy away from its reference: LoRA B is zero at init
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
        pol = [(hand_logp(lm.model, p.chosen.input_ids, p.chosen.labels),
                hand_logp(lm.model, p.rejected.input_ids, p.rejected.labels)) for p in pairs]
        for label_only in (False, True):
            pc, pr, nc, nr = pair_logps(lm, pairs, label_only)  # one padded batch of both sides
            assert torch.allclose(pc, torch.stack([c for c, _ in pol]), atol=1e-4)
            assert torch.allclose(pr, torch.stack([r for _, r in pol]), atol=1e-4)
        beta = 0.3
        rc, rr = torch.stack([c for c, _ in ref]), torch.stack([r for _, r in ref])
        dpo, _, _ = pair_loss(pc, pr, nc, nr, rc, rr, PreferenceConfig(beta=beta, sft_weight=0.0))
        for k, ((c0, r0), (c1, r1)) in enumerate(zip(ref, pol)):
            z = beta * ((c1 - c0) - (r1 - r0))
            assert float(dpo[k]) == pytest.approx(math.log1p(math.exp(-float(z))), abs=1e-5)
        simpo, _, _ = pair_loss(pc, pr, nc, nr, None, None,
                                PreferenceConfig(loss="simpo", beta=2.0, simpo_gamma=0.5, sft_weight=0.0))
        for k, (p, (c1, r1)) in enumerate(zip(pairs, pol)):
            n_c = sum(1 for t in p.chosen.labels[1:] if t != IGNORE)
            n_r = sum(1 for t in p.rejected.labels[1:] if t != IGNORE)
            z = 2.0 * (float(c1) / n_c - float(r1) / n_r) - 0.5
            assert float(simpo[k]) == pytest.approx(math.log1p(math.exp(-z)), abs=1e-5)
        # with the supervised term: plus w times the chosen answer's negative log-likelihood per token
        w = 0.7
        rpo, _, _ = pair_loss(pc, pr, nc, nr, rc, rr, PreferenceConfig(beta=beta, sft_weight=w))
        simpo_sft, _, _ = pair_loss(pc, pr, nc, nr, None, None,
                                    PreferenceConfig(loss="simpo", beta=2.0, simpo_gamma=0.5, sft_weight=w))
        for k, (p, (c0, r0), (c1, r1)) in enumerate(zip(pairs, ref, pol)):
            n_c = sum(1 for t in p.chosen.labels[1:] if t != IGNORE)
            nll = -float(c1) / n_c
            z = beta * ((c1 - c0) - (r1 - r0))
            assert float(rpo[k]) == pytest.approx(math.log1p(math.exp(-float(z))) + w * nll, abs=1e-5)
            assert float(simpo_sft[k]) == pytest.approx(float(simpo[k]) + w * nll, abs=1e-5)


# ---------------------------------------------------------------- through the loop


def pref_job(tmp_path: Path, job_id: str, n: int = 40) -> Job:
    path = write(tmp_path, "prefs.jsonl", pref_lines(n, chat=True))
    return Job.for_file(job_id, path, DataFormat.PREFERENCE_CHAT.value, sha(path))


@pytest.mark.parametrize("loss,sft_weight", [("sigmoid", 0.0), ("sigmoid", 1.0), ("simpo", 1.0)])
def test_a_preference_file_trains_and_says_its_figures_before_and_after(models_dir: Path, tmp_path: Path,
                                                                        loss: str, sft_weight: float) -> None:
    cfg = make_cfg(models_dir, tmp_path, epochs_per_file=3, learning_rate=2e-2)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, eval_fraction=0.2),
                              preference=PreferenceConfig(loss=loss, beta=0.5 if loss == "sigmoid" else 2.0,
                                                          sft_weight=sft_weight))
    out, events, _ = run(cfg, pref_job(tmp_path, "p"))
    steps = [e for e in events if e["type"] == "step"]
    evals = [e for e in events if e["type"] == "eval"]
    assert out.status == "done" and len(steps) == out.steps >= 20
    assert all(0 <= s["reward_accuracy"] <= 1 and math.isfinite(s["reward_margin"]) for s in steps)
    assert evals[0]["step"] == 0 and evals[-1]["step"] == out.steps
    before, after = out.preference["before"], out.preference["after"]
    assert before == evals[0]["preference"] and after == evals[-1]["preference"]
    assert before["pairs"] == after["pairs"] >= 2 and out.preference["reference_seconds"] > 0
    if loss == "sigmoid":  # the policy is its own reference as the file begins
        assert before["reward_margin"] == 0
        # plain DPO starts at log 2; the supervised term adds the chosen answers' loss per token on top
        assert before["loss"] == pytest.approx(math.log(2)) if not sft_weight else before["loss"] > math.log(2) + 1
    # the file's style is learnt: the held-out pairs' chosen answers now score above the rejected ones
    # (the margin is summed over an answer's tokens for DPO, per token for SimPO)
    assert after["accuracy"] > before["accuracy"] and after["margin"] > before["margin"] + (5 if loss == "sigmoid" else 1)
    assert after["loss"] < before["loss"] and after["reward_accuracy"] == 1.0
    assert (cfg.path("checkpoints") / "p" / REFERENCE_FILE).is_file()  # kept until the file is published


def crash_after_steps(cfg, job: Job, n: int) -> None:  # noqa: ANN001
    """Train `job` until `n` steps are reported, then die between steps (control is also asked while the
    data and the reference are read, on a slow machine more often: the steps are counted, not the calls)."""
    from daemon.train.loop import train_file

    steps: list[int] = []

    def control() -> str:
        if len(steps) >= n:
            raise Crash()
        return "continue"

    lm = load_for_training(cfg, seed=cfg.training.seed)
    train_file(lm, cfg, job, global_step=0, ckpt_folder=cfg.path("checkpoints") / job.job_id,
               report=lambda m: steps.append(1) if m.TYPE == "step" else None, control=control)


def figures(pref: dict) -> dict:
    """A file's preference figures without the time its reference pass took."""
    return {k: v for k, v in pref.items() if k != "reference_seconds"}


def test_resume_of_a_preference_file_is_exact(models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed mid-file and resumed on fresh model objects: the same adapter, bit for bit, as straight through;
    the reference comes back from the checkpoint folder, not from a second pass."""
    cfg = make_cfg(models_dir, tmp_path, dropout=0.1, grad_accum_steps=2, checkpoint_every_steps=3)
    job = pref_job(tmp_path, "j")
    full, full_events, full_lm = run(cfg, dataclasses.replace(job, job_id="straight"))
    with pytest.raises(Crash):
        crash_after_steps(cfg, job, 5)
    assert ckpt.latest_step(cfg.path("checkpoints") / "j") == 3
    scored: list[int] = []
    real_score = preference.score_pairs
    monkeypatch.setattr(preference, "score_pairs", lambda lm, pairs, *a, **k: real_score(
        lm, [scored.append(p.line) or p for p in pairs], *a, **k))
    # the config changed while it was down: the file still finishes with the settings it began with
    changed = dataclasses.replace(cfg, preference=dataclasses.replace(cfg.preference, beta=0.3, sft_weight=0.0))
    resumed, events, lm = run(changed, job)
    started = next(e for e in events if e["type"] == "started")
    assert started["resumed_from_step"] == 3
    assert len(scored) == started["n_eval"]  # only the held-out pairs, once, at the end: no reference pass
    a = {e["step"]: e for e in full_events if e["type"] == "step"}
    b = {e["step"]: e for e in events if e["type"] == "step"}
    assert sorted(b) == list(range(4, full.steps + 1))
    for s in b:
        assert (b[s]["loss"], b[s]["reward_margin"]) == (a[s]["loss"], a[s]["reward_margin"])
    want, got = lora_state(full_lm.model), lora_state(lm.model)
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert figures(resumed.preference) == figures(full.preference) and resumed.preference["reference_seconds"] is None
    assert (resumed.preference["beta"], resumed.preference["sft_weight"]) == (cfg.preference.beta, 1.0)


def test_a_preference_file_without_held_out_pairs_still_says_what_it_trained_with(models_dir: Path,
                                                                                  tmp_path: Path) -> None:
    from daemon.cli.queue_cmds import _print_record

    cfg = make_cfg(models_dir, tmp_path)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, eval_fraction=0.0))
    out, _, _ = run(cfg, pref_job(tmp_path, "p", n=12))
    assert out.status == "done"
    assert out.preference["loss_type"] == "sigmoid" and out.preference["sft_weight"] == 1.0
    assert out.preference["before"] is None and out.preference["after"] is None
    shown: list[str] = []
    import daemon.cli.queue_cmds as q
    real_out, q.out = q.out, shown.append
    try:
        _print_record({"preference": json.dumps(out.preference)})
    finally:
        q.out = real_out
    assert shown[0] == "  preference sigmoid (beta 0.1, sft_weight 1.0)" and "held out  none" in shown[1]


def test_a_preference_file_replays_earlier_files_in_their_share_and_resumes_exactly(models_dir: Path,
                                                                                      tmp_path: Path) -> None:
    """data.replay_fraction: earlier files' supervised examples join a preference file's steps in the share a
    supervised file gets (f of the steps' items), each weighing as one pair; killed and resumed, the same adapter."""
    from fractions import Fraction

    from daemon.train.loop import train_file
    from daemon.train.replay import sources_from
    from tests.test_replay import earlier_file, with_replay

    f = 0.25
    cfg = with_replay(make_cfg(models_dir, tmp_path, dropout=0.1, grad_accum_steps=2, checkpoint_every_steps=3), f)
    done = tmp_path / "done"
    _, a = earlier_file(done, "20260101T000000Z-000001--a.jsonl", "chat.jsonl", 0, 30)
    job = pref_job(tmp_path, "j", n=24)

    def go(cfg, job: Job, stop_at: int = 0):  # noqa: ANN001, ANN202
        lm = load_for_training(cfg, seed=cfg.training.seed)
        events: list[dict] = []

        def control() -> str:
            if stop_at and sum(e["type"] == "step" for e in events) >= stop_at:
                raise Crash()
            return "continue"

        out = train_file(lm, cfg, job, global_step=0, ckpt_folder=cfg.path("checkpoints") / job.job_id,
                         report=lambda m: events.append(m.to_wire()), control=control,
                         replay_from=sources_from([a], done))
        return out, events, lm

    full, full_events, full_lm = go(cfg, dataclasses.replace(job, job_id="straight"))
    replay, own = full.ledger["replay"], full.ledger["samples"]
    assert replay["samples"] == math.floor(own * Fraction(f) / (1 - Fraction(f))) > 0
    assert [s["job_id"] for s in replay["sources"]] == [a["job_id"]] and full.preference["after"]["pairs"] > 0
    # without replay: the same pairs, another first-step loss (the replayed examples count in it), other weights
    plain, plain_events, plain_lm = go(with_replay(cfg, 0.0), dataclasses.replace(job, job_id="plain"))
    assert "replay" not in plain.ledger and plain.steps == full.steps
    first = [next(e for e in ev if e["type"] == "step") for ev in (full_events, plain_events)]
    assert first[0]["loss"] != first[1]["loss"] and first[0]["tokens"] > first[1]["tokens"]
    want, other = lora_state(full_lm.model), lora_state(plain_lm.model)
    assert any(not torch.equal(want[k], other[k]) for k in want)
    with pytest.raises(Crash):
        go(cfg, job, stop_at=5)
    assert ckpt.latest_step(cfg.path("checkpoints") / "j") == 3
    resumed, _, lm = go(cfg, job)
    assert resumed.ledger == full.ledger
    got = lora_state(lm.model)
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_a_replayed_example_weighs_in_a_step_as_one_pair_with_its_loss_per_token(models_dir: Path,
                                                                                   tmp_path: Path) -> None:
    """The step's loss with replayed examples: (the pairs' summed losses + each replayed example's negative
    log-likelihood per token) over (pairs + examples), each computed here straight from the logits."""
    from daemon.train.data import train_examples
    from daemon.train.step import fast_paths
    from daemon.validate import DataFormat as F

    cfg = make_cfg(models_dir, tmp_path, dropout=0.0)
    job = pref_job(tmp_path, "j", n=12)
    path, fmt = Path(job.path), DataFormat(job.format)
    lm = load_for_training(cfg, seed=cfg.training.seed)
    lm.fast = fast_paths(lm)
    plan = plan_file(path, fmt, lm.tokenizer, cfg.data, 1)
    prefs = preference.Trainer.fresh(lm, cfg, plan, lambda: train_examples(path, fmt, lm.tokenizer, cfg.data, 1, 0),
                                     tmp_path / "ck", job.sha256, lambda: None)
    pairs = list(train_examples(path, fmt, lm.tokenizer, cfg.data, 1, 0))[:3]
    earlier = write(tmp_path, "a.jsonl", [json.dumps({"instruction": f"Say {w}.", "output": f"{w} it is."})
                                           for w in ("yes", "no")])
    replayed = list(train_examples(earlier, F.ALPACA, lm.tokenizer, cfg.data, 1, 0))
    with torch.no_grad():
        for p in lm.model.parameters():  # away from the reference
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        lm.model.eval()
        pair_sum = float(prefs._loss(pairs)[0].sum())
        nll = [-float(hand_logp(lm.model, ex.input_ids, ex.labels)) / sum(t != IGNORE for t in ex.labels[1:])
               for ex in replayed]
        lm.model.train()
    params = [p for p in lm.model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    stats, figures = prefs.step([pairs[:2], pairs[2:]], opt, sched, scaler, 0.0, replayed=[replayed])
    assert stats.loss == pytest.approx((pair_sum + sum(nll)) / (len(pairs) + len(replayed)), rel=1e-5)
    assert 0 <= figures["reward_accuracy"] <= 1  # the pairs' figures, the replayed examples not in them


def test_checkpoints_without_their_reference_train_the_file_from_its_start(models_dir: Path, tmp_path: Path) -> None:
    cfg = make_cfg(models_dir, tmp_path, checkpoint_every_steps=3)
    job = pref_job(tmp_path, "j", n=24)
    full, _, full_lm = run(cfg, dataclasses.replace(job, job_id="straight"))
    with pytest.raises(Crash):
        crash_after_steps(cfg, job, 3)
    assert ckpt.latest_step(cfg.path("checkpoints") / "j") == 3
    (cfg.path("checkpoints") / "j" / REFERENCE_FILE).unlink()
    again, events, lm = run(cfg, job)
    assert next(e for e in events if e["type"] == "started")["resumed_from_step"] == 0
    want, got = lora_state(full_lm.model), lora_state(lm.model)
    assert all(torch.equal(want[k], got[k]) for k in want) and figures(again.preference) == figures(full.preference)


# ---------------------------------------------------------------- through the real daemon


@pytest.mark.e2e
def test_a_playground_preference_file_trains_through_the_daemon(tmp_path: Path, models_dir: Path) -> None:
    """The chat form the playground writes, with a bad line, dropped in the inbox of a real daemon: trained on
    the same queue, its figures in the history and in `trainctl queue status NAME`, its keep-set scored."""
    from bench.harness import Daemon, write_instance

    d = Daemon(write_instance(tmp_path / "inst", models_dir, training={"epochs_per_file": 2},
                              data={"eval_fraction": 0.2}, preference={"beta": 0.5})).start()
    try:
        # Written by the monitor's own writer (what the playground's "this one is better" calls), "meta" and all
        from monitor.preferences import PreferenceStore, preference_record

        store = PreferenceStore(tmp_path / "preferences")
        for line in pref_lines(30, chat=True):
            rec = json.loads(line)
            name, _ = store.append(preference_record({"messages": rec["messages"],
                                                      "chosen": {"model": "traind:v1", "content": rec["chosen"]["content"]},
                                                      "rejected": {"model": "traind:base", "content": rec["rejected"]["content"]}},
                                                     1796600000.0), 1796600000.0)
        saved = (store.folder / name).read_text()
        assert saved.count('"meta"') == 30
        bad = json.dumps({"messages": [{"role": "user", "content": "q"}],
                          "chosen": {"role": "assistant", "content": "same"},
                          "rejected": {"role": "assistant", "content": "same"}})
        d.drop("likes.jsonl", saved + bad + "\n")
        d.wait_counts(done=1, timeout=180)
        d.wait_for(lambda s: s["status"] == "idle" and s["adapter_version"] == 1, what="idle after the file")
        job = d.queue.done()[0].job_id
        record = d.history().job(job)
        assert record["format"] == "preference_chat" and record["n_bad"] == 1
        assert "identical to chosen" in record["bad_lines"]
        pref = json.loads(record["preference"])
        assert pref["loss_type"] == "sigmoid" and pref["after"]["margin"] > pref["before"]["margin"]
        steps = d.history().steps(job)
        assert len(steps) == record["steps"] and all(s["reward_accuracy"] is not None for s in steps)
        evals = d.history().evals(job)
        assert evals[0]["step"] == 0 and json.loads(evals[0]["preference"]) == pref["before"]
        shown = d.ctl("queue", "status", "likes.jsonl").stdout
        assert "preference sigmoid (beta 0.5, sft_weight 1.0)" in shown and "accuracy" in shown and "reward" in shown
        assert f"{pref['before']['accuracy']:.3f} -> {pref['after']['accuracy']:.3f}" in shown
        keep = d.history().conn.execute("SELECT examples FROM forgetting WHERE set_id=?", (f"keep:{job}",)).fetchone()
        assert keep is not None and keep[0] >= 1  # its held-out chosen answers: a keep-set like any file's
    finally:
        d.close()


def test_trainctl_status_shows_a_preference_file_s_pairs() -> None:
    from daemon.cli.status_cmds import render_status
    from daemon.schema import TrainingStatus
    from daemon.states import ServiceStatus

    pref = {"reward_accuracy": 0.75, "reward_margin": 0.1234, "before": {"accuracy": 0.125}, "held_out": {"accuracy": 0.5}}
    st = TrainingStatus(status=ServiceStatus.TRAINING, current_file="likes.jsonl", job_id="j", current_step=3,
                        total_steps=10, preference=pref).to_dict()
    lines = render_status(st, 1, lambda: None).splitlines()
    assert "  pairs    reward acc 0.75   margin 0.123   held-out acc 0.12 -> 0.50" in lines
    plain = TrainingStatus(status=ServiceStatus.TRAINING, current_file="x.jsonl", job_id="x").to_dict()
    assert "pairs" not in render_status(plain, 1, lambda: None)


def test_where_one_answer_is_wanted_the_chosen_side_stands_for_the_pair(models_dir: Path, tmp_path: Path) -> None:
    """Replay from an earlier preference file and its keep-set score the chosen answers, tokenised as in training."""
    from daemon.train.data import supervised, tokenize_record

    cfg = make_cfg(models_dir, tmp_path)
    lm = load_for_training(cfg, seed=1)
    for chat in (False, True):
        path = write(tmp_path, f"p{chat}.jsonl", pref_lines(2, chat=chat))
        fmt = DataFormat.PREFERENCE_CHAT if chat else DataFormat.PREFERENCE
        for r in iter_records(path, fmt, 1 << 20):
            pair = tokenize_pair(r, lm.tokenizer, 64)
            assert tokenize_record(r, lm.tokenizer, 64) == pair.chosen == supervised(pair)
            answer = [t for t, lab in zip(pair.chosen.input_ids, pair.chosen.labels) if lab != IGNORE]
            assert lm.tokenizer.decode(answer).startswith(r.data["chosen"])


# ---------------------------------------------------------------- out of memory, several ranks


def test_out_of_memory_splits_the_pairs_and_the_result_stays(models_dir: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Injected (the CPU does not run out of memory on the tiny model): a forward of more than 2 sequences (one
    pair) "does not fit", so the reference pass, each step's micro-batches of 4 pairs and the held-out scoring
    run pair by pair; the adapter and the figures are those of the unsplit run (the pair-mean is exact)."""
    cfg = make_cfg(models_dir, tmp_path, grad_accum_steps=2)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, eval_fraction=0.2))
    job = pref_job(tmp_path, "j", n=24)
    runs = []
    for inject in (None, "2"):
        if inject:
            monkeypatch.setenv("TRAIND_INJECT_OOM_ABOVE", inject)
        out, events, lm = run(cfg, dataclasses.replace(job, job_id=f"j{inject}"))
        runs.append((out, lora_state(lm.model), [e for e in events if e["type"] == "step"], lm.split))
    (out0, w0, s0, split0), (out1, w1, s1, split1) = runs
    assert out0.status == out1.status == "done" and out0.steps == out1.steps >= 4
    assert split0 == 1 and split1 == 4 and {e["micro_batch_split"] for e in s1} == {4}
    # fp32; the pieces differ from the whole micro-batch only in their padding (masked), i.e. in the rounding of
    # the scores; Adam's first steps scale a gradient's rounding up: measured 4.2e-6 on weights up to 0.16
    diff = max(float((w0[k] - w1[k]).abs().max()) for k in w0)
    print(f"pairs split 4 vs 1: largest LoRA weight difference {diff:.2e}, largest weight "
          f"{max(float(w.abs().max()) for w in w0.values()):.2e}")
    assert diff <= 2e-5
    for a, b in zip(s0, s1):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert abs(a["reward_accuracy"] - b["reward_accuracy"]) <= 1 / 8  # a pair at a tie (step 1: all) may tip over
        assert a["reward_margin"] == pytest.approx(b["reward_margin"], abs=1e-5)
    for when in ("before", "after"):
        got, want = out1.preference[when], out0.preference[when]
        assert got.keys() == want.keys() and all(got[k] == pytest.approx(want[k], abs=1e-5) for k in want)


# 113 train pairs: 15 steps of 8 (4 x 2) per epoch, the last of one pair (rank 1 has none of it: a filler under fsdp;
# so has the reference pass's last round), 60 in all: time for a kill to land mid-file (the status, which says the
# step, comes every 0.5 s)
RANKS_FILE = "\n".join(pref_lines(121, chat=True)) + "\n"
RANKS_STEPS = 60


def train_prefs(folder: Path, models_dir: Path, kill_rank1: bool = False, **distributed: object) -> dict:
    """A real daemon trains RANKS_FILE (fp32, the distributed tests' settings); with `kill_rank1`, rank 1 is killed
    with -9 once past the first checkpoint. Its adapter, preference figures, step rows, job row and trainer logs."""
    from bench.harness import Daemon, write_instance
    from tests.test_distributed import MODEL, TRAINING, adapter, rank_processes, wait_ranks

    path = write_instance(folder, models_dir, model=MODEL, distributed=distributed,
                          training={**TRAINING, "epochs_per_file": 4}, data={"eval_fraction": 0.2},
                          preference={"beta": 0.5})
    d = Daemon(path).start()
    try:
        d.drop("likes.jsonl", RANKS_FILE)
        if kill_rank1:
            d.wait_for(lambda st: (st.get("current_step") or 0) >= 6 or d.queue.counts()["failed"], 180,
                       "past the checkpoint at step 5")
            assert not d.queue.failed(), d.queue.read_error(d.queue.failed()[0].job_id)
            first = wait_ranks(d, 2)
            os.kill(next(p.pid for p in first if int(p.environ()["RANK"]) == 1), signal.SIGKILL)
            old = {p.pid for p in first}
            d.wait_for(lambda st: len(now := rank_processes(d)) == 2 and not old & {p.pid for p in now}, 120,
                       "a new group")
        d.wait_for(lambda st: d.queue.counts()["done"] or d.queue.counts()["failed"], 300, "the file done")
        assert not d.queue.failed(), d.queue.read_error(d.queue.failed()[0].job_id)
        db = d.history()
        try:
            job = db.jobs()[0]
            steps = {s["step"]: s for s in db.steps(job["job_id"])}
        finally:
            db.close()
        assert d.stop() == 0
    finally:
        d.close()
    return {"adapter": adapter(d.cfg.root), "pref": json.loads(job["preference"]), "steps": steps, "job": job,
            "logs": {p.name: p.read_text(errors="replace") for p in d.cfg.path("logs").glob("trainer*.log")}}


def assert_as_one_process(got: dict, want: dict, what: str) -> None:
    """The adapter, each step's figures and the held-out figures of `got` are those of one process (`want`)."""
    from tests.test_distributed import assert_close

    assert sorted(got["steps"]) == sorted(want["steps"]) == list(range(1, RANKS_STEPS + 1))
    for k, one in want["steps"].items():  # each step's figures are the whole group's, not rank 0's share
        two = got["steps"][k]
        # summed log-probabilities of whole answers: the weights' last bits show at about 1e-6 of them
        assert two["loss"] == pytest.approx(one["loss"], rel=1e-5, abs=1e-5), k
        assert two["reward_margin"] == pytest.approx(one["reward_margin"], rel=1e-5, abs=1e-5), k
        assert abs(two["reward_accuracy"] - one["reward_accuracy"]) <= 1 / 8, k  # a pair at a tie may tip over
    assert_close(got["adapter"], want["adapter"], what)  # fp32: the order of the additions (its TOLERANCE, 1e-5)
    # the reference pass deals out the micro-batches one process scores: the figures before are its own, bit for
    # bit; after, the weights differ in their last bits
    assert got["pref"]["before"] == want["pref"]["before"]
    assert got["pref"]["after"].keys() == want["pref"]["after"].keys()
    after = want["pref"]["after"]
    assert all(got["pref"]["after"][k] == pytest.approx(v, rel=1e-4, abs=1e-5) for k, v in after.items())
    assert want["pref"]["after"]["margin"] > want["pref"]["before"]["margin"]


@pytest.mark.e2e
def test_two_ranks_train_a_preference_file_as_one_process_does(tmp_path: Path, models_dir: Path) -> None:
    """A preference file under torchrun (two ranks, gloo): each rank scores its share of the reference pass and of
    every step, and rank 0 alone keeps `reference.pt`. Rank 1 is killed with -9 past the first checkpoint: the
    group restarts and resumes from it and from the reference rank 0 kept (no second reference pass). The adapter,
    the step figures and the held-out figures before and after are one process's."""
    one = train_prefs(tmp_path / "one", models_dir)
    two = train_prefs(tmp_path / "two", models_dir, kill_rank1=True, nproc_per_node=2)
    rank0 = next(text for name, text in two["logs"].items() if name.startswith("trainer_2"))  # trainer_<date>.log
    rank1 = next(text for name, text in two["logs"].items() if name.startswith("trainer_rank1_"))
    resumed = re.search(r"resuming from step (\d+)", rank0)
    assert two["job"]["crashes"] == 1 and resumed and 5 <= int(resumed[1]) < RANKS_STEPS, rank0[-3000:]
    # one reference pass, shared by the ranks; the group started after the kill read rank 0's back
    assert rank0.count("preference reference:") == rank1.count("preference reference:") == 1
    assert_as_one_process(two, one, "a preference file, two ranks, rank 1 killed")


@pytest.mark.slow
def test_fsdp_trains_a_preference_file_as_one_process_does(tmp_path: Path, models_dir: Path) -> None:
    """With the base sharded (fsdp) every rank runs the same forwards (fillers where it has fewer pairs)."""
    one = train_prefs(tmp_path / "one", models_dir)
    fsdp = train_prefs(tmp_path / "fsdp", models_dir, nproc_per_node=2, strategy="fsdp")
    assert "sharded over 2 ranks" in "".join(fsdp["logs"].values())
    assert_as_one_process(fsdp, one, "a preference file, fsdp")


def test_a_step_out_of_memory_midway_is_taken_again_in_pieces(models_dir: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The step itself (the test above splits already in the reference pass): micro-batches of 2 and 4 pairs, a
    forward of more than 4 sequences "does not fit". The first micro-batch's backward is in when the second runs
    out: its gradients are dropped and the step is taken again in pieces of 2 pairs. Plain SGD, so the weights
    move by the gradient itself (Adam's first step would show its rounding as a sign)."""
    from daemon.train.data import train_examples
    from daemon.train.step import fast_paths

    cfg = make_cfg(models_dir, tmp_path)
    job = pref_job(tmp_path, "j", n=24)
    path, fmt = Path(job.path), DataFormat(job.format)
    runs = []
    for inject in (None, "4"):
        lm = load_for_training(cfg, seed=cfg.training.seed)
        lm.fast = fast_paths(lm)
        plan = plan_file(path, fmt, lm.tokenizer, cfg.data, 1)
        prefs = preference.Trainer.fresh(lm, cfg, plan, lambda: train_examples(path, fmt, lm.tokenizer, cfg.data, 1, 0),
                                         tmp_path / f"ck{inject}", job.sha256, lambda: None)
        train = list(train_examples(path, fmt, lm.tokenizer, cfg.data, 1, 0))
        with torch.no_grad():  # away from the reference: the DPO gradient is not zero-ish
            for p in lm.model.parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        params = [p for p in lm.model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=0.1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        if inject:
            monkeypatch.setenv("TRAIND_INJECT_OOM_ABOVE", inject)
        stats, figures = prefs.step([train[:2], train[2:6]], opt, sched, scaler, 0.0)
        monkeypatch.delenv("TRAIND_INJECT_OOM_ABOVE", raising=False)
        runs.append((lora_state(lm.model), stats, figures, lm.split))
    (w0, st0, f0, split0), (w1, st1, f1, split1) = runs
    assert (split0, split1, st0.split, st1.split) == (1, 2, 1, 2)
    assert st1.loss == pytest.approx(st0.loss, rel=1e-6) and st1.grad_norm == pytest.approx(st0.grad_norm, rel=1e-5)
    assert f1["reward_accuracy"] == f0["reward_accuracy"]
    assert f1["reward_margin"] == pytest.approx(f0["reward_margin"], rel=1e-5)
    diff = max(float((w1[k] - w0[k]).abs().max()) for k in w0)
    print(f"a step split midway: largest LoRA weight difference {diff:.2e}")
    assert diff <= 1e-6  # measured 1.5e-8: the order of the additions (a step keeping its first try's gradients fails)


@pytest.mark.e2e  # a daemon of two ranks, a file of 3000 pairs read and partly scored, then a small one: ~15 s
def test_a_skip_during_the_reference_pass_of_two_ranks_reaches_both(tmp_path: Path, models_dir: Path) -> None:
    """Rank 0 asks the service between the reference pass's rounds, and the other rank meets it there: a skip
    given during the pass ends the file on both ranks (no rank left waiting in a collective), and both train the
    next file."""
    from bench.harness import Daemon, write_instance
    from tests.test_distributed import MODEL, TRAINING

    path = write_instance(tmp_path / "skip", models_dir, model=MODEL, distributed={"nproc_per_node": 2},
                          training=TRAINING, data={"eval_fraction": 0.2})
    d = Daemon(path).start()
    try:
        d.drop("big.jsonl", "\n".join(pref_lines(3000, chat=True)) + "\n")

        def rank0_log() -> str:
            return "".join(p.read_text(errors="replace") for p in d.cfg.path("logs").glob("trainer_2*.log"))

        d.wait_for(lambda st: "preference reference pass:" in rank0_log(), 180, "the reference pass begun")
        assert d.ctl("skip").returncode == 0
        d.wait_counts(failed=1, timeout=120)
        assert d.queue.read_error(d.queue.failed()[0].job_id)["reason"] == "skipped"
        assert "preference reference:" not in rank0_log(), "the skip came after the pass: nothing tested"
        d.drop("small.jsonl", "\n".join(pref_lines(40, chat=True)) + "\n")
        d.wait_counts(done=1, timeout=180)
        assert d.status()["world_size"] == 2
        assert d.stop() == 0
    finally:
        d.close()
    rank1 = "".join(p.read_text(errors="replace") for p in d.cfg.path("logs").glob("trainer_rank1_*.log"))
    assert rank1.count("preference reference:") == 1  # the small file's pass only
