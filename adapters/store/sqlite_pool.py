"""A bounded pool of SQLite connections shared by every thread.

One connection per thread leaks: gRPC and KServe stream handlers run on short-lived threads, and each
connection holds two file descriptors until the process ends. A pool opens at most `size` connections,
lends one per operation, and takes it back (rolled back if a transaction was left open)."""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from hotlora.adapters.errors import Unavailable

log = logging.getLogger("hotlora.registry")

BORROW_TIMEOUT_S = 30.0  # as long as SQLite's own busy timeout


class ConnectionPool:
    def __init__(self, path: Path, size: int, setup: Callable[[sqlite3.Connection], None]):
        if size < 1:
            raise ValueError(f"a connection pool needs at least one connection (got {size})")
        self.path = Path(path)
        self.size = size
        self._setup = setup
        self._cond = threading.Condition()
        self._idle: list[sqlite3.Connection] = []
        self._open = 0
        self._closed = False

    @contextlib.contextmanager
    def connection(self) -> Iterator[sqlite3.Connection]:
        conn = self._borrow()
        try:
            yield conn
        except sqlite3.OperationalError as exc:  # disk gone, out of descriptors, locked for too long
            log.warning("registry database %s: %s", self.path, exc)
            raise Unavailable(f"the adapter registry is unavailable ({exc}); retry later") from exc
        finally:
            self._give_back(conn)

    def open_connections(self) -> int:
        with self._cond:
            return self._open

    def close(self) -> None:
        with self._cond:
            self._closed = True
            for conn in self._idle:
                conn.close()
            self._open -= len(self._idle)
            self._idle.clear()
            self._cond.notify_all()

    def _borrow(self) -> sqlite3.Connection:
        with self._cond:
            while True:
                if self._closed:
                    raise Unavailable("the adapter registry is closed (the server is stopping)")
                if self._idle:
                    return self._idle.pop()
                if self._open < self.size:
                    self._open += 1
                    break
                if not self._cond.wait(BORROW_TIMEOUT_S):
                    raise Unavailable(
                        f"all {self.size} registry connections stayed busy for {BORROW_TIMEOUT_S:.0f} s; "
                        "retry later"
                    )
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, timeout=30.0, check_same_thread=False)
            self._setup(conn)
            return conn
        except BaseException as exc:
            with self._cond:
                self._open -= 1
                self._cond.notify()
            if isinstance(exc, sqlite3.OperationalError):
                log.warning("registry database %s: %s", self.path, exc)
                raise Unavailable(f"the adapter registry is unavailable ({exc}); retry later") from exc
            raise

    def _give_back(self, conn: sqlite3.Connection) -> None:
        try:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
        except sqlite3.Error:
            conn.close()
            with self._cond:
                self._open -= 1
                self._cond.notify()
            return
        with self._cond:
            if self._closed:
                conn.close()
                self._open -= 1
            else:
                self._idle.append(conn)
            self._cond.notify()
