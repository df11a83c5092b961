"""Mid-file checkpoints: write atomically, load the newest good one, prune, delete.

    from daemon.train.checkpoint import Position, save_checkpoint, load_latest, delete_checkpoints
    folder = cfg.path("checkpoints") / job_id
    save_checkpoint(folder, pos, lora, optimizer.state_dict(), scheduler.state_dict(), scaler.state_dict(), keep=2)
    ck = load_latest(folder, sha256, start)   # None when nothing usable (other bytes, other adapter state)
    restore_rng(ck.rng); ...

Layout (docs/internals.md): `<checkpoints>/<job_id>/step_NNNNNN/` holds
`adapter_model.safetensors` (LoRA), `optimizer.pt` (optimizer, scheduler and
grad-scaler states), `rng.pt` (python, numpy, torch CPU and CUDA RNG states)
`ledger.json` (the samples the steps so far consumed, daemon.sample_ledger) and
`state.json` (Position: step, global step, data position, file sha256),
written last inside the folder. The folder is written under a temp name and
published with one rename; `latest.json` then points at it. A folder that is
incomplete or does not load is ignored and an older one is used.

`<checkpoints>/<job_id>/steps.jsonl` (StepLog) is the file's step reports, one
line each, appended as they are sent and made durable before each checkpoint.
A resume truncates it to the checkpoint's step and sends the service the ones
it has not recorded, however far behind the service was when it died.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon import adapters, atomic

log = logging.getLogger(__name__)

STEP_RE = re.compile(r"^step_(\d{6})$")
LATEST = "latest.json"
FILES = ("adapter_model.safetensors", "optimizer.pt", "rng.pt", "state.json")


@dataclass(frozen=True)
class Position:
    """Where training of one file stands after an optimizer step."""

    job_id: str
    sha256: str
    step: int  # optimizer steps done in this file
    global_step: int  # optimizer steps done by the adapter over all files
    total_steps: int
    epoch: int  # the epoch in progress (0-based)
    micro_batches: int  # micro-batches of that epoch already consumed
    last_loss: float | None = None
    order: str = "shuffled"  # how the file's micro-batches are made (daemon.train.batching); older checkpoints: shuffled


@dataclass
class Checkpoint:
    """A loaded checkpoint."""

    path: Path
    position: Position
    lora: dict[str, Any]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    scaler: dict[str, Any]
    rng: dict[str, Any]
    ledger: dict[str, Any] | None = None  # the samples the steps so far consumed (daemon.sample_ledger); None: older checkpoint
    freezing: dict[str, Any] | None = None  # lora.freeze_stalled's state (daemon.train.freezing); None: off


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def capture_rng() -> dict[str, Any]:
    """Every RNG state a training step can draw from."""
    import torch

    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:  # numpy is optional for us; torch works without it
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Put back what capture_rng took (CUDA states only when a GPU is present)."""
    import torch

    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    folder: Path, pos: Position, lora: dict, optimizer: dict, scheduler: dict, scaler: dict, keep: int,
    ledger: dict[str, Any] | None = None, freezing: dict[str, Any] | None = None,
) -> Path:
    """Write `folder/step_NNNNNN/` atomically, point latest.json at it, prune to `keep`.

    `ledger`: the samples consumed by the steps the weights hold (daemon.sample_ledger), in the same folder rename."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    final = folder / step_dir_name(pos.step)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=folder))
    try:
        save_file({k: v.contiguous() for k, v in lora.items()}, str(tmp / "adapter_model.safetensors"))
        # Through Python file objects: on a full disk torch.save raises a RuntimeError ("unexpected pos")
        # whose __context__ is the OSError(ENOSPC) of our file; given a path, it would not say why.
        with open(tmp / "optimizer.pt", "wb") as f:
            atomic.inject_enospc("checkpoint", tmp / "optimizer.pt")
            torch.save({"optimizer": optimizer, "scheduler": scheduler, "scaler": scaler}, f)
        with open(tmp / "rng.pt", "wb") as f:
            torch.save(capture_rng(), f)
        if ledger is not None:
            atomic.write_json(tmp / "ledger.json", ledger, site="checkpoint")
        if freezing is not None:  # tensors (the factors at the last check): torch's format
            with open(tmp / "freezing.pt", "wb") as f:
                torch.save(freezing, f)
        atomic.write_json(tmp / "state.json", dataclasses.asdict(pos), site="checkpoint")  # last: marks the folder complete
        atomic.publish_dir(tmp, final, site="checkpoint")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic.write_json(folder / LATEST, {"step": pos.step, "path": final.name}, site="checkpoint")
    prune(folder, keep)
    return final


def step_dirs(folder: Path) -> list[Path]:
    """Published step folders, newest first."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and STEP_RE.match(p.name)]
    return sorted(found, key=lambda p: p.name, reverse=True)


