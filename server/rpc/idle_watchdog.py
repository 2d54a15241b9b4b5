"""Cancels calls that keep a handler thread waiting for a client message that does not come.

grpcio's sync server blocks a handler thread while it waits for a request body, an upload chunk or a
stream's next request, with no limit of its own. Every wait for a client message goes through
`CallActivity.receive`; a watchdog thread cancels the call once it has waited longer than the limit
with nothing sent or received meanwhile (a stream that is busy answering is not idle)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator

log = logging.getLogger("hotlora.rpc")


class CallActivity:
    """One call's last activity, and whether the watchdog cut it off."""

    __slots__ = ("context", "expired", "last", "waiting")

    def __init__(self, context):
        self.context = context
        self.last = time.monotonic()
        self.waiting = 0  # threads blocked in `receive` (a KServe stream reads on its own thread)
        self.expired = False

    def touch(self) -> None:
        self.last = time.monotonic()


class IdleWatchdog:
    def __init__(self, limit_s: float):
        self.limit_s = limit_s
        self._lock = threading.Lock()
        self._calls: set[CallActivity] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def receive(self, call: CallActivity, iterator: Iterator):
        """next(iterator), cancelled by the watchdog if the client sends nothing for too long."""
        with self._lock:
            call.waiting += 1
            call.touch()
            self._calls.add(call)
            self._start()
        try:
            return next(iterator)
        finally:
            with self._lock:
                call.waiting -= 1
                call.touch()
                if not call.waiting:
                    self._calls.discard(call)

    def close(self) -> None:
        self._stop.set()

    def _start(self) -> None:  # lock held
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="hotlora-idle-watchdog", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        tick = min(1.0, self.limit_s / 4)
        while not self._stop.wait(tick):
            now = time.monotonic()
            with self._lock:
                idle = [c for c in self._calls if c.waiting and now - c.last > self.limit_s]
                for c in idle:
                    self._calls.discard(c)
            for c in idle:
                c.expired = True
                log.info(
                    "cancelling a call: no message from the client in %.1f s (--request-idle-seconds)",
                    self.limit_s,
                )
                c.context.cancel()
