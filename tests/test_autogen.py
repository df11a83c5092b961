"""Data generated when idle (#12): builtin puzzles, a command, an HTTP endpoint; a broken one never blocks."""

from __future__ import annotations

import json
import random
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from daemon.service.autogen import builtin_records
from bench.harness import lines_of, write_instance
from bench.harness import Daemon


def test_builtin_puzzles_have_checkable_answers():
    recs = builtin_records(300, random.Random(0))
    kinds = {"Sort": 0, "What": 0, "How": 0}
    for r in recs:
        q, a = r["messages"][0]["content"], r["messages"][1]["content"]
        kinds[q.split()[0]] += 1
        if q.startswith("Sort"):
            words = q.split(": ", 1)[1].split(", ")
            assert a == ", ".join(sorted(words))
        elif q.startswith("What"):
            x, op, y = q.removeprefix("What is ").rstrip("?").split()
            assert int(a) == {"+": int(x) + int(y), "-": int(x) - int(y), "*": int(x) * int(y)}[op]
        else:
            letter, word = q.split("'")[1], q.split("'")[3]
            assert int(a) == word.count(letter)
    assert all(n > 50 for n in kinds.values())


def gen_daemon(tmp_path, models_dir, **gen):  # noqa: ANN001, ANN201
    return Daemon(write_instance(tmp_path / "inst", models_dir, training={"epochs_per_file": 1},
                                 auto_generate={"enabled": True, "idle_seconds": 0.5, "count": 48, "max_files_per_day": 2, **gen}))


@pytest.mark.e2e
def test_an_idle_daemon_trains_on_builtin_puzzles_up_to_its_daily_cap(tmp_path, models_dir):
    d = gen_daemon(tmp_path, models_dir)
    try:
        d.start()
        st = d.wait_for(lambda s: (s.get("queue") or {}).get("done", 0) >= 2 and (s.get("auto_generate") or {}).get("state") == "daily_cap",
                        timeout=240, what="two generated files trained, then the cap")
        names = sorted(e.original_name for e in d.queue.done())
        assert len(names) == 2 and all(n.startswith("auto-builtin-") for n in names)
        assert st["auto_generate"]["records_total"] == 96 and st["auto_generate"]["files_today"] == 2
        assert st["adapter_version"] == 2
        losses = [loss for _, loss in d.losses()]
        first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
        print(f"builtin puzzles: {len(losses)} steps, loss {first:.3f} (first 3) -> {last:.3f} (last 3)")
        assert last < first  # the puzzles are learnable: the loss falls
    finally:
        d.close()


@pytest.mark.e2e
@pytest.mark.slow  # the default run keeps under 15 min; `pytest -m slow` runs it
def test_command_and_http_generators_and_a_hanging_one(tmp_path, models_dir):
    line = json.dumps({"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]})
    script = f"import os; [print({line!r}) for _ in range(int(os.environ['TRAIND_COUNT']))]"
    d = gen_daemon(tmp_path / "cmd", models_dir, source="command", command=[sys.executable, "-c", script], max_files_per_day=1)
    try:
        d.start()
        d.wait_counts(done=1, timeout=180)
        assert d.queue.done()[0].path.read_text().count("Say hi") == 48
    finally:
        d.close()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            body = json.dumps([json.loads(line)] * 5).encode()  # a JSON list answer, fewer than asked
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    d = gen_daemon(tmp_path / "http", models_dir, source="http", url=f"http://127.0.0.1:{server.server_address[1]}/gen",
                   max_files_per_day=1)
    try:
        d.start()
        d.wait_counts(done=1, timeout=180)
        assert len(d.queue.done()[0].path.read_text().splitlines()) == 5
    finally:
        d.close()
        server.shutdown()


@pytest.mark.e2e
@pytest.mark.parametrize("behaviour", [pytest.param("error", marks=pytest.mark.slow), "hang"])
def test_an_http_generator_that_errors_or_hangs_backs_off_and_training_goes_on(tmp_path, models_dir, behaviour):
    import time

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            if behaviour == "hang":
                time.sleep(20)
            self.send_response(500)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    d = gen_daemon(tmp_path, models_dir, source="http", url=f"http://127.0.0.1:{server.server_address[1]}/gen",
                   timeout_seconds=1.0)
    try:
        d.start()
        st = d.wait_for(lambda s: (s.get("auto_generate") or {}).get("state") == "backing_off", timeout=60, what="back-off")
        err = st["auto_generate"]["last_error"]
        assert ("500" in err) if behaviour == "error" else ("timed out" in err.lower()), err
        assert any(e["kind"] == "auto_generate" for e in d.history().events())
        d.drop("real.jsonl", lines_of("text.jsonl", 12))
        d.wait_counts(done=1, timeout=120)
        t0 = time.time()
        assert d.stop() == 0 and time.time() - t0 < 30  # a stop does not wait for the generator
    finally:
        d.close()
        server.shutdown()
