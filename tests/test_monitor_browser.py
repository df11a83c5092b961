"""The dashboard in Debian's headless chromium (Playwright), against a real monitor process.

    apt-get install -y chromium && pytest tests/test_monitor_browser.py -q

First over a fabricated status tree (the test plays the daemon and moves it
through states), then against the real daemon training the embedded tiny model.
Screenshots go to test-artifacts/ (gitignored).
"""

from __future__ import annotations

import os
import random
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from tests.conftest import skip_or_fail

from daemon import activity_summary, control
from daemon.jobqueue import JobQueue
from daemon.lock import acquire
from daemon.states import ControlAction, DesiredState, FailReason, Priority
from bench.harness import lines_of, time_scale, write_instance
from bench.harness import Daemon
from tests.monitor_helpers import (ALL_LINEAR, ATTENTION, REPO, FakeDaemon, make_instance, monitor_process,
                                   synthetic_activity, token_of)

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
JOB = "20261122T020301Z-000001--customer_chats.jsonl"

pytestmark = [pytest.mark.e2e]


@pytest.fixture(autouse=True)
def _chromium_here() -> None:
    if not CHROMIUM.exists():
        skip_or_fail("needs Debian's chromium at /usr/bin/chromium (apt-get install -y chromium; bin/test.sh does it)")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


class Page:
    """A dashboard tab that records console errors and every URL it asked for."""

    def __init__(self, browser: Any, base: str) -> None:
        self.base = base
        self.page = browser.new_page(viewport={"width": 1400, "height": 1250})
        self.errors: list[str] = []
        self.requests: list[str] = []
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("request", lambda r: self.requests.append(r.url))

    # Waits poll from Python: the page's CSP forbids eval, which wait_for_function(str) needs.
    def open(self, token: str) -> None:
        self.page.goto(f"{self.base}/#token={token}")
        wait_until(lambda: self.page.text_content("#conn") == "live", 15, "SSE connection live")

    def points(self) -> int:
        return int(self.page.get_attribute("#chart-loss", "data-points") or 0)

    def wait_points_above(self, n: int, timeout: float = 30) -> int:
        wait_until(lambda: self.points() > n, timeout, f"loss chart with more than {n} points")
        return self.points()

    def wait_badge(self, state: str, timeout: float = 30) -> None:
        self.page.wait_for_selector(f"#state-badge[data-state='{state}']", timeout=timeout * time_scale() * 1000)

    def wait_button(self, name: str, label: str, enabled: bool, timeout: float = 30) -> None:
        b = self.page.locator(f"#btn-{name}")
        wait_until(lambda: b.text_content() == label and b.is_enabled() == enabled, timeout,
                   f"button {name} showing {label!r} ({'enabled' if enabled else 'disabled'}), now {b.text_content()!r}")

    def shot(self, name: str) -> Path:
        ARTIFACTS.mkdir(exist_ok=True)
        path = ARTIFACTS / name
        self.page.evaluate("() => window.scrollTo(0, 0)")  # else the sticky header lands mid-page in a full-page shot
        self.page.screenshot(path=str(path), full_page=True)
        return path

    def shot_of(self, selector: str, name: str) -> Path:
        """A screenshot of one element (a panel), at its full size."""
        ARTIFACTS.mkdir(exist_ok=True)
        path = ARTIFACTS / name
        self.page.locator(selector).screenshot(path=str(path))
        return path

    def heatmap(self) -> dict[str, str]:
        """The layer activity heatmap's data- attributes (cells drawn, layers, kinds, max, where cells are)."""
        canvas = self.page.locator("#activity-heatmap")
        return {k: canvas.get_attribute("data-" + k) for k in ("cells", "layers", "kinds", "measure", "min", "max", "x0", "y0", "cell-w", "cell-h")}

    def point_at_cell(self, i: int, j: int) -> str:
        """Move the mouse over heatmap cell (layer index i, kind index j); returns the hover text."""
        canvas = self.page.locator("#activity-heatmap")
        canvas.scroll_into_view_if_needed()
        h, box = self.heatmap(), canvas.bounding_box()
        self.page.mouse.move(box["x"] + float(h["x0"]) + (i + 0.5) * float(h["cell-w"]),
                             box["y"] + float(h["y0"]) + (j + 0.5) * float(h["cell-h"]))
        return self.page.text_content("#activity-hover")

    def assert_clean(self) -> None:
        assert not self.errors, self.errors
        foreign = [u for u in self.requests if not u.startswith(self.base) and not u.startswith("data:")]
        assert not foreign, f"the page fetched from elsewhere: {foreign}"


def wait_until(pred, timeout: float = 15, what: str = "") -> None:
    deadline = time.monotonic() + timeout * time_scale()
    while not pred():
        assert time.monotonic() < deadline, f"timed out: {what}"
        time.sleep(0.1)


