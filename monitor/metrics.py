"""GET /metrics: Prometheus text exposition (format 0.0.4) for existing Grafana setups.

Gauges only, read fresh per scrape from the same sources as the JSON API.
Off loopback the scraper sends the token as a bearer token
(`authorization: {credentials_file: .../status/monitor_token}` in prometheus.yml).
"""

from __future__ import annotations

import math

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse

from daemon import forgetting_view
from daemon.states import ServiceStatus
from daemon.status import read_status
from monitor.deps import ReadAuth, StateDep
from monitor.host import memory_view
from monitor.models import GpuView, MemoryView, Status
from monitor.status_api import current_status

router = APIRouter(tags=["metrics"], dependencies=[ReadAuth])
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _Exposition:
    """Gauges grouped per metric name: the format wants all samples of one metric
    together, after its HELP/TYPE lines, whatever order they were added in."""

    def __init__(self) -> None:
        self.groups: dict[str, list[str]] = {}

    def gauge(self, name: str, help: str, value: float | int | bool | None, **labels: object) -> None:
        if name not in self.groups:
            self.groups[name] = [f"# HELP {name} {help}", f"# TYPE {name} gauge"]
        if value is None:
            return  # unknown is absent, not 0: a dashboard must not draw a fake zero loss
        v = float(value)
        text = "NaN" if math.isnan(v) else ("+Inf" if v == math.inf else ("-Inf" if v == -math.inf else repr(v)))
        lab = ",".join(f'{k}="{_escape(str(val))}"' for k, val in labels.items())
        self.groups[name].append(f"{name}{{{lab}}} {text}" if lab else f"{name} {text}")

    def text(self) -> str:
        return "\n".join(line for lines in self.groups.values() for line in lines) + "\n"


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


NOT_RESPONDING = "not_responding"


def _training(x: _Exposition, s: Status) -> None:
    """A stale status is last known, not live: its state reads `not_responding` and
    the rates (tokens/s, ETA) are left out rather than shown as current."""
    x.gauge("traind_up", "1 when the daemon is alive and its status is fresh", not s.stale)
    x.gauge("traind_status_age_seconds", "seconds since the daemon last wrote its status", s.age_seconds)
    now = NOT_RESPONDING if s.stale else s.status
    for st in [*(v.value for v in ServiceStatus), NOT_RESPONDING]:
        x.gauge("traind_state", "1 for the daemon's current state (not_responding: stale status)", now == st, state=st)
    x.gauge("traind_paused_requested", "1 when a pause was requested", s.requested_state == "paused")
    x.gauge("traind_loss", "training loss of the last step", s.loss)
    x.gauge("traind_eval_loss", "last eval loss", s.eval_loss)
    x.gauge("traind_learning_rate", "learning rate of the last step", s.lr)
    x.gauge("traind_global_step", "optimizer steps over all files", s.global_step)
    x.gauge("traind_file_step", "step within the current file", s.current_step)
    x.gauge("traind_file_total_steps", "steps planned for the current file", s.total_steps)
    x.gauge("traind_epoch", "epoch within the current file", s.epoch)
    x.gauge("traind_tokens_per_second", "training throughput", None if s.stale else s.tokens_per_sec)
    x.gauge("traind_eta_seconds", "estimated seconds left in the current file", None if s.stale else s.eta_seconds)
    x.gauge("traind_adapter_version", "current adapter version", s.adapter_version)


def _ranks(x: _Exposition, s: Status) -> None:
    """The trainer's processes: the world size, and per rank (one series each, as many as the
    world size) its tokens per second in the latest step, left out when stale like the total."""
    x.gauge("traind_world_size", "trainer processes (ranks) training together; 1 = a single process", s.world_size)
    for r in s.ranks or []:
        x.gauge("traind_rank_tokens_per_second", "tokens per second of one rank in the latest step (its compute time)",
                None if s.stale else r.tokens_per_sec, rank=r.rank)


def _activity(x: _Exposition, s: Status) -> None:
    """Per-layer LoRA activity as gauges per module kind (a handful), never per layer or module."""
    block = s.layer_activity_summary
    if block is None:
        return
    x.gauge("traind_lora_activity_global_step", "global step of the latest layer-activity sample", block.global_step)
    relative = [v for v in block.per_layer.get("relative", []) if v is not None]
    x.gauge("traind_lora_relative_update_max", "largest per-layer relative update ‖ΔW‖/‖W₀‖", max(relative, default=None))
    for j, kind in enumerate(block.kinds):
        for measure, name, help_text in (
                ("relative", "traind_lora_relative_update", "relative update ‖ΔW‖/‖W₀‖ of all layers' modules of a kind"),
                ("change", "traind_lora_recent_change", "‖ΔW − ΔW at the previous sample‖ over a kind's modules"),
                ("grad_a", "traind_lora_grad_norm_a", "gradient norm of the LoRA A factors of a kind"),
                ("grad_b", "traind_lora_grad_norm_b", "gradient norm of the LoRA B factors of a kind")):
            values = block.per_kind.get(measure) or []
            x.gauge(name, help_text, values[j] if j < len(values) else None, kind=kind)


