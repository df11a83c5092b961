"""Per-layer LoRA activity: how far each LoRA module has moved its frozen base weight.

    probe = ActivityProbe(lm.model)            # finds every LoRA-wrapped module, once per loaded model
    grads = probe.grad_norms()                 # after backward, before the gradients are cleared
    grid = probe.sample(grads)                 # after the optimizer step: measures per (layer, module kind)
    moved = probe.moved_since(lora_before)     # per module ‖ΔW_now − ΔW_before‖_F: what one file moved

For a module with LoRA factors A (r × in), B (out × r) and scaling s, the
update is ΔW = s·B·A. Every norm goes through r × r Gram matrices, never
through the out × in matrix ΔW:

    ‖BA‖²_F       = tr((BᵀB)(AAᵀ))
    ‖BA − B'A'‖²_F = ‖BA‖²_F + ‖B'A'‖²_F − 2·tr((BᵀB')(A'Aᵀ))

in float64: the second is a difference of nearly equal squares, and float32
would leave nothing of a small change. Modules of the same shape are stacked
and done in one batched matmul each. ‖W₀‖_F of the frozen base is computed
once per probe, from the dequantised weight when the base is 4-bit.

Measures (docs/internals.md, "Layer activity"): `update` ‖ΔW‖_F, `relative`
‖ΔW‖_F / ‖W₀‖_F, `change` ‖ΔW − ΔW at the previous sample‖_F (null at the
first sample of a probe), `grad_a` / `grad_b` the gradient norms of A and B at
the sampled step (before clipping), `base` ‖W₀‖_F.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from typing import Any

import torch

from daemon import protocol

log = logging.getLogger(__name__)

ADAPTER = "default"  # the adapter name peft gives the one LoRA traind trains
_LAYER_INDEX = re.compile(r"\.(\d+)\.")  # ".layers.12.", ".h.3.", ".blocks.0.": the first numbered container


@dataclass(frozen=True)
class Site:
    """One LoRA-wrapped module: where it sits in the grid."""

    name: str  # module path in the peft model
    layer: int  # index of the numbered block it is in; -1 when outside any (lm_head, embeddings)
    kind: str  # the module's name within its block: q_proj, down_proj (longer when short names clash)


@dataclass(frozen=True)
class Grid:
    """Values per (layer, kind): `values[measure][i][j]` for layers[i], kinds[j]; None where no LoRA sits."""

    layers: list[int]
    kinds: list[str]
    values: dict[str, list[list[float | None]]]

    def to_dict(self) -> dict[str, Any]:
        return {"layers": self.layers, "kinds": self.kinds, "values": self.values}


def locate(names: list[str]) -> list[Site]:
    """Layer index and kind of each module path: the kind is the module's path within its block, shortened
    to its last name where that stays unambiguous; where two modules would share a cell (two towers with
    the same block layout), the kind keeps the path outside the block too."""
    parsed = []
    for name in names:
        m = _LAYER_INDEX.search(name + ".")
        if m is None:
            parsed.append((name, -1, name, name))
        else:
            within = name[m.end():] if m.end() <= len(name) else name.rsplit(".", 1)[-1]
            parsed.append((name, int(m.group(1)), within, f"{name[:m.start()]}.{within}"))
    short_ok = len({p[2].rsplit(".", 1)[-1] for p in parsed}) == len({p[2] for p in parsed})
    kinds = [p[2].rsplit(".", 1)[-1] if short_ok else p[2] for p in parsed]
    if len({(p[1], k) for p, k in zip(parsed, kinds)}) < len(parsed):  # cells shared: qualify by the tower
        kinds = [_strip_peft(p[3]) for p in parsed]
    return [Site(p[0], p[1], k) for p, k in zip(parsed, kinds)]


def _strip_peft(path: str) -> str:
    """A module path without peft's wrapper prefix (base_model.model.)."""
    return path.removeprefix("base_model.model.")


