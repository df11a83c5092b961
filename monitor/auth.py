"""The access token: made on first start, kept in `status/monitor_token` (0600).

State-changing endpoints always need it; when the monitor is bound to a
non-loopback address every API endpoint does. It travels in a header
(`X-Traind-Token` or `Authorization: Bearer ...`), never a cookie, so another
site open in the same browser cannot forge a request: a cross-origin fetch with
a custom header needs a CORS preflight this server never grants.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import stat
from pathlib import Path

from fastapi import HTTPException, Request, status

log = logging.getLogger(__name__)

TOKEN_FILE = "monitor_token"
HEADER = "X-Traind-Token"


def load_or_create_token(status_dir: Path) -> str:
    """The instance's token; created with O_EXCL and mode 0600 so it is never briefly readable."""
    path = Path(status_dir) / TOKEN_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read_existing(path)
    token = secrets.token_urlsafe(32)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(token + "\n")
        f.flush()
        os.fsync(f.fileno())
    log.info("created monitor token in %s", path)
    return token


def _read_existing(path: Path) -> str:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        log.warning("%s was readable by others (mode %o); setting 0600", path, mode)
        os.chmod(path, 0o600)
    token = path.read_text(encoding="ascii").strip()
    if len(token) < 16:
        raise RuntimeError(f"{path} holds no usable token; delete it and restart the monitor to make a new one")
    return token


def presented_token(request: Request) -> str | None:
    value = request.headers.get(HEADER)
    if value:
        return value.strip()
    auth = request.headers.get("authorization", "")
    scheme, _, cred = auth.partition(" ")
    if scheme.lower() == "bearer" and cred:
        return cred.strip()
    return None


def token_matches(expected: str, given: str | None) -> bool:
    if not given:
        return False
    # compare_digest: the time taken does not tell an attacker how many characters matched
    return hmac.compare_digest(expected.encode(), given.encode())


def check(request: Request, expected: str) -> None:
    if not token_matches(expected, presented_token(request)):
        raise HTTPException(
            status_code=status.HTTP_401_UNAUTHORIZED,
            detail=f"missing or wrong token: send it in the {HEADER} header (see status/{TOKEN_FILE})",
            headers={"WWW-Authenticate": "Bearer"},
        )
