"""Live status: `training_status.json`, the snapshot a person or script reads at a glance.

    writer = StatusWriter(cfg.path("status"))
    writer.write(TrainingStatus(status=ServiceStatus.TRAINING, ...))   # atomic replace
    read_status(cfg.path("status"))                                    # dict, or None

Its fields are daemon.schema.TrainingStatus; what grows (per-step metrics, eval
losses, job records, events) is in the history, daemon.history_db.
Standard library only.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from daemon import atomic
from daemon.diskspace import free_bytes
from daemon.schema import TrainingStatus

STATUS_FILE = "training_status.json"
RESERVE_FILE = ".status_reserve"
# A status file is a few KiB (an 80-layer activity block about 4 KB): this is room for many rewrites.
RESERVE_BYTES = 256 * 1024

log = logging.getLogger(__name__)


class StatusWriter:
    """The one writer of `training_status.json`, and of the room kept for it (RESERVE_FILE).

    A disk filled to its last byte by another program would leave the status saying
    "training" for as long as it stays full: the daemon pauses, but cannot say so.
    So a little room is set aside beside the status; once the service has paused
    for a full disk it releases it (`release_reserve()`) and writes the paused
    status there, and the reader learns why training stopped. `ensure_reserve()`
    sets it aside again once space is back.
    """

    def __init__(self, status_dir: str | Path, reserve_bytes: int = RESERVE_BYTES) -> None:
        self.path = Path(status_dir) / STATUS_FILE
        self.reserve = Path(status_dir) / RESERVE_FILE
        self.reserve_bytes = reserve_bytes
        self.released = False  # the room was spent on a held status and is not set aside again yet

    def write(self, status: TrainingStatus, now: float | None = None) -> None:
        status.updated_at = time.time() if now is None else now
        atomic.write_bytes(self.path, (readable_json(status.to_dict()) + "\n").encode("utf-8"), site="status")

    def release_reserve(self) -> bool:
        """Free the room kept for the status (True when there was some to free)."""
        try:
            self.reserve.unlink()
        except FileNotFoundError:
            return False
        atomic.fsync_dir(self.reserve.parent)
        self.released = True
        log.warning("the disk of %s is full: released the %d bytes kept for the status, to write why training "
                    "is held", self.reserve.parent, self.reserve_bytes)
        return True

    def ensure_reserve(self) -> bool:
        """Set the room aside (at start, and once space is back); not on a disk that is nearly full already."""
        if self.reserve_bytes <= 0:
            return False
        try:
            if self.reserve.stat().st_size >= self.reserve_bytes:
                return True
        except FileNotFoundError:
            pass
        if free_bytes(self.reserve.parent) < 4 * self.reserve_bytes:
            return False
        tmp = self.reserve.with_name(self.reserve.name + ".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                try:
                    os.posix_fallocate(fd, 0, self.reserve_bytes)  # real blocks, not a sparse file
                except OSError as e:
                    if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                        raise
                    os.write(fd, bytes(self.reserve_bytes))
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.reserve)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            log.info("no room set aside for the status in %s: %s", self.reserve.parent, e)
            return False
        self.released = False
        return True

    def room_kept(self) -> bool:
        """The room is set aside, or was never spent: True; else it is set aside again now if it fits."""
        return not self.released or self.ensure_reserve()


def readable_json(obj: Any, depth: int = 0, open_depth: int = 3) -> str:
    """JSON with objects opened one key a line down to `open_depth`, and everything deeper
    (every list) on one line: an 80-layer activity block stays a screenful, not 500 lines."""
    if isinstance(obj, dict) and obj and depth < open_depth:
        pad = "  " * (depth + 1)
        body = ",\n".join(f"{pad}{json.dumps(k)}: {readable_json(v, depth + 1, open_depth)}" for k, v in obj.items())
        return "{\n" + body + "\n" + "  " * depth + "}"
    return json.dumps(obj, default=str)


def read_status(status_dir: str | Path) -> dict[str, Any] | None:
    """The last status written, or None when there is none (or it cannot be read)."""
    try:
        return atomic.read_json(Path(status_dir) / STATUS_FILE)
    except (FileNotFoundError, ValueError):
        return None
