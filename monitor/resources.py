"""GET /api/gpu and GET /api/memory. Sync handlers: FastAPI runs them in its
threadpool, so a slow NVML or /proc read never blocks the event loop (or SSE)."""

from __future__ import annotations

from fastapi import APIRouter

from daemon.status import read_status
from monitor.deps import ReadAuth, StateDep
from monitor.host import memory_view
from monitor.models import GpuView, MemoryView

router = APIRouter(tags=["resources"], dependencies=[ReadAuth])


@router.get("/api/gpu", response_model=GpuView, summary="Per-GPU stats via NVML, or available=false with the reason")
def get_gpu(state: StateDep) -> GpuView:
    return state.gpu.read()


@router.get("/api/memory", response_model=MemoryView, summary="Host RAM/swap/CPU, daemon and trainer processes, disk free")
def get_memory(state: StateDep) -> MemoryView:
    return memory_view(state.cfg, read_status(state.cfg.path("status")), state.procs)
