"""daemon.train.threads: the trainer takes every core, and gives one back while a neighbour stalls it.

The governor is driven here by a clock and counters the test sets, so it is
checked without sleeping; its readings of /proc are checked against a real
busy process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from daemon.train import threads
from daemon.train.threads import QUIET_WINDOWS, ThreadGovernor


class Machine:
    """A clock and counters the test advances: `others` cores used by other processes at normal priority,
    the trainer's threads waiting `stall` seconds per second for a CPU."""

    def __init__(self, schedstat: bool = True) -> None:
        self.t = self.busy = self.own_s = self.wait = 0.0
        self.schedstat = schedstat

    def run(self, seconds: float, others: float, stall: float = 0.1, own: float = 2.0) -> None:
        self.t += seconds
        self.own_s += own * seconds
        self.busy += (others + own) * seconds
        self.wait += stall * seconds


def governor(m: Machine, cores: int = 2) -> tuple[ThreadGovernor, list[int]]:
    calls: list[int] = []
    g = ThreadGovernor(cores, set_threads=calls.append, clock=lambda: m.t, busy=lambda: m.busy, own=lambda: m.own_s,
                       waited=lambda: m.wait if m.schedstat else None)
    return g, calls


def test_a_stalling_neighbour_takes_a_core_and_a_quiet_spell_gives_it_back() -> None:
    m = Machine()
    g, calls = governor(m)
    m.run(1.05, others=0.2, stall=0.3)
    assert g.tick() is None and g.threads == 2  # a light or niced neighbour: both cores still pay
    m.run(0.3, others=0.2, stall=0.8)
    assert g.tick() is None  # less than a window: not even looked at
    m.run(0.8, others=0.4, stall=0.8)
    assert g.tick() == 1 and calls == [1]  # the team keeps waiting for a preempted thread
    m.run(1.05, others=1.0, stall=0.0)
    assert g.tick() is None  # the neighbour still wants a whole core: stay at one thread
    for _ in range(QUIET_WINDOWS - 1):
        m.run(1.05, others=0.05)
        assert g.tick() is None  # quiet, but not for long enough yet
    m.run(1.05, others=0.05)
    assert g.tick() == 2 and calls == [1, 2]


def test_a_neighbour_that_comes_and_goes_does_not_make_it_flap() -> None:
    m = Machine()
    g, calls = governor(m)
    for others, stall in ((1.0, 0.8), (0.05, 0.0), (0.05, 0.0), (0.9, 0.0), (0.05, 0.0), (0.05, 0.0), (1.0, 0.0)):
        m.run(1.05, others=others, stall=stall)
        g.tick()
    assert calls == [1] and g.threads == 1  # never quiet QUIET_WINDOWS windows in a row


def test_without_schedstat_the_neighbours_cpu_decides() -> None:
    m = Machine(schedstat=False)
    g, calls = governor(m)
    m.run(1.05, others=0.1)
    assert g.tick() is None
    m.run(1.05, others=0.6)
    assert g.tick() == 1


def test_taking_the_core_back_too_soon_makes_the_next_wait_longer() -> None:
    m = Machine()
    g, calls = governor(m)
    m.run(1.05, others=0.5, stall=0.9)
    assert g.tick() == 1
    for _ in range(QUIET_WINDOWS):
        m.run(1.05, others=0.2, stall=0.0)
        g.tick()
    assert g.threads == 2
    m.run(1.05, others=0.5, stall=0.9)
    assert g.tick() == 1  # bounced straight back: next time it waits twice as long
    for _ in range(QUIET_WINDOWS):
        m.run(1.05, others=0.2, stall=0.0)
        assert g.tick() is None
    for _ in range(QUIET_WINDOWS):
        m.run(1.05, others=0.2, stall=0.0)
        g.tick()
    assert calls == [1, 2, 1, 2]


