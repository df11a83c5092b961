"""Log retention (service.log_keep_days, log_max_bytes) and `trainctl logs` (#12)."""

from __future__ import annotations

import argparse
import builtins
import io
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

from daemon.cli.status_cmds import cmd_logs
from daemon.config import load_config
from daemon.logs import prune_logs
from bench.harness import REPO, write_instance


def test_old_and_oversized_logs_go_and_the_current_one_stays(tmp_path):
    day = lambda days_ago: time.strftime("%Y%m%d", time.gmtime(time.time() - days_ago * 86400))  # noqa: E731
    for ago, size in ((40, 10), (31, 10), (3, 500), (2, 500), (1, 500), (0, 500)):
        (tmp_path / f"daemon_{day(ago)}.log").write_text("x" * size)
    (tmp_path / f"trainer_{day(40)}.log").write_text("other kind")
    current = tmp_path / f"daemon_{day(0)}.log"
    gone = prune_logs(tmp_path, "daemon", keep_days=30, max_bytes=1200, current=current)
    assert sorted(p.name for p in gone) == sorted(f"daemon_{day(a)}.log" for a in (40, 31, 3, 2))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"daemon_{day(1)}.log", current.name, f"trainer_{day(40)}.log"])
    assert prune_logs(tmp_path, "daemon", keep_days=0, max_bytes=1, current=current) == [tmp_path / f"daemon_{day(1)}.log"]
    assert current.exists()  # the file in use, whatever its size


def test_trainctl_logs_shows_the_newest_lines(tmp_path):
    config = write_instance(tmp_path / "inst")
    cfg = load_config(config)
    cfg.path("logs").mkdir(parents=True)
    today = time.strftime("%Y%m%d", time.gmtime())
    (cfg.path("logs") / f"trainer_{today}.log").write_text("".join(f"line {i}\n" for i in range(100)))

    def trainctl(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "daemon.cli", "--config", str(config), *args], cwd=REPO,
                              capture_output=True, text=True, timeout=60)

    r = trainctl("logs", "--trainer", "-n", "3")
    assert r.returncode == 0 and r.stdout.splitlines() == ["line 97", "line 98", "line 99"]
    r = trainctl("logs")
    assert r.returncode == 1 and "no daemon log" in r.stdout


def test_trainctl_logs_follow_prints_what_is_appended(tmp_path):
    """The real CLI process: the tail, then a line appended later. Bounded: never waits on a missed line."""
    import signal

    config = write_instance(tmp_path / "inst")
    cfg = load_config(config)
    cfg.path("logs").mkdir(parents=True)
    log = cfg.path("logs") / f"daemon_{time.strftime('%Y%m%d', time.gmtime())}.log"
    log.write_text("before\n")
    proc = subprocess.Popen([sys.executable, "-m", "daemon.cli", "--config", str(config), "logs", "-f", "-n", "1"],
                            cwd=REPO, stdout=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    try:
        assert lines.get(timeout=60) == "before\n"
        with open(log, "a") as f:
            f.write("appended later\n")
        assert lines.get(timeout=60) == "appended later\n"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            assert proc.wait(timeout=20) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


class _Overtaken:
    """Opens the log files through a wrapper whose first `times` reads of `path` let a writer append a line
    right after the read returns: the window between reading a file and noting where to go on from."""

    def __init__(self, monkeypatch, path: Path, times: int, what: str = "appended during read") -> None:
        self.path, self.left, self.what, self.appended = path, times, what, []
        self.real_open = builtins.open
        monkeypatch.setattr(builtins, "open", self.open)
        monkeypatch.setattr(io, "open", self.open)  # pathlib's read_text opens through io.open

    def open(self, file, *args, **kwargs):
        f = self.real_open(file, *args, **kwargs)
        return _Reads(f, self) if isinstance(file, (str, os.PathLike)) and Path(file) == self.path else f

    def after_read(self) -> None:
        if self.left > 0:
            self.left -= 1
            line = f"{self.what} {len(self.appended) + 1}\n"
            with self.real_open(self.path, "a", encoding="utf-8") as w:
                w.write(line)
            self.appended.append(line)


class _Reads:
    def __init__(self, f, hook: _Overtaken) -> None:
        self._f, self._hook = f, hook

    def read(self, *args):
        data = self._f.read(*args)
        self._hook.after_read()
        return data

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._f.close()


def _follow(cfg, monkeypatch, polls: int, lines: int = 1, each_poll=lambda k: None) -> None:
    """`trainctl logs -f` in this process for `polls` polls: its sleep runs `each_poll(k)` and then Ctrl-C."""
    count = {"k": 0}

    def sleep(seconds: float) -> None:
        count["k"] += 1
        if count["k"] > polls:
            raise KeyboardInterrupt
        each_poll(count["k"])

    monkeypatch.setattr(time, "sleep", sleep)
    assert cmd_logs(cfg, argparse.Namespace(trainer=False, lines=lines, follow=True)) == 0


def test_logs_follow_prints_a_line_appended_while_the_tail_is_read(tmp_path, monkeypatch, capsys):
    cfg = load_config(write_instance(tmp_path / "inst"))
    cfg.path("logs").mkdir(parents=True)
    log = cfg.path("logs") / f"daemon_{time.strftime('%Y%m%d', time.gmtime())}.log"
    log.write_text("older\nbefore\n")
    hook = _Overtaken(monkeypatch, log, times=3)
    _follow(cfg, monkeypatch, polls=5)
    assert len(hook.appended) == 3  # the tail's read and the follow loop's reads were each overtaken
    assert capsys.readouterr().out == "before\n" + "".join(hook.appended)


def test_logs_follow_across_midnight_keeps_the_old_days_last_lines(tmp_path, monkeypatch, capsys):
    """The new day's file appears; a line still lands in the old one (a record stamped before midnight,
    written just after): both days' lines are printed, each once."""
    cfg = load_config(write_instance(tmp_path / "inst"))
    folder = cfg.path("logs")
    folder.mkdir(parents=True)
    old, new = folder / "daemon_20260101.log", folder / "daemon_20260102.log"
    old.write_text("day one\n")

    def each_poll(k: int) -> None:
        if k == 1:
            with open(old, "a") as f:
                f.write("day one, last\n")
            new.write_text("day two\n")
        elif k == 2:
            with open(old, "a") as f:
                f.write("day one, late\n")
            with open(new, "a") as f:
                f.write("day two, more\n")

    _follow(cfg, monkeypatch, polls=4, each_poll=each_poll)
    out = capsys.readouterr().out.splitlines()
    assert sorted(out) == sorted(["day one", "day one, last", "day two", "day one, late", "day two, more"])
    assert out[:3] == ["day one", "day one, last", "day two"]


def test_logs_tail_reads_only_the_end_of_a_large_file(tmp_path, capsys):
    cfg = load_config(write_instance(tmp_path / "inst"))
    cfg.path("logs").mkdir(parents=True)
    log = cfg.path("logs") / f"daemon_{time.strftime('%Y%m%d', time.gmtime())}.log"
    log.write_bytes(b"".join(b"line %d \xc3\xa9\n" % i for i in range(200_000)) + b"partial")
    assert cmd_logs(cfg, argparse.Namespace(trainer=False, lines=2, follow=False)) == 0
    assert capsys.readouterr().out == "line 199999 \u00e9\npartial\n"
