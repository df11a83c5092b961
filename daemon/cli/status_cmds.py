"""trainctl status: the one-screen summary, `--watch` and `--json`."""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Callable

from daemon import forgetting_view, serve_view
from daemon.cli.shared import daemon_pid, duration, number, out, progress_bar, with_config, with_running_config
from daemon.diskspace import human_bytes
from daemon.diskspace import write_trouble
from daemon.config import Config
from daemon.logs import LogFollower
from daemon.states import DesiredState, PauseReason
from daemon.status import read_status

if TYPE_CHECKING:
    from daemon.cli.shared import Subparsers

FOLLOW_POLL_SECONDS = 0.5  # trainctl logs -f: how often it looks for new lines
RANK_LINES = 8  # ranks listed one per line; the slowest is listed wherever it is, the rest counted (one screen)


def register(subparsers: Subparsers, common: argparse.ArgumentParser) -> None:
    s = subparsers.add_parser("status", parents=[common], help="one-screen summary")
    s.add_argument("--json", action="store_true", help="print the raw status JSON")
    s.add_argument("--watch", nargs="?", const=2.0, type=_seconds, default=None, metavar="SECONDS", help="refresh until Ctrl-C")
    s.set_defaults(handler=with_running_config(cmd_status))
    h = subparsers.add_parser("health", parents=[common],
                              help="one report: daemon, config, queue, disk, adapter, checkpoint (exit 0 ok, 1 warnings, 2 a problem)")
    h.add_argument("--deep", action="store_true", help="also load the newest checkpoint (in a subprocess)")
    h.add_argument("--json", action="store_true")
    h.set_defaults(handler=with_running_config(cmd_health))
    lg = subparsers.add_parser("logs", parents=[common], help="the newest log lines (the daemon's, or --trainer's)")
    lg.add_argument("-n", "--lines", type=int, default=50, help="lines to show (default 50)")
    lg.add_argument("-f", "--follow", action="store_true", help="keep printing new lines (across days) until Ctrl-C")
    lg.add_argument("--trainer", action="store_true", help="the trainer child's log instead of the daemon's")
    lg.set_defaults(handler=with_config(cmd_logs))


def _seconds(text: str) -> float:
    """A refresh interval: a positive number of seconds (argparse turns the error into a usage message)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0.1 <= value <= 86400:
        raise argparse.ArgumentTypeError(f"must be between 0.1 and 86400 seconds, got {text}")
    return value


def cmd_status(cfg: Config, args: argparse.Namespace) -> int:
    try:
        while True:
            st = read_status(cfg.path("status"))
            if args.json:
                out(json.dumps(st, indent=2))
            else:
                if args.watch and sys.stdout.isatty():
                    sys.stdout.write("\x1b[2J\x1b[H")  # redraw in place; piped, each screen follows the last
                elif args.watch:
                    out(f"--- {time.strftime('%H:%M:%S')}")
                out(render_status(st, daemon_pid(cfg), lambda: write_trouble(cfg.path("status")),
                                  serve_view.read_serve(cfg.path("status"))))
            if not args.watch:
                return 0
            time.sleep(args.watch)
    except KeyboardInterrupt:  # Ctrl-C ends --watch, wherever in the loop it lands
        return 0


def render_status(st: dict | None, running_pid: int | None,
                  trouble: Callable[[], tuple[str, str] | None] = lambda: None, serving: dict | None = None) -> str:
    """The one-screen summary a person reads at a glance. `trouble()`: why the status folder cannot be written,
    asked only when the daemon runs but its status is stale (it cannot say so itself then). `serving`: traind
    serve's own status (daemon.serve_view.read_serve), a line of its own."""
    if st is None:
        return "traind: no status yet (the daemon has never run for this config)"
    age = _age(st.get("updated_at"))
    lines = [_headline(st, running_pid, age, trouble), f"  detail   {st.get('detail') or '-'}"]
    dev = " / ".join(str(x) for x in (st.get("device"), st.get("compute_dtype"), st.get("quantization")) if x)
    gen = f"   generation {st['generation']}" if st.get("generation") else ""
    lines.append(f"  model    {st.get('base_model')}{gen}   {dev}   adapter v{st.get('adapter_version') or 0}")
    lines += [f"  setting  {note}" for note in st.get("settings_notes") or []]  # what traind chose, and why
    if st.get("current_file"):
        lines += _training_lines(st)
    if (st.get("world_size") or 1) > 1:
        lines += _rank_lines(st)
    lines.append(_queue_line(st.get("queue") or {}))
    if st.get("forgetting"):  # what the last file's scoring found (trainctl forgetting: the matrix)
        lines.append(f"  forgetting {forgetting_view.one_line(st['forgetting'])}")
    if st.get("pause_reason") in (PauseReason.DISK_FULL.value, PauseReason.UNWRITABLE.value) and st.get("disk_full"):
        lines += _disk_lines(st)
    if st.get("desired_state") == DesiredState.PAUSED.value and st["status"] != "paused":
        lines.append("  note     pause requested; it takes effect at the next step")
    if st.get("last_error"):
        lines.append(f"  error    {st['last_error']}")
    if serving is not None:
        lines.append(f"  serve    {serve_view.one_line(serving)}")
    lines.append(f"  updated  {duration(age)} ago" if age is not None else "  updated  never")
    return "\n".join(lines)


