"""Logging set up once, in entry points: daily files `logs/<prefix>_YYYYMMDD.log`.

    setup_logging(cfg.path("logs"), "daemon", "INFO", also_stderr=True)
    follower = LogFollower(cfg.path("logs"), "daemon")      # trainctl logs: the tail, then what is appended
"""

from __future__ import annotations

import codecs
import logging
import os
import sys
import time
from pathlib import Path
from typing import BinaryIO, Callable

from daemon.atomic import inject_enospc

FORMAT = "%(asctime)s %(levelname)-7s %(process)d %(name)s: %(message)s"

# Log records dropped by this process (a full disk), and the last error: the service reads them
# each tick (a log that cannot be written is a full disk like any other write).
DROPS: dict = {"count": 0, "error": "", "path": ""}


class DailyFileHandler(logging.Handler):
    """Appends to `<dir>/<prefix>_YYYYMMDD.log` (UTC), switching file when the day changes."""

    def __init__(self, directory: str | Path, prefix: str, keep_days: int = 0, max_bytes: int = 0) -> None:
        super().__init__()
        self.directory = Path(directory)
        self.prefix = prefix
        self.keep_days, self.max_bytes = keep_days, max_bytes
        self._day = ""
        self._stream = None
        self.dropped = 0  # records lost to a failed write (a full disk) since the last one that went through

    def current_path(self, t: float | None = None) -> Path:
        day = time.strftime("%Y%m%d", time.gmtime(time.time() if t is None else t))
        return self.directory / f"{self.prefix}_{day}.log"

    def emit(self, record: logging.LogRecord) -> None:
        try:
            day = time.strftime("%Y%m%d", time.gmtime(record.created))
            if day != self._day or self._stream is None:
                if self._stream is not None:
                    self._stream.close()
                self.directory.mkdir(parents=True, exist_ok=True)
                self._stream = open(self.current_path(record.created), "a", encoding="utf-8")
                self._day = day
                prune_logs(self.directory, self.prefix, self.keep_days, self.max_bytes, self.current_path(record.created))
            text = self.format(record) + "\n"
            if self.dropped:
                text = f"{self.format(_dropped_record(record, self.dropped))}\n{text}"
            inject_enospc("log", self.current_path(record.created))
            self._stream.write(text)
            self._stream.flush()
            self.dropped = 0
        except OSError as e:  # a full disk: drop the record, count it, say so once, never raise
            self._drop(e)
        except Exception:  # logging must never take the daemon down
            self.handleError(record)

    def _drop(self, e: OSError) -> None:
        """Forget the stream (its buffer holds a torn line); the next record opens the file again."""
        stream, self._stream = self._stream, None
        if stream is not None:
            try:
                stream.close()
            except OSError:
                pass  # the unwritten buffer goes with it
        DROPS.update(count=DROPS["count"] + 1, error=e.strerror or str(e), path=str(self.directory))
        if self.dropped == 0:
            try:
                sys.stderr.write(f"traind: cannot write {self.prefix} log ({e.strerror or e}); "
                                 "dropping log records until it works again\n")
            except (OSError, ValueError):
                pass
        self.dropped += 1

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        super().close()


def prune_logs(directory: Path, prefix: str, keep_days: int, max_bytes: int, current: Path | None = None) -> list[Path]:
    """Retention (service.log_keep_days, service.log_max_bytes; 0: no limit): the daily files of `prefix` older
    than keep_days go, then the oldest while they total more than max_bytes. The file in use always stays."""
    files = sorted(directory.glob(f"{prefix}_[0-9]*.log"))  # YYYYMMDD: name order is age order
    removed = []
    if keep_days > 0:
        cutoff = time.strftime("%Y%m%d", time.gmtime(time.time() - keep_days * 86400))
        for f in files:
            if f != current and f.name[len(prefix) + 1:len(prefix) + 9] < cutoff:
                removed.append(f)
    kept = [f for f in files if f not in removed]
    if max_bytes > 0:
        sizes = {f: f.stat().st_size for f in kept if f.exists()}
        total = sum(sizes.values())
        for f in kept:
            if total <= max_bytes or f == current:
                break
            removed.append(f)
            total -= sizes.get(f, 0)
    for f in removed:
        try:
            f.unlink()
        except OSError:
            pass
    return removed


def _dropped_record(like: logging.LogRecord, n: int) -> logging.LogRecord:
    return logging.makeLogRecord({"name": __name__, "levelno": logging.WARNING, "levelname": "WARNING",
                                  "msg": "%d log record(s) dropped: the log could not be written (disk full?)",
                                  "args": (n,), "created": like.created, "msecs": like.msecs, "process": like.process})


