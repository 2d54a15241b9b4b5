"""Choose the registry's stores from configuration (docs/design.md §7): SQLite and a local directory under the
data dir for one process (the default), or PostgreSQL and an S3-compatible bucket shared by a fleet."""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from hotlora.adapters.store.registry import AdapterRegistry
from hotlora.adapters.store.s3_blob_store import S3Options
from hotlora.adapters.store.store_urls import check_store_urls

FLEET_INSTALL_HINT = "install the fleet extra: pip install 'hotlora[fleet]'"


@dataclass(frozen=True)
class StoreConfig:
    data_dir: Path
    registry: str = ""
    """Empty: SQLite under `data_dir`; postgresql://...: shared by every replica."""
    blob_store: str = ""
    """Empty: a directory under `data_dir`; s3://bucket/prefix: shared by every replica."""
    connections: int = 8
    job_lease_s: float = 30.0
    replica_id: str = field(default_factory=lambda: default_replica_id())
    timeout_s: float = 5.0
    """The longest one call to the shared database may take (S3's bound is `s3.timeout_s`)."""
    s3: S3Options = S3Options()

    def __post_init__(self):
        problems = check_store_urls(self.registry, self.blob_store)
        if self.job_lease_s < 1.0:
            problems.append(f"--job-lease-seconds must be at least 1 (got {self.job_lease_s})")
        if not 0.1 <= self.timeout_s <= 600:
            problems.append(f"--registry-timeout-seconds must be within 0.1..600 (got {self.timeout_s})")
        if problems:
            raise ValueError("invalid configuration:\n  " + "\n  ".join(problems))

    @property
    def shared(self) -> bool:
        return bool(self.registry)


def default_replica_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def open_registry(cfg: StoreConfig) -> AdapterRegistry:
    """The registry on the configured stores, orphaned blobs collected (safe with other replicas
    collecting at the same time: see `MetadataStore.blob_guard`)."""
    if not cfg.shared:
        return AdapterRegistry.open(cfg.data_dir, cfg.connections)
    try:
        from hotlora.adapters.store.postgres_store import PostgresMetadataStore
        from hotlora.adapters.store.s3_blob_store import S3BlobStore
    except ImportError as exc:
        raise RuntimeError(
            f"a shared registry needs psycopg and boto3 ({exc}); {FLEET_INSTALL_HINT}"
        ) from exc
    metadata = PostgresMetadataStore(
        cfg.registry, cfg.replica_id, cfg.connections, cfg.job_lease_s, timeout_s=cfg.timeout_s
    )
    try:
        blobs = S3BlobStore(cfg.blob_store, cfg.s3)
        registry = AdapterRegistry(metadata, blobs)
        registry.gc()
        blobs.abort_stale_uploads()
    except BaseException:
        metadata.close()
        raise
    return registry
