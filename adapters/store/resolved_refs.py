"""What each adapter reference last resolved to on this replica, so that while the registry database is
unreachable a request for an adapter already resolved here is still served (its blobs are immutable and
its weights usually in memory), instead of every adapter request failing with the database.

Nothing can be committed or deleted while the database is down, so a remembered record is stale only by
a change made just before the outage that this replica missed: a new version of `name` (served the one
before, as if the request had come a moment earlier) or a delete whose notification was lost (the listener
resyncs when it reconnects and drops what is gone)."""

from __future__ import annotations

import collections
import threading

from hotlora.adapters.store.metadata_store import AdapterRecord

CAPACITY = 4096  # (tenant, name, version-or-latest) entries: a few hundred KiB at most


class ResolvedRefs:
    def __init__(self, capacity: int = CAPACITY):
        self.capacity = capacity
        self._lock = threading.Lock()
        self._records: collections.OrderedDict[tuple[str, str, int | None], AdapterRecord] = (
            collections.OrderedDict()
        )

    def remember(self, tenant: str, name: str, version: int | None, record: AdapterRecord) -> None:
        key = (tenant, name, version)
        with self._lock:
            self._records[key] = record
            self._records.move_to_end(key)
            while len(self._records) > self.capacity:
                self._records.popitem(last=False)

    def recall(self, tenant: str, name: str, version: int | None) -> AdapterRecord | None:
        with self._lock:
            return self._records.get((tenant, name, version))

    def forget(self, tenant: str, name: str) -> None:
        """Every reference to `name` (a version of it was deleted)."""
        with self._lock:
            for key in [k for k in self._records if k[:2] == (tenant, name)]:
                del self._records[key]

    def clear(self) -> None:
        with self._lock:
            self._records.clear()
