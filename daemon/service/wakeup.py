"""Wake the service loop early: from watchdog events, signal handlers, other threads.

    wakeup = Wakeup()
    wakeup.watch(inbox_dir)            # filesystem events become wake-ups (hints only)
    wait([wakeup, ...], timeout)       # multiprocessing.connection.wait accepts it
    wakeup.drain()

A socket pair: writing one byte is safe from a signal handler and from any
thread, and the read end is something the loop can wait on together with the
trainer's connection. Events are hints: the loop rescans the folders anyway,
so a missed or early event costs only latency.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class Wakeup:
    def __init__(self) -> None:
        self._r, self._w = socket.socketpair()
        self._w.setblocking(False)
        self._observer: Any = None

    def fileno(self) -> int:
        return self._r.fileno()

    def wake(self) -> None:
        try:
            self._w.send(b"\0")
        except OSError:
            pass  # full of wake-ups already (or closing): the loop is awake anyway

    def drain(self) -> None:
        try:
            while self._r.recv(4096, socket.MSG_DONTWAIT):
                pass
        except BlockingIOError:
            pass

    def watch(self, folder: Path, on_renamed_in: Any = None, on_closed: Any = None) -> None:
        """Wake on any event under `folder`; `on_renamed_in(path)` hears of every file renamed to a name
        there from another name there (the `.part` protocol), and `on_closed(path)` of every file a writer
        closed after writing (inotify's IN_CLOSE_WRITE, where the platform has it), before the wake-up."""
        try:
            from watchdog.events import FileSystemEventHandler
            from watchdog.observers import Observer
        except ImportError:
            log.warning("watchdog not installed: relying on the periodic rescan")
            return
        wake = self.wake

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event: Any) -> None:
                if on_renamed_in is not None and event.event_type == "moved" and not event.is_directory:
                    on_renamed_in(Path(os.fsdecode(event.dest_path)))
                elif on_closed is not None and event.event_type == "closed" and not event.is_directory:
                    on_closed(Path(os.fsdecode(event.src_path)))
                wake()

        self._observer = Observer()
        self._observer.schedule(Handler(), str(folder), recursive=True)
        self._observer.daemon = True
        self._observer.start()

    def close(self) -> None:
        if self._observer is not None:
            self._observer.stop()
        self._r.close()
        self._w.close()
