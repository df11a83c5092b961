"""Intruder dimensions (`activity.intruders`): new dominant directions the LoRA update brings into a weight.

    intruders = Intruders(probe, cfg.activity)     # once per loaded base: the base's vectors, computed lazily
    counts = intruders.counts()                    # one count per LoRA module, as the weights stand now
    per_layer = intruders.per_layer()              # {"layers": [...], "counts": [...], "total": n}

"LoRA vs full fine-tuning: an illusion of equivalence" (Shuttleworth et al., 2024)
finds that LoRA adds singular vectors of large singular value that lie far
from every singular vector of the pretrained weight, that forgetting
concentrates in them, and that they accumulate over sequential fine-tuning.

Per module, with ΔW = s·B·A (B out × r, A r × in), never formed: B = Q_B R_B and
Aᵀ = Q_A R_A (QR), so ΔW = Q_B (s R_B R_Aᵀ) Q_Aᵀ and the SVD of the r × r core
U_c Σ V_cᵀ gives ΔW's singular values Σ and left singular vectors Q_B U_c. A
direction is an intruder when its singular value reaches
`intruders_min_strength` × σ_k of the base weight (k = `intruders_top_k`: weaker
directions do not reorder what the layer does) and its largest cosine
similarity with the base's top k left singular vectors is under
`intruders_threshold`. The base's vectors come from a subspace iteration on each (4-bit:
dequantised) base weight, the first time they are needed for a loaded base
(a new generation loads a new base), and are kept in host memory (k × out floats per module).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from daemon.config import ActivityConfig
from daemon.train.activity_probe import ADAPTER, ActivityProbe

log = logging.getLogger(__name__)

NOTHING = 1e-12  # a singular value under this fraction of the base's σ_k is rounding, not a direction
POWER_ITERATIONS = 6  # subspace iterations for the base's top vectors: converged to ~1e-3 on decaying spectra (tested)


class Intruders:
    """Counts intruder directions per LoRA module of one loaded peft model."""

    def __init__(self, probe: ActivityProbe, ac: ActivityConfig) -> None:
        self.probe, self.ac = probe, ac
        self._base: list[tuple[torch.Tensor, float]] | None = None  # per module: (U_k out × k, σ_k)
        self.base_seconds: float | None = None

    def base_vectors(self) -> list[tuple[torch.Tensor, float]]:
        """The top-k left singular vectors and the k-th singular value of each base weight, once."""
        if self._base is None:
            t0 = time.perf_counter()
            self._base = [_top_left(m.get_base_layer(), self.ac.intruders_top_k) for m in self.probe.modules]
            self.base_seconds = time.perf_counter() - t0
            log.info("intruder dimensions: the base's top-%d singular vectors of %d weights in %.1f s",
                     self.ac.intruders_top_k, len(self._base), self.base_seconds)
        return self._base

    @torch.no_grad()
    def counts(self) -> list[float]:
        """Intruder directions per module, as the LoRA weights stand now."""
        base = self.base_vectors()
        out = []
        for i, m in enumerate(self.probe.modules):
            u0, sigma_k = base[i]
            a = m.lora_A[ADAPTER].weight.detach().double().cpu()
            b = m.lora_B[ADAPTER].weight.detach().double().cpu()
            out.append(float(intruder_count(a, b, float(self.probe.scaling[i]), u0, sigma_k,
                                            self.ac.intruders_threshold, self.ac.intruders_min_strength)))
        return out

    def grid(self) -> dict[str, Any]:
        """The counts laid out as the activity grid (layers × kinds)."""
        return self.probe.grid({"intruders": self.counts()}).to_dict()


def intruder_count(a: torch.Tensor, b: torch.Tensor, scaling: float, u0: torch.Tensor, sigma_k: float,
                   threshold: float, min_strength: float) -> int:
    """Directions of ΔW = scaling·B·A strong enough (≥ min_strength·σ_k) and unlike every column of `u0`
    (largest |cos| < threshold), from r × r products only."""
    qb, rb = torch.linalg.qr(b)  # out × r, r × r
    qa, ra = torch.linalg.qr(a.T)  # in × r, r × r
    uc, s, _ = torch.linalg.svd(scaling * rb @ ra.T)
    dirs = qb @ uc  # out × r: ΔW's left singular vectors, unit length
    strong = (s >= min_strength * sigma_k) & (s > NOTHING * sigma_k)  # a direction with no weight is none
    if not bool(strong.any()):
        return 0
    sim = (u0.double().T @ dirs[:, strong]).abs().amax(dim=0)
    return int((sim < threshold).sum())


def _top_left(layer: Any, k: int) -> tuple[torch.Tensor, float]:
    """(top-k left singular vectors, k-th singular value) of a frozen base layer's weight, on the host."""
    w = layer.weight
    if getattr(w, "quant_state", None) is not None:
        import bitsandbytes as bnb

        w = bnb.functional.dequantize_4bit(w.data, w.quant_state)
    return top_left(w.detach().float().cpu(), k)


