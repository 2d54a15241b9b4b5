"""How many rpcs may be in flight, all together and per tenant.

An rpc is counted from the moment the interceptor admits it (before it is given a handler thread) until
its handler returns or the call ends, whichever comes first. The gRPC handler pool is shared, so without
a per-tenant cap one tenant holding calls open (never sending the body, never reading the answer) would
take every thread; with it, a tenant holds at most its share and the rest serve everyone else."""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass

from hotlora.adapters.errors import ResourceExhausted


@dataclass(frozen=True)
class RpcLimits:
    max_total: int
    """--max-concurrent-rpcs: all tenants together."""
    max_per_tenant: int | None
    """--max-rpcs-per-tenant; None = no per-tenant cap (single-tenant dev mode)."""

    def __post_init__(self) -> None:
        if self.max_total < 1 or (self.max_per_tenant is not None and self.max_per_tenant < 1):
            raise ValueError(f"rpc limits must be at least 1: {self}")


class Lease:
    """One admitted rpc; `release()` is idempotent (called from the handler and from the call's end)."""

    __slots__ = ("_admission", "_lock", "_released", "tenant")

    def __init__(self, admission: RpcAdmission, tenant: str):
        self._admission = admission
        self._lock = threading.Lock()
        self._released = False
        self.tenant = tenant

    def release(self) -> None:
        with self._lock:
            if self._released:
                return
            self._released = True
        self._admission._leave(self.tenant)


class RpcAdmission:
    def __init__(self, limits: RpcLimits):
        self.limits = limits
        self._lock = threading.Lock()
        self._total = 0
        self._by_tenant: Counter[str] = Counter()

    def enter(self, tenant: str) -> Lease:
        """A lease for one more rpc of `tenant`, or ResourceExhausted naming the limit it would pass."""
        lim = self.limits
        with self._lock:
            mine = self._by_tenant[tenant]
            if lim.max_per_tenant is not None and mine >= lim.max_per_tenant:
                raise ResourceExhausted(
                    f"tenant {tenant!r} has {mine} rpcs in flight, the per-tenant limit "
                    "(--max-rpcs-per-tenant); retry when some finish"
                )
            if self._total >= lim.max_total:
                raise ResourceExhausted(
                    f"the server has {self._total} rpcs in flight, its limit (--max-concurrent-rpcs); "
                    "retry later"
                )
            self._total += 1
            self._by_tenant[tenant] = mine + 1
        return Lease(self, tenant)

    def _leave(self, tenant: str) -> None:
        with self._lock:
            self._total -= 1
            self._by_tenant[tenant] -= 1
            if self._by_tenant[tenant] <= 0:
                del self._by_tenant[tenant]

    def in_flight(self, tenant: str | None = None) -> int:
        with self._lock:
            return self._total if tenant is None else self._by_tenant.get(tenant, 0)
