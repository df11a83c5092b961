"""Process set-up of the trainer child: dies with its parent, offline, CPU threads, lock, connection.

    from daemon.train import process
    process.die_with_parent()
    process.ignore_group_signals()                        # a plain child; ranks under torchrun are torch's
    process.quiet_hugging_face()
    fd = process.acquire_lock(cfg.path("checkpoints") / ".trainer.lock")
    conn = process.connect()                              # TRAIND_CONNECT / TRAIND_AUTHKEY from the service

Nothing here knows about training; daemon.train.worker uses it at start.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import warnings
from multiprocessing.connection import Client, Connection
from pathlib import Path

from daemon import lock
from daemon.errors import TraindError

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
LOCK_WAIT_SECONDS = 60.0  # a crashed predecessor may still be dying (SIGKILL of a big CUDA process takes seconds)


# ---------------------------------------------------------------- process set-up


def die_with_parent() -> None:
    """Ask Linux to SIGKILL us when the parent dies (the service treats that as a crash)."""
    parent = os.getppid()
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def ignore_group_signals() -> None:
    """The service owns this process's life (rq's work-horse policy): it says `stop` over the pipe and waits
    for the checkpoint, or SIGKILLs after service.stop_timeout_seconds; PDEATHSIG ends us if it dies. A
    SIGTERM or SIGINT meant for the daemon as a whole (systemd's control-group stop, Ctrl-C in a terminal
    whose group we share) must not kill us before that checkpoint, so both are ignored here."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


def quiet_hugging_face() -> None:
    """No hub access and no progress bars (they would land in the stderr log)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_warning()
    logging.captureWarnings(True)
    # bitsandbytes offers CPU kernels fetched from the hub by the `kernels` package: that is a
    # download at run time, which traind never does, so its warning at every start is noise.
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
        lambda r: "kernels" not in r.getMessage())
    # peft reads a transformers 5 alias that warns (not traind's call to change).
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def acquire_lock(path: Path, wait: float = LOCK_WAIT_SECONDS) -> int:
    """Hold a kernel lock on `path` so two trainers never write the same checkpoints; returns the fd."""
    fd = lock.take(path, wait, poll=0.2)
    if fd is None:
        raise TraindError(f"another trainer holds {path} for more than {wait:.0f} s; is a second daemon running?")
    return fd


def connect() -> Connection:
    """Connect to the service as docs/internals.md says (address and key from the environment)."""
    address = os.environ["TRAIND_CONNECT"]
    if address.startswith("@"):
        address = "\0" + address[1:]
    return Client(address, family="AF_UNIX", authkey=bytes.fromhex(os.environ["TRAIND_AUTHKEY"]))
