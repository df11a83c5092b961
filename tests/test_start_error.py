"""A trainer that cannot start: the status gets its whole error, not a line cut mid-sentence."""

import logging
import time
from pathlib import Path

from daemon.logs import FORMAT, DailyFileHandler
from daemon.service.supervisor import Supervisor
from daemon.train.model import ModelError

LONG = ("`base_model` /data/models/llama-3-8b-instruct-finetuned-on-support-chats: the safetensors header of "
        "model-00003-of-00004.safetensors is damaged (it says 8,589,934,592 bytes of tensors and the file holds "
        "1,073,741,824); copy the folder again from where it came from, or point base_model at another folder.")


def _trainer_log(logs: Path) -> logging.Logger:
    """The trainer's daily log as the child writes it (daemon.logs' handler and format)."""
    handler = DailyFileHandler(logs, "trainer", 0, 0)
    formatter = logging.Formatter(FORMAT)
    formatter.converter = time.gmtime
    handler.setFormatter(formatter)
    logger = logging.getLogger(f"test-trainer-{id(logs)}")
    logger.propagate = False
    logger.addHandler(handler)
    return logger


def _raise(message: str) -> None:
    raise ModelError(message)


def test_the_whole_start_error_reaches_the_status(tmp_path):
    logs = tmp_path / "logs"
    logger = _trainer_log(logs)
    logger.info("trainer pid 1 started")
    try:
        _raise(LONG + "\n  - and a second line of the same error")
    except ModelError:
        logger.exception("trainer failed outside a job; the service restarts it")
    logger.info("trainer exits")  # anything logged after the error does not hide it
    for h in logger.handlers:
        h.close()
    hint = Supervisor(tmp_path / "config.json", logs, wake=lambda: None, backoff_seconds=1).last_error_hint()
    assert hint == f"daemon.train.model.ModelError: {LONG}\n  - and a second line of the same error"


def test_an_error_without_a_traceback_is_kept_whole(tmp_path):
    logs = tmp_path / "logs"
    logger = _trainer_log(logs)
    logger.error("eval.file %s", LONG)
    for h in logger.handlers:
        h.close()
    hint = Supervisor(tmp_path / "config.json", logs, wake=lambda: None, backoff_seconds=1).last_error_hint()
    assert hint == f"eval.file {LONG}"