class Heartbeat:
    """Plays the service's status writer: rewrites the status every 0.5 s until stopped."""

    def __init__(self, daemon: FakeDaemon, **fields: Any) -> None:
        self.daemon, self.fields = daemon, dict(fields)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def set(self, **fields: Any) -> None:
        with self._lock:
            self.fields.update(fields)
            self.daemon.status(**self.fields)

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            with self._lock:
                self.daemon.status(**self.fields)

    def __enter__(self) -> "Heartbeat":
        self.set()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def _fabricated_queue(cfg) -> JobQueue:
    q = JobQueue(cfg.path("queue"))
    now = time.time()
    for name, prio in (("support_tickets.jsonl", Priority.HIGH), ("wiki_dump.jsonl", Priority.NORMAL), ("old_logs.jsonl", Priority.LOW)):
        src = cfg.root / name
        src.write_text(lines_of("chat.jsonl", 20))
        q.admit(src, prio, now)
    bad = cfg.root / "broken.jsonl"
    bad.write_text('{"messages": []}\nnot json\n')
    q.reject(bad, {"reason": FailReason.INVALID_DATA.value, "message": "2 of 2 lines are bad",
                   "errors": [{"line": 1, "field": "messages", "reason": "empty conversation"},
                              {"line": 2, "field": None, "reason": "not valid JSON"}]}, now)
    return q


def test_dashboard_over_a_fabricated_daemon(browser, tmp_path):
    cfg = make_instance(tmp_path)
    fake = FakeDaemon(cfg)
    fake.steps(1500)
    fake.eval(0.62)
    q = _fabricated_queue(cfg)
    training = dict(status="training", detail="training", current_file="customer_chats.jsonl", job_id=JOB,
                    current_step=1500, total_steps=4000, epoch=0.37, loss=0.55, lr=1.9e-4, tokens_per_sec=905.0,
                    eta_seconds=2760.0, eval_loss=0.62, queue=q.counts(), device="cpu", compute_dtype="float32",
                    quantization="none", adapter_version=4, trainer_pid=os.getpid())
    lock_fd = acquire(cfg.path("status") / "daemon.lock")  # a running daemon holds it; skip and stop need one
    with monitor_process(cfg) as url:
        with Heartbeat(fake, **training) as beat:
            tab = Page(browser, url)
            tab.open(token_of(cfg))
            tab.wait_badge("training")
            tab.page.wait_for_selector("text=broken.jsonl")
            tab.page.wait_for_selector("#gpu-cards >> text=No GPU")
            first = tab.wait_points_above(0)

            # training goes on: new steps reach the chart without a reload
            for _ in range(3):
                fake.steps(40)
                beat.set(current_step=training["current_step"] + fake.global_step - 1500, loss=0.5)
                time.sleep(0.6)
            tab.wait_points_above(first)
            tab.shot("monitor_fabricated_training.png")
            assert tab.page.is_hidden("#chart-series")  # one series: nothing to say

            # `config approve` started a new adapter: its steps count from 0 again, in a series of their own
            fake.db.start_series("config approve: lora.r: 8 -> 16", time.time())
            fake.global_step = 1
            fake.steps(25)
            beat.set(current_step=25, loss=0.9)
            wait_until(lambda: tab.points() == 25, what="the loss chart showing the new series alone")
            tab.page.wait_for_selector("#chart-series >> text=series 2 of 2", state="visible")
            assert "lora.r: 8 -> 16" in tab.page.text_content("#chart-series")
            tab.shot_of(".charts-panel", "monitor_new_series.png")
            fake.steps(40)
            beat.set(current_step=65, loss=0.5)
            tab.wait_points_above(25)

            # pause: the button waits for the daemon, then the state comes from the status
            tab.page.click("#btn-pause")
            wait_until(lambda: control.read_desired_state(cfg) is DesiredState.PAUSED, what="desired_state paused")
            tab.wait_button("pause", "Pausing…", enabled=False)
            assert tab.page.text_content("#state-badge") == "training"  # no optimistic guess
            beat.set(status="paused", desired_state="paused", detail="paused")
            tab.wait_badge("paused")
            tab.wait_button("resume", "Resume", enabled=True)
            tab.page.click("#btn-resume")
            wait_until(lambda: control.read_desired_state(cfg) is DesiredState.RUNNING, what="desired_state running")
            tab.wait_button("resume", "Resuming…", enabled=False)
            beat.set(status="training", desired_state="running", detail="training")
            tab.wait_badge("training")
            tab.wait_button("pause", "Pause", enabled=True)

            # skip asks first; cancelling leaves nothing behind, confirming leaves a request for this job
            tab.page.click("#btn-skip")
            tab.page.click("#confirm-cancel")
            time.sleep(0.3)
            assert control.pending_requests(cfg) == []
            tab.page.click("#btn-skip")
            tab.page.click("#confirm-ok")
            wait_until(lambda: [(r.action, r.job_id) for r in control.pending_requests(cfg)] == [(ControlAction.SKIP, JOB)], what="skip request")
            tab.wait_button("skip", "Skipping…", enabled=False)
            for r in control.pending_requests(cfg):  # the daemon consumes it
                control.consume(r)
            tab.wait_button("skip", "Skip file", enabled=True)

            # retry from the failed row goes through the same control requests
            tab.page.click("tr.row-failed >> text=Retry")
            wait_until(lambda: [r.action for r in control.pending_requests(cfg)] == [ControlAction.RETRY], what="retry request")
            tab.page.wait_for_selector("tr.row-failed >> text=retry requested…")

            # the idle-time generator and an out-of-memory split show in the status panel
            beat.set(auto_generate={"state": "backing_off", "source": "http", "files_today": 3, "records_total": 600,
                                    "last_error": "TimeoutError: timed out", "last_file": None, "last_at": None,
                                    "next_try_at": None}, micro_batch_split=2)
            tab.page.wait_for_selector("#generator >> text=http: backing off")
            tab.page.wait_for_selector("#split >> text=in 2 pieces")
            beat.set(auto_generate=None, micro_batch_split=1)

            # a trainer of two processes: the Ranks block, each rank's figures, the slowest marked; hidden with one
            assert tab.page.is_hidden("#ranks-block")
            ranks = [{"rank": r, "node": 0, "host": "node-a", "device": "cpu", "tokens": 600 - 100 * r,
                      "compute_seconds": 1.0 + r, "tokens_per_sec": (600 - 100 * r) / (1.0 + r),
                      "rss_bytes": (3 + r) * 2**30, "gpu_memory_bytes": None if r else 5 * 2**30} for r in (0, 1)]
            beat.set(world_size=2, distributed={"strategy": "ddp", "backend": "gloo", "nnodes": 1}, ranks=ranks,
                     slowest_rank=1)
            tab.page.wait_for_selector("#ranks-block", state="visible")
            assert tab.page.text_content("#ranks-setup") == "2 ranks · ddp · gloo · 1 node"
            rows = [[c.strip() for c in tab.page.locator(f"#ranks-body tr[data-rank='{r}'] td").all_text_contents()]
                    for r in (0, 1)]
            assert rows == [["0", "node-a", "cpu", "600", "3.0 GiB", "5.0 GiB", ""],
                            ["1", "node-a", "cpu", "250", "4.0 GiB", "—", "slowest"]]
            assert tab.page.get_attribute("#ranks-body tr[data-rank='1']", "class") == "slowest"
            tab.shot_of(".resources-panel", "monitor_ranks.png")
            beat.set(world_size=1, distributed=None, ranks=None, slowest_rank=None)
            tab.page.wait_for_selector("#ranks-block", state="hidden")

            # consolidate asks for a description; cancelling leaves nothing, confirming leaves the request with it
            from daemon import atomic
            atomic.write_json(cfg.path("adapters") / "v0004" / "manifest.json", {"version": 4})
            atomic.write_json(cfg.path("adapters") / "current.json", {"version": 4, "path": "v0004"})
            for r in control.pending_requests(cfg):  # the daemon consumes the retry
                control.consume(r)
            tab.page.click("#btn-consolidate")
            tab.page.click("#consolidate-cancel")
            time.sleep(0.3)
            assert control.pending_requests(cfg) == []
            tab.page.click("#btn-consolidate")
            tab.page.fill("#consolidate-description", "the first week of puzzles")
            tab.page.click("#consolidate-ok")
            wait_until(lambda: [(r.action, r.description) for r in control.pending_requests(cfg)]
                       == [(ControlAction.CONSOLIDATE, "the first week of puzzles")], what="consolidate request")
            for r in control.pending_requests(cfg):
                control.consume(r)

            # upload through the page lands in the inbox under its priority
            data = tmp_path / "fresh_batch.jsonl"
            data.write_text(lines_of("chat.jsonl", 5))
            tab.page.set_input_files("#upload-file", str(data))
            tab.page.select_option("#upload-priority", "high")
            tab.page.click("#upload-btn")
            tab.page.wait_for_selector("#upload-result >> text=Queued as fresh_batch.jsonl")
            assert (cfg.path("inbox") / "high" / "fresh_batch.jsonl").read_text() == data.read_text()

        # the heartbeat stopped (a hung daemon): three missed writes later the open page says so
        tab.page.wait_for_selector("#stale-banner", state="visible", timeout=15_000)
        tab.wait_badge("stale")
        assert "no status update" in tab.page.text_content("#stale-reason")
        tab.shot("monitor_fabricated_stale.png")
        tab.assert_clean()
        # a hung daemon still holds its lock: a stop waits for it
        tab.wait_button("stop", "Stop daemon", enabled=True)
        os.close(lock_fd)
    # the monitor went away: the page must not go on looking live
    tab.page.wait_for_selector("#stale-title >> text=Monitor unreachable.", timeout=20_000)
    assert tab.page.text_content("#state-badge") == "unknown"
    for name in ("pause", "resume", "skip", "stop", "consolidate"):
        assert tab.page.is_disabled(f"#btn-{name}"), name
    tab.shot("monitor_unreachable.png")