def top_left(w: torch.Tensor, k: int, iterations: int = POWER_ITERATIONS) -> tuple[torch.Tensor, float]:
    """Top-k left singular vectors and σ_k of `w` by subspace iteration with 2k columns (Halko, Martinsson and
    Tropp 2011, algorithm 4.4): a few products with `w` instead of a full SVD, about 50x less on a
    576 x 1536 weight. The start is drawn from its own generator: the training's RNG is left as it was."""
    k = min(k, *w.shape)
    cols = min(2 * k, *w.shape)
    gen = torch.Generator().manual_seed(0)
    q = torch.linalg.qr(w @ torch.randn(w.shape[1], cols, generator=gen))[0]
    for _ in range(iterations):
        q = torch.linalg.qr(w @ torch.linalg.qr(w.T @ q)[0])[0]
    u, s, _ = torch.linalg.svd(q.T @ w, full_matrices=False)
    return (q @ u[:, :k]).contiguous(), float(s[k - 1])


@torch.no_grad()
def damp_model(model: Any, ac: ActivityConfig, damp: float) -> dict[str, Any]:
    """Scale the intruder directions of every LoRA module of a peft `model` by 1 - `damp`, in its factors:
    ΔW = Q_B U_c Σ V_cᵀ Q_Aᵀ becomes the same with Σ damped where a direction intrudes, written back as
    B = Q_B U_c Σ' / s and A = V_cᵀ Q_Aᵀ (still rank r, so the merged weight is what this adapter's forward
    computes). The base's vectors from `model`'s own (fp32) base weights. Returns what was damped."""
    probe = ActivityProbe(model)
    damped, per_module = 0, {}
    for i, m in enumerate(probe.modules):
        u0, sigma_k = _top_left(m.get_base_layer(), ac.intruders_top_k)
        a_w, b_w = m.lora_A[ADAPTER].weight, m.lora_B[ADAPTER].weight
        a, b, scaling = a_w.double(), b_w.double(), float(probe.scaling[i])
        qb, rb = torch.linalg.qr(b)
        qa, ra = torch.linalg.qr(a.T)
        uc, sv, vch = torch.linalg.svd(scaling * rb @ ra.T)
        dirs = qb @ uc
        sim = (u0.double().T @ dirs).abs().amax(dim=0)
        intruding = (sv >= ac.intruders_min_strength * sigma_k) & (sv > NOTHING * sigma_k) & (sim < ac.intruders_threshold)
        n = int(intruding.sum())
        if n == 0 or scaling == 0:
            continue
        sv = torch.where(intruding, sv * (1 - damp), sv)
        b_w.copy_((dirs * sv / scaling).to(b_w.dtype))
        a_w.copy_((vch @ qa.T).to(a_w.dtype))
        damped += n
        per_module[probe.sites[i].name.removeprefix("base_model.model.")] = n
    return {"damp": damp, "directions": damped, "modules": per_module, "threshold": ac.intruders_threshold,
            "top_k": ac.intruders_top_k, "min_strength": ac.intruders_min_strength}
