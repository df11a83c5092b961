"""Supervision of the trainer child: start, restart with backoff, exits, talk.

    sup = Supervisor(config_path, logs_dir, wake, backoff_seconds=2.0)
    sup.start(now)
    messages, exit_code = sup.poll(now)     # typed messages (daemon.protocol); never blocks; exit_code once gone
    sup.send(protocol.Pause())
    if sup.due(now): sup.start(now)         # after a crash, once the backoff has passed

The service decides what a message or an exit means for the queue; this
module only knows the process: whether it is starting, ready, busy or
exiting, whether it was told to pause and whether it says it holds, what it
says while it loads, how often it failed in a row and what that means for
the status, and the messages owed to the next one that comes up. The
trainer's messages about itself (`loading`, `paused`, `resumed`, `stopped`,
`config_refused`) are taken here (`on_message`); the rest are the service's.
A `done`, `failed` or `skipped` that could not be read at all (not the
protocol's) is remembered, so that a file does not wait for ever for an
answer the service will never read (`dropped_job_end`).

`spawn` makes the child: daemon.service.child.TrainerProcess (the real
process), or a fake that speaks the protocol in the same process, so the
service's loop is tested in milliseconds (tests/fake_trainer.py).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Callable

from daemon import protocol
from daemon.service.child import TrainerProcess
from daemon.states import TrainerState

log = logging.getLogger(__name__)

MAX_BACKOFF_SECONDS = 60.0
START_FAILURES_FOR_ERROR = 3  # crashes in a row before a "ready": the trainer cannot start


class Supervisor:
    def __init__(self, config_path: Path, logs_dir: Path, wake: Callable[[], None], backoff_seconds: float,
                 spawn: Callable[..., Any] = TrainerProcess) -> None:
        self.spawn = spawn
        self.config_path = config_path
        self.logs_dir = logs_dir
        self.wake = wake
        self.backoff_seconds = backoff_seconds
        self.child: TrainerProcess | None = None
        self.state = TrainerState.DOWN
        self.paused = False  # told to pause and not yet to resume (a pause outlives a file)
        self.crashes_in_a_row = 0  # reset by a step: a trainer that trains again is healthy
        self.start_failures = 0  # crashes before "ready" in a row: reset by "ready"
        self.restart_at = 0.0
        self.refusal: list[str] | None = None  # why the config cannot run here, as the child said
        self.holds = False  # the child said it holds between steps (paused, disk_full), until it says resumed
        self.loading: str | None = None  # what it said it is doing before `ready` (converting a GGUF base)
        self.said: str | None = None  # what its last unexpected exit means for the status, until the next ready
        self.owed: list[protocol.Message] = []  # sent at the next ready (skips of files left by a dead child)
        self._unread_ends: set[str] = set()  # job ids of `done`/`failed`/`skipped` that could not be decoded

    # -- process ---------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self.child.pid if self.child else None

    @property
    def connected(self) -> bool:
        return self.child is not None and self.child.connection is not None

    def start(self, now: float) -> None:
        self.child = self.spawn(self.config_path, self.logs_dir, wake=self.wake)
        self.child.start()
        self.state = TrainerState.STARTING
        self.paused = self.holds = False
        self.loading = None

    def due(self, now: float) -> bool:
        return self.state is TrainerState.DOWN and now >= self.restart_at

    def send(self, msg: protocol.Message) -> bool:
        return self.child is not None and self.child.send(msg.to_wire())

    def waitable(self) -> Any:
        return self.child.connection if self.connected else None

    def wait_timeout(self) -> float | None:
        """A short wait while the child may exit without a word (before it connects, after EOF)."""
        if self.child is not None and not self.connected:
            return 0.2
        return None

    def poll(self, now: float) -> tuple[list[protocol.Message], int | None]:
        """Messages waiting, and the exit code if the child is gone (its last words included). One that is not
        the protocol's is logged and left out: a trainer of another version, or a bug, never stops the loop."""
        if self.child is None:
            return [], None
        raw = self.child.receive()
        code = self.child.exited()
        if code is not None:
            raw += self.child.receive()
            self.child.close()
            self.child = None
        messages = []
        for r in raw:
            try:
                messages.append(protocol.decode(r, protocol.TO_SERVICE))
            except protocol.ProtocolError as e:
                log.error("ignoring a message from the trainer: %s", e)
                if isinstance(r, dict) and r.get("type") in ("done", "failed", "skipped") and r.get("job_id"):
                    self._unread_ends.add(str(r["job_id"]))
        if code is not None:
            self.holds = False
        return messages, code

    def job_over(self) -> None:
        """The file it was training has ended: it is free for the next one."""
        if self.state is TrainerState.BUSY:
            self.state = TrainerState.READY

    def dropped_job_end(self, job: Any) -> bool:
        """Whether the end of `job` (the file in training, or None) came in a message that could not be read: then
        only the crash path can end it (the trainer is ended, and the file resumes or is found published)."""
        return job is not None and job.job_id in self._unread_ends and self.child is not None

    def on_message(self, msg: protocol.Message) -> bool:
        """Take a message about the trainer itself; False for one that is the service's (about files, lineage)."""
        match msg:
            case protocol.Loading():
                self.loading = msg.detail
            case protocol.Paused():
                self.holds = True
            case protocol.Resumed():
                self.holds = False
            case protocol.DiskFullReport():  # it paused itself: the resume that ends the hold goes to it
                self.paused = self.holds = True
                return False  # ...and the hold is the service's
            case protocol.Stopped():
                self.state = TrainerState.EXITING
                return False  # the service records where the file stopped
            case protocol.ConfigRefused():
                self.on_refused(msg.problems)
                return False  # the service says why
            case _:
                return False
        return True

    # -- states ----------------------------------------------------------------------
    def on_ready(self) -> None:
        if self.state is not TrainerState.EXITING:
            self.state = TrainerState.READY
        self.start_failures = 0
        self.said = self.loading = None
        owed, self.owed = self.owed, []
        for msg in owed:
            self.send(msg)

    def send_when_ready(self, msg: protocol.Message) -> None:
        """Send `msg` now if the child is ready (idle), else at the next `ready` (a child that died owes it)."""
        if not (self.state is TrainerState.READY and self.send(msg)):
            self.owed.append(msg)

    def on_refused(self, problems: list[str]) -> None:
        """The child said the config cannot run here (daemon/train/preflight.py): it leaves, and no restart
        would help until the config changes, which takes a restart of the daemon."""
        self.refusal = list(problems)
        self.state = TrainerState.REFUSED

    def on_step(self) -> None:
        self.crashes_in_a_row = 0

    def crashed(self, now: float, before_ready: bool, how: str) -> float:
        """Count an unexpected exit (`how`: "signal 9", "exit code 1"); returns the backoff before the restart,
        and `said` is what the status says of it until the next ready."""
        self.state = TrainerState.DOWN
        self.crashes_in_a_row += 1
        if before_ready:
            self.start_failures += 1
        backoff = min(self.backoff_seconds * 2 ** (self.crashes_in_a_row - 1), MAX_BACKOFF_SECONDS)
        self.restart_at = now + backoff
        self.said = (f"the trainer cannot start; retrying in {backoff:.0f} s" if self.cannot_start
                     else f"trainer restarting ({how})")
        return backoff

    @property
    def cannot_start(self) -> bool:
        return self.start_failures >= START_FAILURES_FOR_ERROR

    def pause(self) -> None:
        if not self.paused and self.send(protocol.Pause()):
            self.paused = True

    def resume(self) -> None:
        if self.paused and self.send(protocol.Resume()):
            self.paused = False

    def exit(self) -> None:
        """Ask an idle child to leave (or kill one still loading: it has nothing to save)."""
        if self.child is None:
            return
        if not self.connected:
            self.child.kill()
        else:
            self.send(protocol.Shutdown())
        self.state = TrainerState.EXITING

    def kill(self) -> None:
        if self.child is not None:
            self.child.kill()

    def close(self, timeout: float = 10.0) -> None:
        """At service exit: shut the child down, killing it if it does not go in time."""
        if self.child is None:
            return
        if self.child.exited() is None:
            self.send(protocol.Shutdown())
            if self.child.wait(timeout) is None:
                self.child.kill()
        self.child.close()
        self.child = None

    # -- diagnosis --------------------------------------------------------------------
    def last_error_hint(self) -> str:
        """The trainer's last logged error, whole (a traceback's final exception, every line of it), or the last
        error line it wrote to stderr, for the status and the events; the traceback itself stays in the log."""
        logs = sorted(self.logs_dir.glob("trainer_2*.log"))
        if logs and (error := last_logged_error(logs[-1])):
            return error
        try:
            lines = (self.logs_dir / "trainer_stderr.log").read_text(errors="replace").splitlines()[-200:]
        except OSError:
            lines = []
        for line in reversed(lines):
            if re.search(r"\b(ERROR|CRITICAL)\b|Error:|Exception:", line):
                return _capped(line.strip())
        return "see logs/trainer_*.log"


