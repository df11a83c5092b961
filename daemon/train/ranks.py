"""The trainer's ranks under torchrun: who talks to the service, and the collectives the loop needs.

    ranks = Ranks.from_env(cfg.distributed)      # world 1 without torchrun: every method is a no-op
    msg = ranks.broadcast(msg)                   # rank 0's object, on every rank (the control channel)
    mine = ranks.shard(group)                    # this rank's share of an accumulation group
    ranks.average_grads(params)                  # the gradient summed over ranks (see below)
    totals = ranks.sum([loss_sum, targets])      # floats summed over ranks

Rank 0 alone is connected to the service. It broadcasts every message it
acts on, and at every step boundary its verdict (continue/stop/skip), so the
ranks pause, skip and stop at the same step. That control channel is a gloo
group with a timeout of years: a pause can last days, and a rank waiting in
gloo's receive sleeps (its CPU time does not move: docs/DISTRIBUTED.md). Gradients go over
the main group (nccl on CUDA, gloo on the CPU) with `distributed.timeout_seconds`,
so a hung rank ends the group rather than holding it for ever.

Why a hand-written all-reduce rather than torch's DistributedDataParallel
wrapper: the loop divides each rank's summed loss by the trainable tokens of the
whole global batch, so the summed gradients are exactly the single-process
gradient whatever the split (DDP averages, which would weight ranks with fewer
tokens wrongly); the label-only forward calls the decoder without the wrapper,
which DDP does not support; and only the LoRA parameters (a few MB) need it, in
one flat buffer per step. FSDP (daemon.train.sharding) shards the frozen base
and leaves the LoRA to this same all-reduce.

The global batch is `training.micro_batch_size x grad_accum_steps` examples
whatever the world size: each step takes the same group of micro-batches from
the file's deterministic stream and every rank computes its share. So a
checkpoint's position (steps, micro-batches consumed) is in global terms and a
restart with another world size continues it with the same global batch.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon.config import DistributedConfig
from daemon.errors import TraindError

log = logging.getLogger(__name__)

CONTROL_TIMEOUT = datetime.timedelta(days=3650)  # pauses may last for ever; a dead peer ends the wait anyway
FILE_CHUNK = 16 << 20  # a file sent to the other nodes goes in pieces of this size


def choose_backend(dc: DistributedConfig, device: str) -> str:
    """`distributed.backend`, auto resolved: nccl on CUDA, gloo on the CPU; nccl off CUDA is refused."""
    backend = dc.backend if dc.backend != "auto" else ("nccl" if device == "cuda" else "gloo")
    if backend == "nccl" and device != "cuda":
        raise TraindError("`distributed.backend` = 'nccl' needs CUDA; use 'auto' or 'gloo' on the CPU")
    return backend


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


@dataclass
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0
    nnodes: int = 1
    backend: str | None = None
    strategy: str | None = None
    control: Any = None  # the gloo group of the control channel
    host: str = field(default_factory=socket.gethostname)
    where: list[dict[str, Any]] = field(default_factory=list)  # node, host, device of every rank (gathered once)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def many(self) -> bool:
        return self.world_size > 1

    @property
    def sharded(self) -> bool:
        """The base is sharded (fsdp): every rank must run the same number of forwards."""
        return self.many and self.strategy == "fsdp"

    def most(self, count: int) -> int:
        """The largest `count` over ranks."""
        return int(max(row[0] for row in self.gather_floats([float(count)]))) if self.many else count

    @classmethod
    def from_env(cls, dc: DistributedConfig, device: str) -> "Ranks":
        """Join the process group torchrun set up (a single Ranks without torchrun)."""
        if not under_torchrun() or int(os.environ.get("WORLD_SIZE", "1")) == 1:
            return cls()
        import torch
        import torch.distributed as dist

        backend = choose_backend(dc, device)
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device == "cuda":
            if local_rank >= torch.cuda.device_count():
                raise TraindError(f"`distributed.nproc_per_node` = {dc.nproc_per_node} but this machine has "
                                  f"{torch.cuda.device_count()} CUDA GPU(s): one rank per GPU")
            torch.cuda.set_device(local_rank)
        store, rank, world = next(dist.rendezvous("env://"))
        dist.init_process_group(backend, store=store, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=dc.timeout_seconds))
        control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
        ranks = cls(rank, world, local_rank, int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
                    int(os.environ.get("GROUP_RANK", "0")), dc.nnodes,
                    backend, dc.strategy, control)
        ranks.where = ranks.gather({"node": ranks.node_rank, "host": ranks.host,
                                    "device": f"cuda:{local_rank}" if device == "cuda" else "cpu"})
        log.info("rank %d of %d (node %d, local rank %d), %s, %s", rank, world, ranks.node_rank, local_rank,
                 backend, dc.strategy)
        return ranks

    def close(self) -> None:
        if self.many:
            import torch.distributed as dist

            dist.destroy_process_group()

    # ---------------------------------------------------------------- the control channel
    def broadcast(self, obj: Any = None) -> Any:
        """Rank 0's `obj` on every rank (waits without a deadline: see the module docstring)."""
        if not self.many:
            return obj
        import torch.distributed as dist

        box = [obj if self.main else None]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.many:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.control)
        return out

    # ---------------------------------------------------------------- data parallel
    def shard(self, group: list[list[Any]]) -> list[list[Any]]:
        """This rank's share of an accumulation group of micro-batches: every micro-batch split in
        `world_size` parts balanced by tokens (longest example first to the lightest part; deterministic).

        Splitting each micro-batch, rather than handing whole ones round-robin, keeps the ranks level:
        micro-batches grouped by length differ widely, and the group's step waits for its slowest rank
        (bench/distributed.py; docs/DISTRIBUTED.md). A rank may get
        nothing from a micro-batch smaller than the world: it then adds zero gradients."""
        if not self.many:
            return group
        out = []
        for mb in group:
            parts: list[list[Any]] = [[] for _ in range(self.world_size)]
            weight = [0] * self.world_size
            for ex in sorted(mb, key=lambda e: (-len(e.input_ids), e.line)):
                k = min(range(self.world_size), key=lambda i: (weight[i], i))
                parts[k].append(ex)
                weight[k] += len(ex.input_ids)
            if parts[self.rank]:
                out.append(sorted(parts[self.rank], key=lambda e: e.line))
        return out

    def gather_floats(self, values: list[float]) -> list[list[float]]:
        """Every rank's `values` (float64), in rank order, on every rank: one small collective per step."""
        if not self.many:
            return [values]
        import torch
        import torch.distributed as dist

        mine = torch.tensor(values, dtype=torch.float64)
        out = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(out, mine, group=self.control)
        return [t.tolist() for t in out]

    def average_grads(self, params: list[Any]) -> None:
        """Sum the gradients of `params` over ranks, in place (a missing gradient counts as zero).

        Each rank's loss is already divided by the global batch's trainable tokens, so
        the sum is the single-process gradient of the global batch."""
        if not self.many:
            return
        import torch
        import torch.distributed as dist

        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1).float() for p in params])
        dist.all_reduce(flat)
        offset = 0
        for p in params:
            n = p.grad.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
            offset += n

    def sync_tensors(self, tensors: list[Any]) -> None:
        """Overwrite `tensors` on every rank with rank 0's: one flat broadcast on the control channel (rank 0
        may first spend long on its own, e.g. publishing an adapter while the disk is full)."""
        if not self.many or not tensors:
            return
        import torch
        import torch.distributed as dist

        flat = torch.cat([t.detach().reshape(-1).float().cpu() for t in tensors])
        dist.broadcast(flat, src=0, group=self.control)
        offset = 0
        with torch.no_grad():
            for t in tensors:
                n = t.numel()
                t.copy_(flat[offset:offset + n].view_as(t))
                offset += n

    def sync_lora(self, model: Any) -> None:
        """Every rank's LoRA weights become rank 0's (after a rollback, a consolidation, a start)."""
        self.sync_tensors([p for p in model.parameters() if p.requires_grad])

    # ---------------------------------------------------------------- files for the other nodes
    def share_file(self, path: Path, sha256: str, cache: Path) -> Path:
        """The training file on this rank: rank 0's own path on node 0; on another node a copy sent
        by rank 0 over the control channel, kept in `cache` and checked against `sha256`."""
        if self.nnodes == 1 or not self.many:
            return path
        size = self.broadcast(path.stat().st_size if self.main else None)
        target = cache / f"{sha256}.jsonl"
        receive = self.node_rank != 0 and self.local_rank == 0
        digest = hashlib.sha256()
        cache.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(f".tmp{os.getpid()}")
        out = open(tmp, "wb") if receive else None
        try:
            with (open(path, "rb") if self.main else open(os.devnull, "rb")) as src:
                for _ in range(0, max(size, 1), FILE_CHUNK):
                    piece = self.broadcast(src.read(FILE_CHUNK) if self.main else None)
                    if out is not None:
                        out.write(piece)
                        digest.update(piece)
        finally:
            if out is not None:
                out.close()
        if receive:
            if digest.hexdigest() != sha256:
                raise TraindError(f"the copy of {path.name} received from rank 0 does not match its sha256")
            os.replace(tmp, target)
        self.broadcast(None)  # the local ranks of each node read it only once its first rank has written it
        return path if self.node_rank == 0 else target

    def same_base(self, model: Any) -> None:
        """Refuse to train when the ranks loaded different bases (another file on another node)."""
        if not self.many:
            return
        digest = hashlib.sha256()
        for name, p in model.named_parameters():
            if not p.requires_grad:
                digest.update(name.encode())
                digest.update(p.detach().reshape(-1)[:4096].float().cpu().numpy().tobytes())
        prints = self.gather(digest.hexdigest())
        odd = [r for r, h in enumerate(prints) if h != prints[0]]
        if odd:
            raise TraindError(f"rank(s) {odd} loaded a base model different from rank 0's; every node needs the "
                               "same base model files at the configured path")


