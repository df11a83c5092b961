"""`traind serve`: the model as an OpenAI-compatible endpoint that follows each newly published version.

    traind serve [--config config.json] [--host 127.0.0.1] [--port 8090]
    python -m daemon.serve --config config.json --check-port      # can it listen there? (exit 0 yes, 3 no)

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8090/v1", api_key=open("status/monitor_token").read().strip())
    client.chat.completions.create(model="traind", messages=[{"role": "user", "content": "Hello"}])

A process of its own on the torch side, started by bin/start_all.sh when `serve.enabled`: it reads the adapter
store and never writes it. Models: `traind` (the current version), `traind:vN` (a kept version), `traind:base`.
It writes `status/serve.json` (its one writer: port, state, what is loaded, counts) for the monitor and the
CLI, and logs to `logs/serve_YYYYMMDD.log`. Exit codes: 0 stopped, 2 bad config, 3 cannot listen on the port.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

from daemon.serve_view import STATUS_FILE

log = logging.getLogger("daemon.serve")
PID_FILE = "serve.pid"
EXIT_BAD_CONFIG = 2
EXIT_CANNOT_LISTEN = 3
STATUS_SECONDS = 2.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from daemon.config import default_config_path

    p = argparse.ArgumentParser(prog="traind serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=default_config_path(), help="the instance's config (default: $TRAIND_CONFIG or ./config.json)")
    p.add_argument("--host", help="address to bind (default: serve.host)")
    p.add_argument("--port", type=int, help="port (default: serve.port)")
    p.add_argument("--check-port", action="store_true", help="only check that it can listen there, then exit (0 yes, 3 no)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from daemon.config import load_config
    from daemon.errors import ConfigError
    from monitor.listen import CannotListen, listen

    args = parse_args(argv)
    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        print(f"traind serve: {e}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    host, port = args.host or cfg.serve.host, args.port or cfg.serve.port
    try:
        sockets = listen(host, port, setting="serve.port")  # first: a port in use is refused at once, before the model loads
    except CannotListen as e:
        print(f"traind serve: {e}", file=sys.stderr)
        return EXIT_CANNOT_LISTEN
    if args.check_port:
        for s in sockets:
            s.close()
        return 0
    return serve(cfg, host, port, sockets)


def serve(cfg, host: str, port: int, sockets: list) -> int:  # noqa: ANN001 (Config; imported lazily)
    import uvicorn

    from daemon import atomic
    from daemon.logs import setup_logging
    from monitor import auth
    from monitor.settings import is_loopback

    setup_logging(cfg.path("logs"), "serve", cfg.service.log_level, also_stderr=True,
                  keep_days=cfg.service.log_keep_days, max_bytes=cfg.service.log_max_bytes)
    if cfg.serve.nice:
        os.nice(cfg.serve.nice)  # on a busy CPU the trainer comes first
    if cfg.serve.device != "cuda":  # before torch is imported (choosing "auto" imports it); on a GPU, CPU-side ops
        from daemon.train.threads import start_threads

        start_threads(cfg.serve.cpu_threads, key="serve.cpu_threads")
    device = _device(cfg.serve.device)
    from daemon.train.inspect import quiet_loading

    quiet_loading()
    from daemon.serve.app import create_app
    from daemon.serve.engine import Engine
    from daemon.serve.models import ModelHost

    status_dir = cfg.path("status")
    token = auth.load_or_create_token(status_dir)
    engine = Engine(cfg, ModelHost(cfg, device))
    app = create_app(cfg, engine, token, loopback_only=is_loopback(host))
    atomic.write_text(status_dir / PID_FILE, f"{os.getpid()}\n")
    started = time.time()
    stop_status = threading.Event()
    writer = threading.Thread(target=_write_status, args=(status_dir / STATUS_FILE, engine, host, port, device, started, stop_status),
                              name="serve-status", daemon=True)
    engine.start()
    writer.start()
    log.info("traind serve for %s on http://%s:%d/v1 (%s; token in %s)", cfg.root, host, port, device,
             status_dir / auth.TOKEN_FILE)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", log_config=None,
                                           access_log=False, timeout_graceful_shutdown=10))
    # uvicorn handles SIGTERM/SIGINT while it serves, then raises them again under the handlers it found: with
    # these (which only note the signal), that ends here instead of killing the process before it says "stopped".
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda s, f: log.info("stopping (%s)", signal.Signals(s).name))
    try:
        server.run(sockets=sockets)
    finally:
        engine.stop()
        stop_status.set()
        writer.join(5)
        _write_once(status_dir / STATUS_FILE, engine, host, port, device, started, stopped=True)
        _remove_pid(status_dir / PID_FILE)
    return 0


def _device(choice: str) -> str:
    if choice != "auto":
        return choice
    from daemon.train.model import capabilities

    return "cuda" if capabilities().cuda else "cpu"


def _write_status(path: Path, engine, host: str, port: int, device: str, started: float, stop: threading.Event) -> None:  # noqa: ANN001
    while not stop.is_set():
        _write_once(path, engine, host, port, device, started)
        stop.wait(STATUS_SECONDS)


def _write_once(path: Path, engine, host: str, port: int, device: str, started: float, stopped: bool = False) -> None:  # noqa: ANN001
    from daemon import atomic

    snap = engine.snapshot()
    state = "stopped" if stopped else "ready" if snap["ready"] else ("error" if snap["error"] else "loading")
    try:
        atomic.write_json(path, {"pid": os.getpid(), "host": host, "port": port, "device": device, "state": state,
                                 "started_at": started, "updated_at": time.time(), **snap})
    except OSError as e:  # a full disk: the endpoint goes on; the next write tries again
        log.warning("could not write %s: %s", path, e)


def _remove_pid(path: Path) -> None:
    try:
        if path.read_text().strip() == str(os.getpid()):
            path.unlink()
    except OSError:
        pass


if __name__ == "__main__":
    sys.exit(main())
