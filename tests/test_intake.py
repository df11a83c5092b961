import os

from daemon.intake import InboxScanner
from daemon.states import Priority


def scanner(tmp_path, settle=1.0):
    s = InboxScanner(tmp_path / "inbox", settle, (".tmp", ".part"))
    s.ensure()
    return s


def test_file_taken_only_after_settling(tmp_path):
    s = scanner(tmp_path)
    f = tmp_path / "inbox" / "a.jsonl"
    f.write_text("x\n")
    assert s.ready(now=100.0) == []
    assert s.ready(now=100.5) == []
    assert s.ready(now=101.0) == [(f, Priority.NORMAL)]


def test_growing_file_restarts_the_window(tmp_path):
    s = scanner(tmp_path)
    f = tmp_path / "inbox" / "a.jsonl"
    f.write_text("x\n")
    s.ready(now=100.0)
    with open(f, "a") as fh:
        fh.write("more\n")
    assert s.ready(now=100.9) == []  # changed: window starts again at 100.9
    assert s.ready(now=101.5) == []
    assert s.ready(now=102.0) == [(f, Priority.NORMAL)]


def test_touched_mtime_restarts_the_window(tmp_path):
    s = scanner(tmp_path)
    f = tmp_path / "inbox" / "a.jsonl"
    f.write_text("x\n")
    s.ready(now=100.0)
    os.utime(f, ns=(1, 1))
    assert s.ready(now=101.0) == []


def test_temp_names_hidden_files_and_folders_ignored(tmp_path):
    s = scanner(tmp_path, settle=0)
    inbox = tmp_path / "inbox"
    for name in ("a.jsonl.tmp", "b.jsonl.PART", ".hidden.jsonl"):
        (inbox / name).write_text("x\n")
    (inbox / "sub").mkdir()
    assert s.ready(now=1.0) == []


def test_priority_from_subfolder(tmp_path):
    s = scanner(tmp_path, settle=0)
    (tmp_path / "inbox" / "high" / "h.jsonl").write_text("x\n")
    (tmp_path / "inbox" / "low" / "l.jsonl").write_text("x\n")
    (tmp_path / "inbox" / "n.jsonl").write_text("x\n")
    got = {p.name: prio for p, prio in s.ready(now=1.0)}
    assert got == {"h.jsonl": Priority.HIGH, "l.jsonl": Priority.LOW, "n.jsonl": Priority.NORMAL}


def test_a_stray_folder_is_reported_once(tmp_path, caplog):
    s = InboxScanner(tmp_path / "inbox", settle_seconds=0, ignore_suffixes=[".tmp"])
    s.ensure()
    (tmp_path / "inbox" / "urgent").mkdir()
    (tmp_path / "inbox" / "urgent" / "a.jsonl").write_text('{"text": "x"}\n')
    with caplog.at_level("WARNING", logger="daemon.intake"):
        assert s.ready(0.0) == [] and s.ready(1.0) == []
    told = [r.getMessage() for r in caplog.records if "urgent" in r.getMessage()]
    assert len(told) == 1 and "is not read" in told[0] and "inbox/high/" in told[0]


def test_a_file_waiting_at_start_and_unchanged_for_the_window_is_taken_at_once(tmp_path):
    """Waiting when the daemon starts: its mtime says it has held still. A later arrival is watched all the
    same (a network file system's writer may set an mtime from a clock that runs behind)."""
    s = scanner(tmp_path)
    old, fresh = tmp_path / "inbox" / "old.jsonl", tmp_path / "inbox" / "fresh.jsonl"
    old.write_text("x\n")
    fresh.write_text("y\n")
    now = fresh.stat().st_mtime
    os.utime(old, (now - 5, now - 5))
    assert s.ready(now=now + 0.1) == [(old, Priority.NORMAL)]  # the fresh one still gets its window
    assert s.ready(now=now + 1.01) == [(fresh, Priority.NORMAL), (old, Priority.NORMAL)]
    later = tmp_path / "inbox" / "later.jsonl"
    later.write_text("z\n")
    os.utime(later, (now - 5, now - 5))
    assert (later, Priority.NORMAL) not in s.ready(now=now + 1.1)  # not the first scan: it gets its window


def test_a_file_renamed_in_is_taken_at_once_and_one_written_in_place_waits(tmp_path, models_dir):
    """The `.part` protocol needs no settle window; a file written in place still gets it (#9: inbox latency)."""
    import time

    from tests.conftest import lines_of, write_instance
    from tests.daemon_harness import Daemon

    d = Daemon(write_instance(tmp_path / "inst", models_dir, intake={"settle_seconds": 30.0, "scan_interval_seconds": 0.5}))
    try:
        d.start()
        d.wait_for(lambda s: s["status"] == "idle", what="idle")
        in_place = d.cfg.path("inbox") / "copied.jsonl"
        in_place.write_text(lines_of("text.jsonl", 10))
        t0 = time.time()
        d.drop("renamed.jsonl", lines_of("text.jsonl", 11))  # written as renamed.jsonl.part, then renamed
        d.wait_for(lambda s: (s.get("queue") or {}).get("pending", 0) + (s.get("queue") or {}).get("processing", 0)
                   + (s.get("queue") or {}).get("done", 0) >= 1, timeout=20, what="the renamed file queued")
        taken = time.time() - t0
        print(f"renamed in: queued after {taken:.2f} s (settle window 30 s)")
        assert taken < 15
        assert in_place.exists()  # still settling: a writer may be appending to it
    finally:
        d.close()
