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


def test_the_readings_see_a_neighbour_at_normal_priority_more_than_a_niced_one() -> None:
    def others_over(cmd: list[str]) -> float:
        proc = spinning(cmd)
        time.sleep(0.3)
        b0, o0, t0 = threads.machine_busy_seconds(), threads.own_seconds(), time.monotonic()
        time.sleep(1.0)
        b1, o1, t1 = threads.machine_busy_seconds(), threads.own_seconds(), time.monotonic()
        proc.kill()
        proc.wait()
        return ((b1 - b0) - (o1 - o0)) / (t1 - t0)

    # A process spinning a whole core counts; the same niced, like the monitor, does not (it yields to the
    # trainer). Compared with each other, so that whatever else the machine runs cancels out.
    normal, niced = others_over([]), others_over(["nice", "-n", "10"])
    assert normal - niced > 0.6, (normal, niced)


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
