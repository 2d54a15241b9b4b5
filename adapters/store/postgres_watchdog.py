"""Bounds on PostgreSQL calls that the server cannot enforce: psycopg has no client-side timeout, and a
frozen server or a black-holed network never answers (statement_timeout runs on the server, which is the
one not answering; TCP keepalives on loopback are answered by the kernel). The watchdog shuts down the
socket of a connection whose work outlives its deadline, or whose caller stopped waiting: the blocked
query then fails at once with psycopg.OperationalError, and the pool replaces the connection."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from hotlora.adapters.caller import Caller

POLL_S = 0.05  # how late a cut may come, and how often a waiting caller is asked whether it still waits


@dataclass(eq=False)
class Watch:
    conn: object
    deadline: float
    caller: Caller | None
    cut: str = ""
    """Why the connection was cut: "" (it was not), "timeout" (the store's own bound) or "caller"."""


class ConnectionWatchdog:
    def __init__(self, name: str = "hotlora-registry-watchdog"):
        self._lock = threading.Lock()
        self._watches: set[Watch] = set()
        self._wake = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def watch(self, conn, timeout_s: float, caller: Caller | None) -> Iterator[Watch]:
        w = Watch(conn, time.monotonic() + timeout_s, caller)
        with self._lock:
            self._watches.add(w)
            first = len(self._watches) == 1
        if first:  # otherwise the watchdog is polling already
            self._wake.set()
        try:
            yield w
        finally:
            with self._lock:  # not cut after this: the connection goes back to the pool for someone else
                self._watches.discard(w)

    def close(self) -> None:
        self._stop = True
        self._wake.set()

    def _run(self) -> None:
        while not self._stop:
            self._wake.wait(POLL_S if self._watches else None)
            self._wake.clear()
            now = time.monotonic()
            with self._lock:
                for w in self._watches:
                    if w.cut:
                        continue
                    caller_gone = w.caller is not None and w.caller.gone() is not None
                    if caller_gone:
                        w.cut = "caller"
                    elif now >= w.deadline:
                        w.cut = "timeout"
                    else:
                        continue
                    _shut_down(w.conn)


def _shut_down(conn) -> None:
    try:
        fd = conn.pgconn.socket
        sock = socket.socket(fileno=os.dup(fd))
    except Exception:  # closed meanwhile: nothing to cut
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked on the socket; the connection is dead
    except OSError:
        pass
    finally:
        sock.close()
