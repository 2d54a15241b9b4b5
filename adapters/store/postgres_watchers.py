"""The two background threads of a replica on the PostgreSQL registry.

`ChangeListener` LISTENs for other replicas' changes on its own connection; when that connection drops
it reconnects and asks for a resync, since notifications sent meanwhile are lost. `LeaseKeeper` renews
this replica's job leases a few times per lease and fails the jobs of replicas that stopped renewing
(not those that were only cut off from the database with it)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from hotlora.adapters.store.registry_changes import RegistryChange

log = logging.getLogger("hotlora.registry")

POLL_S = 0.2  # how often the listener looks for its stop flag between notifications
RECONNECT_S = 1.0
RETRY_S = 0.5  # how often leases are tried again while the registry is unreachable


class ChangeListener:
    def __init__(
        self,
        url: str,
        channel: str,
        on_change: Callable[[RegistryChange], None],
        on_resync: Callable[[], None],
        where: str,
    ):
        self._url, self._channel, self._where = url, channel, where
        self._on_change, self._on_resync = on_change, on_resync
        self._stop = threading.Event()
        self._listening = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hotlora-registry-listen", daemon=True)

    def start(self, timeout: float = 10.0) -> None:
        self._thread.start()
        # a change committed after start() returns must reach us: wait until LISTEN is in place
        self._listening.wait(timeout)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)

    def _run(self) -> None:
        import psycopg

        missed = False
        while not self._stop.is_set():
            try:
                with psycopg.connect(self._url, autocommit=True, connect_timeout=5) as conn:
                    conn.execute(f"LISTEN {self._channel}")
                    self._listening.set()
                    if missed:
                        log.warning("registry %s: listening again; resyncing the adapter cache", self._where)
                        self._safely(self._on_resync)
                        missed = False
                    while not self._stop.is_set():
                        for note in conn.notifies(timeout=POLL_S):
                            self._dispatch(note.payload)
            except psycopg.Error as exc:
                if self._stop.is_set():
                    return
                log.warning("registry %s: change notifications lost (%s); reconnecting", self._where, exc)
                missed = True
                self._stop.wait(RECONNECT_S)

    def _dispatch(self, payload: str) -> None:
        try:
            change = RegistryChange.decode(payload)
        except (ValueError, KeyError, TypeError):
            log.warning("registry %s: ignored a malformed change notification %r", self._where, payload[:200])
            return
        self._safely(lambda: self._on_change(change))

    def _safely(self, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception:  # one bad change must not stop the listener
            log.exception("registry %s: applying a change failed", self._where)


class LeaseKeeper:
    """Renews this replica's leases every `interval_s` and fails other replicas' expired ones.

    After the registry was unreachable (a database outage cuts every replica off at once) it renews again
    as soon as the database answers (it retries every RETRY_S meanwhile), and fails nobody's expired
    lease for two more intervals: the other replicas were cut off too and renew theirs in that time, so a
    job outlives an outage longer than its lease as long as its replica lives."""

    def __init__(self, store, on_lost: Callable[[set[str]], None], interval_s: float):
        self._store, self._on_lost, self._interval = store, on_lost, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hotlora-job-leases", daemon=True)
        self._cut_off = False
        self._sweep_after = 0.0  # time.monotonic() before which no expired lease is failed

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)

    def _run(self) -> None:
        while not self._stop.wait(min(self._interval, RETRY_S) if self._cut_off else self._interval):
            self.round()

    def round(self) -> None:
        try:
            lost = self._store.renew_job_leases()
        except Exception as exc:  # the registry is down: leases lapse; we retry soon
            if not self._cut_off:
                log.warning("job leases: %s", exc)
            self._cut_off = True
            return
        if self._cut_off:
            self._cut_off = False
            self._sweep_after = time.monotonic() + 2 * self._interval
            log.warning("job leases renewed again; others' expired leases are failed from %.0f s on",
                        2 * self._interval)  # fmt: skip
        try:
            if lost:
                self._on_lost(lost)
            if time.monotonic() >= self._sweep_after:
                self._store.expire_job_leases()
        except Exception as exc:
            log.warning("job leases: %s", exc)
