"""Consolidation: fold the current adapter into its base and save the result as the next generation's base.

    from daemon.train.consolidate import consolidate
    result = consolidate(cfg, current, base_path, description, generation=0)   # Consolidated, or ConsolidationRefused

The QLoRA-correct merge: the base is loaded again in fp32 from its folder (never
the 4-bit weights the trainer holds), the adapter is applied with PEFT and
merged, and the merged model is saved as a standard Hugging Face folder
(safetensors, config, tokenizer with its chat template) under
`consolidated_models/<stamp>/` with `lineage.json`. Before it is published, two
checks: the merged model's logits equal base + adapter's on a probe batch
within MERGE_TOLERANCE of their scale (fp32; the headroom is recorded), and the saved folder, loaded back with plain
`AutoModelForCausalLM`, gives the merged model's logits again (SAVE_TOLERANCE in
the saved dtype). A failed check, or too little memory or disk (checked first,
with the numbers), raises ConsolidationRefused and leaves everything as it was.

The folder is written under a temp name and renamed when complete; temp folders
left by a crash are swept here. Consolidated folders are never deleted or
overwritten by traind (each has its own stamp). Switching training to the new
base is the caller's (daemon/train/lineage.py): it publishes a fresh adapter
whose manifest names the new base, the commit point.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import struct
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from daemon import adapters, atomic
from daemon.config import Config, resolved_dict
from daemon.errors import TraindError

log = logging.getLogger(__name__)

LINEAGE = "lineage.json"
# fp32 logits of the merged model against base + adapter: a merge is W + B·A·scale computed once instead of
# per forward, so the two differ by float rounding only, which grows with the logits' size: relative to their
# scale (the largest |logit| of the probe, at least 1). Measured: 5e-6 on the embedded model (logits about 10),
# 9.2e-5 on SmolLM2-135M (logits up to 35, 2.6e-6 of the scale), where an absolute 1e-4 left 1.1x headroom.
# A wrong merge (the adapter missing, scaled twice) moves logits by the adapter's effect, 1e-2 to 1 of the scale.
MERGE_TOLERANCE = 1e-4  # relative: the allowed max |logit diff| is MERGE_TOLERANCE * scale
SAVE_TOLERANCE = {"float32": 1e-5, "bfloat16": 5e-2, "float16": 1e-2}  # the saved folder reloaded, per saved dtype
PROBE_TEXTS = ("The quick brown fox jumps over the lazy dog.",
               "Consolidation folds the adapter into the base model.",
               "1 2 3 4 5 6 7 8 9 10")
# RAM for the merge: the base in fp32, then the saved folder loaded again to check it, plus room to work.
RAM_FACTOR = 2.5
DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1}


class ConsolidationRefused(TraindError):
    """Consolidation did not happen; everything is as it was. The message says why, with the numbers."""


@dataclass(frozen=True)
class Consolidated:
    path: Path
    generation: int
    max_logit_diff: float
    reload_logit_diff: float
    seconds: float
    lineage: dict[str, Any]


def consolidated_root(cfg: Config) -> Path:
    return cfg.path("consolidated")


def sweep_temp(root: Path) -> int:
    """Remove temp folders a crash left mid-consolidation (the trainer holds its lock: nothing else writes here)."""
    removed = 0
    for tmp in root.glob(".*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)
        removed += 1
    return removed


def base_params(base: Path) -> int:
    """Parameters in the base's safetensors files, read from their headers (no weights are loaded)."""
    total = 0
    files = sorted(base.glob("*.safetensors"))
    if not files:
        raise ConsolidationRefused(f"{base} has no .safetensors weights; consolidation needs a safetensors base")
    for f in files:
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, t in header.items():
            if name != "__metadata__":
                count = 1
                for d in t["shape"]:
                    count *= d
                total += count
    return total


def available_memory() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    return 0


