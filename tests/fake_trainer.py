"""A fake trainer child that speaks daemon.protocol in the test's own process, and a service built on it.

    svc, trainer = service_with_fake(tmp_path)       # the real Service, started, its trainer this fake
    trainer.ready()                                  # what the trainer says, typed
    svc.tick()                                       # one turn of the real loop
    trainer.received                                 # what the service sent it, typed
    trainer.die(-9)                                  # the child process "exits"

The service's `spawn` seam (daemon.service.loop.Service, daemon.service.supervisor)
makes this instead of the real process: its logic then runs in milliseconds,
with a clock the test moves. The real-process tests (tests/test_*_e2e.py) prove
the seam itself: socket, pickling, signals, a real trainer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from daemon import protocol
from daemon.config import load_config
from bench.harness import write_instance

NOW = 1_800_000_000.0
FAST = {"intake": {"settle_seconds": 0.0, "scan_interval_seconds": 0.5},
        "service": {"status_interval_seconds": 0.5, "restart_backoff_seconds": 2.0, "min_free_bytes": 0}}


class FakeTrainer:
    """Stands where daemon.service.child.TrainerProcess stands: started, connected at once, talks in wire dicts
    (what the real connection pickles), exits when told to. `made` keeps every one the service spawned."""

    made: list[FakeTrainer] = []
    next_pid = 90_000

    def __init__(self, config_path: Path, logs_dir: Path, wake: Callable[[], None] | None = None) -> None:
        self.config_path, self.logs_dir, self.wake = config_path, logs_dir, wake
        self.received: list[protocol.Message] = []
        self.outbox: list[Any] = []
        self.code: int | None = None
        self.connection: object | None = None
        self.closed = False
        FakeTrainer.next_pid += 1
        self.pid = FakeTrainer.next_pid
        FakeTrainer.made.append(self)

    # -- what TrainerProcess offers the supervisor ---------------------------------------
    def start(self) -> None:
        self.connection = object()  # connected at once

    def send(self, wire: dict[str, Any]) -> bool:
        if self.code is not None or self.connection is None:
            return False
        msg = protocol.decode(wire, protocol.TO_TRAINER)  # what the real trainer would decode
        self.received.append(msg)
        if isinstance(msg, protocol.Shutdown):
            self.code = 0
        return True

    def receive(self) -> list[Any]:
        out, self.outbox = self.outbox, []
        return out

    def exited(self) -> int | None:
        return self.code

    def kill(self) -> None:
        if self.code is None:
            self.code = -9

    def wait(self, timeout: float) -> int | None:
        return self.code

    def close(self) -> None:
        self.closed = True

    # -- what the test makes it say ----------------------------------------------------------
    def say(self, *msgs: protocol.Message | dict) -> None:
        self.outbox += [m.to_wire() if isinstance(m, protocol.Message) else m for m in msgs]

    def ready(self, **over: Any) -> None:
        fields = dict(device="cpu", compute_dtype="float32", quantization="none", base_model="embedded:tiny-qwen3",
                      adapter_version=None, trainable_params=10, total_params=100, load_seconds=0.1)
        self.say(protocol.Ready(**{**fields, **over}))

    def die(self, code: int = -9) -> None:
        self.code = code

    def sent(self, kind: type[protocol.Message]) -> list[Any]:
        """What the service sent of one type, in order."""
        return [m for m in self.received if isinstance(m, kind)]

    def train_order(self) -> protocol.Job:
        (order,) = self.sent(protocol.Train)[-1:]
        return order.job


class Clock:
    def __init__(self, t: float = NOW) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> float:
        self.t += seconds
        return self.t


def service_with_fake(tmp_path: Path, clock: Clock | None = None, **overrides: Any) -> tuple[Any, FakeTrainer]:
    """The real Service on a fresh instance, started (history, folders, the inbox watched), with a FakeTrainer
    as its child; not running its loop: the test calls `tick()`. Close it with `stop_service`."""
    from daemon.service import Service

    def merge(a: dict, b: dict) -> dict:
        return {k: merge(a.get(k, {}), v) if isinstance(v, dict) else v for k, v in {**a, **b}.items()}

    path = write_instance(tmp_path / "inst", **merge(FAST, overrides))
    FakeTrainer.made.clear()
    svc = Service(load_config(path), path, clock=clock or Clock(), spawn=FakeTrainer)
    svc.start()
    return svc, FakeTrainer.made[-1]


def stop_service(svc: Any) -> None:
    svc._shutdown()


def drop(svc: Any, name: str, text: str, sub: str = "") -> Path:
    """A file into the inbox as a careful producer writes it (the scanner is told it was renamed in)."""
    folder = svc.cfg.path("inbox") / sub
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    tmp = path.with_name(name + ".part")
    tmp.write_text(text, encoding="utf-8")
    tmp.rename(path)
    svc.scanner.renamed_in(path)
    return path
