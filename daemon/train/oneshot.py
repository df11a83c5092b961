"""One-shot training without the daemon: `traind train FILE --output-dir DIR`.

    traind train data.jsonl --output-dir runs/first [--config config.json] [--epochs N]

The same trainer as the daemon's (formats, validation, batching, checkpoints,
config), for a user who wants a single run: FILE is validated (bad lines are
reported with their line, field and reason), trained, and DIR receives a
standard PEFT adapter folder, `manifest.json` (file, sha256, steps, losses,
base, config) and `steps.jsonl` (every step's loss). Checkpoints go to
`DIR/checkpoints/` while it runs: run the same command again after a crash,
a kill or Ctrl-C and it resumes where the last checkpoint left off; they are
removed once the adapter is saved.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from daemon import atomic, protocol
from daemon.config import Config, resolved_dict
from daemon.errors import TraindError
from daemon.jsonl import sha256_of
from daemon.validate import validate_file

log = logging.getLogger(__name__)


def run(cfg: Config, file: Path, output_dir: Path, epochs: int | None = None) -> int:
    from daemon.train import checkpoint as ckpt
    from daemon.train.loop import Job, train_file
    from daemon.train.convert import source_of
    from daemon.train.model import load_for_training, save_adapter

    if epochs is not None:
        cfg = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, epochs_per_file=epochs))
    report = validate_file(file, cfg.data, cfg.intake.max_file_bytes)
    if not report.accepted or report.format is None:
        lines = "".join(f"\n  line {e.line}{', field ' + e.field if e.field else ''}: {e.reason}" for e in report.errors[:10])
        raise TraindError(f"{file}: {report.reason}{lines}")
    if report.n_bad:
        log.warning("%s: %d bad line(s) skipped (data.bad_line_policy = skip)", file, report.n_bad)
    if (output_dir / "adapter_model.safetensors").exists():
        raise TraindError(f"{output_dir} already holds a trained adapter; choose another --output-dir")
    output_dir.mkdir(parents=True, exist_ok=True)

    stop = {"asked": False}

    def on_signal(signum: int, frame: Any) -> None:
        stop["asked"] = True

    previous = signal.signal(signal.SIGINT, on_signal), signal.signal(signal.SIGTERM, on_signal)
    t0 = time.monotonic()
    lm = load_for_training(cfg, seed=cfg.training.seed)
    log.info("loaded %s in %.1f s", lm.base_path, time.monotonic() - t0)
    sha = sha256_of(file)
    job = Job.for_file(file.stem, file.resolve(), report.format.value, sha, n_records=report.n_valid)
    every = max(1, cfg.training.checkpoint_every_steps)

    def on_report(msg: protocol.Message) -> None:
        match msg:
            case protocol.Started(resumed_from_step=resumed) if resumed:
                log.info("resuming from step %d of %d", resumed, msg.total_steps)
            case protocol.Started():
                log.info("%s: %d examples (%d held out), %d steps", file.name, msg.n_train, msg.n_eval, msg.total_steps)
            case protocol.Step() if msg.step % every == 0 or msg.step in (1, msg.total_steps):
                log.info("step %d/%d  loss %.4f  %.0f tokens/s", msg.step, msg.total_steps, msg.loss, msg.tokens_per_sec)
            case protocol.Eval():
                log.info("eval loss %.4f", msg.eval_loss)

    folder = output_dir / "checkpoints"
    try:
        outcome = train_file(lm, cfg, job, global_step=0, ckpt_folder=folder, report=on_report,
                             control=lambda: "stop" if stop["asked"] else "continue")
    finally:
        signal.signal(signal.SIGINT, previous[0])
        signal.signal(signal.SIGTERM, previous[1])
    if outcome.status == "stopped":
        log.info("stopped at step %s; run the same command again to resume", outcome.checkpoint_step)
        return 130
    steps = ckpt.read_step_log(folder / ckpt.StepLog.NAME)
    tmp = output_dir / ".adapter.tmp"
    tmp.mkdir(exist_ok=True)
    save_adapter(lm.model, tmp)
    for p in tmp.iterdir():  # the adapter's files, then the manifest last
        atomic.move_file(p, output_dir / p.name)
    tmp.rmdir()
    atomic.write_text(output_dir / "steps.jsonl", "".join(json.dumps(m) + "\n" for m in steps))
    atomic.write_json(output_dir / "manifest.json", {
        "file": str(file), "sha256": sha, "format": report.format.value, "records": report.n_valid,
        "bad_lines": report.n_bad, "steps": outcome.steps, "final_loss": outcome.final_loss,
        "eval_loss": outcome.eval_loss, "base_model": str(lm.base_path), "quantization": lm.quantization,
        **({"base_gguf": gguf} if (gguf := source_of(lm.base_path)) else {}), "seconds": round(time.monotonic() - t0, 1),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "config": resolved_dict(cfg),
    })
    ckpt.delete_checkpoints(folder)
    log.info("done: %d steps, final loss %.4f%s; adapter in %s", outcome.steps, outcome.final_loss or float("nan"),
             f", eval loss {outcome.eval_loss:.4f}" if outcome.eval_loss is not None else "", output_dir)
    return 0


def main(argv: list[str]) -> int:
    import argparse

    from daemon.config import default_config_path
    from daemon.config import load_config
    from daemon.errors import ConfigError

    p = argparse.ArgumentParser(prog="traind train", description=__doc__.split("\n\n")[0])
    p.add_argument("file", type=Path)
    p.add_argument("--output-dir", type=Path, required=True)
    p.add_argument("--config", default=default_config_path(), help="config file (default: $TRAIND_CONFIG or ./config.json)")
    p.add_argument("--epochs", type=int, help="passes over the file (default: training.epochs_per_file)")
    args = p.parse_args(argv)
    if args.epochs is not None and args.epochs < 1:
        p.error("--epochs must be at least 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    for noisy in ("transformers", "bitsandbytes", "peft", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        cfg = load_config(args.config)
        return run(cfg, args.file, args.output_dir, args.epochs)
    except (ConfigError, TraindError) as e:
        print(f"traind train: {e}", file=sys.stderr)
        return 1
