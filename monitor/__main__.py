"""Run the monitor in the foreground for the instance a config describes.

    python -m monitor                                       # ./config.json, http://127.0.0.1:8080/
    traind-monitor --config /srv/traind/config.json --host 0.0.0.0 --port 9000
    traind-monitor --port 9000 --check-port                 # can it listen there? (exit 0 yes, 3 no)

--config defaults to $TRAIND_CONFIG, else ./config.json; --port to $TRAIND_MONITOR_PORT, else 8080.
Open the page as http://127.0.0.1:8080/#token=<contents of status/monitor_token>
(bin/start_all.sh prints that URL). Bound off loopback, every API call needs the token.
Exit codes: 0 stopped, 2 bad config, 3 cannot listen on the port (in use: the line names who holds it).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import uvicorn

from daemon.config import default_config_path, load_config
from daemon.errors import ConfigError
from monitor import auth
from monitor.app import create_app
from monitor.listen import CannotListen, listen
from monitor.settings import DEFAULT_HOST, DEFAULT_MAX_UPLOAD_BYTES, DEFAULT_PORT, MonitorSettings, is_loopback

log = logging.getLogger("monitor")
PORT_ENV = "TRAIND_MONITOR_PORT"  # bin/start_all.sh reads it too
EXIT_CANNOT_LISTEN = 3


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="traind-monitor", description="traind monitor: FastAPI server and live dashboard")
    p.add_argument("--config", default=default_config_path(), help="the instance's config (default: $TRAIND_CONFIG or ./config.json)")
    p.add_argument("--host", default=DEFAULT_HOST, help=f"address to bind (default {DEFAULT_HOST}; anything else needs the token for every call)")
    # a string default goes through `type` too, so a bad $TRAIND_MONITOR_PORT is a usage error, not a traceback
    p.add_argument("--port", type=_port, default=os.environ.get(PORT_ENV) or str(DEFAULT_PORT),
                   help=f"port (default: ${PORT_ENV} or {DEFAULT_PORT})")
    p.add_argument("--check-port", action="store_true", help="only check that --host/--port can be listened on, then exit (0 yes, 3 no)")
    p.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_BYTES / 2**20, help="largest upload accepted (MiB)")
    p.add_argument("--nice", type=int, default=10, help="CPU niceness increment (default 10): on a busy machine the trainer comes first")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--access-log", action="store_true",
                   help="log every HTTP request (off by default: an open dashboard polls every few seconds)")
    return p.parse_args(argv)


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be from 1 to 65535, got {value}")
    return value


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
    # Listen first: a port in use is refused at once with the way out, before the app is built.
    try:
        sockets = listen(args.host, args.port)
    except CannotListen as e:
        print(f"traind-monitor: {e}", file=sys.stderr)
        return EXIT_CANNOT_LISTEN
    if args.check_port:
        for s in sockets:
            s.close()
        return 0
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
    server.run(sockets=sockets)
    return 0


if __name__ == "__main__":
    sys.exit(main())
