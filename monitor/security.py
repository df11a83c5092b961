"""Response headers, and the Host check that keeps a loopback-only monitor loopback-only.

A page on another site can make the browser resolve its own domain name to
127.0.0.1 (DNS rebinding) and then read this server as same-origin. While the
monitor is bound to loopback and reads need no token, requests must therefore
name a loopback host. CSP keeps the dashboard from loading anything that is not
ours and from being framed (no clickjacking of the stop button).
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}
CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
       "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")
# Swagger UI's page starts itself with an inline script.
DOCS_CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
            "script-src 'self' 'unsafe-inline'; frame-ancestors 'none'")


def host_name(host_header: str) -> str:
    """'[::1]:8080' -> '::1', 'localhost:8080' -> 'localhost'."""
    h = host_header.strip().lower()
    if h.startswith("["):
        return h[1:h.find("]")] if "]" in h else h
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


class SecurityHeaders:
    def __init__(self, app: ASGIApp, loopback_only: bool) -> None:
        self.app = app
        self.loopback_only = loopback_only

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        host = host_name(headers.get(b"host", b"").decode("latin-1"))
        if self.loopback_only and host not in LOOPBACK_NAMES:
            await _refuse(send, f"host {host!r} is not a loopback name; open http://127.0.0.1/ or http://localhost/")
            return
        csp = DOCS_CSP if scope["path"] == "/docs" else CSP

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [
                    (b"content-security-policy", csp.encode()),
                    (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"no-referrer"),
                ]
            await send(message)

        await self.app(scope, receive, send_with_headers)


async def _refuse(send: Send, why: str) -> None:
    body = why.encode()
    await send({"type": "http.response.start", "status": 421,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