def test_clean_stop_is_not_an_alarm_and_skipped_bad_lines_show(browser, tmp_path):
    """A daemon that wrote "stopped" and exited reads as stopped, not "not responding"; a done
    file trained without some bad lines says which, and a failed one retries at its old priority."""
    import json
    import subprocess
    import sys

    cfg = make_instance(tmp_path)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    fake = FakeDaemon(cfg, pid=gone.pid)
    fake.steps(50)
    q = _fabricated_queue(cfg)
    done = q.finish(q.start(q.next_pending()).job_id)  # support_tickets.jsonl, high
    failed = q.failed()[0]
    bad = [{"line": n, "field": "messages[0].role", "reason": "'human' is not one of system, user, assistant"} for n in (3, 9)]
    fake.db.upsert_job(done.job_id, original_name=done.original_name, priority="high", state="done",
                       n_records=18, n_bad=2, bad_lines=json.dumps(bad), finished_at=time.time())
    fake.db.upsert_job(failed.job_id, original_name=failed.original_name, priority="low", state="failed")
    fake.status(status="stopped", detail="stopped", queue=q.counts())
    with monitor_process(cfg) as url:
        tab = Page(browser, url)
        tab.open(token_of(cfg))
        tab.page.wait_for_selector("#stale-banner", state="visible", timeout=15_000)
        tab.wait_badge("stopped")
        assert tab.page.text_content("#state-badge") == "stopped"
        assert tab.page.text_content("#stale-title") == "Daemon stopped."
        assert "banner-info" in tab.page.get_attribute("#stale-banner", "class")
        row = tab.page.locator(f"tr[data-job='{done.job_id}']")
        row.locator("text=2 bad lines skipped").wait_for()
        assert "line 3 (messages[0].role)" in row.text_content() and "high" in row.text_content()
        assert tab.page.locator(f"tr[data-job='{failed.job_id}'] select").input_value() == "low"
        tab.shot("monitor_fabricated_stopped.png")
        tab.assert_clean()