def setup_logging(logs_dir: str | Path, prefix: str, level: str = "INFO", also_stderr: bool = True,
                  keep_days: int = 0, max_bytes: int = 0) -> None:
    formatter = logging.Formatter(FORMAT)
    formatter.converter = time.gmtime
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = DailyFileHandler(logs_dir, prefix, keep_days, max_bytes)
    handler.setFormatter(formatter)
    root.addHandler(handler)
    if also_stderr:
        err = logging.StreamHandler(sys.stderr)
        err.setFormatter(formatter)
        root.addHandler(err)
    root.setLevel(level)
    for noisy in ("watchdog", "urllib3", "httpx", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


# ---------------------------------------------------------------- reading them back (trainctl logs)

TAIL_BLOCK = 1 << 16  # bytes read at a time from the end while looking for the last N lines
LATE_LINES_SECONDS = 30.0  # an earlier day's file is still read this long after it last grew


class _OpenLog:
    """One daily file held open: text comes from where the last read ended, never from a size taken apart."""

    def __init__(self, path: Path, clock: Callable[[], float]) -> None:
        self.path = path
        self.file: BinaryIO = open(path, "rb")
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a character split across reads
        self.grew_at = clock()

    def read(self, clock: Callable[[], float]) -> str:
        data = self.file.read()
        if data:
            self.grew_at = clock()
        return self.decoder.decode(data)

    def close(self) -> None:
        self.file.close()


class LogFollower:
    """The tail of the newest daily log of `prefix`, then whatever is appended (`trainctl logs [-f]`).

        follower = LogFollower(cfg.path("logs"), "daemon")
        sys.stdout.write(follower.tail(50))
        while True: time.sleep(0.5); sys.stdout.write(follower.poll())

    The tail is read from the handle it keeps, and following goes on from where that read ended: a
    line appended while the tail was read is printed once, never lost (#26). When a newer day's
    file appears, the old one is read to its end and then still read for LATE_LINES_SECONDS after
    it last grew: a record stamped before midnight can be written just after it.
    """

    def __init__(self, folder: str | Path, prefix: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.folder, self.prefix, self.clock = Path(folder), prefix, clock
        self.current: _OpenLog | None = None
        self.earlier: list[_OpenLog] = []

    def newest(self) -> Path | None:
        return max(self.folder.glob(f"{self.prefix}_[0-9]*.log"), default=None)  # YYYYMMDD: name order is age order

    def tail(self, lines: int) -> str:
        """The last `lines` lines of the newest file (and anything appended while they were read)."""
        path = self.newest()
        if path is None:
            return ""
        self.current = _OpenLog(path, self.clock)
        self.current.file.seek(_start_of_last_lines(self.current.file, max(lines, 0)))
        return self.current.read(self.clock)

    def poll(self) -> str:
        """What was appended since the last call, across a change of day."""
        out = []
        newest = self.newest()
        if newest is not None and (self.current is None or newest.name > self.current.path.name):
            if self.current is not None:
                out.append(self.current.read(self.clock))  # the old day's rest, before the new day's lines
                self.earlier.append(self.current)
            self.current = _OpenLog(newest, self.clock)  # a new day: from its start
        for old in list(self.earlier):
            out.append(old.read(self.clock))
            if self.clock() - old.grew_at > LATE_LINES_SECONDS:
                old.close()
                self.earlier.remove(old)
        if self.current is not None:
            out.append(self.current.read(self.clock))
        return "".join(out)

    def close(self) -> None:
        for f in [*self.earlier, *([self.current] if self.current else [])]:
            f.close()
        self.earlier, self.current = [], None


def _start_of_last_lines(f: BinaryIO, lines: int) -> int:
    """The offset where the last `lines` lines begin (a last line without its newline counts), read backwards
    from the end in blocks: a long log is never read whole for a few lines."""
    end = f.seek(0, os.SEEK_END)
    if lines == 0 or end == 0:
        return end
    f.seek(end - 1)
    need = lines + (f.read(1) == b"\n")  # newlines to pass going back; a final one ends the last line
    pos = end
    while pos > 0:
        step = min(TAIL_BLOCK, pos)
        pos -= step
        f.seek(pos)
        block = f.read(step)
        at = len(block)
        while (at := block.rfind(b"\n", 0, at)) >= 0:
            need -= 1
            if need == 0:
                return pos + at + 1
    return 0