def _age(updated_at: str | None) -> float | None:
    if not updated_at:
        return None
    try:  # the writer's format; any ISO 8601 time (a hand-edited or foreign status) is read too
        t = datetime.fromisoformat(updated_at.replace("Z", "+00:00"))
    except (TypeError, ValueError):
        return None
    if t.tzinfo is None:
        t = t.replace(tzinfo=timezone.utc)
    return time.time() - t.timestamp()


HELD = {PauseReason.DISK_FULL.value: " (disk full)", PauseReason.UNWRITABLE.value: " (cannot write)"}


def _headline(st: dict, running_pid: int | None, age: float | None,
              trouble: Callable[[], tuple[str, str] | None] = lambda: None) -> str:
    """The state, and whether the daemon runs and still writes its status."""
    alive = running_pid is not None
    said = st["status"] + HELD.get(st.get("pause_reason") or "", "")
    state = said if alive else f"not running (last said: {said})"
    if alive and age is not None and age > 3 * st.get("write_interval_seconds", 2.0):
        why = trouble()
        if why is not None:  # it runs, but cannot say so: its status folder tells why
            kind = "disk full" if why[0] == "full" else "cannot write"
            state = (f"paused ({kind})  !! the daemon cannot write its status: {why[1]}; training is held until it "
                     f"can (last update {duration(age)} ago)")
        else:
            state += f"  !! no status update for {duration(age)}: daemon not responding"
    return f"traind  {state}" + (f"   pid {running_pid}" if alive else "")


def _disk_lines(st: dict) -> list[str]:
    """Why the daemon holds for disk space, and what ends it."""
    d = st["disk_full"]
    need = f" (needs {human_bytes(d['min_free_bytes'])})" if d.get("min_free_bytes") else ""
    what = "free space below the threshold" if d.get("site") == "threshold" else f"{d.get('site')} write failed: {d.get('message')}"
    if d.get("kind") == "unwritable":
        return [f"  DISK     CANNOT WRITE: {d.get('folder')}", f"           {what}; since {d.get('since') or '?'}",
                "           training resumes by itself once it can be written again (permissions, a read-only mount)"]
    lines = [f"  DISK     FULL: {d.get('folder')} has {human_bytes(d.get('free_bytes') or 0)} free{need}",
             f"           {what}; since {d.get('since') or '?'}",
             "           training resumes by itself once space is back (free some, or raise the disk)"]
    if st.get("desired_state") == DesiredState.PAUSED.value:
        lines.append("           and stays paused after that: pause was requested (trainctl resume)")
    return lines


def _training_lines(st: dict) -> list[str]:
    total, step = st.get("total_steps") or 0, st.get("current_step") or 0
    live = st.get("status") == "training"  # paused or stopping: no throughput, and no time left to tell
    eta = duration(st.get("eta_seconds")) if live else "-"
    tps = number(st.get("tokens_per_sec"), ",.0f") if live else "-"
    return [
        f"  file     {st['current_file']}   ({st.get('job_id')})",
        f"  progress {progress_bar(step, total)}  step {step}/{total}  epoch {st.get('epoch', 0):.2f}  ETA {eta}",
        f"  loss     {number(st.get('loss'), '.4f')}   eval {number(st.get('eval_loss'), '.4f')}   "
        f"lr {number(st.get('lr'), '.2e')}   {tps} tok/s",
    ] + _preference_lines(st.get("preference"))


