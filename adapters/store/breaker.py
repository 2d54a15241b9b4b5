"""A circuit breaker for one shared store (the registry database, the object store).

Once a call finds the store unreachable, the calls after it fail at once with UNAVAILABLE instead of each
waiting out a timeout, and a background thread tries the store (`probe`) every `retry_s` until it
answers; then calls go through again. So during an outage an upload is refused in microseconds, a request
for an adapter this replica already resolved is served from memory without waiting, and the replica is
back within `retry_s` of the store."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from hotlora.adapters.errors import Unavailable

log = logging.getLogger("hotlora.registry")


class Breaker:
    def __init__(self, what: str, probe: Callable[[], None], retry_s: float = 0.5):
        self.what = what
        self.retry_s = retry_s
        self._probe = probe
        self._lock = threading.Lock()
        self._down_since: float | None = None
        self._why = ""
        self._prober: threading.Thread | None = None
        self._closed = threading.Event()

    @property
    def down(self) -> bool:
        return self._down_since is not None

    def admit(self) -> None:
        """Raises Unavailable while the store is known to be down."""
        down_since = self._down_since
        if down_since is None:
            return
        since = time.monotonic() - down_since
        raise Unavailable(f"{self.what} is unavailable ({self._why}; for {since:.1f} s); retry later")

    def succeeded(self) -> None:
        if self._down_since is None:  # the common case: no lock
            return
        with self._lock:
            if self._down_since is None:
                return
            since, self._down_since = time.monotonic() - self._down_since, None
        log.warning("%s answers again (after %.1f s)", self.what, since)

    def failed(self, why: str) -> None:
        with self._lock:
            self._why = why[:300]
            if self._down_since is not None:
                return
            self._down_since = time.monotonic()
            if self._prober is None and not self._closed.is_set():
                self._prober = threading.Thread(target=self._probe_until_back, name="hotlora-store-probe",
                                                daemon=True)  # fmt: skip
                self._prober.start()
        log.error("%s is unreachable (%s): calls fail at once until a probe (every %.1f s) gets through",
                  self.what, why, self.retry_s)  # fmt: skip

    def close(self) -> None:
        self._closed.set()

    def _probe_until_back(self) -> None:
        while not self._closed.wait(self.retry_s):
            try:
                self._probe()
            except Exception:
                continue  # still down; the first failure's reason stays the one shown
            self.succeeded()
            with self._lock:
                if self._down_since is None:
                    self._prober = None  # under the lock: the next failure starts another
                    return
