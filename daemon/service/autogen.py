"""Data when idle: once the queue has been empty for `auto_generate.idle_seconds`, ask a generator for records
and deliver them into the inbox like any producer (NAME.part, then a rename), where the normal path takes
them (validation, ledger, queue; `inbox/low/` by default).

    gen = AutoGenerator(cfg)
    gen.tick(now, queue_empty=True, paused=False)   # from the service loop: starts a request when due, never waits
    gen.status()                                    # for the status file

Sources: `builtin` (learnable puzzles with checkable answers, in chat format: sorting words, arithmetic,
counting letters), `http` (a GET to `url` on loopback answering JSONL or a JSON list of records; `?count=N`
is added) and `command` (argv whose stdout is JSONL). Each request runs in its own thread with a timeout, so
a slow, broken or hanging generator never holds training or a stop back. Limits: one request in flight,
`max_files_per_day`, and back-off after a failure (doubling from 30 s to an hour).
"""

from __future__ import annotations

import json
import logging
import os
import random
import subprocess
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from typing import Any

from daemon.config import Config

log = logging.getLogger(__name__)

FIRST_BACKOFF, MAX_BACKOFF = 30.0, 3600.0
WORDS = ("apple", "river", "stone", "cloud", "maple", "ember", "lantern", "violet", "harbor", "falcon", "meadow",
         "copper", "willow", "thunder", "saffron", "quartz", "pebble", "orchid", "glacier", "cinder")


@dataclass
class GeneratorStatus:
    state: str = "off"  # off, waiting, generating, backing_off, daily_cap
    source: str = ""
    files_today: int = 0
    records_total: int = 0
    last_file: str | None = None
    last_at: float | None = None
    last_error: str | None = None
    next_try_at: float | None = None
    day: str = field(default="", repr=False)


def builtin_records(count: int, rng: random.Random) -> list[dict[str, Any]]:
    """Small puzzles whose answers are checkable, as chat records (the loss falls as it learns them)."""
    out = []
    for _ in range(count):
        kind = rng.randrange(3)
        if kind == 0:
            words = rng.sample(WORDS, rng.randint(3, 6))
            q, a = f"Sort these words alphabetically: {', '.join(words)}", ", ".join(sorted(words))
        elif kind == 1:
            x, y, op = rng.randint(2, 99), rng.randint(2, 99), rng.choice("+-*")
            q, a = f"What is {x} {op} {y}?", str(eval(f"{x}{op}{y}"))  # noqa: S307 - two ints and an operator
        else:
            word, letter = rng.choice(WORDS), rng.choice("aeiorstln")
            q, a = f"How many times does the letter '{letter}' appear in '{word}'?", str(word.count(letter))
        out.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
    return out


def parse_records(text: str) -> list[dict[str, Any]]:
    """JSONL, or one JSON list of records."""
    text = text.strip()
    if text.startswith("["):
        data = json.loads(text)
        if not isinstance(data, list):
            raise ValueError("not a list of records")
        return data
    return [json.loads(line) for line in text.splitlines() if line.strip()]


class AutoGenerator:
    def __init__(self, cfg: Config, clock: Any = time.time) -> None:
        self.cfg, self.ac, self.clock = cfg, cfg.auto_generate, clock
        self.st = GeneratorStatus(state="waiting" if self.ac.enabled else "off", source=self.ac.source)
        self._idle_since: float | None = None
        self._thread: threading.Thread | None = None
        self._failures = 0
        self._seq = 0

    def status(self) -> dict[str, Any]:
        d = asdict(self.st)
        d.pop("day")
        return d

    def follow(self, now: float, queue_empty: bool, paused: bool, status: Any, db: Any) -> bool:
        """`tick`, then what it changed into the service's status (and a new error into the history); True when
        the status changed. The request's thread changes the state too: compared with what the status shows."""
        before = status.auto_generate or {}
        self.tick(now, queue_empty, paused)
        after = self.status()
        if after == before:
            return False
        status.auto_generate = after
        if after.get("last_error") and after.get("last_error") != before.get("last_error"):
            db.event("auto_generate", f"generator ({after['source']}) failed: {after['last_error']}", t=now)
        return True

    def tick(self, now: float, queue_empty: bool, paused: bool) -> None:
        if not self.ac.enabled or (self._thread is not None and self._thread.is_alive()):
            return
        day = time.strftime("%Y%m%d", time.gmtime(now))
        if day != self.st.day:
            self.st.day, self.st.files_today = day, 0
        if not queue_empty or paused:
            self._idle_since = None
            if self.st.state not in ("backing_off",):
                self.st.state = "waiting"
            return
        self._idle_since = self._idle_since or now
        if self.st.next_try_at is not None and now < self.st.next_try_at:
            self.st.state = "backing_off"
            return
        if self.st.files_today >= self.ac.max_files_per_day:
            self.st.state = "daily_cap"
            return
        if now - self._idle_since < self.ac.idle_seconds:
            self.st.state = "waiting"
            return
        self.st.state = "generating"
        self._seq += 1
        self._thread = threading.Thread(target=self._request, args=(now, self._seq), name="autogen", daemon=True)
        self._thread.start()

    def _request(self, now: float, seq: int) -> None:
        try:
            records = self._records(now, seq)
            if not records:
                raise ValueError("the generator gave no records")
            name = self._deliver(records, now, seq)
        except Exception as e:  # any failure: back off, say why, never take the service down
            self._failures += 1
            delay = min(MAX_BACKOFF, FIRST_BACKOFF * 2 ** (self._failures - 1))
            self.st.last_error = f"{type(e).__name__}: {e}"[:500]
            self.st.next_try_at, self.st.state = self.clock() + delay, "backing_off"
            log.warning("auto_generate (%s) failed: %s; next try in %.0f s", self.ac.source, self.st.last_error, delay)
            return
        self._failures = 0
        self.st.files_today += 1
        self.st.records_total += len(records)
        self.st.last_file, self.st.last_at, self.st.next_try_at = name, self.clock(), None
        self.st.state, self._idle_since = "waiting", None
        log.info("auto_generate (%s): %d records delivered as %s", self.ac.source, len(records), name)

    def _records(self, now: float, seq: int) -> list[dict[str, Any]]:
        ac = self.ac
        if ac.source == "builtin":
            return builtin_records(ac.count, random.Random(f"{self.cfg.training.seed}:{now}:{seq}"))
        if ac.source == "http":
            sep = "&" if "?" in ac.url else "?"
            with urllib.request.urlopen(f"{ac.url}{sep}count={ac.count}", timeout=ac.timeout_seconds) as resp:  # noqa: S310
                return parse_records(resp.read().decode("utf-8"))[: ac.count]
        r = subprocess.run(list(ac.command), capture_output=True, text=True, timeout=ac.timeout_seconds,
                           stdin=subprocess.DEVNULL, env=dict(os.environ, TRAIND_COUNT=str(ac.count)))
        if r.returncode != 0:
            raise RuntimeError(f"the command exited with {r.returncode}: {r.stderr.strip()[-300:]}")
        return parse_records(r.stdout)[: ac.count]

    def _deliver(self, records: list[dict[str, Any]], now: float, seq: int) -> str:
        folder = self.cfg.path("inbox") / self.ac.priority if self.ac.priority != "normal" else self.cfg.path("inbox")
        folder.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
        name = f"auto-{self.ac.source}-{stamp}-{seq:04d}.jsonl"
        part = folder / f"{name}.part"
        with open(part, "w", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(part, folder / name)  # the rename says it is complete: the intake takes it at once
        return name

