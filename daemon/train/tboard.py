"""TensorBoard event files (tensorboard.enabled): the trainer's reports, where TensorBoard users look.

    board = Board.open(cfg)        # None when off; a clear warning when the package is missing
    board.report(msg)              # step / eval / activity messages, as sent to the service

Scalars by global step: train/loss, train/lr, train/tokens_per_sec, train/grad_norm, eval/loss,
eval_set/loss (eval.file, after each file), activity/relative/layer_NN (‖ΔW‖/‖W₀‖ per layer). One writer,
the trainer child, under `tensorboard.dir` (default logs/tensorboard/). A failure to write is logged once
and never stops training.
"""

from __future__ import annotations

import logging
from typing import Any

from daemon import protocol
from daemon.config import Config

log = logging.getLogger(__name__)


class Board:
    def __init__(self, writer: Any) -> None:
        self.writer = writer
        self.failed = False

    @classmethod
    def open(cls, cfg: Config) -> "Board | None":
        if not cfg.tensorboard.enabled:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            log.warning("tensorboard.enabled but TensorBoard is not installed (pip install 'traind[tensorboard]'): %s", e)
            return None
        cfg.tensorboard_dir.mkdir(parents=True, exist_ok=True)
        return cls(SummaryWriter(log_dir=str(cfg.tensorboard_dir), flush_secs=10))

    def report(self, msg: protocol.Message) -> None:
        if self.failed:
            return
        try:
            if isinstance(msg, protocol.Step):
                for key, tag in (("loss", "train/loss"), ("lr", "train/lr"), ("tokens_per_sec", "train/tokens_per_sec"),
                                 ("grad_norm", "train/grad_norm")):
                    if getattr(msg, key) is not None:
                        self.writer.add_scalar(tag, getattr(msg, key), msg.global_step)
            elif isinstance(msg, protocol.Eval):
                self.writer.add_scalar("eval/loss", msg.eval_loss, msg.global_step)
            elif isinstance(msg, protocol.Activity):
                for layer, row in zip(msg.layers, msg.values.get("relative") or []):
                    cells = [v for v in row if v is not None]
                    if cells:
                        self.writer.add_scalar(f"activity/relative/layer_{layer:02d}", sum(v * v for v in cells) ** 0.5,
                                               msg.global_step)
            elif isinstance(msg, protocol.Done) and (msg.eval_set or {}).get("after") is not None:
                self.writer.add_scalar("eval_set/loss", msg.eval_set["after"], msg.global_step)
        except Exception:  # a diagnostic never fails a file
            self.failed = True
            log.warning("TensorBoard events are no longer written", exc_info=True)

    def flush(self) -> None:
        try:
            self.writer.flush()
        except Exception:
            log.warning("TensorBoard flush failed", exc_info=True)
