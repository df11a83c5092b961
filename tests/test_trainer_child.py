"""The trainer child as a real subprocess, driven over a real multiprocessing connection.

Two children share one session: the first runs the life of an adapter (two files,
an already-trained file, pause/resume/skip, failures, stop); the second is
SIGKILLed after a checkpoint and a fresh one resumes the file exactly.

`models_dir` (conftest) builds the embedded tiny model once per session.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection, Listener
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from daemon import protocol  # noqa: E402
from daemon.config import load_config  # noqa: E402
from daemon.errors import TraindError  # noqa: E402
from daemon.train.loop import Job, train_file  # noqa: E402
from daemon.train.model import load_adapter, load_for_training, lora_max_abs_diff, lora_state  # noqa: E402
from daemon.train.process import acquire_lock  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
TIMEOUT = 90.0  # a cold child start (torch + transformers import, model load) on 2 busy cores
MAX_RESUME_DIFF = 1e-5


@pytest.fixture(autouse=True, scope="module")
def one_thread():  # noqa: ANN201
    """One intra-op thread: on 2 shared cores, 2 OpenMP threads spin-wait on each other (10-50x slower steps)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)



def write_config(root: Path, models: Path, **training: Any) -> Path:
    # cpu_threads 1, as one_thread: steady on shared cores, same numbers as this process
    tc = {"micro_batch_size": 4, "learning_rate": 0.01, "warmup_steps": 2, "epochs_per_file": 1,
          "checkpoint_every_steps": 1000, "seed": 5, "cpu_threads": 1, **training}
    dropout = tc.pop("dropout", 0.0)
    raw = {"base_model": "embedded:tiny-qwen3", "paths": {"models": str(models)},
           "data": {"max_length": 64, "eval_fraction": 0.1, "eval_max_examples": 8},
           "model": {"quantization": "nf4", "device": "cpu"},
           "lora": {"r": 4, "alpha": 8, "dropout": dropout}, "training": tc}
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(raw))
    return root / "config.json"


def data_file(root: Path, name: str, n: int, src: str = "alpaca.jsonl") -> tuple[Path, str]:
    lines = (EXAMPLES / src).read_text(encoding="utf-8").splitlines()[:n]
    path = root / "processing" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


class Child:
    """A real `python -m daemon.train` with the service's end of the connection."""

    def __init__(self, config: Path) -> None:
        key = secrets.token_bytes(16)
        name = f"traind-test-{os.getpid()}-{secrets.token_hex(4)}"
        self.listener = Listener("\0" + name, family="AF_UNIX", authkey=key)
        env = dict(os.environ, TRAIND_CONNECT="@" + name, TRAIND_AUTHKEY=key.hex(), HF_HUB_OFFLINE="1")
        self.stderr = open(config.parent / "child_stderr.log", "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "daemon.train", "--config", str(config)],
                                     cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=self.stderr, stderr=self.stderr)
        self.conn = self._accept()
        self.seen: list[dict] = []

    def _accept(self) -> Connection:
        box: list[Connection] = []
        t = threading.Thread(target=lambda: box.append(self.listener.accept()), daemon=True)
        t.start()
        t.join(TIMEOUT)
        if not box:
            self.proc.kill()
            raise AssertionError("the trainer child never connected")
        return box[0]

    def send(self, msg: protocol.Message) -> None:
        self.conn.send(msg.to_wire())

    def until(self, kind: str, timeout: float = TIMEOUT) -> list[dict]:
        """Messages up to and including the first of type `kind`."""
        out, deadline = [], time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.conn.poll(0.1):
                msg = self.conn.recv()
                out.append(msg)
                self.seen.append(msg)
                if msg["type"] == kind:
                    return out
            elif self.proc.poll() is not None:
                break
        raise AssertionError(f"no {kind!r} (child exit {self.proc.poll()}); got {[m['type'] for m in out]}")

    def drain(self, wait: float) -> list[dict]:
        out = []
        while self.conn.poll(wait):
            out.append(self.conn.recv())
        return out

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self.conn.close()
        self.listener.close()
        self.stderr.close()


