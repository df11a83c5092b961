"""Webhooks: the daemon's events, POSTed as JSON to the URLs in `notify.webhooks`, never in training's way.

    notifier = Notifier(cfg)          # a daemon thread with a bounded queue
    notifier.event("job_done", "done: a.jsonl", job_id, t, details)   # from the service thread; returns at once
    notifier.close()

Events (`notify.events`): file_done, file_failed, paused (a guard paused
training: a full disk), daemon_error (the trainer died), consolidation_done,
rollback, forgetting (the forgetting gate tripped: warned, held or rolled
back). The body: `{"event", "message", "job_id", "file", "t", "instance",
...details}` (steps, losses, reason). With `notify.secret` set, the header
`X-Traind-Signature: sha256=<hex HMAC-SHA256 of the body>` lets the receiver
check it came from this daemon. A failed delivery (a connection error, a
timeout, an HTTP status >= 300) is tried again with back-off, up to
`notify.max_attempts` times; after that it is logged and dropped. Deliveries
live in memory: a daemon that dies loses the ones not yet sent.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import queue
import threading
import time
import urllib.error
import urllib.request
from typing import Any

from daemon.config import Config
from daemon.jobqueue import original_name

log = logging.getLogger(__name__)

# history event kind -> webhook event
EVENT_OF = {
    "job_done": "file_done", "job_failed": "file_failed", "job_rejected": "file_failed",
    "disk_full": "paused", "unwritable": "paused", "guard": "paused", "trainer_crash": "daemon_error", "consolidated": "consolidation_done",
    "rollback": "rollback", "forgetting": "forgetting",
}
EVENTS = tuple(sorted(set(EVENT_OF.values())))
MAX_QUEUED = 1000
FIRST_RETRY_SECONDS = 1.0


class Notifier:
    def __init__(self, cfg: Config) -> None:
        nc = cfg.notify
        self.urls, self.events, self.secret = list(nc.webhooks), set(nc.events), nc.secret.encode()
        self.timeout, self.attempts = nc.timeout_seconds, nc.max_attempts
        self.instance = str(cfg.root)
        self.sent = self.failed = self.dropped = 0
        self._queue: queue.Queue = queue.Queue(maxsize=MAX_QUEUED)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if self.urls:
            self._thread = threading.Thread(target=self._run, name="webhooks", daemon=True)
            self._thread.start()

    def event(self, kind: str, message: str, job_id: str | None, t: float, details: dict[str, Any] | None = None) -> None:
        """Queue the webhooks of one history event (non-blocking; a full queue drops it, with a count)."""
        name = EVENT_OF.get(kind)
        if not self.urls or name is None or name not in self.events:
            return
        body = {"event": name, "kind": kind, "message": message, "job_id": job_id, "t": t, "instance": self.instance,
                **(details or {})}
        for url in self.urls:
            try:
                self._queue.put_nowait((url, body, 1, 0.0))
            except queue.Full:
                self.dropped += 1
                log.warning("webhook queue full: %s to %s dropped", name, url)

    def close(self, wait_seconds: float = 2.0) -> None:
        """Stop the sender; what is still queued after `wait_seconds` is dropped (a stop never waits longer)."""
        deadline = time.monotonic() + wait_seconds
        while self._thread is not None and not self._queue.empty() and time.monotonic() < deadline:
            time.sleep(0.05)
        self._stop.set()

    def _run(self) -> None:
        retry: list[tuple[str, dict, int, float]] = []
        while not self._stop.is_set():
            now = time.monotonic()
            due = [r for r in retry if r[3] <= now]
            retry = [r for r in retry if r[3] > now]
            for item in due:
                self._deliver(*item[:3], retry)
            try:
                url, body, attempt, _ = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            self._deliver(url, body, attempt, retry)

    def _deliver(self, url: str, body: dict, attempt: int, retry: list) -> None:
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json", "User-Agent": "traind-webhook", "X-Traind-Event": body["event"]}
        if self.secret:
            headers["X-Traind-Signature"] = "sha256=" + hmac.new(self.secret, data, hashlib.sha256).hexdigest()
        try:
            req = urllib.request.Request(url, data=data, headers=headers, method="POST")
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:  # noqa: S310 - the user's own URL
                if resp.status >= 300:
                    raise urllib.error.HTTPError(url, resp.status, "not a success", resp.headers, None)
            self.sent += 1
        except (OSError, ValueError) as e:  # URLError, HTTPError, timeouts
            if attempt >= self.attempts:
                self.failed += 1
                log.warning("webhook %s to %s failed %d times, dropped: %s", body["event"], url, attempt, e)
                return
            delay = FIRST_RETRY_SECONDS * 2 ** (attempt - 1)
            log.info("webhook %s to %s failed (%s); again in %.0f s", body["event"], url, e, delay)
            retry.append((url, body, attempt + 1, time.monotonic() + delay))


def signature_ok(secret: str, body: bytes, header: str | None) -> bool:
    """For receivers (and tests): does `header` sign `body` with `secret`?"""
    expected = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return header is not None and hmac.compare_digest(expected, header)


def job_details(db: Any, kind: str, job_id: str | None) -> dict[str, Any]:
    """What a webhook of a history event says of its file: the job record's name, steps, losses, reason."""
    if not job_id or kind not in EVENT_OF:
        return {}
    record = db.job(job_id) or {}
    details = {k: record.get(k) for k in ("original_name", "steps", "final_loss", "eval_loss", "reason",
                                          "adapter_version", "eval_set_before", "eval_set_after")}
    details["file"] = details.pop("original_name") or original_name(job_id)
    return details
