"""Monitor settings: how it was started, separate from the daemon's config.json."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
# A month of JSONL for the tiny model is a few MB; 256 MiB is generous yet keeps
# one request from filling the disk. intake.max_file_bytes, when set, is tighter.
DEFAULT_MAX_UPLOAD_BYTES = 256 * 1024 * 1024
WEB_DIR = Path(__file__).resolve().parent.parent / "web"


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and 'localhost'; anything else is reachable from outside."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: assume it resolves to something reachable


@dataclass(frozen=True)
class MonitorSettings:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    web_dir: Path = WEB_DIR
    token: str | None = None  # None: read or create status/monitor_token

    @property
    def token_for_reads(self) -> bool:
        """Off loopback every endpoint needs the token, not only the state-changing ones."""
        return not is_loopback(self.host)
