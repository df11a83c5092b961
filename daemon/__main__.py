"""Run the traind daemon in the foreground (or train one file without it).

    python -m daemon --config config.json        # or the console script: traind --config config.json
    traind train FILE --output-dir DIR [--config config.json] [--epochs N]   # one run, no daemon
    traind serve [--config config.json] [--port 8090]                         # an OpenAI-compatible endpoint
    traind worker --node-rank 1 [--config config.json] [--master-addr HOST]   # another machine's ranks

Logs go to `<paths.logs>/daemon_YYYYMMDD.log` and to stderr. SIGTERM or
Ctrl-C stops warmly (checkpoint, then exit); a second one stops at once.
Exit codes: 0 stopped, 1 bad config, 2 locked keys changed, 3 already running.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from types import FrameType
from typing import Any

log = logging.getLogger("daemon")


class StoppedWhileStarting(Exception):
    """SIGTERM or SIGINT before the service installed its own handlers: it holds nothing yet (no lock, no
    child, no file), so it ends there with exit 0 instead of the signal's default death."""


def _stopped_while_starting(signum: int, frame: FrameType | None) -> None:
    raise StoppedWhileStarting(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:  # the torch side only for this command: the daemon's service never imports it
        from daemon.train.oneshot import main as train_main

        return train_main(argv[1:])
    if argv[:1] == ["serve"]:  # the model as an OpenAI-compatible endpoint: its own torch-side process
        from daemon.serve.__main__ import main as serve_main

        return serve_main(argv[1:])
    if argv[:1] == ["worker"]:  # distributed.nnodes > 1: this machine's trainer ranks (daemon.train.launch)
        from daemon.train.launch import worker_main

        return worker_main(argv[1:])
    # Until Service.run installs its own handlers (its first act); put back on return, for an in-process caller.
    before: dict[int, Any] = {}
    try:  # a signal may land as soon as the first handler is in: inside the try
        for signum in (signal.SIGTERM, signal.SIGINT):
            before[signum] = signal.signal(signum, _stopped_while_starting)
        return _daemon(argv)
    except StoppedWhileStarting as e:
        print(f"traind: stopped ({e}) while starting, before it took anything", file=sys.stderr)
        return 0
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)


def _daemon(argv: list[str]) -> int:
    # Imported here, after the stop handlers: the service's imports are most of a start's first second.
    from daemon.config import default_config_path, load_config
    from daemon.errors import AlreadyRunningError, ConfigError
    from daemon.logs import setup_logging
    from daemon.service import EXIT_ALREADY_RUNNING, Service

    parser = argparse.ArgumentParser(
        prog="traind", description="Train a LoRA adapter from JSONL files dropped into inbox/.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=("commands:\n"
                "  traind [--config PATH]                  run the daemon in the foreground\n"
                "  traind train FILE --output-dir DIR ...  one run on one file, no daemon (traind train --help)\n"
                "  traind serve [--port N]                 the model as an OpenAI-compatible endpoint (traind serve --help)\n"
                "  traind worker --node-rank N ...         this machine's trainer ranks when distributed.nnodes > 1\n"
                "                                          (traind worker --help)\n"
                "\nexit codes: 0 stopped, 1 bad config, 2 locked keys changed, 3 already running"))
    parser.add_argument("--config", default=default_config_path(), help="config file (default: $TRAIND_CONFIG or ./config.json)")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        print(f"traind: {e}", file=sys.stderr)
        return 1
    # On a terminal the log goes to stderr too; in the background (launch script)
    # stderr is redirected to a file and would only duplicate the daily log.
    setup_logging(cfg.path("logs"), "daemon", cfg.service.log_level, also_stderr=sys.stderr.isatty(),
                  keep_days=cfg.service.log_keep_days, max_bytes=cfg.service.log_max_bytes)
    try:
        return Service(cfg, args.config).run()
    except AlreadyRunningError as e:
        log.error("%s", e)
        print(f"traind: {e}", file=sys.stderr)
        return EXIT_ALREADY_RUNNING


if __name__ == "__main__":
    sys.exit(main())
