"""Webhooks (#12): the daemon's events reach a real HTTP server on loopback, signed, retried, never blocking."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from daemon.service.notify import signature_ok
from bench.harness import lines_of, time_scale, write_instance
from bench.harness import Daemon

pytestmark = pytest.mark.e2e
SECRET = "s3cret"


class Receiver:
    """A loopback server; answers 500 to the first `fail_first` posts, then 204; or hangs when `hang`."""

    def __init__(self, fail_first: int = 0, hang: bool = False) -> None:
        self.got: list[tuple[dict, bool]] = []
        self.attempts = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.attempts += 1
                if hang:
                    time.sleep(30)
                if outer.attempts <= fail_first:
                    self.send_response(500)
                    self.end_headers()
                    return
                outer.got.append((json.loads(body), signature_ok(SECRET, body, self.headers.get("X-Traind-Signature"))))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def close(self) -> None:
        self.server.shutdown()


def wait_until(pred, timeout: float = 60) -> None:  # noqa: ANN001
    deadline = time.time() + timeout * time_scale()
    while time.time() < deadline:
        if pred():
            return
        time.sleep(0.1)
    raise AssertionError("timed out")


def test_done_and_failed_files_are_posted_signed_and_retried(tmp_path, models_dir):
    rx = Receiver(fail_first=2)  # the first two deliveries fail: back-off, then they arrive
    d = Daemon(write_instance(tmp_path / "inst", models_dir, training={"epochs_per_file": 1},
                              notify={"webhooks": [rx.url], "secret": SECRET}))
    try:
        d.start()
        d.drop("good.jsonl", lines_of("text.jsonl", 12))
        d.drop("bad.jsonl", "not json\n")
        wait_until(lambda: {b["event"] for b, _ in rx.got} >= {"file_done", "file_failed"})
        bodies = {b["event"]: (b, ok) for b, ok in rx.got}
        done, ok = bodies["file_done"]
        assert ok and done["file"] == "good.jsonl" and done["steps"] > 0 and done["final_loss"] is not None
        failed, ok = bodies["file_failed"]
        assert ok and failed["file"] == "bad.jsonl" and "invalid_data" in failed["reason"]
        assert rx.attempts >= len(rx.got) + 2  # the failed tries were made again
    finally:
        d.close()
        rx.close()


@pytest.mark.slow  # the default run keeps under 15 min; `pytest -m slow` runs it
def test_a_hanging_receiver_never_holds_training_back(tmp_path, models_dir):
    rx = Receiver(hang=True)
    d = Daemon(write_instance(tmp_path / "inst", models_dir, training={"epochs_per_file": 1},
                              notify={"webhooks": [rx.url], "timeout_seconds": 1.0, "max_attempts": 1}))
    try:
        d.start()
        for k in range(2):
            d.drop(f"f{k}.jsonl", lines_of("text.jsonl", 12 + k))
        d.wait_counts(done=2, timeout=120)
        assert rx.attempts >= 1
        assert d.stop() == 0  # and a stop does not wait for it
    finally:
        d.close()
        rx.close()