def train_msg(job_id: str, path: Path, sha: str, fmt: str = "alpaca") -> dict:
    """A `train` message as the service sends it (daemon.protocol, on the wire)."""
    return protocol.Train(job=protocol.Job(job_id, str(path), path.name, sha, fmt, 0)).to_wire()


def adapter_weights(root: Path, version: int) -> dict:
    from safetensors.torch import load_file

    return load_file(str(root / "adapters" / f"v{version:04d}" / "adapter_model.safetensors"))


def manifest(root: Path, version: int) -> dict:
    return json.loads((root / "adapters" / f"v{version:04d}" / "manifest.json").read_text())


def test_child_life_of_an_adapter(models_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "inst"
    config = write_config(root, models_dir)
    a, sha_a = data_file(root, "a.jsonl", 40)
    b, sha_b = data_file(root, "b.jsonl", 40, "text.jsonl")
    long_, sha_long = data_file(root, "long.jsonl", 240, "chat.jsonl")
    child = Child(config)
    try:
        ready = child.until("ready")[-1]
        assert ready["adapter_version"] is None and ready["quantization"] == "nf4" and ready["device"] == "cpu"
        assert 0 < ready["trainable_params"] < ready["total_params"]
        # the speed levers' start report crosses the process boundary as plain data (daemon/train/levers.py)
        assert ready["levers"]["fused_lora"]["state"] == "on" and ready["levers"]["packed_rows"]["state"] == "on"
        assert ready["levers"]["thread_governor"] == {"state": "not_used",
                                                      "text": "thread governor not used (training.cpu_threads = 1)"}

        # two files -> one adapter, versions 1 and 2
        child.conn.send(train_msg("j-a", a, sha_a))
        done = child.until("done")[-1]
        assert done["adapter_version"] == 1 and not done["already_trained"] and done["steps"] > 0
        child.conn.send(train_msg("j-b", b, sha_b, "text"))
        done = child.until("done")[-1]
        assert done["adapter_version"] == 2
        m2 = manifest(root, 2)
        assert m2["parent_version"] == 1 and m2["trained_jobs"] == ["j-a", "j-b"] and m2["sha256"] == sha_b
        assert json.loads((root / "adapters" / "current.json").read_text()) == {"version": 2, "path": "v0002"}
        assert not (root / "checkpoints" / "j-a").exists()

        # already trained: answered without training
        child.conn.send(train_msg("j-a", a, sha_a))
        msgs = child.until("done")
        assert [m["type"] for m in msgs] == ["done"] and msgs[0]["already_trained"] and msgs[0]["adapter_version"] == 2

        # pause holds between steps, resume continues, skip restores (checked by the next job below)
        child.conn.send(train_msg("j-long", long_, sha_long, "chat"))
        child.until("step")
        child.send(protocol.Pause())
        paused = child.until("paused")
        assert paused[-1]["job_id"] == "j-long"
        assert child.drain(1.0) == []  # nothing trains while paused
        child.send(protocol.Resume())
        child.until("resumed")
        child.until("step")
        child.send(protocol.Skip(job_id="j-long"))
        skipped = child.until("skipped")[-1]
        assert skipped["steps_discarded"] >= 2 and not (root / "checkpoints" / "j-long").exists()

        # failures answer `failed` and the child serves the next job
        child.conn.send(train_msg("j-missing", root / "processing" / "nope.jsonl", "0" * 64))
        failed = child.until("failed")[-1]
        assert failed["reason"] == "training_error" and "Traceback" in failed["traceback"]
        child.conn.send(train_msg("j-wrongfmt", a, sha_a, "chat"))
        assert child.until("failed")[-1]["reason"] == "invalid_data"
        child.conn.send(train_msg("j-a2", a, sha_a))
        assert child.until("done")[-1]["adapter_version"] == 3

        # stop checkpoints the job in progress and exits 0
        child.conn.send(train_msg("j-stop", long_, sha_long, "chat"))
        child.until("step")
        child.send(protocol.Stop())
        stopped = child.until("stopped")[-1]
        assert stopped["job_id"] == "j-stop" and stopped["checkpoint_step"] >= 1
        assert child.proc.wait(30) == 0
        latest = json.loads((root / "checkpoints" / "j-stop" / "latest.json").read_text())
        assert latest["step"] == stopped["checkpoint_step"]
    finally:
        child.close()
    logs = list((root / "logs").glob("trainer_*.log"))
    assert logs and "torch CPU threads: 1 (training.cpu_threads)" in logs[0].read_text()
    assert "speed levers on tiny-qwen3" in logs[0].read_text()

    # v3 = v2 + file a, trained in a process that had skipped j-long: the skip restored v2 exactly,
    # and a job started after other jobs trains as one started in a fresh model.
    cfg = load_config(config)
    lm = load_for_training(cfg, seed=cfg.training.seed)
    load_adapter(lm.model, root / "adapters" / "v0002")
    train_file(lm, cfg, Job.for_file("j-a2", a, "alpaca", sha_a), global_step=0, ckpt_folder=tmp_path / "ck",
               report=lambda e: None, control=lambda: "continue")
    diff = lora_max_abs_diff(lora_state(lm.model), adapter_weights(root, 3))
    print(f"skip-restore + same-process vs fresh max abs lora diff: {diff:.3g}")
    assert diff <= MAX_RESUME_DIFF


@pytest.mark.slow  # the default run has the same through the daemon (test_resume_e2e: kill -9 of the trainer child)
def test_child_sigkill_then_fresh_child_resumes_exactly(models_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "inst"
    config = write_config(root, models_dir, dropout=0.1, grad_accum_steps=2, checkpoint_every_steps=3,
                          epochs_per_file=2, keep_checkpoints=2)
    path, sha = data_file(root, "k.jsonl", 80)
    child = Child(config)
    try:
        child.until("ready")
        child.conn.send(train_msg("j-k", path, sha))
        child.until("checkpoint")
        os.kill(child.proc.pid, signal.SIGKILL)
        assert child.proc.wait(10) == -signal.SIGKILL
    finally:
        child.close()
    assert not (root / "adapters" / "current.json").exists()

    child = Child(config)
    try:
        child.until("ready")
        child.conn.send(train_msg("j-k", path, sha))
        msgs = child.until("done")
    finally:
        child.close()
    resumed_from = next(m for m in msgs if m["type"] == "started")["resumed_from_step"]
    assert resumed_from >= 3 and resumed_from % 3 == 0
    resumed = {m["step"]: m["loss"] for m in msgs if m["type"] == "step"}

    cfg = load_config(config)  # the uninterrupted run, in this process
    lm = load_for_training(cfg, seed=cfg.training.seed)
    events: list[dict] = []
    train_file(lm, cfg, Job.for_file("straight", path, "alpaca", sha), global_step=0, ckpt_folder=tmp_path / "ck",
               report=lambda m: events.append(m.to_wire()), control=lambda: "continue")
    straight = {e["step"]: e["loss"] for e in events if e["type"] == "step"}
    assert sorted(resumed) == [s for s in sorted(straight) if s > resumed_from]
    loss_diff = max(abs(straight[s] - resumed[s]) for s in resumed)
    weight_diff = lora_max_abs_diff(lora_state(lm.model), adapter_weights(root, 1))
    print(f"SIGKILL resume from step {resumed_from}: max abs diff loss {loss_diff:.3g}, lora {weight_diff:.3g}")
    assert loss_diff <= MAX_RESUME_DIFF and weight_diff <= MAX_RESUME_DIFF


def test_trainer_lock_waits_then_refuses(tmp_path: Path) -> None:
    fd = acquire_lock(tmp_path / ".trainer.lock")
    try:
        t0 = time.monotonic()
        with pytest.raises(TraindError, match="another trainer"):
            acquire_lock(tmp_path / ".trainer.lock", wait=0.5)
        assert time.monotonic() - t0 >= 0.5
    finally:
        os.close(fd)
    os.close(acquire_lock(tmp_path / ".trainer.lock", wait=0.5))  # free again once released


def test_cpu_threads_auto_takes_every_core() -> None:
    from daemon.train.threads import cpu_thread_count

    assert cpu_thread_count(3) == 3
    assert cpu_thread_count(0) == len(os.sched_getaffinity(0))
