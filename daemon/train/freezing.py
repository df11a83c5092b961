"""Freeze what stopped moving (`lora.freeze_stalled`): LoRA layers whose change stalls stop taking gradients.

    freezer = Freezer(lm.model, cfg.lora)             # once per loaded model (the trainer's session)
    freezer.begin(carried)                            # each file, before its optimizer is built: every LoRA
                                                      # parameter in the optimizer's list; `carried` frozen
    freezer.resume(ck.freezing) / freezer.baseline()  # after a checkpoint is restored (or none was)
    freezer.after_backward()                          # in the step, before unscaling and clipping
    freezer.after_step(step, global_step)             # every lora.freeze_every_steps: freeze the stalled
    freezer.state_dict()                              # into the checkpoint; freezer.summary() into the record

Every `freeze_every_steps` steps the change of each unit (a layer's LoRA modules
together, or one module) since the previous check is measured relative to its
base weight, ‖ΔW_now − ΔW_then‖_F / ‖W₀‖_F (the activity probe's r × r Gram
products: daemon.train.activity_probe). A unit whose change is under
`freeze_threshold` × the median of the trainable units for `freeze_patience`
checks in a row freezes: requires_grad off, its gradient dropped, so AdamW
(which steps only parameters with a gradient) leaves its weights bitwise as
they are, weight decay included. Relative to the median, not an absolute
figure: under Adam every parameter moves about `lr` per step while its
gradient is consistent, so a unit that moves much less than the others is one
whose gradient has become noise (Spectrum's low signal-to-noise layers).

The saving: with `freeze_scope` bottom (the default), layers freeze from the
bottom up, and the hidden state entering the lowest trainable block is
detached, so the frozen blocks below keep no activations and get no backward
pass. A frozen layer in the middle saves only its LoRA gradients (the base's
weights never take any), which is why `any` is not the default.

A new file starts from the frozen set of the version it continues (the
manifest's `freezing`). Its first step computes the gradients of every unit;
a frozen unit whose gradient (relative to ‖W₀‖) reaches `thaw_ratio` × the
median of the trainable ones thaws (with scope bottom, every frozen layer above
it thaws too, so the frozen run stays at the bottom). Everything the decisions
use is in the checkpoint (frozen set, stall counts, the factors at the last
check), so a resumed file freezes at the same steps as an uninterrupted one.
"""

from __future__ import annotations

import logging
import math
import statistics
from typing import Any

import torch

from daemon.config import LoraConfig
from daemon.train.activity_probe import ADAPTER, ActivityProbe, _LAYER_INDEX

log = logging.getLogger(__name__)