def test_done_files_show_their_training_page_through_and_a_duplicate_says_it_was_not_trained(browser, tmp_path):
    """23 done files: each row says its steps and losses, the list says how many there are and pages
    through them, and the newest (a duplicate) says in the activity panel that it was never trained."""
    from daemon.intake import finish_duplicate

    cfg = make_instance(tmp_path)
    fake = FakeDaemon(cfg)
    q = JobQueue(cfg.path("queue"))
    t0 = time.time() - 3600
    ids = []
    for k in range(22):
        src = cfg.root / f"batch_{k:02d}.jsonl"
        src.write_text(lines_of("chat.jsonl", 3 + k))
        done = q.finish(q.start(q.admit(src, Priority.NORMAL, t0 + k)).job_id)
        fake.db.upsert_job(done.job_id, original_name=src.name, state="done", steps=40 + k, total_steps=40 + k,
                           final_loss=round(1.5 - k / 20, 4), eval_loss=round(1.7 - k / 20, 4) if k % 2 else None,
                           adapter_version=k + 1, finished_at=t0 + k + 0.5)
        ids.append(done.job_id)
    again = cfg.root / "batch_00_again.jsonl"
    again.write_text(lines_of("chat.jsonl", 3))
    dup = q.admit(again, Priority.NORMAL, t0 + 100)
    finish_duplicate(dup, {"sha256": "ab" * 32, "job_id": ids[0], "original_name": "batch_00.jsonl", "version": 1,
                           "generation": 0}, t0 + 101, q, fake.db)
    with monitor_process(cfg) as url, Heartbeat(fake, status="idle", detail="waiting for files", queue=q.counts()):
        tab = Page(browser, url)
        tab.open(token_of(cfg))
        tab.page.wait_for_selector("#done-range >> text=done 1–10 of 23 · 13 older")
        rows = tab.page.locator("tr.row-done")
        assert rows.count() == 10
        assert "not trained again" in rows.nth(0).text_content()  # the duplicate, newest
        assert rows.nth(1).locator(".trained").text_content() == "61 steps · loss 0.4500 · eval loss 0.6500 · adapter v22"
        assert rows.nth(2).locator(".trained").text_content() == "60 steps · loss 0.5000 · adapter v21"
        assert "was not trained: its content repeats batch_00.jsonl, already in adapter v1" in tab.page.text_content("#moved-info")
        tab.page.locator(".activity-panel").scroll_into_view_if_needed()
        tab.shot_of(".activity-panel", "monitor_done_duplicate_moved.png")
        tab.page.click("#done-older")
        tab.page.wait_for_selector("#done-range >> text=done 11–20 of 23 · 3 older")
        assert rows.nth(0).get_attribute("data-job") == ids[12]  # the duplicate, then ids[21] down to ids[13] before
        tab.page.click("#done-older")
        tab.page.wait_for_selector("#done-range >> text=done 21–23 of 23")
        assert [rows.nth(k).get_attribute("data-job") for k in range(rows.count())] == ids[2::-1]
        assert tab.page.is_disabled("#done-older") and tab.page.is_enabled("#done-newer")
        tab.page.select_option("select[aria-label='done files per page']", "50")
        tab.page.wait_for_selector("#done-range >> text=done 1–23 of 23")
        assert rows.count() == 23
        tab.page.locator(".queue-panel").scroll_into_view_if_needed()
        tab.shot_of(".queue-panel", "monitor_done_list.png")
        tab.assert_clean()


def _done_file_with_moved(cfg, fake: FakeDaemon, name: str, n_layers: int, kinds: tuple[str, ...]) -> dict:
    """A file in queue/done whose job record says what it moved (as the service writes it at `done`); returns the record."""
    q = JobQueue(cfg.path("queue"))
    src = cfg.root / name
    src.write_text(lines_of("chat.jsonl", 20))
    q.admit(src, Priority.NORMAL, time.time())
    done = q.finish(q.start(q.next_pending()).job_id)
    v = synthetic_activity(3000, 3000, n_layers, kinds, random.Random(3))["values"]
    grid = {"layers": list(range(n_layers)), "kinds": list(kinds),
            "values": {"moved": v["update"], "moved_relative": v["relative"], "base": v["base"]}}
    record = activity_summary.file_moved(grid)
    fake.db.upsert_job(done.job_id, original_name=name, state="done", steps=3000, adapter_version=3,
                       finished_at=time.time(), activity=record)
    return record


