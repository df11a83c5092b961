"""The service's handle on the trainer child process.

    child = TrainerProcess(config_path, logs_dir)
    child.start()                 # spawns `python -m daemon.train --config PATH` (or its ranks under torchrun)
    child.connection              # None until the child has connected
    child.send(protocol.Train(job=job).to_wire())   # the supervisor sends typed messages as wire dicts
    for msg in child.receive():   # everything waiting, never blocks
        ...
    child.exited()                # exit code once it is gone, else None

The child connects back over a unix socket (path and auth key in its
environment, see docs/internals.md), so it can also be started under
`torchrun`, where only rank 0 connects. This module never imports torch.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
from multiprocessing.connection import Connection, Listener
from pathlib import Path
from typing import Any

from daemon.config import load_config

log = logging.getLogger(__name__)


def ranks_configured(config_path: Path) -> int:
    """Trainer processes the config asks for over every node (1: a plain child)."""
    dc = load_config(config_path).distributed
    return dc.nproc_per_node * dc.nnodes


SOCKET_NAME = "trainer.sock"
SOCKET_PATH_MAX = 107  # sun_path holds 108 bytes on Linux, the last a NUL


def socket_folder(config_path: Path) -> str:
    """A private folder (0700) for the child's socket, named after the instance and user: `$TMPDIR/traind-<hash>`.

    One name per instance, so a service killed with SIGKILL (which cannot remove its
    folder) leaves one folder that its next start takes over and a clean stop removes,
    rather than a new orphan per kill. Only one service runs per instance (the daemon
    lock). A folder of that name that is not ours (another owner, a symlink, open to
    others) is left alone and a fresh random one is used.
    """
    # short: a unix socket's path must fit 107 bytes ($TMPDIR/traind-<12 hex>/trainer.sock); a $TMPDIR too long
    # for that (a deep per-job or per-test folder) gives way to /tmp rather than a start that fails on bind
    key = f"{os.getuid()}:{Path(config_path).resolve().parent}"
    base = tempfile.gettempdir()
    if len(os.fsencode(os.path.join(base, "traind-" + "0" * 12, SOCKET_NAME))) > SOCKET_PATH_MAX:
        log.warning("$TMPDIR %s is too long for the trainer's socket path (%d bytes at most): using /tmp",
                    base, SOCKET_PATH_MAX)
        base = "/tmp"
    path = os.path.join(base, "traind-" + hashlib.sha256(key.encode()).hexdigest()[:12])
    try:
        os.mkdir(path, 0o700)
        return path
    except FileExistsError:
        st = os.lstat(path)
        if not (stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) == 0o700):
            log.warning("%s exists and is not a private folder of ours; using a fresh one", path)
            return tempfile.mkdtemp(prefix="traind-")
    for name in os.listdir(path):  # a killed predecessor's socket: nobody listens on it any more
        os.unlink(os.path.join(path, name))
    return path


class TrainerProcess:
    def __init__(self, config_path: str | Path, logs_dir: str | Path, wake: Any = None) -> None:
        self.config_path = Path(config_path)
        self.logs_dir = Path(logs_dir)
        self.wake = wake  # callable run when the child connects, to wake the service loop
        self.proc: subprocess.Popen | None = None
        self.connection: Connection | None = None
        self._listener: Listener | None = None
        self._sockdir: str | None = None
        self._stderr = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self) -> None:
        self._sockdir = socket_folder(self.config_path)
        address = os.path.join(self._sockdir, SOCKET_NAME)
        authkey = secrets.token_bytes(32)
        self._listener = Listener(address, family="AF_UNIX", authkey=authkey)
        env = dict(os.environ, TRAIND_CONNECT=address, TRAIND_AUTHKEY=authkey.hex(), HF_HUB_OFFLINE="1",
                   TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_PROGRESS_BARS="1", TOKENIZERS_PARALLELISM="false")
        # Fault injection (daemon/atomic.py) is armed per process by tests: the child's comes from TRAIND_TRAINER_*.
        for hook, trainer_hook in (("TRAIND_CRASH_AFTER_OP", "TRAIND_TRAINER_CRASH_AFTER_OP"),
                                   ("TRAIND_ENOSPC_AT", "TRAIND_TRAINER_ENOSPC_AT")):
            env.pop(hook, None)
            if os.environ.get(trainer_hook):
                env[hook] = os.environ[trainer_hook]
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        # The child's own log is logs/trainer_*.log; this file only catches what
        # bypasses logging (a native crash, a library writing to stderr).
        self._stderr = open(self.logs_dir / "trainer_stderr.log", "ab")
        cmd = [sys.executable, "-m", "daemon.train", "--config", str(self.config_path)]
        if ranks_configured(self.config_path) > 1:  # several ranks: torch's launcher runs them (daemon.train.launch)
            cmd = [sys.executable, "-m", "daemon.train.launch", "--config", str(self.config_path)]
        self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=self._stderr,
                                     stderr=self._stderr, start_new_session=True)
        log.info("trainer child started, pid %d", self.proc.pid)
        threading.Thread(target=self._accept, name="trainer-accept", daemon=True).start()

    def _accept(self) -> None:
        listener = self._listener
        try:
            conn = listener.accept()
        except Exception as e:  # closed because the child died first, or a bad handshake
            log.debug("trainer accept ended: %s", e)
            return
        self.connection = conn
        if self.wake:
            self.wake()

    def send(self, msg: dict[str, Any]) -> bool:
        """Send a message; False when the child is not connected or gone."""
        if self.connection is None:
            return False
        try:
            self.connection.send(msg)
            return True
        except (OSError, EOFError, ValueError):
            return False

    def receive(self) -> list[dict[str, Any]]:
        """Every message waiting, without blocking (empty once the child is gone)."""
        out = []
        conn = self.connection
        if conn is None:
            return out
        try:
            while conn.poll():
                out.append(conn.recv())
        except (EOFError, OSError):
            # The child closed its end (it is exiting or dead). A closed socket stays
            # "readable" for ever, so drop it, or the service loop would spin on it.
            conn.close()
            self.connection = None
        return out

    def exited(self) -> int | None:
        """The exit code once the process is gone (negative: killed by that signal)."""
        return None if self.proc is None else self.proc.poll()

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout) if self.proc else None
        except subprocess.TimeoutExpired:
            return None

    def close(self) -> None:
        """Release the socket, listener and log file (after the process is gone)."""
        if self.connection is None and self._listener is not None:
            # Wake the accept thread: on Linux, shutting down a listening socket
            # makes a blocked accept() fail, where close() alone would not.
            try:
                self._listener._listener._socket.shutdown(socket.SHUT_RDWR)
            except (AttributeError, OSError):
                pass
        for closer in (self.connection, self._listener, self._stderr):
            try:
                if closer is not None:
                    closer.close()
            except OSError:
                pass
        if self._sockdir:
            shutil.rmtree(self._sockdir, ignore_errors=True)
        self.connection = self._listener = self._stderr = None
