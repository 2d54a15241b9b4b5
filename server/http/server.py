"""uvicorn serving the HTTP door on its own port, in a thread of the server's process.

The socket is bound by us (port 0 = a free one) before uvicorn starts, so the port is known at once and
the door is up, answering 503, while the model loads, like the gRPC port's health.

uvicorn bounds an idle kept-alive connection (`timeout_keep_alive`) but not a request head that arrives
slowly: 64 connections sending a header byte a second stay open for ever (slowloris). `with_head_timeout`
closes a connection whose request line and headers are not complete within --http-header-timeout-seconds of
its first byte (or of the connection's start), after a 408; the body's own deadline is the gate's
(`gate.RequestGate`)."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time

import uvicorn

log = logging.getLogger("hotlora.http")

_HEAD_LATE = b"the request line and headers did not arrive in time (--http-header-timeout-seconds)\n"
TIMEOUT_408 = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\nconnection: close\r\n"
    b"content-length: %d\r\n\r\n%s" % (len(_HEAD_LATE), _HEAD_LATE)
)


def with_head_timeout(seconds: float) -> type[asyncio.Protocol]:
    """uvicorn's HTTP/1.1 protocol (httptools or h11, as uvicorn picks) with a deadline on request heads.

    A head is complete when the protocol starts a new request cycle: both of uvicorn's protocols make
    `self.cycle` then, so the timer is armed when a connection opens or the first byte of a next request
    arrives, and disarmed when a cycle starts."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class HeadTimeoutProtocol(AutoHTTPProtocol):
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            cycle = self.cycle
            between_requests = cycle is None or cycle.response_complete
            super().data_received(data)
            if self.cycle is not cycle:
                self._disarm()  # a head is complete
            elif between_requests and self._head_timer is None:
                self._arm()  # the first bytes of the next request's head

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._head_timer = self.loop.call_later(seconds, self._expired)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _expired(self) -> None:
            self._head_timer = None
            if not self.transport.is_closing():
                self.transport.write(TIMEOUT_408)
                self.transport.close()

    return HeadTimeoutProtocol


class HttpServer:
    def __init__(self, app, host: str, port: int, head_timeout_seconds: float = 10.0):
        self.app = app
        self.host = host
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(
            app,
            http=with_head_timeout(head_timeout_seconds),
            log_level="warning",
            access_log=False,
            lifespan="on",
            timeout_keep_alive=30,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self._run, name="hotlora-http", daemon=True)

    def _run(self) -> None:
        self.server.run(sockets=[self.sock])

    def start(self, timeout: float = 60.0) -> None:
        self.thread.start()
        deadline = time.monotonic() + timeout
        # a bound for a door that cannot start, not a budget: a loaded machine may take seconds
        while not self.server.started and self.thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not self.server.started:
            raise RuntimeError(f"the HTTP door did not start on {self.host}:{self.port}")

    def stop(self, grace: float = 5.0) -> None:
        self.server.should_exit = True
        self.thread.join(grace)
        if self.thread.is_alive():
            self.server.force_exit = True
            self.thread.join(1.0)
        self.sock.close()