def test_frozen_layers_and_intruders_in_the_heatmap(browser, tmp_path):
    """lora.freeze_stalled: frozen cells crossed out, named under the heatmap and in the hover; activity.intruders: the
    count per layer. A 30-layer model (SmolLM2-135M's depth) with its 8 lowest layers frozen."""
    cfg = make_instance(tmp_path)
    fake = FakeDaemon(cfg)
    for k in range(3):
        fake.steps(10)
        block = fake.activity(10 * (k + 1), n_layers=30, kinds=ALL_LINEAR, frozen_below=8, intruders=True)
    assert block.per_layer["frozen"][:9] == [7.0] * 8 + [0.0]  # the status block counts them per layer
    with monitor_process(cfg) as url, Heartbeat(fake, status="training", detail="training", job_id=JOB,
                                                current_file="customer_chats.jsonl", current_step=30, total_steps=100,
                                                queue=JobQueue(cfg.path("queue")).counts(), layer_activity_summary=block):
        token = token_of(cfg)
        latest = httpx.get(url + "/api/activity", headers={"X-Traind-Token": token}).json()["latest"]
        assert latest["per_layer"]["frozen"][:9] == [7.0] * 8 + [0.0]
        tab = Page(browser, url)
        tab.open(token)
        tab.page.wait_for_selector("#activity-heatmap[data-frozen='56']")
        note = tab.page.locator("#activity-layers-note")
        assert note.get_attribute("data-frozen-layers") == ",".join(str(n) for n in range(8))
        text = note.text_content()
        total = sum(v for row in latest["values"]["intruders"] for v in row)
        assert "frozen (lora.freeze_stalled): layers 0, 1, 2" in text and f"Intruder dimensions: {total:g}" in text, text
        tab.point_at_cell(3, 0)
        assert tab.page.locator("#activity-tip").text_content().count("frozen (lora.freeze_stalled)") == 1
        tab.point_at_cell(20, 0)
        assert "frozen" not in tab.page.locator("#activity-tip").text_content()
        tab.page.locator(".activity-panel").scroll_into_view_if_needed()
        tab.shot_of(".activity-panel", "monitor_activity_frozen.png")
        tab.assert_clean()


def test_layer_activity_of_an_80_layer_model(browser, tmp_path):
    """80 layers x 7 kinds: every cell drawn, the colour switch, hover values, top layers over time, a file's record."""
    cfg = make_instance(tmp_path)
    fake = FakeDaemon(cfg)
    for k in range(300):
        fake.steps(10)
        block = fake.activity(10 * (k + 1), n_layers=80, kinds=ALL_LINEAR)
    moved = _done_file_with_moved(cfg, fake, "support_tickets.jsonl", 80, ALL_LINEAR)
    q = JobQueue(cfg.path("queue"))
    with monitor_process(cfg) as url, Heartbeat(fake, status="training", detail="training", job_id=JOB,
                                                current_file="customer_chats.jsonl", current_step=3000, total_steps=4000,
                                                queue=q.counts(), layer_activity_summary=block):
        token = token_of(cfg)
        top5 = httpx.get(url + "/api/activity?top=5", headers={"X-Traind-Token": token}).json()
        latest = top5["latest"]
        tab = Page(browser, url)
        tab.open(token)
        tab.page.wait_for_selector("#activity-heatmap[data-cells='560']")
        h = tab.heatmap()
        assert (h["layers"], h["kinds"], h["measure"]) == ("80", "7", "relative")
        assert float(h["max"]) == max(v for row in latest["values"]["relative"] for v in row)
        assert tab.page.is_hidden("#activity-empty")

        # the switch recolours by the recent change: another scale
        tab.page.check("#activity-measure-relative_change")
        wait_until(lambda: tab.heatmap()["measure"] == "relative_change", what="heatmap recoloured")
        h = tab.heatmap()
        assert h["cells"] == "560"
        changed_most = max(v for row in latest["values"]["relative_change"] for v in row)
        assert float(h["max"]) == changed_most != max(v for row in latest["values"]["relative"] for v in row)
        chart = tab.page.locator("#activity-chart")  # the chart follows: per-layer recent change over time
        wait_until(lambda: chart.get_attribute("data-measure") == "relative_change", what="chart of the recent change")

        # hover: the cell under the mouse, named and valued
        text = tab.point_at_cell(37, 2)
        assert text.startswith("layer 37 · v_proj · recent change"), text
        hover = tab.page.locator("#activity-hover")
        assert float(hover.get_attribute("data-value")) == latest["values"]["relative_change"][37][2]
        assert tab.page.is_visible("#activity-tip")
        tab.page.check("#activity-measure-relative")
        wait_until(lambda: tab.heatmap()["measure"] == "relative", what="back to the relative update")
        text = tab.point_at_cell(79, 6)
        assert text.startswith("layer 79 · down_proj · relative update"), text
        assert float(hover.get_attribute("data-value")) == latest["values"]["relative"][79][6]

        # the top 5 layers over time, one line each, a point per sample
        chart = tab.page.locator("#activity-chart")
        wait_until(lambda: chart.get_attribute("data-measure") == "relative" and chart.get_attribute("data-series") == "5"
                   and int(chart.get_attribute("data-points")) == 300, what="top-layers chart with 5 series of 300 points")
        labels = [chart.locator(".u-legend .u-series").nth(k + 1).locator(".u-label").text_content() for k in range(5)]
        assert labels == [f"layer {n}" for n in top5["series"]["layers"]]

        # what the finished file moved: its name, per-layer bars, its top modules
        tab.page.wait_for_selector("#moved-info >> text=support_tickets.jsonl")
        assert "adapter v3" in tab.page.text_content("#moved-info")
        assert tab.page.get_attribute("#moved-bars", "data-layers") == "80"
        first = moved["top"][0]
        assert f"layer {first['layer']} {first['kind']}" in tab.page.text_content("#moved-top")
        tab.page.locator(".activity-panel").scroll_into_view_if_needed()  # else the shot scrolls the tooltip away
        tab.point_at_cell(60, 4)
        tab.shot_of(".activity-panel", "monitor_activity_80_layers.png")
        tab.assert_clean()