def preflight(base: Path, root: Path, save_bytes_per_param: int) -> dict[str, int]:
    """Refuse, with the numbers, when memory or disk cannot hold the merge."""
    params = base_params(base)
    need_ram = int(params * 4 * RAM_FACTOR)
    have_ram = available_memory()
    if have_ram < need_ram:
        raise ConsolidationRefused(
            f"not enough memory to merge: the base has {params:,} parameters, {params * 4 / 2**30:.2f} GiB in fp32; "
            f"the merge needs about {need_ram / 2**30:.2f} GiB and {have_ram / 2**30:.2f} GiB is available")
    root.mkdir(parents=True, exist_ok=True)
    need_disk = int(params * save_bytes_per_param * 1.05) + 50 * 2**20  # weights, tokenizer and some slack
    have_disk = shutil.disk_usage(root).free
    if have_disk < need_disk:
        raise ConsolidationRefused(
            f"not enough disk in {root}: the merged model needs about {need_disk / 2**30:.2f} GiB and "
            f"{have_disk / 2**30:.2f} GiB is free")
    return {"params": params, "ram_needed": need_ram, "ram_available": have_ram, "disk_needed": need_disk,
            "disk_free": have_disk}


def folder_sha256(folder: Path) -> str:
    """One hash over the folder's files (names and bytes, in name order): the content a base is."""
    h = hashlib.sha256()
    for p in sorted(x for x in folder.rglob("*") if x.is_file()):
        h.update(str(p.relative_to(folder)).encode() + b"\0")
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("traind", "torch", "transformers", "peft", "bitsandbytes", "safetensors"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def _save_dtype(cfg: Config, base: Path) -> str:
    wanted = cfg.consolidation.save_dtype
    if wanted != "auto":
        return wanted
    try:
        raw = json.loads((base / "config.json").read_text())
        name = str(raw.get("dtype") or raw.get("torch_dtype") or "float32")
    except (OSError, ValueError):
        name = "float32"
    return name if name in SAVE_TOLERANCE else "float32"


def consolidate(cfg: Config, current: adapters.AdapterVersion, base: Path, description: str,
                generation: int) -> Consolidated:
    """Merge `current` into `base` (generation `generation`) and publish generation + 1's base folder."""
    import torch
    from transformers import AutoModelForCausalLM

    if not description.strip():
        raise ConsolidationRefused("a consolidation needs a description of what was trained")
    t0 = time.monotonic()
    root = consolidated_root(cfg)
    swept = sweep_temp(root) if root.is_dir() else 0
    if swept:
        log.info("removed %d temp folder(s) a crash left in %s", swept, root)
    save_dtype = _save_dtype(cfg, base)
    figures = preflight(base, root, 4 if save_dtype == "float32" else 2)
    log.info("consolidating adapter v%d into %s (%s parameters; %s)", current.version, base,
             f"{figures['params']:,}", description)

    merged, tokenizer, ids, got, check = merge_in_fp32(base, current.path, cfg, cfg.consolidation.damp_intruders)
    max_diff = check["max_abs_logit_diff"]
    if not max_diff <= check["tolerance"]:
        raise ConsolidationRefused(f"the merged model's logits differ from base + adapter by {max_diff:.3g} "
                                   f"(tolerance {check['tolerance']:.3g}: {MERGE_TOLERANCE:g} of the logits' scale "
                                   f"{check['logit_scale']:.3g}): nothing was saved")

    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    final = root / stamp
    n = 1
    while final.exists():  # never overwrite a consolidated model
        n += 1
        final = root / f"{stamp}-{n}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=root))
    try:
        merged.to(getattr(torch, save_dtype)).save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)  # with its chat template
        del merged
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32, use_kernels=False)
        reloaded.eval()
        with torch.no_grad():
            again = reloaded(**ids).logits
        del reloaded
        reload_diff = float((again - got).abs().max())
        tolerance = SAVE_TOLERANCE[save_dtype] * max(1.0, float(got.abs().max()))
        if not reload_diff <= tolerance:
            raise ConsolidationRefused(f"the saved model, loaded back, differs from the merged one by {reload_diff:.3g} "
                                       f"(tolerance {tolerance:.3g} in {save_dtype}): nothing was published")
        lineage = _lineage(cfg, current, base, description, generation, final, check, reload_diff,
                           save_dtype, figures, int(ids["input_ids"].numel()))
        atomic.write_json(tmp / LINEAGE, lineage)
        tmp.chmod(0o755)
        atomic.publish_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    seconds = time.monotonic() - t0
    log.info("consolidated into %s in %.1f s (max |logit diff| %.2e merged, %.0fx headroom; %.2e reloaded)", final,
             seconds, max_diff, check["headroom"], reload_diff)
    return Consolidated(final, generation + 1, max_diff, reload_diff, seconds, lineage)