RECORD_START = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (\w+)\s+\d+ \S+: ")  # daemon.logs.FORMAT
MAX_ERROR_CHARS = 4000  # the status stays small; past this the log has the rest


def last_logged_error(path: Path, tail_bytes: int = 1 << 20) -> str | None:
    """The last ERROR/CRITICAL record of a daemon.logs log: its exception (type and whole message) when it
    carries a traceback, else its message; None when the tail of the file has none."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - tail_bytes))
            lines = f.read().decode("utf-8", errors="replace").splitlines()
    except OSError:
        return None
    start = next((i for i in range(len(lines) - 1, -1, -1)
                  if (m := RECORD_START.match(lines[i])) and m.group(1) in ("ERROR", "CRITICAL")), None)
    if start is None:
        return None
    end = next((j for j in range(start + 1, len(lines)) if RECORD_START.match(lines[j])), len(lines))
    record = lines[start:end]
    frames = [i for i, line in enumerate(record) if line.startswith('  File "')]
    if not frames:
        return _capped("\n".join([RECORD_START.sub("", record[0], count=1), *record[1:]]).strip())
    # after the last frame: its indented source lines (and ^^^ markers), then the exception, every line of it
    rest = record[frames[-1] + 1:]
    while rest and rest[0].startswith("    "):
        rest = rest[1:]
    return _capped("\n".join(rest).strip()) or None


def _capped(text: str) -> str:
    if len(text) <= MAX_ERROR_CHARS:
        return text
    return text[:MAX_ERROR_CHARS] + f"... ({len(text) - MAX_ERROR_CHARS} more characters in the trainer log)"
