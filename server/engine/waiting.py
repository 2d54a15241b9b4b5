"""Requests waiting for admission: one FIFO line per tenant, taken round-robin across tenants, with the
queue limits (all tenants, and per tenant) that keep one tenant from filling the server's queue.

Not thread-safe by itself: the engine guards it with its condition."""

from __future__ import annotations

import collections
import time
from collections.abc import Callable

from hotlora.adapters.errors import HotloraError, ResourceExhausted
from hotlora.server.engine.endings import expiry
from hotlora.server.engine.requests import FinishReason, GenerationRequest, PoolingRequest

Request = GenerationRequest | PoolingRequest


class WaitingLines:
    def __init__(self, max_queue: int, max_queue_per_tenant: int):
        self.max_queue = max_queue
        self.max_queue_per_tenant = max_queue_per_tenant
        self._lines: dict[str, collections.deque[Request]] = collections.OrderedDict()
        self._count = 0
        self._rr = 0

    def __len__(self) -> int:
        return self._count

    def requests(self) -> list[Request]:
        return [r for line in self._lines.values() for r in line]

    def push(self, req: Request) -> None:
        if self._count >= self.max_queue:
            raise ResourceExhausted(
                f"the request queue is full ({self.max_queue} waiting requests, --max-queue); retry later"
            )
        line = self._lines.setdefault(req.tenant, collections.deque())
        if len(line) >= self.max_queue_per_tenant:
            raise ResourceExhausted(
                f"tenant {req.tenant!r} has {len(line)} waiting requests, the per-tenant limit "
                "(--max-queue-per-tenant); retry later"
            )
        line.append(req)
        self._count += 1

    def pop_admissible(
        self,
        generation_row_free: bool,
        try_acquire: Callable[[Request], int | None],
        end: Callable[[Request, FinishReason, Exception | None], None],
    ) -> tuple[Request, int] | None:
        """The next admissible request and its adapter's device slot, round-robin over tenants. A request
        whose adapter is not resident yet stays queued, first in its tenant's line, while the tenant's later
        requests may go ahead. Expired requests, and those whose adapter cannot be had (deleted,
        unloadable), leave their line through `end(req, reason, error)`."""
        now = time.monotonic()
        found = None
        tenants = list(self._lines.keys())
        skipped: dict[str, list[Request]] = collections.defaultdict(list)
        start = self._rr % len(tenants) if tenants else 0
        for tenant in tenants[start:] + tenants[:start]:
            line = self._lines[tenant]
            while line and found is None:
                req = line[0]
                reason = expiry(req, now)
                if reason is not None:
                    self._take(line)
                    end(req, reason, None)
                    continue
                if isinstance(req, GenerationRequest) and not generation_row_free:
                    break  # no row free for this tenant's next generation
                try:
                    slot = try_acquire(req.adapter)
                except HotloraError as exc:  # e.g. deleted or unloadable adapter: fail this one only
                    self._take(line)
                    end(req, FinishReason.ERROR, exc)
                    continue
                self._take(line)
                if slot is None:  # adapter loading
                    skipped[tenant].append(req)
                    continue
                found = (req, slot)
            if found is not None:
                break
        self._rr += 1
        for tenant, reqs in skipped.items():  # back to the front, in order
            line = self._lines.setdefault(tenant, collections.deque())
            line.extendleft(reversed(reqs))
            self._count += len(reqs)
        for tenant in [t for t, line in self._lines.items() if not line]:
            del self._lines[tenant]
        return found

    def _take(self, line: collections.deque) -> None:
        line.popleft()
        self._count -= 1