class ActivityProbe:
    """Measures the LoRA modules of one loaded peft model; keeps ‖W₀‖ and the previous sample."""

    def __init__(self, model: Any) -> None:
        from peft.tuners.lora import LoraLayer

        found = [(n, m) for n, m in model.named_modules()
                 if isinstance(m, LoraLayer) and ADAPTER in getattr(m, "lora_A", {})
                 and hasattr(m.lora_A[ADAPTER], "weight") and m.lora_A[ADAPTER].weight.dim() == 2]
        self.modules = [m for _, m in found]
        self.sites = locate([n for n, _ in found])
        self.layers = sorted({s.layer for s in self.sites})
        self.kinds = sorted({s.kind for s in self.sites}, key=_kind_order)
        self.scaling = torch.tensor([float(m.scaling[ADAPTER]) for m in self.modules], dtype=torch.float64)
        self.groups = _groups(self.modules)
        self._base: list[float] | None = None
        self._prev: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # group -> (A, B, ‖BA‖²)
        # measure -> () -> one value per module, added to each sample the Sampler reports: `frozen`
        # (daemon.train.freezing), `intruders` (daemon.train.intruders)
        self.extra: dict[str, Any] = {}

    # -- the factors --------------------------------------------------------------------
    def _factors(self, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """A (n, r, in) and B (n, out, r) of the modules `idx`, stacked, float64."""
        a = torch.stack([self.modules[i].lora_A[ADAPTER].weight.detach() for i in idx]).double()
        b = torch.stack([self.modules[i].lora_B[ADAPTER].weight.detach() for i in idx]).double()
        return a, b

    def base_norms(self) -> list[float]:
        """‖W₀‖_F per module, computed once (4-bit weights dequantised one at a time)."""
        if self._base is None:
            self._base = [_weight_norm(m.get_base_layer()) for m in self.modules]
        return self._base

    # -- measures -----------------------------------------------------------------------
    @torch.no_grad()
    def grad_norms(self) -> tuple[list[float | None], list[float | None]]:
        """‖∇A‖, ‖∇B‖ per module from the gradients as they are now (None where there is none)."""
        out: list[list[float | None]] = []
        for which in ("lora_A", "lora_B"):
            grads = [getattr(m, which)[ADAPTER].weight.grad for m in self.modules]
            have = [g for g in grads if g is not None]
            norms = iter(torch.stack(torch._foreach_norm(have)).double().cpu().tolist()) if have else iter(())
            out.append([next(norms) if g is not None else None for g in grads])
        return out[0], out[1]

    @torch.no_grad()
    def sample(self, grads: tuple[list[float | None], list[float | None]] | None = None) -> Grid:
        """Every measure per module now; `change` against the previous sample of this probe."""
        n = len(self.modules)
        update, change = [0.0] * n, [None] * n
        for g, idx in enumerate(self.groups):
            a, b = self._factors(idx)
            sq = _gram_trace(b, b, a, a)
            prev = self._prev.get(g)
            if prev is not None:
                pa, pb, psq = (t.to(a.device, torch.float64) for t in prev)
                diff = (sq + psq - 2 * _gram_trace(b, pb, a, pa)).clamp_min(0)
                for k, i in enumerate(idx):
                    change[i] = float(self.scaling[i] * diff[k].sqrt())
            self._prev[g] = (a.float().cpu(), b.float().cpu(), sq.cpu())  # host memory: a GPU's is dearer
            for k, i in enumerate(idx):
                update[i] = float(self.scaling[i] * sq[k].sqrt())
        base = self.base_norms()
        relative = [u / w if w > 0 else None for u, w in zip(update, base)]
        grad_a, grad_b = grads if grads is not None else ([None] * n, [None] * n)
        return self.grid({"update": update, "relative": relative, "change": change,
                          "grad_a": grad_a, "grad_b": grad_b, "base": base})

    @torch.no_grad()
    def moved_since(self, before: dict[str, torch.Tensor]) -> Grid:
        """‖ΔW_now − ΔW_before‖_F (and relative to ‖W₀‖_F) per module; `before` as from model.lora_state."""
        moved: list[float | None] = [None] * len(self.modules)
        for idx in self.groups:
            a, b = (t.cpu() for t in self._factors(idx))
            pa = torch.stack([before[self._key(i, "lora_A")] for i in idx]).double()
            pb = torch.stack([before[self._key(i, "lora_B")] for i in idx]).double()
            diff = (_gram_trace(b, b, a, a) + _gram_trace(pb, pb, pa, pa) - 2 * _gram_trace(b, pb, a, pa)).clamp_min(0)
            for k, i in enumerate(idx):
                moved[i] = float(self.scaling[i] * diff[k].sqrt())
        base = self.base_norms()
        rel = [m / w if m is not None and w > 0 else None for m, w in zip(moved, base)]
        return self.grid({"moved": moved, "moved_relative": rel, "base": base})

    def forget_previous(self) -> None:
        """The next sample has no `change` (the weights were replaced: a skip, a failure, a new adapter)."""
        self._prev.clear()

    # -- layout -------------------------------------------------------------------------
    def grid(self, per_module: dict[str, list[float | None]]) -> Grid:
        """Lay per-module lists out as layers × kinds; a non-finite value (an overflowed fp16
        gradient, a diverged module) becomes None, which JSON and every reader can carry."""
        row = {layer: i for i, layer in enumerate(self.layers)}
        col = {kind: j for j, kind in enumerate(self.kinds)}
        values = {}
        for measure, vals in per_module.items():
            cells: list[list[float | None]] = [[None] * len(self.kinds) for _ in self.layers]
            for site, v in zip(self.sites, vals):
                cells[row[site.layer]][col[site.kind]] = v if v is not None and math.isfinite(v) else None
            values[measure] = cells
        return Grid(list(self.layers), list(self.kinds), values)

    def _key(self, i: int, which: str) -> str:
        """The module's key in peft's adapter state dict (the adapter name left out)."""
        return f"{self.sites[i].name}.{which}.weight"


def _gram_trace(b1: torch.Tensor, b2: torch.Tensor, a1: torch.Tensor, a2: torch.Tensor) -> torch.Tensor:
    """tr((B1ᵀB2)(A2A1ᵀ)) per stacked module = ⟨B1A1, B2A2⟩_F, from r × r products only."""
    gb = torch.bmm(b1.transpose(1, 2), b2)  # (n, r, r)
    ga = torch.bmm(a1, a2.transpose(1, 2))  # (n, r, r): A1A2ᵀ, the transpose of A2A1ᵀ
    return (gb * ga).sum(dim=(1, 2))  # tr(X Yᵀ) = Σ X∘Y


def _groups(modules: list[Any]) -> list[list[int]]:
    """Indices of modules whose A and B have the same shapes, device and dtype (one batched matmul each)."""
    by: dict[tuple, list[int]] = {}
    for i, m in enumerate(modules):
        a, b = m.lora_A[ADAPTER].weight, m.lora_B[ADAPTER].weight
        by.setdefault((tuple(a.shape), tuple(b.shape), a.device, a.dtype, b.dtype), []).append(i)
    return list(by.values())


def _weight_norm(layer: Any) -> float:
    """‖W‖_F of a frozen base layer, dequantising a bitsandbytes 4-bit weight first."""
    w = layer.weight
    if getattr(w, "quant_state", None) is not None:
        import bitsandbytes as bnb

        w = bnb.functional.dequantize_4bit(w.data, w.quant_state)
    return float(torch.linalg.vector_norm(w.detach(), dtype=torch.float64))


_KIND_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _kind_order(kind: str) -> tuple[int, str]:
    """Attention before MLP, in the order the blocks run; unknown kinds after, by name."""
    short = kind.rsplit(".", 1)[-1]
    return (_KIND_ORDER.index(short) if short in _KIND_ORDER else len(_KIND_ORDER), kind)


class Sampler:
    """When the loop samples a file's activity, and the sampling itself, which never fails the file.

    Due at the file's last step always; else every `activity.every_steps` steps, at most once per
    `activity.min_interval_seconds`. Activity is a diagnostic: an error measuring it is logged once
    per file and the step goes on without a sample.
    """

    def __init__(self, probe: ActivityProbe | None, every_steps: int, min_interval: float, clock: Any,
                 report: Any, job_id: str) -> None:
        self.probe, self.every, self.min_interval = probe, every_steps, min_interval
        self.clock, self.report, self.job_id = clock, report, job_id
        self.last = -math.inf
        self.failed = False

    def due(self, step: int, total_steps: int) -> bool:
        if self.probe is None or self.failed:
            return False
        return step == total_steps or (self.every > 0 and step % self.every == 0
                                       and self.clock() - self.last >= self.min_interval)

    def sample(self, step: int, global_step: int, total_steps: int, grads: Any) -> None:
        self.last = self.clock()
        try:
            grid = self.probe.sample(grads)
            if self.probe.extra:
                more = self.probe.grid({m: fn() for m, fn in self.probe.extra.items()})
                grid = Grid(grid.layers, grid.kinds, {**grid.values, **more.values})
        except Exception:  # a diagnostic must never cost the file its training
            log.warning("%s: layer activity not sampled (no more samples for this file)", self.job_id, exc_info=True)
            self.failed = True
            return
        self.report(protocol.Activity(job_id=self.job_id, step=step, global_step=global_step,
                                      final=step == total_steps, **grid.to_dict()))
