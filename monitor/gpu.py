"""GPU stats through NVML (pynvml from nvidia-ml-py), with a held handle.

`nvmlInit` costs tens of milliseconds and a driver round trip, so it is done
once and the handle kept for the life of the monitor (`close()` shuts it down).
Where there is no NVIDIA driver, pynvml raises NVMLError_LibraryNotFound: the
probe then reports `available: false` with that reason, and tries again at most
every RETRY_SECONDS (a driver installed later is picked up without a restart).
Consumer GPUs refuse some queries (power limit, per-process memory): those
fields are None, not an error. `nvml` is injectable so tests run the same device
loop against a fake library.
"""

from __future__ import annotations

import logging
import threading
import time
from types import ModuleType
from typing import Any, Callable

from monitor.models import Gpu, GpuProcess, GpuView

log = logging.getLogger(__name__)
RETRY_SECONDS = 60.0


def _load_pynvml() -> ModuleType:
    import pynvml  # lazy: only the GPU endpoints need it

    return pynvml


def _text(v: Any) -> str:
    return v.decode(errors="replace") if isinstance(v, bytes) else str(v)


class GpuProbe:
    def __init__(self, nvml: ModuleType | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self._nvml = nvml
        self._clock = clock
        self._lock = threading.Lock()  # NVML calls come from the threadpool
        self._ready = False
        self._reason: str | None = None
        self._next_try = 0.0

    def _init(self) -> bool:
        if self._ready:
            return True
        if self._clock() < self._next_try:
            return False
        self._next_try = self._clock() + RETRY_SECONDS
        try:
            if self._nvml is None:
                self._nvml = _load_pynvml()
            self._nvml.nvmlInit()
        except ImportError as e:
            self._reason = f"pynvml is not installed ({e}); pip install nvidia-ml-py"
            return False
        except self._error as e:  # NVMLError_LibraryNotFound, _DriverNotLoaded, _NoPermission, ...
            reason = f"no NVIDIA driver or GPU: {type(e).__name__}: {e}"
            if reason != self._reason:  # once, not at every retry
                log.info("GPU stats unavailable: %s", reason)
            self._reason = reason
            return False
        self._ready, self._reason = True, None
        return True

    def read(self) -> GpuView:
        with self._lock:
            if not self._init():
                return GpuView(available=False, reason=self._reason)
            n = self._nvml
            try:
                count = n.nvmlDeviceGetCount()
                gpus = [self._device(i) for i in range(count)]
                driver = self._opt(lambda: _text(n.nvmlSystemGetDriverVersion()))
            except self._error as e:  # a GPU fell off the bus, driver reloaded: re-init next time
                log.warning("NVML read failed: %s", e)
                self._shutdown_locked()
                self._reason = f"NVML read failed: {type(e).__name__}: {e}"
                return GpuView(available=False, reason=self._reason)
        if not gpus:
            return GpuView(available=False, reason="NVIDIA driver present but no GPU found", driver_version=driver)
        return GpuView(available=True, driver_version=driver, gpus=gpus)

    def _device(self, i: int) -> Gpu:
        n = self._nvml
        h = n.nvmlDeviceGetHandleByIndex(i)
        util = self._opt(lambda: n.nvmlDeviceGetUtilizationRates(h))
        mem = self._opt(lambda: n.nvmlDeviceGetMemoryInfo(h))
        power = self._opt(lambda: n.nvmlDeviceGetPowerUsage(h))  # milliwatts
        limit = self._opt(lambda: n.nvmlDeviceGetEnforcedPowerLimit(h))
        return Gpu(
            index=i,
            name=_text(n.nvmlDeviceGetName(h)),
            uuid=self._opt(lambda: _text(n.nvmlDeviceGetUUID(h))),
            utilization_percent=None if util is None else float(util.gpu),
            memory_utilization_percent=None if util is None else float(util.memory),
            memory_used_bytes=None if mem is None else int(mem.used),
            memory_total_bytes=None if mem is None else int(mem.total),
            temperature_c=self._opt(lambda: float(n.nvmlDeviceGetTemperature(h, n.NVML_TEMPERATURE_GPU))),
            power_watts=None if power is None else power / 1000.0,
            power_limit_watts=None if limit is None else limit / 1000.0,
            clock_sm_mhz=self._opt(lambda: int(n.nvmlDeviceGetClockInfo(h, n.NVML_CLOCK_SM))),
            clock_mem_mhz=self._opt(lambda: int(n.nvmlDeviceGetClockInfo(h, n.NVML_CLOCK_MEM))),
            processes=self._processes(h),
        )

    def _processes(self, h: Any) -> list[GpuProcess]:
        n = self._nvml
        procs: dict[int, GpuProcess] = {}
        for getter in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
            for p in self._opt(lambda: getattr(n, getter)(h)) or []:
                used = getattr(p, "usedGpuMemory", None)
                procs[p.pid] = GpuProcess(pid=p.pid, name=_proc_name(p.pid),
                                          used_memory_bytes=used if isinstance(used, int) else None)
        return list(procs.values())

    def _opt(self, fn: Callable[[], Any]) -> Any:
        """A field this GPU or driver does not support is None, not a failed request."""
        try:
            return fn()
        except self._error:
            return None

    @property
    def _error(self) -> type[BaseException]:
        return getattr(self._nvml, "NVMLError", Exception)

    def _shutdown_locked(self) -> None:
        if self._ready:
            try:
                self._nvml.nvmlShutdown()
            except self._error as e:
                log.debug("nvmlShutdown: %s", e)
        self._ready = False
        self._next_try = 0.0

    def close(self) -> None:
        with self._lock:
            self._shutdown_locked()


def _proc_name(pid: int) -> str | None:
    import psutil

    try:
        return psutil.Process(pid).name()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