STEP_FIGURES = ("loss_sum", "targets", "tokens", "slots", "compute_seconds", "rss_bytes", "gpu_memory_bytes")


def step_figures(ranks: Ranks, mine: dict[str, float]) -> tuple[dict[str, float], list[dict[str, Any]] | None]:
    """(the step's figures summed over ranks, each rank's row for the status or None with one process)."""
    rows = ranks.gather_floats([float(mine.get(k) or 0.0) for k in STEP_FIGURES])
    totals = {k: sum(r[i] for r in rows) for i, k in enumerate(STEP_FIGURES)}
    if not ranks.many:
        return totals, None
    out = []
    for r, (row, where) in enumerate(zip(rows, ranks.where)):
        fig = dict(zip(STEP_FIGURES, row))
        out.append({"rank": r, **where, "tokens": int(fig["tokens"]), "compute_seconds": fig["compute_seconds"],
                    "tokens_per_sec": fig["tokens"] / max(fig["compute_seconds"], 1e-9),
                    "rss_bytes": int(fig["rss_bytes"]),
                    "gpu_memory_bytes": int(fig["gpu_memory_bytes"]) if where["device"] != "cpu" else None})
    return totals, out


def memory_now(device: str) -> tuple[int, int]:
    """(resident bytes of this process, peak CUDA bytes allocated or 0)."""
    import psutil

    gpu = 0
    if device == "cuda":
        import torch

        gpu = int(torch.cuda.max_memory_allocated())
    return psutil.Process().memory_info().rss, gpu
