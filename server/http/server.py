"""uvicorn serving the HTTP door on its own port, in a thread of the server's process.

The socket is bound by us (port 0 = a free one) before uvicorn starts, so the port is known at once and
the door is up, answering 503, while the model loads, like the gRPC port's health."""

from __future__ import annotations

import logging
import socket
import threading
import time

import uvicorn

log = logging.getLogger("hotlora.http")


class HttpServer:
    def __init__(self, app, host: str, port: int):
        self.app = app
        self.host = host
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(
            app, log_level="warning", access_log=False, lifespan="on", timeout_keep_alive=30
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self._run, name="hotlora-http", daemon=True)

    def _run(self) -> None:
        self.server.run(sockets=[self.sock])

    def start(self, timeout: float = 10.0) -> None:
        self.thread.start()
        deadline = time.monotonic() + timeout
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
