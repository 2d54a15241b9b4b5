"""The Tinker API's futures: every training or sampling call answers at once with a request id, and the SDK
polls `retrieve_future` until the work is done (a long poll here: it waits up to WAIT_SECONDS, then answers
`try_again`).

A future belongs to its tenant: another tenant's id is not found. Ids carry this process's boot id, so after
a restart a future of the previous process answers a clean failure ("the server restarted") instead of a
not-found, and the SDK's caller learns its work was lost (saved weights are kept on disk and in the
registry). Finished futures are kept for KEEP_SECONDS after they finish, then forgotten."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from hotlora.adapters.errors import NotFound

WAIT_SECONDS = 5.0  # one retrieve_future waits at most this long before `try_again`
KEEP_SECONDS = 900.0
POLL_SECONDS = 0.02


@dataclass
class Future:
    id: str
    tenant: str
    session: str
    kind: str  # ForwardBackward, OptimStep, SaveWeights, ... (the SDK's request types)
    done: bool = False
    result: Any = None  # a JSON-able dict, or bytes already encoded as protobuf
    error: str | None = None
    category: str = "user"  # the SDK's RequestErrorCategory: user | server
    finished_at: float = 0.0
    event: threading.Event = field(default_factory=threading.Event)


class Futures:
    def __init__(self):
        self.boot = uuid.uuid4().hex[:8]
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._by_id: dict[str, Future] = {}

    def create(self, tenant: str, session: str, kind: str) -> Future:
        fut = Future(f"{self.boot}-{next(self._ids)}", tenant, session, kind)
        with self._lock:
            self._forget_old()
            self._by_id[fut.id] = fut
        return fut

    def finish(self, fut: Future, result: Any) -> None:
        if fut.done:
            return
        fut.result, fut.done, fut.finished_at = result, True, time.monotonic()
        fut.event.set()

    def fail(self, fut: Future, message: str, category: str = "user") -> None:
        if fut.done:
            return
        fut.error, fut.category, fut.done, fut.finished_at = message, category, True, time.monotonic()
        fut.event.set()

    def fail_session(self, session: str, message: str) -> None:
        """Every open future of `session` fails with `message` (the session expired)."""
        with self._lock:
            open_ = [f for f in self._by_id.values() if f.session == session and not f.done]
        for f in open_:
            self.fail(f, message)

    def fail_all(self, message: str) -> None:
        with self._lock:
            open_ = [f for f in self._by_id.values() if not f.done]
        for f in open_:
            self.fail(f, message, "server")

    def get(self, tenant: str, request_id: str) -> Future | None:
        """The tenant's future, or None for one of a previous process (its work was lost)."""
        boot, _, _ = request_id.partition("-")
        if boot != self.boot and boot and request_id.count("-") == 1:
            return None
        with self._lock:
            fut = self._by_id.get(request_id)
        if fut is None or fut.tenant != tenant:
            raise NotFound(f"future {request_id!r} not found (finished futures are kept {KEEP_SECONDS:g} s)")
        return fut

    async def wait(self, fut: Future, seconds: float = WAIT_SECONDS) -> bool:
        """Wait (without holding a thread) until `fut` is done or `seconds` pass; True if done."""
        deadline = time.monotonic() + seconds
        while not fut.done and time.monotonic() < deadline:
            await asyncio.sleep(POLL_SECONDS)
        return fut.done

    def _forget_old(self) -> None:
        now = time.monotonic()
        old = [k for k, f in self._by_id.items() if f.done and now - f.finished_at > KEEP_SECONDS]
        for k in old:
            del self._by_id[k]