def _sample_with_head(fake: FakeDaemon, step: int) -> Any:
    """A 2-layer sample plus LoRA on lm_head (layer -1, 'other'): no q/k/v/o there, no lm_head in the layers."""
    msg = synthetic_activity(step, fake.global_step, 2, ATTENTION, fake.rng, JOB)
    msg["layers"] = [-1, *msg["layers"]]
    msg["kinds"] = [*msg["kinds"], "lm_head"]
    for m, rows in msg["values"].items():
        head = {"update": 0.01, "relative": 0.0005, "change": 0.001, "grad_a": 0.002, "grad_b": 0.003, "base": 20.0}[m]
        msg["values"][m] = [[None] * len(ATTENTION) + [head * (step + 1) ** 0.5]] + [row + [None] for row in rows]
    now = time.time()
    fake.db.record_activity(JOB, step, fake.global_step, now, False, msg["layers"], msg["kinds"],
                            activity_summary.per_layer(msg), msg["values"])
    return activity_summary.summary(msg, now)


def test_layer_activity_of_a_small_model(browser, tmp_path):
    """No activity yet says so; the first samples arrive by the live status; a 2-layer grid reads at a glance,
    a module without LoRA is not a zero."""
    cfg = make_instance(tmp_path)
    fake = FakeDaemon(cfg)
    fake.steps(20)
    q = JobQueue(cfg.path("queue"))
    with monitor_process(cfg) as url, Heartbeat(fake, status="training", detail="training", job_id=JOB,
                                                current_file="customer_chats.jsonl", queue=q.counts()) as beat:
        tab = Page(browser, url)
        tab.open(token_of(cfg))
        tab.page.wait_for_selector("#activity-empty >> text=No layer activity yet")
        tab.page.wait_for_selector("#moved-info >> text=No file has finished yet")
        for k in range(12):
            fake.steps(10)
            block = _sample_with_head(fake, 10 * (k + 1))
        beat.set(layer_activity_summary=block)
        tab.page.wait_for_selector("#activity-heatmap[data-cells='9']", timeout=15_000)  # 2 x 4 + lm_head
        h = tab.heatmap()
        assert (h["layers"], h["kinds"]) == ("3", "5")
        assert int(h["cell-w"]) >= 60, h  # big cells for a small model
        assert tab.point_at_cell(0, 0) == "layer other · q_proj · no LoRA"
        assert tab.point_at_cell(0, 4).startswith("layer other · lm_head · relative update")
        assert tab.point_at_cell(2, 3).startswith("layer 1 · o_proj · relative update")
        assert tab.page.get_attribute("#activity-chart", "data-series") == "3"
        _done_file_with_moved(cfg, fake, "support_tickets.jsonl", 2, ATTENTION)
        beat.set(queue=q.counts())
        tab.page.wait_for_selector("#moved-info >> text=support_tickets.jsonl")
        tab.page.locator(".activity-panel").scroll_into_view_if_needed()
        tab.point_at_cell(2, 2)
        tab.shot_of(".activity-panel", "monitor_activity_2_layers.png")
        tab.assert_clean()


def test_dashboard_drives_the_real_daemon(browser, tmp_path, models_dir):
    """Real daemon + real monitor on loopback: upload from the page, chart fills, pause/resume, kill -> banner."""
    config_path = write_instance(tmp_path / "inst", models_dir, training={"epochs_per_file": 30})
    d = Daemon(config_path)
    try:
        d.start()
        d.wait_for(lambda st: st.get("status") in ("idle", "training"), timeout=120, what="daemon up")
        with monitor_process(d.cfg, log_path=tmp_path / "monitor.log") as url:
            tab = Page(browser, url)
            tab.open(token_of(d.cfg))
            data = tmp_path / "long_chat.jsonl"
            data.write_text(lines_of("chat.jsonl", 40))
            tab.page.set_input_files("#upload-file", str(data))
            tab.page.click("#upload-btn")
            tab.page.wait_for_selector("#upload-result >> text=Queued as long_chat.jsonl")

            d.wait_for(lambda st: st.get("status") == "training" and st.get("global_step", 0) >= 2, timeout=180, what="training")
            tab.wait_badge("training")
            first = tab.wait_points_above(0, timeout=60)
            tab.wait_points_above(first, timeout=60)  # the chart grows as the daemon trains
            tab.shot("monitor_real_training.png")

            # the layer activity of the embedded model (2 layers x 4 attention modules), with real numbers
            wait_until(lambda: tab.heatmap()["cells"] == "8", 120, "layer activity heatmap of the real model")
            h = tab.heatmap()
            assert (h["layers"], h["kinds"]) == ("2", "4") and float(h["max"]) > 0, h
            tab.page.locator(".activity-panel").scroll_into_view_if_needed()
            assert tab.point_at_cell(1, 2).startswith("layer 1 · "), tab.page.text_content("#activity-hover")
            tab.shot_of(".activity-panel", "monitor_activity_real.png")

            tab.page.click("#btn-pause")
            st = d.wait_for(lambda st: st.get("status") == "paused", timeout=120, what="paused")
            tab.wait_badge("paused")
            tab.wait_button("resume", "Resume", enabled=True)
            time.sleep(1.5)
            assert d.status()["global_step"] == st["global_step"]  # really holds
            tab.shot("monitor_real_paused.png")
            tab.page.click("#btn-resume")
            d.wait_for(lambda s: s.get("status") == "training" and s.get("global_step", 0) > st["global_step"], timeout=120, what="resumed")
            tab.wait_badge("training")

            d.kill9()  # a dead daemon must never look like training
            tab.page.wait_for_selector("#stale-banner", state="visible", timeout=15_000)
            tab.wait_badge("stale")
            assert "is gone" in tab.page.text_content("#stale-reason")
            tab.wait_button("stop", "Stop daemon", enabled=False)  # nobody would act on it but the next start
            assert tab.page.is_disabled("#btn-skip") and "not running" in tab.page.text_content("#control-hint")
            tab.page.wait_for_selector("#host-cards tr:has(td:text-is('daemon')) >> text=not running", timeout=10_000)
            tab.shot("monitor_real_daemon_killed.png")
            tab.assert_clean()
    finally:
        d.close()