class Freezer:
    """The frozen set of one loaded model's LoRA, and the rules that change it."""

    def __init__(self, model: Any, lc: LoraConfig, probe: ActivityProbe | None = None) -> None:
        self.lc = lc
        self.model = model
        self.probe = ActivityProbe(model)  # its own: its previous sample is the previous check, not the activity one
        if probe is not None:
            self.probe._base = probe.base_norms()  # ‖W₀‖ once per loaded model (4-bit: dequantised once)
        sites = self.probe.sites
        if lc.freeze_unit == "layer":
            layers = sorted({s.layer for s in sites if s.layer >= 0})
            self.units = [[i for i, s in enumerate(sites) if s.layer == layer] for layer in layers]
            self.names = [f"layer {layer}" for layer in layers]
            self.unit_layer = layers
            self.unit_kind = ["layer"] * len(layers)
        else:
            idx = sorted((i for i, s in enumerate(sites) if s.layer >= 0), key=lambda i: (sites[i].layer, i))
            self.units = [[i] for i in idx]
            self.names = [f"{sites[i].layer}.{sites[i].kind}" for i in idx]
            self.unit_layer = [sites[i].layer for i in idx]
            self.unit_kind = [sites[i].kind for i in idx]
        self.params = [[m.lora_A[ADAPTER].weight, m.lora_B[ADAPTER].weight] for m in self.probe.modules]
        # A LoRA on an embedding (outside the numbered blocks, before them) would lose its gradient to the detach.
        self.can_detach = not any(s.layer < 0 and "embed" in s.name for s in sites)
        self.blocks = {s.layer: model.get_submodule(_block_path(s.name)) for s in sites if s.layer >= 0}
        self.frozen: set[int] = set()
        self.stalls = [0] * len(self.units)
        self.probed = True
        self.events: list[dict[str, Any]] = []
        self.carried: list[str] = []
        self.carry: list[str] = []  # the frozen set the next file starts from (the current version's manifest)
        self._hook: Any = None

    # -- a file's start -------------------------------------------------------------------
    def begin(self, carried: list[str] | None) -> None:
        """Before the file's optimizer is built: every LoRA parameter trainable (the optimizer lists them all);
        `carried` (unit names, the version's frozen set) frozen, to be re-tested by the first step's gradients."""
        by_name = {n: u for u, n in enumerate(self.names)}
        self.carried = [n for n in carried or [] if n in by_name]
        self.frozen = {by_name[n] for n in self.carried}
        self.stalls = [0] * len(self.units)
        self.probed = not self.frozen  # nothing to re-test
        self.events = []
        self._set_requires_grad(set())
        self._detach_below(None)

    def resume(self, state: dict[str, Any]) -> None:
        """A checkpoint's state (after `begin`): the decisions go on exactly where they were. A state of other
        units (lora.freeze_unit changed since) is not used: the file goes on from its weights, nothing frozen."""
        by_name = {n: u for u, n in enumerate(self.names)}
        if len(state["stalls"]) != len(self.units) or any(n not in by_name for n in state["frozen"]):
            log.warning("the checkpoint's frozen set is of other units (lora.freeze_unit changed?): not used")
            self.frozen, self.probed = set(), True
            self.baseline()
            return
        self.frozen = {by_name[n] for n in state["frozen"]}
        self.stalls = list(state["stalls"])
        self.probed = bool(state["probed"])
        self.events = list(state["events"])
        self.probe._prev = {int(g): tuple(t) for g, t in state["prev"].items()}
        if self.probed:
            self._apply()

    def baseline(self) -> None:
        """No checkpoint: the weights now are what the first check measures the change from."""
        self.probe.forget_previous()
        self.probe.sample()

    def state_dict(self) -> dict[str, Any]:
        return {"frozen": [self.names[u] for u in sorted(self.frozen)], "stalls": list(self.stalls),
                "probed": self.probed, "events": list(self.events),
                "prev": {g: list(t) for g, t in self.probe._prev.items()}}

    # -- in the step ----------------------------------------------------------------------
    @torch.no_grad()
    def after_backward(self, step: int = 1, global_step: int = 0) -> None:
        """The first step of a file: thaw the frozen units its gradients need; then drop the frozen ones'."""
        if not self.probed:
            grads = [self._unit_grad(u) for u in range(len(self.units))]
            thaw = self._to_thaw(grads)
            if thaw:
                self.frozen -= thaw
                self.events.append({"step": step, "global_step": global_step, "action": "thaw",
                                    "units": [self.names[u] for u in sorted(thaw)]})
                log.info("thawed %s: the new file's gradients need them", ", ".join(self.names[u] for u in sorted(thaw)))
            self.probed = True
            self._apply()
        for u in self.frozen:
            for i in self.units[u]:
                for p in self.params[i]:
                    p.grad = None

    def _unit_grad(self, u: int) -> float:
        sq = sum(float(p.grad.double().pow(2).sum()) for i in self.units[u] for p in self.params[i] if p.grad is not None)
        return math.sqrt(sq) / max(self._unit_base(u), 1e-30)

    def _to_thaw(self, grads: list[float]) -> set[int]:
        trainable = [u for u in range(len(self.units)) if u not in self.frozen]
        thaw = set()
        for u in self.frozen:
            peers = [grads[v] for v in trainable if self.unit_kind[v] == self.unit_kind[u]]
            if peers and grads[u] >= self.lc.thaw_ratio * statistics.median(peers):
                thaw.add(u)
        if thaw and self.lc.freeze_scope == "bottom":  # the frozen set stays a run at the bottom
            lowest = min(self.unit_layer[u] for u in thaw)
            thaw |= {u for u in self.frozen if self.unit_layer[u] >= lowest}
        return thaw

    @torch.no_grad()
    def after_step(self, step: int, global_step: int) -> None:
        """At every `freeze_every_steps`-th step: measure each unit's change and freeze the stalled ones."""
        if step % self.lc.freeze_every_steps:
            return
        change = self.probe.sample().values["change"]
        per_module = self._per_module(change)
        rel = [self._unit_change(u, per_module) for u in range(len(self.units))]
        trainable = [u for u in range(len(self.units)) if u not in self.frozen]
        for u in trainable:
            peers = [rel[v] for v in trainable if self.unit_kind[v] == self.unit_kind[u] and rel[v] is not None]
            stalled = rel[u] is not None and bool(peers) and rel[u] < self.lc.freeze_threshold * statistics.median(peers)
            self.stalls[u] = self.stalls[u] + 1 if stalled else 0
        room = math.floor(self.lc.freeze_max_fraction * len(self.units)) - len(self.frozen)
        new: list[int] = []
        for u in sorted(trainable, key=lambda v: (self.unit_layer[v], v)):
            if len(new) >= room:
                break
            if self.stalls[u] < self.lc.freeze_patience:
                if self.lc.freeze_scope == "bottom":
                    break  # a unit above a trainable one may not freeze
                continue
            if self.lc.freeze_scope == "bottom" and any(
                    self.unit_layer[v] < self.unit_layer[u] and v not in self.frozen and v not in new for v in trainable):
                break
            new.append(u)
        if new:
            self.frozen |= set(new)
            self.events.append({"step": step, "global_step": global_step, "action": "freeze",
                                "units": [self.names[u] for u in new]})
            log.info("froze %s at step %d: stalled for %d checks", ", ".join(self.names[u] for u in new), step,
                     self.lc.freeze_patience)
            self._apply()

    def _per_module(self, grid_change: list[list[float | None]]) -> list[float | None]:
        row = {layer: i for i, layer in enumerate(self.probe.layers)}
        col = {kind: j for j, kind in enumerate(self.probe.kinds)}
        return [grid_change[row[s.layer]][col[s.kind]] for s in self.probe.sites]

    def _unit_base(self, u: int) -> float:
        base = self.probe.base_norms()
        return math.sqrt(sum(base[i] ** 2 for i in self.units[u]))

    def _unit_change(self, u: int, per_module: list[float | None]) -> float | None:
        vals = [per_module[i] for i in self.units[u]]
        if any(v is None for v in vals):
            return None
        return math.sqrt(sum(v * v for v in vals)) / max(self._unit_base(u), 1e-30)

    # -- applying the frozen set ---------------------------------------------------------
    def frozen_modules(self) -> set[int]:
        return {i for u in self.frozen for i in self.units[u]}

    def _apply(self) -> None:
        frozen = self.frozen_modules()
        self._set_requires_grad(frozen)
        trainable_layers = [self.probe.sites[i].layer for i in range(len(self.params)) if i not in frozen]
        lowest = min(trainable_layers) if trainable_layers else None
        self._detach_below(lowest if lowest is not None and lowest > min(self.blocks) else None)

    def _set_requires_grad(self, frozen: set[int]) -> None:
        for i, ps in enumerate(self.params):
            for p in ps:
                p.requires_grad_(i not in frozen)
                if i in frozen:
                    p.grad = None

    def _detach_below(self, layer: int | None) -> None:
        """The hidden state entering block `layer` is detached: the blocks below get no backward pass."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if layer is not None and self.can_detach:
            self._hook = self.blocks[layer].register_forward_pre_hook(_detach_hidden, with_kwargs=True)
        self.skipped_below = layer if self._hook is not None else None

    def skipped_layers(self) -> list[int]:
        """Blocks that get no backward pass (below the lowest trainable one)."""
        return [layer for layer in sorted(self.blocks) if self.skipped_below is not None and layer < self.skipped_below]

    # -- what it reports --------------------------------------------------------------------
    def per_module(self) -> list[float]:
        """1.0 for a frozen module, 0.0 for a trainable one (the activity grid's `frozen` measure)."""
        frozen = self.frozen_modules()
        return [1.0 if i in frozen else 0.0 for i in range(len(self.params))]

    def summary(self) -> dict[str, Any]:
        """For the job record and the version's manifest (the next file starts from `frozen`)."""
        return {"unit": self.lc.freeze_unit, "frozen": [self.names[u] for u in sorted(self.frozen)],
                "units": len(self.units), "carried": list(self.carried),
                "skipped_layers": self.skipped_layers(), "events": list(self.events)}

    def release(self) -> None:
        """Every LoRA parameter trainable again, no detach (freezing off, or the model is handed on)."""
        self.frozen = set()
        self._set_requires_grad(set())
        self._detach_below(None)


def _block_path(name: str) -> str:
    """The numbered block a module path is in: 'base_model.model.model.layers.3.mlp.up_proj' -> '...layers.3'."""
    m = _LAYER_INDEX.search(name + ".")
    return name[:m.end() - 1]


def _detach_hidden(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    if args and isinstance(args[0], torch.Tensor):
        return (args[0].detach(), *args[1:]), kwargs
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"].detach()}
    return None
