"""A small pool of PostgreSQL connections whose every wait is the caller's to bound.

Why not psycopg_pool: it makes connections on background workers and, when they fail (an outage), retries
them on a backoff that grows through the outage and one growth at a time, so after the database is back a
caller can wait seconds on a retry scheduled during the outage. Here a connection is made on the
caller's own thread when no idle one is there (within `connect_timeout`), an idle one the server closed
meanwhile (a restart) is noticed before use, and the only other wait is for a free slot, bounded by the
caller's budget."""

from __future__ import annotations

import select
import threading
import time

from psycopg import Connection
from psycopg.pq import TransactionStatus


class PoolBusy(Exception):
    """Every connection stayed borrowed for the whole budget."""


class PostgresPool:
    def __init__(self, url: str, kwargs: dict, max_size: int):
        self._url, self._kwargs, self.max_size = url, kwargs, max_size
        self._slots = threading.BoundedSemaphore(max_size)
        self._idle: list[Connection] = []  # most recently returned last: a warm one is reused first
        self._lock = threading.Lock()
        self._closed = False

    def borrow(self, deadline: float) -> Connection:
        """An idle connection the server still holds, or a new one (psycopg.OperationalError if it
        cannot be made); PoolBusy if no slot frees before `deadline` (time.monotonic())."""
        if not self._slots.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise PoolBusy(f"all {self.max_size} registry connections stayed busy")
        try:
            while True:
                with self._lock:
                    conn = self._idle.pop() if self._idle else None
                if conn is None:
                    return Connection.connect(self._url, **self._kwargs)
                if _quiet(conn):
                    return conn
                conn.close()  # ended by the server (a restart): its first query would fail
        except BaseException:
            self._slots.release()
            raise

    def give_back(self, conn: Connection) -> None:
        """Keep it for the next borrower if it is idle and whole; close it otherwise."""
        reusable = (
            not self._closed
            and not conn.closed
            and not conn.broken
            and conn.info.transaction_status == TransactionStatus.IDLE
        )
        try:
            if reusable:
                with self._lock:
                    self._idle.append(conn)
            else:
                conn.close()
        finally:
            self._slots.release()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


def _quiet(conn: Connection) -> bool:
    """Nothing to read on an idle connection: the server has not closed it (a closed one reads EOF)."""
    if conn.closed or conn.broken:
        return False
    try:
        readable, _, _ = select.select([conn.pgconn.socket], [], [], 0)
    except (OSError, ValueError):
        return False
    return not readable
