"""The adapter registry: validated uploads become immutable, versioned, per-tenant records.

Crash safety comes from ordering: file blobs are written first (content-addressed, idempotent), then ONE
metadata transaction makes the version visible. A crash before that transaction leaves only unreferenced
blobs, which `gc()` (run by `open`) removes; a crash after it leaves a complete version.

Several processes may share the stores (a fleet): the metadata store's `blob_guard` is held shared from a
commit's "its blobs exist" check to its insert and exclusive while unreferenced blobs are removed, so a
collector on one replica never deletes a blob a commit on another is about to reference.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from hotlora.adapters.base_model_info import BaseModelInfo
from hotlora.adapters.caller import current_caller
from hotlora.adapters.errors import (
    Cancelled,
    DeadlineExceeded,
    HotloraError,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from hotlora.adapters.names import format_ref, parse_ref, validate_name
from hotlora.adapters.peft.format import RECORD_FILE, WEIGHTS_FILE, AdapterLimits, parse_peft_adapter
from hotlora.adapters.store.blob_store import BlobStore, LocalBlobStore
from hotlora.adapters.store.metadata_store import (
    SOURCES,
    AdapterRecord,
    MetadataStore,
    TenantQuota,
)
from hotlora.adapters.store.resolved_refs import ResolvedRefs
from hotlora.adapters.store.sqlite_store import SqliteMetadataStore
from hotlora.adapters.weights import LoraWeights

MAX_DESCRIPTION_CHARS = 1024
METADATA_FILE = "registry.sqlite3"
BLOBS_DIR = "blobs"

__all__ = ["AdapterRecord", "AdapterRegistry"]


class AdapterRegistry:
    """Thread-safe. Tenants are isolated: every lookup is scoped by tenant, so another tenant's adapter of
    the same name is simply not found."""

    def __init__(self, metadata: MetadataStore, blobs: BlobStore):
        self.metadata = metadata
        self.blobs = blobs
        self.resolved = ResolvedRefs()

    @classmethod
    def open(cls, data_dir: Path, connections: int = 8) -> AdapterRegistry:
        """The default stores under `data_dir` (SQLite + local blobs); removes orphaned blobs."""
        data_dir = Path(data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        registry = cls(
            SqliteMetadataStore(data_dir / METADATA_FILE, connections), LocalBlobStore(data_dir / BLOBS_DIR)
        )
        registry.gc()
        return registry

    def check(self) -> None:
        """Raises unless both stores work: the database answers and the blob store can write."""
        self.metadata.ping()
        self.blobs.check()

    def close(self) -> None:
        self.metadata.close()
        self.blobs.close()

    def commit(
        self,
        tenant: str,
        name: str,
        files: dict[str, bytes],
        weights: LoraWeights,
        *,
        description: str = "",
        source: str = "UPLOAD",
        quota: TenantQuota | None = None,
    ) -> AdapterRecord:
        """Store a validated adapter as version max+1 of `name`; visible only once complete. The tenant's
        `quota` is checked in the committing transaction; a refused version leaves no blob behind."""
        _check_tenant(tenant)
        validate_name(name)
        if source not in SOURCES:
            raise InvalidArgument(f"source {source!r} is not one of {', '.join(SOURCES)}")
        if len(description) > MAX_DESCRIPTION_CHARS:
            raise InvalidArgument(
                f"description is {len(description)} characters; at most {MAX_DESCRIPTION_CHARS}"
            )
        if WEIGHTS_FILE not in files:
            raise InvalidArgument(f"the adapter lacks {WEIGHTS_FILE}")
        caller = current_caller()  # nothing is committed once it stopped waiting (it was told it failed)
        # Blobs first, outside the lock: large writes must not block other tenants' lookups or commits.
        manifest = {fname: self.blobs.put(data) for fname, data in files.items()}
        draft = AdapterRecord(
            tenant=tenant,
            name=name,
            version=0,
            task=weights.task,
            rank=weights.rank,
            alpha=weights.alpha,
            target_modules=tuple(weights.target_modules),
            labels=tuple(weights.labels),
            sha256=manifest[WEIGHTS_FILE],
            size_bytes=sum(len(d) for d in files.values()),
            created_at=datetime.now(UTC),
            source=source,
            description=description,
            files=manifest,
        )
        if caller is not None:
            caller.check(f"committing a version of {name}")
        with self.metadata.blob_guard(exclusive=False):
            # A concurrent delete or gc may have removed an identical blob meanwhile: put it back.
            for fname, sha in manifest.items():
                if not self.blobs.exists(sha):
                    self.blobs.put(files[fname])
            try:
                return self.metadata.insert_next_version(draft, quota, caller)
            except (DeadlineExceeded, Cancelled):
                raise  # its blobs stay until a gc: the registry may be unreachable just now
            except HotloraError as exc:  # refused (over the quota): its blobs go now, not at a later gc
                refused = exc
        with self.metadata.blob_guard(exclusive=True):
            self._remove_unreferenced(set(manifest.values()))
        raise refused

    def resolve(self, tenant: str, ref: str) -> AdapterRecord:
        """`name` -> latest version, `name@N` -> that version; NotFound says what exists. While the
        database is unreachable, what the reference last resolved to here (see resolved_refs.py)."""
        name, version = parse_ref(ref)
        try:
            record = self.metadata.get(tenant, name, version)
        except Unavailable:
            known = self.resolved.recall(tenant, name, version)
            if known is None:
                raise
            return known
        if record is not None:
            self.resolved.remember(tenant, name, version, record)
            return record
        versions = self.metadata.versions(tenant, name)
        if not versions:
            raise NotFound(f"adapter {name!r} not found; upload it first or list adapters to see the names")
        shown = ", ".join(str(v) for v in versions[-10:])
        raise NotFound(
            f"adapter {name!r} has no version {version}; it has {len(versions)} version(s): "
            f"{'..., ' if len(versions) > 10 else ''}{shown} (latest {format_ref(name, versions[-1])})"
        )

    def list(self, tenant: str, prefix: str = "", all_versions: bool = False) -> list[AdapterRecord]:
        return self.metadata.list(tenant, prefix, all_versions)

    def delete(self, tenant: str, ref: str) -> list[AdapterRecord]:
        """Delete every version of `name`, or just `name@N`; returns what was deleted."""
        name, version = parse_ref(ref)
        with self.metadata.blob_guard(exclusive=True):
            removed = self.metadata.delete(tenant, name, version)
            self.resolved.forget(tenant, name)
            self._remove_unreferenced({sha for r in removed for sha in r.files.values()})
        if not removed:
            self.resolve(tenant, ref)  # raises NotFound saying which versions exist
        return removed

    def read_files(self, record: AdapterRecord) -> dict[str, bytes]:
        """The PEFT files exactly as committed (each verified against its sha256)."""
        return {fname: self.blobs.get(sha) for fname, sha in sorted(peft_files(record.files).items())}

    def read_record(self, record: AdapterRecord) -> bytes | None:
        """The version's training record (examples and validation) if it was fine-tuned here."""
        sha = record.files.get(RECORD_FILE)
        return None if sha is None else self.blobs.get(sha)

    def stream_files(self, manifest: dict[str, str], chunk_bytes: int) -> Iterator[tuple[str, bytes]]:
        """(file name, chunk) of each file of a manifest, by name, read from the blob store a chunk at a
        time (each file verified before its first chunk); an empty file is one empty chunk."""
        for fname, sha in sorted(manifest.items()):
            for data in self.blobs.iter_chunks(sha, chunk_bytes):
                yield fname, data

    def load_weights(self, record: AdapterRecord, base: BaseModelInfo, limits: AdapterLimits) -> LoraWeights:
        """Re-parse the stored files (the host cache's path from disk to memory)."""
        return parse_peft_adapter(self.read_files(record), base, limits, labels=record.labels)

    def gc(self) -> int:
        """Remove blobs no record references (left by a crash mid-commit); returns how many."""
        with self.metadata.blob_guard(exclusive=True):
            return self._remove_unreferenced(set(self.blobs.list()))

    def _remove_unreferenced(self, candidates: set[str]) -> int:
        live = self.metadata.referenced_blobs()
        orphans = candidates - live
        for sha in orphans:
            self.blobs.delete(sha)
        return len(orphans)


def peft_files(manifest: dict[str, str]) -> dict[str, str]:
    """A version's manifest without its training record: what export and parsing see."""
    return {f: sha for f, sha in manifest.items() if f != RECORD_FILE}


def _check_tenant(tenant: str) -> None:
    if not isinstance(tenant, str) or not tenant or len(tenant) > 256:
        raise InvalidArgument(f"tenant must be a non-empty string of at most 256 characters, got {tenant!r}")
