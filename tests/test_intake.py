import os

from daemon.service.inbox import InboxScanner
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

    from bench.harness import lines_of, write_instance
    from bench.harness import Daemon

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


# ---------------------------------------------------------------- writers that hold a file open (#26)


def test_a_file_held_open_for_writing_is_not_taken_until_its_writer_closes_it(tmp_path):
    """A writer that keeps the file open and pauses longer than the settle window: the file is not taken
    half-written, however long the pause; closed, it is taken at once (it has held still)."""
    s = scanner(tmp_path)
    f = tmp_path / "inbox" / "a.jsonl"
    fh = open(f, "w")
    try:
        fh.write('{"text": "one"}\n')
        fh.flush()
        assert s.ready(now=100.0) == []
        assert s.ready(now=101.5) == [] and s.held_open() == 1  # held still past the window, but still open
        fh.write('{"text": "two"}\n')
        fh.flush()
        assert s.ready(now=104.0) == []
        assert s.ready(now=500.0) == []
    finally:
        fh.close()
    s.closed(f)  # what the inbox watcher tells on inotify's close-after-write
    assert s.ready(now=500.1) == [(f, Priority.NORMAL)]


def test_a_file_open_only_for_reading_is_taken(tmp_path):
    s = scanner(tmp_path)
    f = tmp_path / "inbox" / "a.jsonl"
    f.write_text('{"text": "one"}\n')
    with open(f, encoding="utf-8") as reader:
        reader.read(1)
        s.ready(now=100.0)
        assert s.ready(now=101.0) == [(f, Priority.NORMAL)]


def test_a_file_another_process_holds_open_is_seen_and_looked_at_again_after_it_exits(tmp_path):
    import subprocess
    import sys

    s = scanner(tmp_path)
    f = tmp_path / "inbox" / "a.jsonl"
    f.write_text('{"text": "one"}\n')
    code = "import sys, time; f = open(sys.argv[1], 'a'); print('open', flush=True); time.sleep(60)"
    holder = subprocess.Popen([sys.executable, "-c", code, str(f)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "open\n"
        s.ready(now=100.0)
        assert s.ready(now=101.0) == []
        assert s.ready(now=102.0) == []  # looked at again only every recheck_seconds (2 s here)...
    finally:
        holder.kill()
        holder.wait()
    assert s.ready(now=102.5) == []  # ...so its end is seen at the next look
    assert s.ready(now=103.0) == [(f, Priority.NORMAL)]


def test_open_for_writing_reads_the_mode_of_each_open_file(tmp_path):
    from daemon.service.openfiles import open_for_writing

    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("x\n")
    b.write_text("y\n")
    with open(a, "r+b"), open(b, "rb"):
        found = open_for_writing([a, b])
        assert found.supported
        assert [w.pid for w in found.writers[a]] == [os.getpid()] and found.writers[a][0].name
        assert b not in found.writers
    renamed = tmp_path / "c.jsonl"
    with open(a, "ab"):
        a.rename(renamed)  # the link under /proc follows the file
        assert renamed in open_for_writing([renamed]).writers
    assert open_for_writing([renamed]).writers == {}


def test_a_name_taken_lately_that_appears_again_waits_the_longer_window(tmp_path, caplog):
    """`echo line >> inbox/x.jsonl` every 2 s: the first line is taken after the settle window; the file the
    next echo makes again waits recreated_settle_seconds, so the rest arrive as one file, not one each."""
    s = InboxScanner(tmp_path / "inbox", 1.0, (".part",), recreated_settle_seconds=30.0)
    s.ensure()
    f = tmp_path / "inbox" / "x.jsonl"
    f.write_text("1\n")
    s.ready(now=100.0)
    assert s.ready(now=101.0) == [(f, Priority.NORMAL)]
    s.forget(f)
    s.taken(f, now=101.0)
    f.unlink()  # what the queue's move does
    f.write_text("2\n")
    with caplog.at_level("WARNING", logger="daemon.intake"):
        assert s.ready(now=103.0) == []
        assert s.ready(now=105.0) == []  # held still for the usual window, not for the longer one
    with open(f, "a") as fh:
        fh.write("3\n")
    assert s.ready(now=107.0) == [] and s.ready(now=136.0) == []
    assert s.ready(now=137.0) == [(f, Priority.NORMAL)]
    told = [r.getMessage() for r in caplog.records if "x.jsonl" in r.getMessage()]
    assert len(told) == 1 and "x.jsonl.part" in told[0], told
    # a rename says the file is complete: taken at once, however lately the name was taken
    s.forget(f)
    s.taken(f, now=137.0)
    f.unlink()
    f.write_text("4\n")
    s.renamed_in(f)
    assert s.ready(now=137.5) == [(f, Priority.NORMAL)]
    # ten minutes on, the name is new again
    s.forget(f)
    s.taken(f, now=137.5)
    assert s.ready(now=137.5 + 601) == [] and s.ready(now=137.5 + 602) == [(f, Priority.NORMAL)]


def test_things_that_are_not_regular_files_are_named_once_and_left_alone(tmp_path, caplog):
    s = scanner(tmp_path, settle=0)
    inbox = tmp_path / "inbox"
    os.mkfifo(inbox / "pipe.jsonl")
    (inbox / "zero.jsonl").symlink_to("/dev/zero")
    (inbox / "nowhere.jsonl").symlink_to(inbox / "missing")
    (inbox / "high" / "folder.jsonl").mkdir()
    with caplog.at_level("WARNING", logger="daemon.intake"):
        assert s.ready(now=1.0) == [] and s.ready(now=2.0) == []
    told = sorted(r.getMessage() for r in caplog.records)
    assert len(told) == 4, told
    assert any("pipe.jsonl is a FIFO" in t for t in told)
    assert any("zero.jsonl is a link to a character device" in t for t in told)
    assert any("nowhere.jsonl is a link to nothing" in t for t in told)
    assert any("folder.jsonl is a folder" in t for t in told)
