"""Logging set up once, in entry points: daily files `logs/<prefix>_YYYYMMDD.log`.

    setup_logging(cfg.path("logs"), "daemon", "INFO", also_stderr=True)
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)-7s %(process)d %(name)s: %(message)s"


class DailyFileHandler(logging.Handler):
    """Appends to `<dir>/<prefix>_YYYYMMDD.log` (UTC), switching file when the day changes."""

    def __init__(self, directory: str | Path, prefix: str) -> None:
        super().__init__()
        self.directory = Path(directory)
        self.prefix = prefix
        self._day = ""
        self._stream = None

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
            self._stream.write(self.format(record) + "\n")
            self._stream.flush()
        except Exception:  # logging must never take the daemon down
            self.handleError(record)

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        super().close()


def setup_logging(logs_dir: str | Path, prefix: str, level: str = "INFO", also_stderr: bool = True) -> None:
    formatter = logging.Formatter(FORMAT)
    formatter.converter = time.gmtime
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = DailyFileHandler(logs_dir, prefix)
    handler.setFormatter(formatter)
    root.addHandler(handler)
    if also_stderr:
        err = logging.StreamHandler(sys.stderr)
        err.setFormatter(formatter)
        root.addHandler(err)
    root.setLevel(level)
    for noisy in ("watchdog", "urllib3", "httpx", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