def test_the_charts_mark_consolidations_and_rollbacks_and_the_base_is_named_whole(browser, tmp_path):
    """Issue 28, item 7: a consolidation and a rollback are lines on the charts at their steps; the Base field
    shows the generation and the consolidated folder's whole stamp."""
    cfg = make_instance(tmp_path)
    fake = FakeDaemon(cfg)
    fake.steps(120)
    fake.db.event("consolidated", "adapter v3 merged into generation 1's base", t=time.time())
    time.sleep(0.01)
    fake.steps(60)
    fake.db.event("rollback", "rolled back to adapter v4 (published as v6)", t=time.time())
    time.sleep(0.01)
    fake.steps(30)
    stamp = "20261206T193000Z-2"
    base = str(cfg.path("consolidated") / stamp)
    with monitor_process(cfg) as url, Heartbeat(fake, status="idle", detail="waiting for files", base_model=base,
                                                generation=1, adapter_version=6):
        tab = Page(browser, url)
        tab.open(token_of(cfg))
        tab.wait_badge("idle")
        tab.wait_points_above(0)
        wait_until(lambda: tab.page.get_attribute("#chart-loss", "data-markers") == "consolidation@119,rollback@179",
                   what="markers at steps 119 and 179")
        shown = tab.page.inner_text("#base-model")
        assert shown == f"generation 1 · {stamp}", shown
        assert tab.page.evaluate("(() => { const e = document.getElementById('base-model');"
                                 " return e.scrollWidth <= e.clientWidth; })()"), "the Base field is cut"
        tab.shot("monitor_generation_markers.png")


def _forgetting_history(fake: FakeDaemon) -> dict:
    """Five files of one generation as the service records their forgetting reports: the fourth forgets the
    first file (+50%) and the general probe (+20%), a rollback after the third, a consolidation after the last.
    Returns the status block of the last report."""
    from daemon import forgetting_view
    from tests.forgetting_helpers import report

    names = ["facts.jsonl", "chat_examples.jsonl", "support.jsonl", "style_guide.jsonl", "more_facts.jsonl"]
    ids = [f"20261122T02030{i}Z-00000{i}--{n}" for i, n in enumerate(names)]
    right_after = [0.60, 0.50, 0.45, 0.40, 0.42]
    now_of = [  # each earlier file's keep-set loss after file k
        [], [0.63], [0.64, 0.52], [0.90, 0.56, 0.47], [0.80, 0.52, 0.46, 0.41]]
    general = [1.05, 1.07, 1.06, 1.272, 1.20]
    style = [2.00, 1.96, 1.90, 1.80, 1.82]
    t0, out = time.time() - 600, None
    for k, (job_id, name) in enumerate(zip(ids, names)):
        r = report(job_id, name, k + 1, 0,
                   keep=[(ids[i], names[i], now_of[k][i], right_after[i]) for i in range(k)],
                   probes=[("general.jsonl", general[k], general[k - 1] if k else 1.0, 1.0),
                           ("style.jsonl", style[k], style[k - 1] if k else 2.0, 2.0)],
                   own=(job_id, right_after[k]))
        fake.db.record_forgetting(r, "done", t0 + 60 * k)
        out = forgetting_view.summary(r, "done")
        if k == 2:
            fake.db.event("rollback", "rolled back to adapter v2 (published as v4)", t=t0 + 60 * k + 30)
    fake.db.event("consolidated", "adapter v5 merged into generation 1's base", t=t0 + 60 * 4 + 30)
    return out


