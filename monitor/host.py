"""Host RAM/swap/CPU, the daemon's and trainer's processes, and disk free (psutil)."""

from __future__ import annotations

import math
import os
import threading
import time
from typing import Any, Callable

import psutil

from daemon.config import Config
from monitor.liveness import parse_iso, pid_alive
from monitor.models import DiskStats, MemoryView, ProcessStats

RUNTIME_FOLDERS = ("inbox", "queue", "status", "adapters", "checkpoints", "logs", "models")


MIN_CPU_WINDOW_SECONDS = 1.0


class ProcessSampler:
    """Keeps psutil.Process objects between requests: cpu_percent() is the CPU used
    since the previous call on the same object, so a fresh object would always say 0.

    A CPU figure is re-measured at most once per MIN_CPU_WINDOW_SECONDS and shared
    meanwhile, so a dashboard and a Prometheus scrape polling at their own rates
    do not shrink each other's windows into noise.
    """

    def __init__(self) -> None:
        self._procs: dict[int, psutil.Process] = {}
        self._cpu: dict[int | str, tuple[float, float]] = {}  # key -> (measured at, percent)
        self._lock = threading.Lock()
        # psutil.cpu_percent(interval=None) keeps its last sample per thread (psutil 7), and
        # requests run on a pool of threads: it would say 0.0 on each thread's first call.
        self._host_times = _busy_total(psutil.cpu_times())
        self._cpu["host"] = (time.monotonic(), 0.0)

    def _cpu_percent(self, key: int | str, measure: Callable[[], float]) -> float:
        with self._lock:
            at, value = self._cpu.get(key, (-math.inf, 0.0))
            now = time.monotonic()
            if now - at >= MIN_CPU_WINDOW_SECONDS:
                value = measure()
                self._cpu[key] = (now, value)
            return value

    def host_cpu_percent(self) -> float:
        """Host CPU busy percent (of all cores) since the last measurement."""
        return self._cpu_percent("host", self._measure_host)

    def _measure_host(self) -> float:  # called under self._lock
        (busy0, total0), (busy1, total1) = self._host_times, _busy_total(psutil.cpu_times())
        self._host_times = (busy1, total1)
        return 100.0 * (busy1 - busy0) / (total1 - total0) if total1 > total0 else 0.0

    def stats(self, role: str, pid: Any, started_at: float | None = None) -> ProcessStats:
        if not pid_alive(pid, started_at if role == "daemon" else None):
            return ProcessStats(role=role, pid=pid if isinstance(pid, int) else None, running=False)
        with self._lock:
            proc = self._procs.get(pid)
            if proc is None:
                proc = self._procs[pid] = psutil.Process(pid)
                proc.cpu_percent(interval=None)
                self._cpu[pid] = (time.monotonic(), 0.0)
            self._procs = {p: v for p, v in self._procs.items() if p == pid or v.is_running()}
            self._cpu = {k: v for k, v in self._cpu.items() if k == "host" or k in self._procs}
        try:
            with proc.oneshot():
                cpu = self._cpu_percent(pid, lambda: proc.cpu_percent(interval=None))
                return ProcessStats(role=role, pid=pid, running=True, rss_bytes=proc.memory_info().rss,
                                    cpu_percent=cpu, num_threads=proc.num_threads())
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return ProcessStats(role=role, pid=pid, running=False)


def _busy_total(t: Any) -> tuple[float, float]:
    """(busy, total) CPU seconds over all cores; waiting on I/O counts as idle, as in top."""
    total = sum(t)
    return total - t.idle - getattr(t, "iowait", 0.0), total


def disks(cfg: Config) -> list[DiskStats]:
    """Free space per filesystem holding a runtime folder (folders sharing one are grouped)."""
    by_dev: dict[int, tuple[list[str], str]] = {}
    for name in RUNTIME_FOLDERS:
        path = cfg.path(name)
        while not path.exists() and path != path.parent:  # not created yet: its parent's filesystem
            path = path.parent
        dev = os.stat(path).st_dev
        by_dev.setdefault(dev, ([], str(path)))[0].append(name)
    out = []
    for names, path in by_dev.values():
        u = psutil.disk_usage(path)
        out.append(DiskStats(folders=names, free_bytes=u.free, total_bytes=u.total, used_percent=u.percent))
    return out


def trainer_ranks(pid: Any) -> list[tuple[int, int]]:
    """(rank, pid) of the trainer ranks on this machine: with several (distributed.nproc_per_node), the trainer
    pid is torch's launcher and the ranks are its children; empty for a single trainer process."""
    if not isinstance(pid, int):
        return []
    out = []
    try:
        children = psutil.Process(pid).children()
    except psutil.Error:
        return []
    for child in children:
        try:
            if "daemon.train" in child.cmdline():
                out.append((int(child.environ().get("RANK", len(out))), child.pid))
        except (psutil.Error, ValueError):
            continue
    return sorted(out)


def memory_view(cfg: Config, status: dict[str, Any] | None, sampler: ProcessSampler) -> MemoryView:
    vm, sw = psutil.virtual_memory(), psutil.swap_memory()
    status = status or {}
    ranks = trainer_ranks(status.get("trainer_pid"))
    procs = [
        sampler.stats("daemon", status.get("pid"), parse_iso(status.get("started_at"))),
        sampler.stats("trainer launcher" if ranks else "trainer", status.get("trainer_pid")),
        *(sampler.stats("trainer rank", pid).model_copy(update={"rank": rank}) for rank, pid in ranks),
        sampler.stats("monitor", os.getpid()),
    ]
    return MemoryView(
        ram_total_bytes=vm.total, ram_available_bytes=vm.available, ram_used_percent=vm.percent,
        swap_total_bytes=sw.total, swap_used_bytes=sw.used, swap_used_percent=sw.percent,
        cpu_percent=sampler.host_cpu_percent(), cpu_count=psutil.cpu_count() or 1,
        load_average=list(os.getloadavg()), processes=procs, disks=disks(cfg),
    )