def merge_in_fp32(base: Path, adapter: Path, cfg: Config | None = None,
                  damp: float = 0.0) -> tuple[Any, Any, dict[str, Any], Any, dict[str, float]]:
    """`adapter` merged into the base folder `base` in fp32: (the merged model, the base's tokenizer, the probe
    batch, the merged model's logits on it, merge_check against base + adapter). Consolidation and export judge
    the check, each with its own refusal. With `damp` > 0 (consolidation.damp_intruders) the adapter's intruder
    directions are damped first (daemon.train.intruders.damp_model): the check is against base + the damped
    adapter, which is what is merged, and check["intruders_damped"] says what was."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, use_kernels=False)  # no hub kernels: model.load_base
    model.eval()
    peft_model = PeftModel.from_pretrained(model, str(adapter))
    peft_model.eval()
    damped = None
    if damp > 0 and cfg is not None:
        from daemon.train.intruders import damp_model

        damped = damp_model(peft_model, cfg.activity, damp)
        log.info("damped %d intruder direction(s) by %g before merging", damped["directions"], damp)
    ids = _probe_ids(tokenizer)
    with torch.no_grad():
        expected = peft_model(**ids).logits
        merged = peft_model.merge_and_unload()
        got = merged(**ids).logits
    check = merge_check(expected, got)
    return merged, tokenizer, ids, got, {**check, "intruders_damped": damped} if damped is not None else check


def merge_check(expected: Any, got: Any) -> dict[str, float]:
    """The merged model's logits (`got`) against base + adapter's: max |diff|, the tolerance at these logits'
    scale, and the headroom (tolerance / diff: how far inside it the merge is)."""
    max_diff = float((got.float() - expected.float()).abs().max())
    scale = max(1.0, float(expected.float().abs().max()))
    tolerance = MERGE_TOLERANCE * scale
    return {"max_abs_logit_diff": max_diff, "logit_scale": scale, "tolerance": tolerance,
            "relative_tolerance": MERGE_TOLERANCE, "headroom": tolerance / max_diff if max_diff > 0 else float("inf")}


def _probe_ids(tokenizer: Any) -> dict[str, Any]:
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return dict(tokenizer(list(PROBE_TEXTS), return_tensors="pt", padding=True))


def _lineage(cfg: Config, current: adapters.AdapterVersion, base: Path, description: str, generation: int,
             final: Path, check: dict[str, float], reload_diff: float, save_dtype: str, figures: dict[str, int],
             probe_tokens: int) -> dict[str, Any]:
    from daemon.train.convert import source_of

    ledger = current.dataset
    parent_lineage = base / LINEAGE
    gguf = source_of(base)  # generation 0 converted from a GGUF: that file's hash is the root of the lineage
    headroom = check["headroom"]
    return {
        "generation": generation + 1,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "description": description,
        "path": str(final),
        "parent_base": {"path": str(base), "sha256": folder_sha256(base), "generation": generation,
                        "lineage": str(parent_lineage) if parent_lineage.is_file() else None,
                        **({"gguf": gguf} if gguf else {})},
        "adapter": {"version": current.version, "path": str(current.path), "global_step": current.manifest.global_step},
        # what this generation learnt (the files merged now); `dataset` is every generation's, carried on
        "files": [e for e in ledger if e.get("generation", 0) == generation],
        "dataset": ledger,
        "verification": {"probe_tokens": probe_tokens, **check, "headroom": headroom if headroom != float("inf") else None,
                         "reloaded_max_abs_logit_diff": reload_diff, "saved_dtype": save_dtype},
        "resources": figures,
        "config": resolved_dict(cfg),
        "versions": library_versions(),
        "host": os.uname().nodename,
    }