def test_the_forgetting_view_shows_the_matrix_the_probes_and_the_gate(browser, tmp_path):
    """Files × sets coloured by the change since learnt, over-limit cells outlined, probes as lines over files,
    the rollback and the consolidation marked, the gate's message when the last file tripped it."""
    cfg = make_instance(tmp_path)
    fake = FakeDaemon(cfg)
    fake.steps(20)
    with monitor_process(cfg) as url, Heartbeat(fake, status="idle", detail="waiting for files") as beat:
        tab = Page(browser, url)
        tab.open(token_of(cfg))
        tab.page.wait_for_selector("#forgetting-generation option", state="attached")  # the first answer came
        assert tab.page.locator("#forgetting-empty").is_visible() and not tab.page.locator("#forgetting-body").is_visible()
        block = _forgetting_history(fake)
        block["gate"] = {"action": "warn", "tripped": True, "over": ["probe:general.jsonl"],
                         "message": "general.jsonl loss +20.0% against the version before (limit +10.0%)"}
        beat.set(forgetting=block)
        tab.page.wait_for_selector("#forgetting-heatmap[data-rows='5']", timeout=15_000)
        canvas = tab.page.locator("#forgetting-heatmap")
        attrs = {k: canvas.get_attribute("data-" + k) for k in ("cells", "cols", "over", "markers", "x0", "y0", "cell-w", "cell-h")}
        assert attrs["cols"] == "7" and attrs["markers"] == "2", attrs  # 2 probes + 5 keep-sets
        assert int(attrs["cells"]) == 2 * 5 + 10 and int(attrs["over"]) >= 2, attrs  # probes every row; keep below the diagonal
        banner = tab.page.locator("#forgetting-gate")
        banner.wait_for(state="visible", timeout=15_000)  # from the status, which may come after the matrix
        assert "general.jsonl loss +20.0%" in banner.text_content()
        assert "style_guide.jsonl" not in (tab.page.text_content("#forgetting-info") or "")
        assert tab.page.get_attribute("#forgetting-probes", "data-series") == "2"
        canvas.scroll_into_view_if_needed()
        box = canvas.bounding_box()
        tab.page.mouse.move(box["x"] + float(attrs["x0"]) + 2.5 * float(attrs["cell-w"]),   # K0: facts.jsonl's keep-set
                            box["y"] + float(attrs["y0"]) + 3.5 * float(attrs["cell-h"]))   # after file 3
        said = tab.page.text_content("#forgetting-hover")
        assert "after style_guide.jsonl (v4)" in said and "keep-set facts.jsonl" in said and "+50.0%" in said
        assert "over its limit" in said
        path = tab.shot_of(".forgetting-panel", "monitor_forgetting.png")
        assert path.stat().st_size > 10_000
        tab.assert_clean()
    fake.db.close()


def test_a_held_version_shows_what_it_forgot_and_accept_asks_the_daemon(browser, tmp_path):
    """forgetting.action hold: the controls say what the held version forgot and offer accept and reject; a click
    leaves the request the service carries out (version 2 held aside, version 1 current)."""
    from daemon import adapters

    cfg = make_instance(tmp_path)
    fake = FakeDaemon(cfg)
    fake.steps(10)
    folder = cfg.path("adapters")
    adapters.publish(folder, {"version": 1, "job_id": "j1", "original_name": "a.jsonl"}, lambda d: None)
    adapters.publish(folder, {"version": 2, "parent_version": 1, "job_id": "j2", "original_name": "b.jsonl",
                              "held": True}, lambda d: None, make_current=False)
    message = ("adapter v2 (b.jsonl) is held: forgot the keep-set of a.jsonl: loss 0.60 -> 0.90 (+50.0%, limit 25% "
               "since learnt)")
    lock_fd = acquire(cfg.path("status") / "daemon.lock")  # a running daemon holds it: the request is for it
    with monitor_process(cfg) as url, Heartbeat(fake, status="paused", detail=message, pause_reason="forgetting",
                                                adapter_version=1, held={"version": 2, "job_id": "j2",
                                                                         "file": "b.jsonl", "message": message}):
        tab = Page(browser, url)
        tab.open(token_of(cfg))
        tab.page.locator("#held-box").wait_for(state="visible", timeout=15_000)
        assert "+50.0%" in tab.page.text_content("#held-message")
        assert tab.page.text_content("#btn-accept") == "Accept v2" and tab.page.is_enabled("#btn-reject")
        tab.page.click("#btn-accept")
        wait_until(lambda: [(r.action, r.version) for r in control.pending_requests(cfg)] == [(ControlAction.ACCEPT, 2)],
                   what="the accept request")
        tab.shot_of(".controls-panel", "monitor_held.png")
        tab.assert_clean()
    os.close(lock_fd)
    fake.db.close()


def test_a_preference_file_shows_its_pairs_in_training_and_when_done(browser, tmp_path):
    """The status panel's Pairs row while a preference file trains (hidden otherwise), and a done preference
    file's row says how many held-out pairs preferred the chosen answer before and after it."""
    import json

    cfg = make_instance(tmp_path)
    fake = FakeDaemon(cfg)
    q = _fabricated_queue(cfg)
    done = q.finish(q.start(q.next_pending()).job_id)
    pref = {"loss_type": "sigmoid", "beta": 0.1, "before": {"pairs": 8, "accuracy": 0.125},
            "after": {"pairs": 8, "accuracy": 0.875}}
    fake.db.upsert_job(done.job_id, original_name=done.original_name, state="done", steps=12, total_steps=12,
                       final_loss=0.31, format="preference_chat", preference=json.dumps(pref), finished_at=time.time())
    training = dict(status="training", detail="training", current_file="likes.jsonl", job_id=JOB, current_step=3,
                    total_steps=12, queue=q.counts(), trainer_pid=os.getpid(),
                    preference={"reward_accuracy": 0.75, "reward_margin": 0.123, "before": {"accuracy": 0.125}})
    with monitor_process(cfg) as url, Heartbeat(fake, **training) as beat:
        tab = Page(browser, url)
        tab.open(token_of(cfg))
        tab.page.wait_for_selector("#pref >> text=reward acc 0.75 · margin 0.123 · held-out acc 0.13 → —")
        tab.page.locator(f"tr[data-job='{done.job_id}'] >> text=preferred 0.13 → 0.88").wait_for()
        beat.set(preference=None)
        tab.page.wait_for_selector("#pref-row", state="hidden")
        tab.assert_clean()
