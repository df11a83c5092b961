"""The trainer's CPU threads: every core while the machine is otherwise quiet, one fewer while it is not.

    n = start_threads(cfg.training.cpu_threads)      # before torch is first imported
    governor = ThreadGovernor(n)                     # where it applies and is on: daemon.train.levers.thread_governor
    governor.tick()                                  # between optimizer steps: cheap, acts at most once a second

Why: torch's OpenMP threads work in lock step. When another process at the
same priority wants a core, one of them is preempted and the others wait for
it at every barrier (spinning first, then sleeping), and two threads on two
cores beside a busy neighbour run slower than one thread; a neighbour at nice
10 costs them little (bench/threads.py; the figures: docs/PERFORMANCE.md,
"CPU threads"). The monitor runs at nice 10 for that reason; the governor
covers every other neighbour (a data generator, a compile): it measures the CPU that other processes used
over the last second, from /proc/stat less this process' own time, and drops
to one thread fewer while they want about a third of a core or more, coming
back once they have been quiet for a few seconds.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Callable

log = logging.getLogger(__name__)

WINDOW_SECONDS = 1.0  # how often the machine is looked at
# Between what each of our threads waits for a CPU beside a niced or a part-time neighbour (still faster than one
# thread) and beside a busy one (far slower), as measured on 2 cores (docs/PERFORMANCE.md, "CPU threads").
STALLED_WAIT = 0.25  # seconds per second each of our threads waited for a CPU: the team stalls, give a core back
BUSY_CORES = 0.3  # without schedstat: others using this much (in cores) over a window compete for ours
QUIET_CORES = 0.3  # others below this for QUIET_WINDOWS windows in a row: take the core back
QUIET_WINDOWS = 3  # doubled each time the core had to be given back soon after (up to MAX_QUIET_WINDOWS)
MAX_QUIET_WINDOWS = 96
SOON = 10.0  # seconds: giving the core back within this long of taking it counts as a bounce


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # what this process may use (containers, taskset)
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def cpu_thread_count(configured: int, sharing: int = 1) -> int:
    """`training.cpu_threads`, or for 0 (auto) every usable core (split between the `sharing` trainer ranks
    of this machine); the governor trims it under load."""
    return configured if configured > 0 else max(1, usable_cores() // max(1, sharing))


def start_threads(configured: int, sharing: int = 1, key: str = "training.cpu_threads") -> int:
    """Set the torch CPU threads, and the OpenMP/MKL environment before torch is first imported (call this
    first), so every runtime and thread starts with the same count. Returns the count."""
    n = cpu_thread_count(configured, sharing)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)
    import torch

    torch.set_num_threads(n)
    how = key if configured > 0 else "auto: every core, one fewer while other processes want CPU"
    log.info("torch CPU threads: %d (%s)", torch.get_num_threads(), how)
    return n


def machine_busy_seconds() -> float:
    """CPU seconds used by work at normal priority on the cores this process may run on (/proc/stat's
    per-CPU lines); 0 where they cannot be read. Niced processes (the monitor at nice 10) are left out:
    they yield to the trainer and do not stall it; so are cores outside our affinity (containers, taskset). The
    kernel books only user time to the nice column: a niced process's system time is counted, which is fine for the
    monitor (it mostly sleeps in its system calls)."""
    try:
        ours = {f"cpu{k}" for k in os.sched_getaffinity(0)}
    except AttributeError:  # not on Linux
        return 0.0
    busy = 0
    try:
        with open("/proc/stat", encoding="ascii") as f:
            for line in f:
                fields = line.split()
                if fields and fields[0] in ours:
                    user, _nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[1:9])
                    busy += user + system + irq + softirq + steal
    except OSError:
        return 0.0
    return busy / os.sysconf("SC_CLK_TCK")


def own_seconds() -> float:
    t = os.times()
    return t.user + t.system


def waited_seconds() -> float | None:
    """Seconds this process' threads have spent runnable but waiting for a CPU; None without schedstat."""
    total, seen = 0, False
    for task in os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else []:
        try:
            with open(f"/proc/self/task/{task}/schedstat", encoding="ascii") as f:
                total += int(f.read().split()[1])
                seen = True
        except (OSError, IndexError, ValueError):  # a thread that ended meanwhile, or no schedstat
            continue
    return total / 1e9 if seen else None


class ThreadGovernor:
    """Trims the torch threads to cores - 1 while other processes want CPU (see the module docstring)."""

    def __init__(self, cores: int, set_threads: Callable[[int], None] | None = None,
                 clock: Callable[[], float] = time.monotonic, busy: Callable[[], float] = machine_busy_seconds,
                 own: Callable[[], float] = own_seconds, waited: Callable[[], float | None] = waited_seconds) -> None:
        self.cores, self.threads = cores, cores
        self.set_threads = set_threads or _torch_threads
        self.clock, self.busy, self.own, self.waited = clock, busy, own, waited
        self._mark = self._read()
        self._quiet = 0
        self._needed = QUIET_WINDOWS  # quiet windows wanted before taking the core back
        self._up_at: float | None = None

    def _read(self) -> tuple[float, float, float, float | None]:
        return self.clock(), self.busy(), self.own(), self.waited()

    def tick(self) -> int | None:
        """Look at the last window if one has passed; the new thread count when it changed, else None."""
        t0, b0, o0, w0 = self._mark
        if self.cores < 2 or self.clock() - t0 < WINDOW_SECONDS:
            return None
        now, b, o, w = self._mark = self._read()
        others = max(0.0, (b - b0) - (o - o0)) / (now - t0)
        stall = (w - w0) / (now - t0) / self.threads if w is not None and w0 is not None else None
        return self._decide(others, stall)

    def _decide(self, others: float, stall: float | None) -> int | None:
        crowded = stall >= STALLED_WAIT if stall is not None else others >= BUSY_CORES
        if self.threads == self.cores and crowded:
            self._quiet = 0
            if self._up_at is not None and self.clock() - self._up_at < SOON:
                self._needed = min(2 * self._needed, MAX_QUIET_WINDOWS)
            return self._set(self.cores - 1, f"each of its threads waited {stall:.2f} s/s for a CPU" if stall is not None
                             else f"other processes used {others:.2f} cores")
        self._quiet = self._quiet + 1 if others < QUIET_CORES else 0
        if self.threads < self.cores and self._quiet >= self._needed:
            self._up_at = self.clock()
            return self._set(self.cores, f"other processes used {others:.2f} cores")
        if self.threads == self.cores and self._up_at is not None and self.clock() - self._up_at >= SOON:
            self._needed = QUIET_WINDOWS  # it held: the next time may be quick again
        return None

    def _set(self, n: int, why: str) -> int:
        self.threads = n
        self.set_threads(n)
        log.info("torch CPU threads: %d (over the last second %s)", n, why)
        return n


def _torch_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)
