"""daemon.train.loop + daemon.train.checkpoint: a file trains, and an interrupted run resumes exactly.

`models_dir` (conftest) builds the embedded tiny model once per session.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from daemon.config import Config, DataConfig, LoraConfig, ModelConfig, PathsConfig, TrainingConfig  # noqa: E402
from daemon.train import checkpoint as ckpt  # noqa: E402
from daemon.sample_ledger import check_ledger  # noqa: E402
from daemon.train.data import train_lines  # noqa: E402
from daemon.train.loop import Job, job_seed, lr_factor, steps_per_epoch, train_file  # noqa: E402
from daemon.validate import DataFormat  # noqa: E402
from daemon.train.model import load_for_training, lora_max_abs_diff, lora_state  # noqa: E402

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
MAX_RESUME_DIFF = 1e-5


@pytest.fixture(autouse=True, scope="module")
def one_thread():  # noqa: ANN201
    """One intra-op thread: on 2 shared cores, 2 OpenMP threads spin-wait on each other (10-50x slower steps)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)



def small_file(tmp_path: Path, name: str = "alpaca.jsonl", n: int = 40) -> Path:
    lines = (EXAMPLES / name).read_text(encoding="utf-8").splitlines()[:n]
    out = tmp_path / f"{n}-{name}"
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def make_cfg(models: Path, tmp: Path, quantization: str = "none", **training: object) -> Config:
    tc = dict(micro_batch_size=4, grad_accum_steps=1, learning_rate=1e-2, warmup_steps=2, schedule="constant",
              epochs_per_file=2, checkpoint_every_steps=1000, keep_checkpoints=2, seed=11)
    tc.update(training)
    return Config(
        paths=PathsConfig(models=str(models), checkpoints=str(tmp / "checkpoints")),
        data=DataConfig(max_length=64, eval_fraction=0.1, eval_max_examples=8),
        # fp32: the exactness checks here (1e-5) are fp32's; bf16 (auto on CPUs with native bf16) has its own
        # cases, and the daemon tests run whatever auto picks on the machine
        model=ModelConfig(quantization=quantization, device="cpu", compute_dtype="float32"),
        lora=LoraConfig(r=4, alpha=8, dropout=float(tc.pop("dropout", 0.0))),  # type: ignore[arg-type]
        training=TrainingConfig(**tc),  # type: ignore[arg-type]
    )


def run(cfg: Config, job: Job, control=lambda: "continue", lm=None, global_step: int = 0,  # noqa: ANN001, ANN201
        events: list[dict] | None = None):
    """Train `job` on a freshly loaded model; (outcome, events, lm). `events` (if given) receives the reports
    as they come, for a control that answers by what the run has reached."""
    lm = lm or load_for_training(cfg, seed=cfg.training.seed)
    events = [] if events is None else events
    out = train_file(lm, cfg, job, global_step=global_step, ckpt_folder=cfg.path("checkpoints") / job.job_id,
                     report=lambda m: events.append(m.to_wire()), control=control)
    return out, events, lm


def after_step(step: int, events: list[dict], verdict: str = "stop"):  # noqa: ANN201
    """A control answering `verdict` once step `step` is reported, "continue" before. By the step reached, not
    by how often it is asked: the loop also asks every PREP_POLL_SECONDS while a file is read, so on a busy
    machine the count of questions before a step varies."""
    return lambda: verdict if any(e["type"] == "step" and e["step"] >= step for e in events) else "continue"


def losses(events: list[dict]) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in events if e["type"] == "step"}


def sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("quantization", ["none", "nf4"])
@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])  # auto picks bf16 on a CPU with native bf16
def test_file_in_adapter_out_loss_decreases(models_dir: Path, tmp_path: Path, quantization: str, compute_dtype: str) -> None:
    cfg = make_cfg(models_dir, tmp_path, quantization, epochs_per_file=3)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, compute_dtype=compute_dtype))
    path = small_file(tmp_path)
    out, events, lm = run(cfg, Job.for_file("j1", path, "alpaca", sha(path)))
    dtype = getattr(torch, compute_dtype)
    assert lm.dtype == dtype
    # the LoRA weights (and so AdamW's state) stay fp32 whatever the compute dtype
    assert all(p.dtype == torch.float32 for p in lm.model.parameters() if p.requires_grad)
    if quantization == "nf4":
        import bitsandbytes as bnb

        q = lm.model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
        assert isinstance(q, bnb.nn.Linear4bit) and q.weight.quant_type == "nf4" and q.compute_dtype == dtype
    started = next(e for e in events if e["type"] == "started")
    steps = losses(events)
    assert out.status == "done" and out.steps == started["total_steps"] == len(steps) == out.global_step
    first, last = sum(list(steps.values())[:3]) / 3, sum(list(steps.values())[-3:]) / 3
    # Three epochs of 40 records with a high learning rate: the mean of the last steps is clearly lower.
    assert last < first - 0.2, steps
    assert out.eval_loss is not None and out.eval_loss < steps[1] - 0.2
    assert [e for e in events if e["type"] == "eval"]
    step = next(e for e in events if e["type"] == "step")
    assert set(step) >= {"job_id", "step", "total_steps", "global_step", "epoch", "loss", "lr", "grad_norm",
                         "tokens", "tokens_per_sec", "elapsed"}
    assert ckpt.step_dirs(cfg.path("checkpoints") / "j1") == []  # no checkpoint was due


