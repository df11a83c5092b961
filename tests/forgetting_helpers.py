"""Forgetting reports as the trainer sends them (daemon/train/forgetting.py), with numbers a test can check.

    r = report("j2", "b.jsonl", version=2, generation=0, keep=[("j1", "a.jsonl", 0.9, 0.6)],
               probes=[("general.jsonl", 1.3, 1.2, 1.1)], own=("j2", 0.5))
    r["sets"][1]["change"] == (0.9 - 0.6) / 0.6

Each keep-set is (job_id, original name, loss now, loss right after it was learnt); each probe (file name, loss
now, loss under the version before, loss at the generation's start); `own` the file's own keep-set (the diagonal).
"""

from __future__ import annotations

from typing import Any

PROBE_LIMIT, KEEP_LIMIT = 0.10, 0.25


def _set(sid: str, kind: str, name: str, job_id: str | None, loss: float, ref: float | None, base: float | None,
         limit: float) -> dict[str, Any]:
    change = None if ref is None else (loss - ref) / ref
    return {"id": sid, "kind": kind, "name": name, "job_id": job_id, "examples": 16, "tokens": 640,
            "loss": loss, "accuracy": round(1 - loss / 4, 6),
            "reference": None if ref is None else {"loss": ref, "accuracy": round(1 - ref / 4, 6)},
            "baseline": None if base is None else {"loss": base, "accuracy": round(1 - base / 4, 6)},
            "change": change, "drift": None if base is None else (loss - base) / base,
            "limit": limit, "over": change is not None and change > limit}


def report(job_id: str, name: str, version: int | None, generation: int = 0,
           keep: list[tuple[str, str, float, float]] = (), probes: list[tuple[str, float, float, float]] = (),
           own: tuple[str, float] | None = None, action: str = "warn", sampled: bool = False) -> dict[str, Any]:
    sets = [_set(f"probe:{p}", "probe", p, None, loss, ref, base, PROBE_LIMIT) for p, loss, ref, base in probes]
    sets += [_set(f"keep:{j}", "keep", n, j, loss, ref, None, KEEP_LIMIT) for j, n, loss, ref in keep]
    if own is not None:  # the diagonal: its reference is itself (right after it was learnt is now)
        sets.append(_set(f"keep:{own[0]}", "keep", name, own[0], own[1], own[1], own[1], KEEP_LIMIT) | {"drift": None})
    earlier = [s for s in sets if s["kind"] == "keep" and s["job_id"] != job_id]
    bwt = ({"accuracy": sum(s["accuracy"] - s["reference"]["accuracy"] for s in earlier) / len(earlier),
            "loss": sum(s["loss"] - s["reference"]["loss"] for s in earlier) / len(earlier), "sets": len(earlier)}
           if earlier else None)
    scored = [s for s in sets if s["change"] is not None and s["job_id"] != job_id]
    worst = max(scored, key=lambda s: s["change"], default=None)
    over = [s["id"] for s in sets if s["over"]]
    return {"job_id": job_id, "original_name": name, "version": version, "generation": generation,
            "seconds": 1.5, "train_seconds": 20.0, "budget_seconds": 3.0, "sampled": sampled,
            "examples_per_set": 8 if sampled else None, "sets": sets, "backward_transfer": bwt,
            "worst": {"id": worst["id"], "name": worst["name"], "change": worst["change"]} if worst else None,
            "gate": {"action": action, "tripped": bool(over), "over": over,
                     "message": f"{', '.join(over)} over the limit" if over else None}}


def sequence(ids: tuple[str, str, str] = ("j1", "j2", "j3"), names: tuple[str, str, str] = ("a.jsonl", "b.jsonl", "c.jsonl"),
             generation: int = 0, first_version: int = 1) -> list[dict[str, Any]]:
    """Three files, the third forgetting the first (keep-set +50%) and the probe (+20% against the version before)."""
    g, (j1, j2, j3), (a, b, c), v = "general.jsonl", ids, names, first_version
    return [
        report(j1, a, v, generation, probes=[(g, 1.10, 1.00, 1.00)], own=(j1, 0.60)),
        report(j2, b, v + 1, generation, keep=[(j1, a, 0.66, 0.60)], probes=[(g, 1.12, 1.10, 1.00)], own=(j2, 0.50)),
        report(j3, c, v + 2, generation, keep=[(j1, a, 0.90, 0.60), (j2, b, 0.55, 0.50)],
               probes=[(g, 1.344, 1.12, 1.00)], own=(j3, 0.40)),
    ]
