"""eval.file: a fixed set scored before and after every file, so the history says whether a file helped or hurt.

    examples, why_not = load_eval_set(cfg, lm)      # tokenised once per loaded model; (None, why) when unusable
    loss = eval_set_loss(sess)                      # under the live adapter (cached per published version)
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from daemon.config import Config

if TYPE_CHECKING:  # pragma: no cover
    from daemon.train.session import Session

log = logging.getLogger(__name__)


def load_eval_set(cfg: Config, lm: Any) -> tuple[list | None, str | None]:
    """eval.file's first eval.max_examples examples, tokenised; (None, why) when it cannot be used."""
    path = cfg.eval_file
    if path is None:
        return None, None
    import dataclasses

    from daemon.train.data import train_examples
    from daemon.validate import validate_file

    try:
        report = validate_file(path, cfg.data, 0)
        if not report.accepted or report.format is None:
            raise ValueError(report.reason or "not a training file")
        data = dataclasses.replace(cfg.data, eval_fraction=0.0)
        examples = sorted(train_examples(path, report.format, lm.tokenizer, data, cfg.training.seed, 0), key=lambda e: e.line)
    except (OSError, ValueError) as e:
        log.error("eval.file %s is not used: %s", path, e)
        return None, f"eval.file {path}: {e}"
    if not examples:
        return None, f"eval.file {path}: no example keeps a token to score"
    log.info("eval set: %d examples of %s", min(len(examples), cfg.eval.max_examples), path)
    return examples[:cfg.eval.max_examples], None


def eval_set_loss(sess: "Session", cached: bool = True) -> float | None:
    """The eval set's loss under the live adapter (cached per published version: a file's `before` is
    usually the previous file's `after`). A diagnostic: a failure is logged and never fails a file."""
    if not sess.eval_set:
        return None
    if cached and sess.eval_cache is not None and sess.eval_cache[0] == sess.version and sess.version is not None:
        return sess.eval_cache[1]
    from daemon.train.step import evaluate, fast_paths

    try:
        if sess.lm.fast is None:
            sess.lm.fast = fast_paths(sess.lm)
        loss = evaluate(sess.lm, sess.eval_set, sess.cfg.training.micro_batch_size, sess.lm.fast, sess.cfg.data.packing)
    except Exception:
        log.warning("the eval set was not scored", exc_info=True)
        return None
    return loss
