"""Health follows the registry: a server whose registry cannot be read or written says NOT_SERVING.

Every adapter rpc of every tenant needs the registry, so a probe (a query and a blob-store write) runs
every --health-check-seconds; when it fails health turns NOT_SERVING, so a load balancer stops sending
traffic here, and SERVING again once it passes."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger("hotlora.health")


class RegistryHealth:
    def __init__(self, probe: Callable[[], None], on_change: Callable[[bool], None], interval_s: float):
        self._probe = probe
        self._on_change = on_change
        self._interval = interval_s
        self._healthy = True
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hotlora-registry-health", daemon=True)

    @property
    def healthy(self) -> bool:
        return self._healthy

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def check_now(self) -> bool:
        try:
            self._probe()
            ok, why = True, ""
        except Exception as exc:
            ok, why = False, f"{type(exc).__name__}: {exc}"
        with self._lock:
            changed, self._healthy = ok != self._healthy, ok
        if changed:
            if ok:
                log.warning("the adapter registry works again: health SERVING")
            else:
                log.error("the adapter registry is unusable (%s): health NOT_SERVING", why)
            self._on_change(ok)
        return ok

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.check_now()