def _preference_lines(pref: dict | None) -> list[str]:
    """A preference file's last step (reward accuracy and margin) and its held-out pairs so far."""
    if not pref:
        return []
    held, before = pref.get("held_out") or {}, pref.get("before") or {}
    line = (f"  pairs    reward acc {number(pref.get('reward_accuracy'), '.2f')}   "
            f"margin {number(pref.get('reward_margin'), '.3f')}")
    if before or held:
        line += (f"   held-out acc {number(before.get('accuracy'), '.2f')} -> "
                 f"{number(held.get('accuracy'), '.2f')}")
    return [line]


def _rank_lines(st: dict) -> list[str]:
    """The trainer's processes: how they train together, then one line per rank of the latest step."""
    d = st.get("distributed") or {}
    nodes = d.get("nnodes") or 1
    how = [x for x in (d.get("strategy"), d.get("backend")) if x] + [f"{nodes} node" + ("s" if nodes > 1 else "")]
    lines = [f"  ranks    {st['world_size']} ({', '.join(how)})"]
    shown = [r for i, r in enumerate(st.get("ranks") or []) if i < RANK_LINES or r.get("rank") == st.get("slowest_rank")]
    rows = [(str(r.get("rank")), r.get("host") or "-", r.get("device") or "-", number(r.get("tokens_per_sec"), ",.0f"),
             "-" if r.get("rss_bytes") is None else human_bytes(r["rss_bytes"]),
             "" if r.get("gpu_memory_bytes") is None else f"   GPU {human_bytes(r['gpu_memory_bytes'])}",
             "   <- slowest" if r.get("rank") == st.get("slowest_rank") else "") for r in shown]
    width = [max((len(row[i]) for row in rows), default=0) for i in range(5)]
    for rank, host, device, tps, rss, gpu, mark in rows:
        lines.append(f"           rank {rank:<{width[0]}}  {host:<{width[1]}}  {device:<{width[2]}}  "
                     f"{tps:>{width[3]}} tok/s   RSS {rss:>{width[4]}}{gpu}{mark}")
    if len(st.get("ranks") or []) > len(shown):
        lines.append(f"           ... and {len(st['ranks']) - len(shown)} more (trainctl status --json)")
    return lines


def _queue_line(q: dict) -> str:
    return (f"  queue    pending {q.get('pending', 0)} (high {q.get('pending_high', 0)}, normal {q.get('pending_normal', 0)}, "
            f"low {q.get('pending_low', 0)})  processing {q.get('processing', 0)}  done {q.get('done', 0)}  failed {q.get('failed', 0)}")


def cmd_health(cfg: Config, args: argparse.Namespace) -> int:
    from daemon.health import Check, exit_code, run_checks

    checks = run_checks(cfg, deep=args.deep)
    problem = getattr(args, "config_problem", None)  # config.json broken; the checks ran on the daemon's copy
    if problem is not None:
        checks = [Check("config", "problem", f"{' '.join(str(problem).split())}; the running daemon keeps the config "
                                             "it started with, and will not start again with this one")
                  if c.name == "config" else c for c in checks]
    code = exit_code(checks)
    if args.json:
        out(json.dumps({"exit_code": code, "checks": [c.to_dict() for c in checks]}, indent=2))
        return code
    marks = {"ok": "ok  ", "warning": "WARN", "problem": "FAIL"}
    for c in checks:
        out(f"{marks[c.level]}  {c.name:<11} {c.detail}")
    out({0: "healthy", 1: "healthy, with warnings", 2: "not healthy"}[code])
    return code


def cmd_logs(cfg: Config, args: argparse.Namespace) -> int:
    prefix = "trainer" if args.trainer else "daemon"
    follower = LogFollower(cfg.path("logs"), prefix)
    if follower.newest() is None and not args.follow:
        out(f"no {prefix} log in {cfg.path('logs')} yet")
        return 1
    try:
        text = follower.tail(args.lines)  # following goes on from where this read ended: nothing is missed
        if not args.follow:
            sys.stdout.write(text if not text or text.endswith("\n") else text + "\n")
            return 0
        while True:
            if text:
                sys.stdout.write(text)
                sys.stdout.flush()
            time.sleep(FOLLOW_POLL_SECONDS)
            text = follower.poll()
    except KeyboardInterrupt:
        return 0
    finally:
        follower.close()