def prune(folder: Path, keep: int) -> None:
    """Keep the newest `keep` step folders; remove older ones and leftover temp folders."""
    for old in step_dirs(folder)[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    for tmp in [*folder.glob(".step_*.tmp"), *folder.glob(".step_*.old-*")]:
        shutil.rmtree(tmp, ignore_errors=True)


def sweep_temp(root: Path) -> int:
    """Remove temp and moved-aside folders a killed trainer left in any job's checkpoint folder.

    Only safe under the trainer lock (no other trainer is writing); a job that
    failed as `crashed` keeps its published checkpoints for a retry, but its temp
    folders would otherwise stay forever. Returns how many were removed.
    """
    removed = 0
    # .tmp: killed while writing a step folder; .old-<pid>: killed after replacing one, before removing the old
    for tmp in [*root.glob("*/.step_*.tmp"), *root.glob("*/.step_*.old-*")]:
        shutil.rmtree(tmp, ignore_errors=True)
        removed += 1
    for job in (p for p in root.iterdir() if p.is_dir()) if root.is_dir() else ():
        removed += atomic.sweep_temps(job, LATEST)  # latest.json's temp file, killed before its rename
    return removed


def sweep_published(root: Path, trained_jobs: set[str]) -> int:
    """Remove the checkpoint folders of jobs the current adapter already learnt; how many.

    A trainer killed after publishing a file's adapter but before deleting its
    checkpoints leaves them, and the service then moves the file to done/
    without sending it again: nobody else would ever delete them. Such a job is
    never trained again, so its checkpoints can never be used. Under the trainer lock.
    """
    removed = 0
    for job in [p for p in root.iterdir() if p.is_dir() and p.name in trained_jobs] if root.is_dir() else []:
        delete_checkpoints(job)
        removed += 1
    return removed


def read_checkpoint(path: Path) -> Checkpoint:
    """Load one step folder; raises on anything missing or unreadable."""
    import torch
    from safetensors.torch import load_file

    for name in FILES:
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path.name} has no {name}")
    pos = Position(**atomic.read_json(path / "state.json"))
    opt = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    # rng.pt holds numpy's state (an ndarray in a tuple): our own file, so a full unpickle is fine.
    rng = torch.load(path / "rng.pt", map_location="cpu", weights_only=False)
    lora = load_file(str(path / "adapter_model.safetensors"))
    ledger = atomic.read_json(path / "ledger.json") if (path / "ledger.json").is_file() else None  # older: none
    freezing = (torch.load(path / "freezing.pt", map_location="cpu", weights_only=True)
                if (path / "freezing.pt").is_file() else None)
    return Checkpoint(path, pos, lora, opt["optimizer"], opt["scheduler"], opt["scaler"], rng, ledger, freezing)


def _candidates(folder: Path) -> list[Path]:
    """The folder latest.json names first, then every step folder newest first."""
    dirs = step_dirs(folder)
    try:
        named = folder / atomic.read_json(folder / LATEST)["path"]
    except (OSError, ValueError, KeyError, TypeError):
        return dirs
    return [named] + [d for d in dirs if d != named]


def load_latest(folder: Path, sha256: str, start_global_step: int | None = None) -> Checkpoint | None:
    """The newest checkpoint that loads, belongs to these file bytes and continues
    from the adapter state training starts from now, or None.

    `start_global_step` is the adapter's global step before this file. A file
    that failed as `crashed` keeps its checkpoints for a retry; if other files
    trained meanwhile, those checkpoints hold LoRA weights from before them, and
    resuming would silently drop what the adapter learnt since.
    """
    for path in _candidates(folder):
        try:
            ck = read_checkpoint(path)
        except Exception as e:  # a torn or corrupt folder: fall back to an older one
            log.warning("ignoring checkpoint %s: %s", path, e)
            continue
        if ck.position.sha256 != sha256:
            log.warning("ignoring checkpoint %s: it was made from other file bytes", path)
            continue
        began = ck.position.global_step - ck.position.step
        if start_global_step is not None and began != start_global_step:
            log.warning("ignoring checkpoint %s: it continues the adapter at global step %d, which is now at %d "
                        "(other files trained since)", path, began, start_global_step)
            continue
        return ck
    return None


def latest_step(folder: Path) -> int | None:
    """The step of the newest published step folder (cheap: no loading)."""
    dirs = step_dirs(folder)
    return int(STEP_RE.match(dirs[0].name).group(1)) if dirs else None


def delete_checkpoints(folder: Path) -> None:
    """Remove a job's checkpoint folder entirely (after publish, skip or invalid data)."""
    if folder.exists():
        shutil.rmtree(folder, ignore_errors=True)
        atomic.fsync_dir(folder.parent)


class StepLog:
    """The step reports of one file in training (`steps.jsonl` in its checkpoint folder); the trainer alone writes it.

    Appends are buffered; `sync()` makes them durable and is called before every checkpoint is
    written, so the log always reaches at least the newest checkpoint's step.
    """

    NAME = adapters.STEP_LOG  # the same name in a checkpoint folder and in the version it becomes

    def __init__(self, folder: Path) -> None:
        self.path = folder / self.NAME
        self._fh: Any = None

    def reset(self) -> None:
        """A file trained from its start: no earlier reports count."""
        self.close()
        if self.path.exists():
            atomic.remove_file(self.path)

    def resume(self, step: int) -> list[dict[str, Any]]:
        """Keep the reports up to `step` (a resumed checkpoint's; later ones are trained again); return them."""
        self.close()
        kept = [m for m in read_step_log(self.path) if m.get("step", 0) <= step]
        if self.path.exists():
            atomic.write_text(self.path, "".join(json.dumps(m) + "\n" for m in kept))
        return kept

    def append(self, msg: dict[str, Any]) -> None:
        if self._fh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - open across steps, closed by close()
        self._fh.write(json.dumps(msg) + "\n")

    def sync(self) -> None:
        if self._fh is not None:
            self._fh.flush()
            os.fsync(self._fh.fileno())

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


read_step_log = adapters.read_step_log
