"""What `traind serve` says about itself (`status/serve.json`), read by the CLI and the monitor.

    info = read_serve(cfg.path("status"))     # None when it never ran; else the file plus `running` (its pid alive)
    one_line(info)                             # "http://127.0.0.1:8090/v1 ready, traind is v7; 12 answered, 1 running"
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from monitor.liveness import pid_alive

STATUS_FILE = "serve.json"  # its one writer: daemon/serve/__main__.py


def read_serve(status_dir: Path) -> dict[str, Any] | None:
    try:
        info = json.loads((Path(status_dir) / STATUS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict):
        return None
    started = info.get("started_at") if isinstance(info.get("started_at"), (int, float)) else None
    # not a zombie, nor a later process that got the same pid
    info["running"] = info.get("state") != "stopped" and pid_alive(info.get("pid"), started)
    return info


def url(info: dict[str, Any]) -> str:
    host = info.get("host") or "127.0.0.1"
    return f"http://{'[' + host + ']' if ':' in host else host}:{info.get('port')}/v1"


def one_line(info: dict[str, Any] | None) -> str:
    if info is None:
        return "not started (bin/start_all.sh starts it when serve.enabled; or traind serve)"
    if not info["running"]:
        return "not running" + (" (it was killed: its status file is stale)" if info.get("state") != "stopped" else "")
    state = info.get("state")
    if state != "ready":
        return f"{url(info)} {state}" + (f": {info['error']}" if info.get("error") else "")
    following = info.get("following")
    what = f"traind is v{following}" if following is not None else "traind is the base"
    busy = f", {info.get('active', 0)} running, {info.get('waiting', 0)} waiting" if info.get("active") or info.get("waiting") else ""
    return f"{url(info)} ready, {what}; {info.get('completed', 0)} answered{busy}"
