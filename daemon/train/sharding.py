"""`distributed.strategy` = fsdp: the frozen base's weights sharded across the ranks (PyTorch FSDP2).

    from daemon.train.sharding import check_fsdp, shard_base
    check_fsdp(cfg, device)          # before loading: refuses what the installed stack cannot do, with the reason
    shard_base(lm, ranks)            # after the LoRA is attached and synced: each decoder layer is one FSDP unit

For a base that does not fit one GPU. Each decoder layer becomes an FSDP unit
(`torch.distributed.fsdp.fully_shard`): a rank keeps 1/world of its frozen
weights and gathers a layer's only while it runs. The LoRA parameters are left
out of the sharding (`ignored_params`): a few MB, replicated on every rank and
summed over ranks by the same all-reduce as ddp (daemon.train.ranks), so
checkpoints, adapters and the activity probe see plain tensors whatever the
strategy. Embeddings, the final norm and the LM head stay whole on every rank
(tied embeddings cannot be split across two units).

Every rank must run the same number of forwards per step (a layer's gather is a
collective): the loop gives ranks without examples an empty-weight forward,
and an out-of-memory cannot be split rank by rank (it ends the group: lower
`training.micro_batch_size`).

What the installed stack supports (checked, refused with the reason otherwise):
- an unquantised base (`model.quantization` none), on the CPU (gloo) or CUDA;
- a 4-bit base (QLoRA + FSDP) on CUDA only, with bitsandbytes storing the
  4-bit weights in the compute dtype (`bnb_4bit_quant_storage`), so FSDP can
  flatten them with the rest; bitsandbytes' CPU 4-bit layer cannot be sharded.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

from daemon.config import Config
from daemon.errors import TraindError

log = logging.getLogger(__name__)


class ShardingError(TraindError):
    """The installed stack cannot run `distributed.strategy` = fsdp as configured."""


def check_fsdp(cfg: Config, device: str) -> None:
    """Raise ShardingError, naming why, where FSDP cannot run here."""
    if cfg.distributed.strategy != "fsdp":
        return
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401 - FSDP2, torch >= 2.6
    except ImportError as e:
        raise ShardingError(f"`distributed.strategy` = 'fsdp' needs torch >= 2.6 (FSDP2's fully_shard): {e}") from e
    if cfg.model.quantization not in ("none", "auto") and device != "cuda":  # auto is none on the CPU (where it fits)
        raise ShardingError(
            f"`distributed.strategy` = 'fsdp' with a 4-bit base (`model.quantization` = {cfg.model.quantization!r}) runs "
            "on CUDA only: bitsandbytes' CPU 4-bit layers cannot be sharded. On the CPU use strategy 'ddp', or "
            "quantization 'none'")
    if cfg.model.quantization not in ("none", "auto") and importlib.util.find_spec("bitsandbytes") is None:
        raise ShardingError("`distributed.strategy` = 'fsdp' with a 4-bit base needs bitsandbytes")


def decoder_layers(model: Any) -> list[Any]:
    """The transformer blocks of a peft-wrapped causal LM (`model.layers` of its decoder)."""
    decoder = model.get_base_model().get_decoder()
    layers = getattr(decoder, "layers", None)
    if layers is None or len(layers) == 0:
        raise ShardingError(f"{type(decoder).__name__} has no `layers` list to shard; use strategy 'ddp'")
    return list(layers)


def shard_base(lm: Any, ranks: Any) -> int:
    """Shard every decoder layer's frozen weights across the ranks; the units made."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh("cuda" if lm.device == "cuda" else "cpu", (ranks.world_size,))
    lora = {p for p in lm.model.parameters() if p.requires_grad}
    policy = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32)
    layers = decoder_layers(lm.model)
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy, ignored_params=lora & set(layer.parameters()))
    log.info("fsdp: %d decoder layers sharded over %d ranks (LoRA replicated)", len(layers), ranks.world_size)
    return len(layers)


def reshard(model: Any) -> int:
    """Free the gathered weights of every FSDP unit of `model` (none: nothing to do); the units resharded.

    Each layer is an FSDP root of its own, and a root keeps its weights gathered after a forward (for the
    backward that usually follows). After forwards with no backward (the step's probes) they stay so until
    something reshards them, and a state_dict does: rank 0 alone takes one (the adapter's weights) before a
    file, and its next forward would then gather weights the other ranks still hold, a collective they never
    join. So forwards without a backward end here, on every rank alike."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.reshard()
    return len(units)