def _forgetting(x: _Exposition, s: Status) -> None:
    """The last file's forgetting figures (the status block): a handful of gauges, and per probe (at most
    daemon.forgetting_view.MAX_PROBES series, as many as the status block carries) its loss and drift."""
    block = s.forgetting
    if not block:
        return
    bwt, worst, gate = block.get("backward_transfer") or {}, block.get("worst") or {}, block.get("gate") or {}
    x.gauge("traind_forgetting_backward_transfer_loss", "last file: mean over earlier files' keep-sets of loss now "
            "minus right after learnt (positive: forgotten)", bwt.get("loss"))
    x.gauge("traind_forgetting_backward_transfer_accuracy", "last file: mean over earlier files' keep-sets of token "
            "accuracy now minus right after learnt (negative: forgotten)", bwt.get("accuracy"))
    x.gauge("traind_forgetting_worst_change", "last file: the largest relative loss increase of a set", worst.get("change"))
    x.gauge("traind_forgetting_gate_tripped", "1 when the last file tripped the forgetting gate", bool(gate.get("tripped")))
    for p in (block.get("probes") or [])[:forgetting_view.MAX_PROBES]:
        x.gauge("traind_forgetting_probe_loss", "a probe's loss after the last file", p.get("loss"), probe=p.get("id"))
        x.gauge("traind_forgetting_probe_drift", "a probe's relative loss change since the generation began",
                p.get("drift"), probe=p.get("id"))


def _queue(x: _Exposition, counts: dict[str, int]) -> None:
    for key in ("pending_high", "pending_normal", "pending_low", "processing", "done", "failed"):
        state, _, prio = key.partition("_")
        labels = {"state": state, "priority": prio} if prio else {"state": state}
        x.gauge("traind_queue_files", "files in the queue by state (and priority for pending)", counts.get(key, 0), **labels)


def _gpu(x: _Exposition, g: GpuView) -> None:
    x.gauge("traind_gpu_available", "1 when NVML reports at least one GPU", g.available)
    for gpu in g.gpus:
        lab = {"gpu": gpu.index, "name": gpu.name}
        x.gauge("traind_gpu_utilization_percent", "GPU busy percent", gpu.utilization_percent, **lab)
        x.gauge("traind_gpu_memory_used_bytes", "GPU memory used", gpu.memory_used_bytes, **lab)
        x.gauge("traind_gpu_memory_total_bytes", "GPU memory total", gpu.memory_total_bytes, **lab)
        x.gauge("traind_gpu_temperature_celsius", "GPU temperature", gpu.temperature_c, **lab)
        x.gauge("traind_gpu_power_watts", "GPU power draw", gpu.power_watts, **lab)
        x.gauge("traind_gpu_power_limit_watts", "GPU enforced power limit", gpu.power_limit_watts, **lab)


def _host(x: _Exposition, m: MemoryView) -> None:
    x.gauge("traind_host_memory_total_bytes", "host RAM", m.ram_total_bytes)
    x.gauge("traind_host_memory_available_bytes", "host RAM available", m.ram_available_bytes)
    x.gauge("traind_host_swap_used_bytes", "swap in use", m.swap_used_bytes)
    x.gauge("traind_host_cpu_percent", "host CPU busy percent since the last sample", m.cpu_percent)
    for p in m.processes:
        who = {"role": p.role} if p.rank is None else {"role": p.role, "rank": str(p.rank)}
        x.gauge("traind_process_up", "1 when the process is running", p.running, **who)
        x.gauge("traind_process_rss_bytes", "resident memory", p.rss_bytes, **who)
        x.gauge("traind_process_cpu_percent", "CPU percent since the last sample (100 = one core)", p.cpu_percent, **who)
    for d in m.disks:
        x.gauge("traind_disk_free_bytes", "free bytes on the filesystem of these runtime folders", d.free_bytes, folders=",".join(d.folders))


@router.get("/metrics", response_class=PlainTextResponse, summary="Prometheus text format")
def metrics(state: StateDep) -> PlainTextResponse:
    x = _Exposition()
    s = current_status(state)
    _training(x, s)
    _ranks(x, s)
    _activity(x, s)
    _forgetting(x, s)
    _queue(x, state.queue.counts())
    _gpu(x, state.gpu.read())
    _host(x, memory_view(state.cfg, read_status(state.cfg.path("status")), state.procs))
    return PlainTextResponse(x.text(), media_type=CONTENT_TYPE)
