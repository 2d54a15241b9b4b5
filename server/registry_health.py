"""Health follows the registry: a server whose registry cannot be read or written says NOT_SERVING.

Every adapter rpc of every tenant needs the registry, so a probe (a query and a blob-store write) runs
every --health-check-seconds; when it fails, or does not answer within its bound, health turns
NOT_SERVING, so a load balancer stops sending traffic here, and SERVING again once a probe passes. The
probe runs on a thread of its own: a store that hangs a probe cannot keep health at SERVING."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

log = logging.getLogger("hotlora.health")


class RegistryHealth:
    def __init__(
        self,
        probe: Callable[[], None],
        on_change: Callable[[bool], None],
        interval_s: float,
        timeout_s: float = 5.0,
    ):
        self._probe = probe
        self._on_change = on_change
        self._interval = interval_s
        self._timeout = timeout_s
        self._healthy = True
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._probes = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hotlora-registry-probe")
        self._pending: Future | None = None
        self._thread = threading.Thread(target=self._run, name="hotlora-registry-health", daemon=True)

    @property
    def healthy(self) -> bool:
        return self._healthy

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._probes.shutdown(wait=False, cancel_futures=True)

    def check_now(self) -> bool:
        ok, why = self._outcome()
        with self._lock:
            changed, self._healthy = ok != self._healthy, ok
        if changed:
            if ok:
                log.warning("the adapter registry works again: health SERVING")
            else:
                log.error("the adapter registry is unusable (%s): health NOT_SERVING", why)
            self._on_change(ok)
        return ok

    def _outcome(self) -> tuple[bool, str]:
        # a probe still hanging from an earlier round is waited for, never doubled
        if self._pending is None or self._pending.done():
            self._pending = self._probes.submit(self._probe)
        try:
            self._pending.result(timeout=self._timeout)
            return True, ""
        except FutureTimeout:
            return False, f"the probe did not answer within {self._timeout:g} s"
        except Exception as exc:
            return False, f"{type(exc).__name__}: {exc}"

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.check_now()
