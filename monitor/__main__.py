"""Run the monitor in the foreground for the instance a config describes.

    python -m monitor --config config.json                  # http://127.0.0.1:8080/
    traind-monitor --config /srv/traind/config.json --host 0.0.0.0 --port 9000

Open the page as http://127.0.0.1:8080/#token=<contents of status/monitor_token>
(bin/start_all.sh prints that URL). Bound off loopback, every API call needs the token.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import uvicorn

from daemon.config import load_config
from daemon.errors import ConfigError
from monitor import auth
from monitor.app import create_app
from monitor.settings import DEFAULT_HOST, DEFAULT_MAX_UPLOAD_BYTES, DEFAULT_PORT, MonitorSettings, is_loopback

log = logging.getLogger("monitor")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="traind-monitor", description="traind monitor: FastAPI server and live dashboard")
    p.add_argument("--config", required=True, help="the instance's config.json")
    p.add_argument("--host", default=DEFAULT_HOST, help=f"address to bind (default {DEFAULT_HOST}; anything else needs the token for every call)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    p.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_BYTES / 2**20, help="largest upload accepted (MiB)")
    p.add_argument("--nice", type=int, default=10, help="CPU niceness increment (default 10): on a busy machine the trainer comes first")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--access-log", action="store_true",
                   help="log every HTTP request (off by default: an open dashboard polls every few seconds)")
    return p.parse_args(argv)


class _Server(uvicorn.Server):
    """Tell live event streams to end as soon as shutdown starts, so Ctrl-C does not wait on open tabs."""

    def __init__(self, config: uvicorn.Config, on_exit: list) -> None:
        super().__init__(config)
        self._on_exit = on_exit

    def handle_exit(self, sig: int, frame: object) -> None:
        for fn in self._on_exit:
            fn()
        super().handle_exit(sig, frame)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        log.error("%s", e)
        return 2
    if args.nice:
        os.nice(args.nice)  # training must never wait on the monitor, CPU included
    settings = MonitorSettings(host=args.host, port=args.port, max_upload_bytes=int(args.max_upload_mb * 2**20))
    app = create_app(cfg, settings)
    state = app.state.monitor
    if not is_loopback(args.host):
        log.warning("bound to %s: every endpoint requires the token", args.host)
    log.info("monitor for %s at http://%s:%d/ (token in %s)", cfg.root, args.host, args.port,
             cfg.path("status") / auth.TOKEN_FILE)
    server = _Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                    timeout_graceful_shutdown=3, log_config=None,
                                    access_log=args.access_log),
                     on_exit=[lambda: setattr(state, "closing", True)])
    server.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
