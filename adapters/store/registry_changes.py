"""What one replica tells the others about the shared registry (docs/design.md §7).

A replica resolves every request against the metadata store, so a new version is servable everywhere as
soon as its row commits and a deleted one is refused everywhere as soon as its delete commits. What the
others must hear about is their own memory: the cached weights of a deleted version (freed) and an
UnloadAdapter taken elsewhere (evicted here too)."""

from __future__ import annotations

import json
from dataclasses import dataclass

OPS = ("delete", "unload")
MAX_PAYLOAD_BYTES = 7900  # PostgreSQL's NOTIFY payload limit is 8000 bytes


@dataclass(frozen=True)
class RegistryChange:
    op: str
    """"delete" (the versions are gone) or "unload" (evict them from memory; they stay stored)."""
    tenant: str
    name: str
    versions: tuple[int, ...]
    """Empty: every version of `name` (a change too long to list)."""
    origin: str = ""
    """Replica that made the change."""

    def encode(self) -> str:
        payload = json.dumps(
            {"op": self.op, "t": self.tenant, "n": self.name, "v": list(self.versions), "o": self.origin}
        )
        if len(payload.encode()) > MAX_PAYLOAD_BYTES:
            return RegistryChange(self.op, self.tenant, self.name, (), self.origin).encode()
        return payload

    @staticmethod
    def decode(payload: str) -> RegistryChange:
        d = json.loads(payload)
        if d["op"] not in OPS:
            raise ValueError(f"unknown registry change {d['op']!r}")
        return RegistryChange(d["op"], d["t"], d["n"], tuple(int(v) for v in d["v"]), d.get("o", ""))
