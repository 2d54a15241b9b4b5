"""What bounds a slow peer on the gRPC door (issue 37 asked the HTTP door's slowloris question of it): a
connection that sends nothing, one that drips the HTTP/2 preface a byte at a time, and one that drips a
call's header block in CONTINUATION frames (the call never starts, so no handler thread and no
--request-idle-seconds watchdog is involved) are all closed by --connection-idle-seconds, the server's
`grpc.max_connection_idle_ms` (default 600 s; and every connection by --connection-max-age-seconds + grace).
A bare grpc server with the server's own channel arguments (server/rpc/transport.py), idle limit 2 s."""

from __future__ import annotations

import select
import socket
import struct
import time
from concurrent import futures

import grpc

from hotlora.server.config import ServerConfig
from hotlora.server.rpc.transport import server_options

IDLE = 2.0
WAIT = 60.0  # a bound only a connection that is never closed reaches
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def literal(name: bytes, value: bytes) -> bytes:  # HPACK: a literal header field, new name, not indexed
    return b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value


def test_slow_peers_are_closed_by_the_connection_idle_limit(tmp_path):
    cfg = ServerConfig(port=0, data_dir=str(tmp_path), connection_idle_seconds=IDLE)
    server = grpc.server(futures.ThreadPoolExecutor(2), options=server_options(cfg))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    block = b"".join(
        literal(k, v)
        for k, v in (
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", b"/hotlora.v1.Inference/Generate"),
            (b":authority", b"localhost"),
            (b"content-type", b"application/grpc"),
        )
    )
    try:
        peers = {
            name: socket.create_connection(("127.0.0.1", port)) for name in ("silent", "preface", "headers")
        }
        # HEADERS without END_HEADERS: the header block goes on in CONTINUATION frames, a byte each
        peers["headers"].sendall(PREFACE + frame(4, 0, 0, b"") + frame(1, 0, 1, block[:4]))
        drip = {"preface": iter(PREFACE[i : i + 1] for i in range(len(PREFACE)))}
        drip["headers"] = iter(frame(9, 0, 1, block[i : i + 1]) for i in range(4, len(block)))
        t0 = time.monotonic()
        closed: dict[str, float] = {}
        while len(closed) < len(peers) and time.monotonic() - t0 < WAIT:
            for name, data in drip.items():
                if name not in closed:
                    try:
                        peers[name].send(next(data, b""))
                    except OSError:
                        pass
            open_peers = [s for n, s in peers.items() if n not in closed]
            for s in select.select(open_peers, [], [], 0.25)[0]:
                name = next(n for n, p in peers.items() if p is s)
                try:
                    got = s.recv(65536)
                except OSError:
                    got = b""
                if not got:
                    closed[name] = time.monotonic() - t0
        assert set(closed) == set(peers), f"never closed: {set(peers) - set(closed)}"
        assert all(seconds >= IDLE * 0.9 for seconds in closed.values()), closed
    finally:
        for s in peers.values():
            s.close()
        server.stop(0)