@pytest.mark.gpu
def test_nf4_trains_on_cuda_in_its_compute_dtype(models_dir: Path, tmp_path: Path) -> None:
    """The CUDA path: nf4 weights on the GPU, bf16 compute where supported (fp16 otherwise)."""
    cfg = make_cfg(models_dir, tmp_path, "nf4", epochs_per_file=3)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, device="cuda"))
    path = small_file(tmp_path)
    out, events, lm = run(cfg, Job.for_file("g1", path, "alpaca", sha(path)))
    q = lm.model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    assert q.weight.device.type == "cuda" and q.weight.quant_type == "nf4"
    assert q.compute_dtype == (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    steps = list(losses(events).values())
    assert out.status == "done" and sum(steps[-3:]) / 3 < sum(steps[:3]) / 3 - 0.2, steps


class Crash(Exception):
    """Stands in for a kill: the loop dies between steps, leaving only its checkpoints."""


def crash_after(n: int):  # noqa: ANN201
    """A control callback that lets `n` steps through, then raises Crash (a kill between steps)."""
    calls = {"n": 0}

    def control() -> str:
        calls["n"] += 1
        if calls["n"] > n:
            raise Crash()
        return "continue"

    return control


def test_resume_after_crash_is_exact(models_dir: Path, tmp_path: Path) -> None:
    # dropout > 0 (RNG must be restored) and grad_accum > 1 (position counts micro-batches)
    cfg = make_cfg(models_dir, tmp_path, dropout=0.1, grad_accum_steps=2, checkpoint_every_steps=3)
    path = small_file(tmp_path)
    job = Job.for_file("j2", path, "alpaca", sha(path))
    full, full_events, full_lm = run(cfg, dataclasses.replace(job, job_id="straight"))
    total = full.steps
    assert total >= 8

    calls = {"n": 0}

    def crash_after_5() -> str:
        calls["n"] += 1
        if calls["n"] > 5:  # steps 1..5 ran; the newest checkpoint is step 3
            raise Crash()
        return "continue"

    with pytest.raises(Crash):
        run(cfg, job, control=crash_after_5)
    assert ckpt.latest_step(cfg.path("checkpoints") / "j2") == 3
    resumed, events, lm = run(cfg, job)  # fresh model objects, RNG elsewhere: all state from the checkpoint
    started = next(e for e in events if e["type"] == "started")
    assert started["resumed_from_step"] == 3
    a, b = losses(full_events), losses(events)
    assert sorted(b) == list(range(4, total + 1))
    loss_diff = max(abs(a[s] - b[s]) for s in b)
    weight_diff = lora_max_abs_diff(lora_state(full_lm.model), lora_state(lm.model))
    print(f"resume max abs diff: loss {loss_diff:.3g}, lora {weight_diff:.3g}")
    assert loss_diff <= MAX_RESUME_DIFF and weight_diff <= MAX_RESUME_DIFF
    assert resumed.eval_loss == pytest.approx(full.eval_loss, abs=MAX_RESUME_DIFF)
    # The sample ledger: the resumed run's equals the straight one's (same samples in the same steps), and
    # each epoch consumed every train line of the file once.
    assert resumed.ledger == full.ledger
    expected = train_lines(path, DataFormat.ALPACA, lm.tokenizer, cfg.data, job_seed(cfg.training.seed, job.sha256))
    assert check_ledger(full.ledger, expected, cfg.training.epochs_per_file, total) == []
    assert full.ledger["samples"] == 2 * len(expected) and full.ledger["complete"]


def test_checkpoint_of_an_older_adapter_state_is_not_resumed(models_dir: Path, tmp_path: Path) -> None:
    """A file failed as `crashed` keeps its checkpoints; if other files trained before
    its retry, resuming them would throw away what the adapter learnt meanwhile."""
    cfg = make_cfg(models_dir, tmp_path, checkpoint_every_steps=3)
    path = small_file(tmp_path, n=24)
    job = Job.for_file("j5", path, "alpaca", sha(path))
    calls = {"n": 0}

    def crash_after_4() -> str:
        calls["n"] += 1
        if calls["n"] > 4:
            raise Crash()
        return "continue"

    with pytest.raises(Crash):
        run(cfg, job, control=crash_after_4)
    folder = cfg.path("checkpoints") / "j5"
    assert ckpt.load_latest(folder, job.sha256, start_global_step=0).position.step == 3
    assert ckpt.load_latest(folder, job.sha256, start_global_step=40) is None  # the adapter moved on

    out, events, _ = run(cfg, job, global_step=40)
    started = next(e for e in events if e["type"] == "started")
    steps = [e for e in events if e["type"] == "step"]
    assert started["resumed_from_step"] == 0 and steps[0]["step"] == 1 and steps[0]["global_step"] == 41
    assert out.status == "done" and out.global_step == 40 + out.steps


@pytest.mark.parametrize("verdict", ["stop", "skip"])
def test_control_acts_while_a_file_is_read(models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           verdict: str) -> None:
    """Reading a big file before step 1 takes long: stop and skip must not wait for it."""
    import daemon.train.loop as loop

    monkeypatch.setattr(loop, "PREP_POLL_SECONDS", 0.0)
    cfg = make_cfg(models_dir, tmp_path)
    path = small_file(tmp_path)
    asked: list[int] = []
    out, events, _ = run(cfg, Job.for_file("j6", path, "alpaca", sha(path)), control=lambda: asked.append(1) or verdict)
    assert out.status == ("stopped" if verdict == "stop" else "skipped") and out.steps == 0
    assert asked and not [e for e in events if e["type"] in ("started", "step")]
    assert not (cfg.path("checkpoints") / "j6").exists()


def test_stop_while_a_resume_reads_up_to_its_checkpoint_keeps_it(models_dir: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import daemon.train.loop as loop

    cfg = make_cfg(models_dir, tmp_path, checkpoint_every_steps=3)
    path = small_file(tmp_path)
    job = Job.for_file("j7", path, "alpaca", sha(path))
    first: list[dict] = []
    run(cfg, job, control=after_step(4, first), events=first)
    assert ckpt.latest_step(cfg.path("checkpoints") / "j7") == 4  # the stop saved step 4
    monkeypatch.setattr(loop, "PREP_POLL_SECONDS", 0.0)
    events: list[dict] = []
    # through the plan and eval passes; once `started` is out, the resume reads ahead to step 4: stop there
    control = lambda: "stop" if any(e["type"] == "started" for e in events) else "continue"  # noqa: E731
    lm = load_for_training(cfg, seed=cfg.training.seed)
    out = train_file(lm, cfg, job, global_step=0, ckpt_folder=cfg.path("checkpoints") / "j7",
                     report=lambda m: events.append(m.to_wire()), control=control)
    assert out.status == "stopped" and out.checkpoint_step == 4 and out.steps == 4
    assert [e["resumed_from_step"] for e in events if e["type"] == "started"] == [4]
    assert not [e for e in events if e["type"] == "step"]
    assert ckpt.latest_step(cfg.path("checkpoints") / "j7") == 4


@pytest.mark.parametrize("recorded_through", [1, 6])
def test_a_resume_sends_again_the_steps_the_service_never_recorded(models_dir: Path, tmp_path: Path,
                                                                   recorded_through: int) -> None:
    # Checkpoints every 2 steps; the trainer dies after step 7, and the service (killed too) had recorded only
    # steps 1..recorded_through: a resume from step 6 sends what it misses up to 6, as first reported.
    cfg = make_cfg(models_dir, tmp_path, checkpoint_every_steps=2, keep_checkpoints=2)
    path = small_file(tmp_path, n=24)
    job = Job.for_file("j9", path, "alpaca", sha(path))
    reported: list[dict] = []
    crash_now = after_step(7, reported, verdict="crash")

    def control() -> str:
        if crash_now() == "crash":
            raise Crash
        return "continue"

    with pytest.raises(Crash):
        run(cfg, job, control=control, events=reported)
    folder = cfg.path("checkpoints") / "j9"
    assert ckpt.latest_step(folder) == 6
    first = [e for e in events_of(folder) if e["step"] <= 6]
    assert [e["step"] for e in first] == [1, 2, 3, 4, 5, 6]
    resumed = dataclasses.replace(job, recorded_through=recorded_through)
    out, events, _ = run(cfg, resumed)
    assert out.status == "done"
    again = [e for e in events if e["type"] == "steps_again"]
    if recorded_through >= 6:
        assert again == []
    else:
        assert [m["step"] for m in again[0]["steps"]] == list(range(recorded_through + 1, 7))
        assert again[0]["steps"] == first[recorded_through:]
    # the log of the file now holds each step once: the resumed ones after the kept ones, none twice
    assert [e["step"] for e in events_of(folder)] == list(range(1, out.steps + 1))


def events_of(folder: Path) -> list[dict]:
    return ckpt.read_step_log(folder / ckpt.StepLog.NAME)


def test_stop_checkpoints_and_skip_returns(models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import daemon.train.loop as loop

    cfg = make_cfg(models_dir, tmp_path)
    path = small_file(tmp_path)
    job = Job.for_file("j3", path, "alpaca", sha(path))
    events: list[dict] = []
    out, events, lm = run(cfg, job, control=after_step(2, events), events=events)
    assert out.status == "stopped" and out.steps == 2 and out.checkpoint_step == 2
    assert [e["step"] for e in events if e["type"] == "checkpoint"] == [2]
    # the skip is answered between steps (a skip while the resume reads up to step 2 is another case:
    # test_control_acts_while_a_file_is_read): the loop asks nothing by the clock while reading here
    monkeypatch.setattr(loop, "PREP_POLL_SECONDS", math.inf)
    out, _, _ = run(cfg, job, control=lambda: "skip", lm=lm)
    assert out.status == "skipped" and out.steps == 2  # resumed at 2, skipped before step 3


def test_checkpoint_fallback_prune_and_identity(models_dir: Path, tmp_path: Path) -> None:
    cfg = make_cfg(models_dir, tmp_path, checkpoint_every_steps=2, keep_checkpoints=2)
    path = small_file(tmp_path, n=24)
    job = Job.for_file("j4", path, "alpaca", sha(path))
    events: list[dict] = []
    run(cfg, job, control=after_step(6, events), events=events)
    folder = cfg.path("checkpoints") / "j4"
    assert [p.name for p in ckpt.step_dirs(folder)] == ["step_000006", "step_000004"]  # step_000002 pruned
    (folder / "step_000006" / "optimizer.pt").unlink()  # torn newest folder
    assert ckpt.load_latest(folder, job.sha256).position.step == 4
    (folder / "step_000004" / "state.json").write_text("{not json")
    assert ckpt.load_latest(folder, job.sha256) is None
    shutil.rmtree(folder)
    events = []
    run(cfg, job, control=after_step(2, events), events=events)
    assert ckpt.load_latest(folder, "other-bytes") is None  # a checkpoint of other file bytes is never used
    ckpt.delete_checkpoints(folder)
    assert not folder.exists()


def test_sweep_removes_only_unfinished_checkpoint_folders(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    kept = [root / "job-a" / "step_000004", root / "job-b" / "step_000002", root / "job-b" / "latest.json"]
    temps = [root / "job-a" / ".step_000006.x1.tmp", root / "job-b" / ".step_000004.y2.tmp"]
    for p in kept[:2] + temps:
        p.mkdir(parents=True)
        (p / "state.json").write_text("{}")
    kept[2].write_text("{}")
    assert ckpt.sweep_temp(root) == 2
    assert all(p.exists() for p in kept) and not any(p.exists() for p in temps)
    assert ckpt.sweep_temp(root) == 0


def test_sweep_temp_also_removes_the_old_step_folders_killed_publications_left(tmp_path: Path) -> None:
    """A trainer killed after a step folder's rename, before removing the one it replaced, leaves
    `.step_NNNNNN.old-<pid>` (a full checkpoint); a job failed as crashed is never published again under that
    name, so the next trainer's start removes it (the slow sweep's trainer op 4 left one per job)."""
    job = tmp_path / "checkpoints" / "j1"
    (job / "step_000004").mkdir(parents=True)
    (job / ".step_000004.old-4242").mkdir()
    (job / ".step_000004.old-4242" / "optimizer.pt").write_bytes(b"x" * 100)
    assert ckpt.sweep_temp(tmp_path / "checkpoints") == 1 and [p.name for p in job.iterdir()] == ["step_000004"]


def test_schedule_and_step_budget() -> None:
    tc = TrainingConfig(warmup_steps=2, schedule="cosine", min_lr_ratio=0.1)
    f = lr_factor(tc, total_steps=10)
    assert f(0) == pytest.approx(1 / 3) and f(2) == pytest.approx(1.0) and f(9) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(2, 9))
    assert lr_factor(dataclasses.replace(tc, schedule="constant"), 10)(7) == 1.0
    assert steps_per_epoch(38, 4, 1) == 10 and steps_per_epoch(38, 4, 3) == 4


def test_sweep_removes_checkpoints_of_jobs_the_adapter_already_learnt(tmp_path: Path) -> None:
    """A trainer killed between publishing a file's adapter and deleting its checkpoints: the service
    moves the file to done/ without training it again, so only the next trainer can drop them."""
    root = tmp_path / "checkpoints"
    for job in ("published-job", "job-in-progress"):
        (root / job / "step_000002").mkdir(parents=True)
    assert ckpt.sweep_published(root, {"published-job", "another-one"}) == 1
    assert sorted(p.name for p in root.iterdir()) == ["job-in-progress"]
    assert ckpt.sweep_published(tmp_path / "none", {"x"}) == 0
