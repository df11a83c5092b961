"""What the trainer says of itself at `ready`, and when it refuses the config, as the status and the log keep it.

    take_ready(status, ready, cfg.tuned)      # device, precision, base and its generation, settings, ranks
    status.last_error = refusal_said(msg)     # every reason the config cannot run here, numbered
"""

from __future__ import annotations

import logging

from daemon import protocol
from daemon.schema import TrainingStatus
from daemon.service import rank_status

log = logging.getLogger(__name__)


def take_ready(status: TrainingStatus, msg: protocol.Ready, tuned: tuple = ()) -> None:
    """Into the status: what the loaded trainer runs on, the base in use and its generation, the settings traind
    chose (the config's `tuned`, then the trainer's notes) and, with several ranks, how they train together."""
    s = status
    s.device, s.compute_dtype, s.quantization, s.base_model = msg.device, msg.compute_dtype, msg.quantization, msg.base_model
    s.adapter_version = msg.adapter_version if msg.adapter_version is not None else s.adapter_version
    s.generation = msg.generation
    s.settings_notes = [*tuned, *msg.notes]
    for note in s.settings_notes:
        log.info("setting: %s", note)
    s.world_size, s.distributed = rank_status.setup(msg)
    log.info("trainer ready on %s (%s, %s) in %.1f s", msg.device, msg.compute_dtype, msg.quantization, msg.load_seconds)
    if s.distributed is not None:
        d = s.distributed
        log.info("trainer runs %d ranks (%s, %s, %d node(s))", s.world_size, d.strategy, d.backend, d.nnodes)
    if msg.eval_set_error:  # training goes on without it; say why where people look
        s.last_error = msg.eval_set_error


def refusal_said(msg: protocol.ConfigRefused) -> str:
    listed = "; ".join(f"({i}) {p}" for i, p in enumerate(msg.problems, 1))
    said = f"the config cannot run on this machine: {listed}"
    log.error("%s; no file is trained until config.json is mended and the daemon restarted", said)
    return said
