"""The monitor's listening sockets, opened before anything else starts, and a clear refusal when they cannot be.

    socks = listen("127.0.0.1", 8080)      # bound sockets for uvicorn; raises CannotListen with the way out

A port already in use is named with the program that holds it (where the system tells) and a free
port near it, so `start_all.sh` can refuse before it starts a daemon that would run without its
monitor, and a monitor started by hand says the same instead of uvicorn's bind error.
"""

from __future__ import annotations

import errno
import socket

import psutil

from daemon.errors import TraindError

SEARCH = 20  # ports after the one asked for that are tried for a free one to suggest
CMDLINE_CHARS = 80


class CannotListen(TraindError):
    """The monitor cannot listen where it was asked to; the message says why and what to do."""


def listen(host: str, port: int, setting: str = "TRAIND_MONITOR_PORT") -> list[socket.socket]:
    """Sockets bound to every address `host` names (as asyncio's create_server binds them); raise CannotListen
    (a port in use says who holds it, a free one near, and `setting`: where another port is chosen)."""
    try:
        return _bind(host, port)
    except OSError as e:
        if e.errno != errno.EADDRINUSE:
            raise CannotListen(f"cannot listen on {host} port {port}: {e.strerror or e}") from None
        holder = holder_of(port)
        by = f" (by {holder})" if holder else ""
        near = free_port_near(host, port)
        hint = f" ({near} is free now)" if near else ""
        raise CannotListen(f"port {port} on {host} is in use{by}; start with --port N or set {setting}{hint}") from None


def _bind(host: str, port: int) -> list[socket.socket]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    socks: list[socket.socket] = []
    unavailable = OSError(errno.EADDRNOTAVAIL, f"no address of {host} can be bound")
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            s = socket.socket(family, kind, proto)
            socks.append(s)
            # uvicorn sets it too: a port left in TIME_WAIT by the last monitor is free, one with a listener is not
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                s.bind(address)
            except OSError as e:
                if e.errno != errno.EADDRNOTAVAIL:
                    raise
                socks.pop().close()  # a family the host has not enabled (asyncio skips it too)
                unavailable = e
        if not socks:
            raise unavailable
    except OSError:
        for s in socks:
            s.close()
        raise
    return socks


def holder_of(port: int) -> str | None:
    """"pid N: its command line" of the process listening on TCP `port`; None where the system does not say."""
    try:
        pids = {c.pid for c in psutil.net_connections(kind="tcp")
                if c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN and c.pid}
    except psutil.Error:
        return None
    if not pids:
        return None
    pid = min(pids)
    try:
        cmd = " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return f"pid {pid}"
    if len(cmd) > CMDLINE_CHARS:
        cmd = cmd[:CMDLINE_CHARS - 3] + "..."
    return f"pid {pid}: {cmd}" if cmd else f"pid {pid}"


def free_port_near(host: str, port: int) -> int | None:
    """The first port after `port` that can be listened on now, within SEARCH; None if none is."""
    for candidate in range(port + 1, min(port + SEARCH, 65535) + 1):
        try:
            for s in _bind(host, candidate):
                s.close()
        except OSError:
            continue
        return candidate
    return None