def test_one_core_is_left_alone() -> None:
    m = Machine()
    g, calls = governor(m, cores=1)
    m.run(5.0, others=2.0, stall=1.0)
    assert g.tick() is None and calls == []


def spinning(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd + [sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 3: pass"])


def cpu_columns() -> tuple[float, float]:
    """(normal-priority busy, niced) CPU seconds on the cores this process may run on, from /proc/stat."""
    ours = {f"cpu{k}" for k in os.sched_getaffinity(0)}
    busy = niced = 0
    with open("/proc/stat", encoding="ascii") as f:
        for fields in (line.split() for line in f):
            if fields and fields[0] in ours:
                user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[1:9])
                busy, niced = busy + user + system + irq + softirq + steal, niced + nice
    return busy / os.sysconf("SC_CLK_TCK"), niced / os.sysconf("SC_CLK_TCK")


# Spins until it has had half a CPU second of its own, however long a crowded machine takes to give it that. It
# asks for its CPU time (a system call) only between long runs of user-mode work: the kernel books a niced
# process's system time to the system column, not to nice.
SPIN_HALF_A_CPU_SECOND = "import time\nwhile time.process_time() < 0.5:\n    for _ in range(200_000): pass"


def spun(cmd: list[str]) -> tuple[float, float, float]:
    """Runs a spinner; returns (its CPU seconds, what machine_busy_seconds saw of others, the nice column's growth)."""
    b0, o0, (_, n0) = threads.machine_busy_seconds(), threads.own_seconds(), cpu_columns()
    proc = subprocess.Popen(cmd + [sys.executable, "-c", SPIN_HALF_A_CPU_SECOND])
    _, _, usage = os.wait4(proc.pid, 0)
    proc.returncode = 0  # reaped above
    b1, o1, (_, n1) = threads.machine_busy_seconds(), threads.own_seconds(), cpu_columns()
    return usage.ru_utime + usage.ru_stime, (b1 - b0) - (o1 - o0), n1 - n0


@pytest.mark.skipif(os.nice(0) != 0, reason="the test runs niced, so its 'normal priority' spinner would be niced too")
def test_the_readings_count_a_neighbour_at_normal_priority_and_leave_a_niced_one_out() -> None:
    # The kernel books each tick of CPU to one column of /proc/stat. Whatever else the machine runs only adds to
    # the columns, so lower bounds hold on a crowded machine: the normal spinner's half second shows in the reading;
    # the niced spinner's (like the monitor at nice 10) shows in the nice column, which the reading leaves out.
    # Tick sampling (CONFIG_HZ) and the startup of the interpreter are what the 0.8 allows for.
    spinner, others, _ = spun([])
    assert spinner >= 0.5 and others >= 0.8 * spinner, (spinner, others)
    spinner, _, nice_column = spun(["nice", "-n", "10"])
    assert spinner >= 0.5 and nice_column >= 0.8 * spinner, (spinner, nice_column)


@pytest.mark.skipif(threads.waited_seconds() is None, reason="no /proc/self/task/*/schedstat on this kernel")
def test_the_wait_reading_grows_when_every_core_is_contended() -> None:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 2)
    a = torch.randn(256, 256)

    def waited_while_working(seconds: float = 1.0) -> float:
        w0, t0 = threads.waited_seconds(), time.monotonic()
        while time.monotonic() - t0 < seconds:
            (a @ a).relu_()
        return (threads.waited_seconds() - w0) / (time.monotonic() - t0)

    try:
        alone = waited_while_working()
        # three spinners a core: under pytest-xdist another worker may already be loading the cores during
        # `alone`, so the crowd must outweigh that, not merely match the core count
        hogs = [spinning([]) for _ in range(3 * (os.cpu_count() or 2))]
        time.sleep(0.2)
        crowded = waited_while_working()
        for h in hogs:
            h.kill()
            h.wait()
    finally:
        torch.set_num_threads(before)
    assert crowded > alone + 0.2, (alone, crowded)
