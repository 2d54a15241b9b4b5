"""Binding the server's ports (gRPC `--port`, the HTTP door `--http-port`, metrics `--metrics-port`) with
an error that names the address, the flag and what to do, where the libraries would give a traceback
("Failed to bind") or a bare `[Errno 98] Address already in use`."""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class PortUnavailable(Exception):
    """A port of the server cannot be bound; the message says which, why, and the flags that fix it."""

    def __init__(self, what: str, flag: str, host: str, port: int, reason: str, can_be_off: bool):
        self.flag, self.host, self.port = flag, host, port
        off = f", or {flag} -1 to serve none" if can_be_off else ""
        super().__init__(
            f"cannot listen on {_address(host, port)} for {what} ({flag} {port}): {reason}. "
            f"Stop what holds it, give another {flag}, or {flag} 0 to take a free port (chosen and "
            f"logged at start){off}"
        )


def bind_port(
    what: str, flag: str, host: str, port: int, open_port: Callable[[], T], can_be_off: bool = False
) -> T:
    """`open_port()`, or PortUnavailable with the reason. (host, port) is tried first with a plain socket:
    a library that fails to bind may not say why (gRPC says only "Failed to bind")."""
    reason = why_unbindable(host, port)
    if reason is None:
        try:
            return open_port()
        except (OSError, RuntimeError) as exc:
            reason = _reason(exc) if isinstance(exc, OSError) else str(exc).split(";")[0]
    raise PortUnavailable(what, flag, host, port, reason, can_be_off)


def why_unbindable(host: str, port: int) -> str | None:
    """Why a listening socket cannot be bound to (host, port) now; None when it can (port 0 always can)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        return f"the address {host!r} does not resolve ({exc.strerror})"
    if port == 0:
        return None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind: TIME_WAIT is fine
        try:
            probe.bind(address)
        except OSError as exc:
            return _reason(exc)
    return None


def _reason(exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return "the port is in use (another process listens on it)"
    if exc.errno == errno.EACCES:
        return "permission denied (ports below 1024 need privileges)"
    if exc.errno == errno.EADDRNOTAVAIL:
        return "no network interface of this machine has that address"
    return exc.strerror or str(exc)


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
