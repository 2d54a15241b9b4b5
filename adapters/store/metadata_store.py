"""Adapter and fine-tune job metadata behind `MetadataStore` (docs/design.md §7): SQLite for one process
(sqlite_store.py), PostgreSQL for a fleet (postgres_store.py); their shared row format is metadata_rows.py.

Versions come from a per-(tenant, name) counter that outlives deletions, so `name@N` always means the same
bytes: a deleted version number is never handed out again.
"""

from __future__ import annotations

import contextlib
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime

from hotlora.adapters.caller import Caller
from hotlora.adapters.errors import ResourceExhausted
from hotlora.adapters.names import format_ref
from hotlora.adapters.store.registry_changes import RegistryChange

SOURCES = ("UPLOAD", "FINETUNE")


@dataclass(frozen=True)
class AdapterRecord:
    """One committed adapter version."""

    tenant: str
    name: str
    version: int
    task: str
    """"CAUSAL_LM" or "SEQ_CLS"."""
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    labels: tuple[str, ...]
    sha256: str
    """sha256 hex of adapter_model.safetensors as uploaded (what `sha256sum` prints for the user's file)."""
    size_bytes: int
    """All stored files together."""
    created_at: datetime
    """UTC."""
    source: str
    """"UPLOAD" or "FINETUNE"."""
    description: str = ""
    files: dict[str, str] = field(default_factory=dict, hash=False)
    """File name -> sha256 hex of its bytes (the manifest; blobs are keyed by these)."""

    @property
    def ref(self) -> str:
        return format_ref(self.name, self.version)


@dataclass(frozen=True)
class TenantQuota:
    """What one tenant may store; checked inside the transaction that commits a version, so racing
    uploads cannot all pass it."""

    max_versions: int
    """--max-adapters-per-tenant"""
    max_bytes: int
    """--max-tenant-bytes: size_bytes of every live version together"""

    def check(self, tenant: str, versions: int, used_bytes: int, new_bytes: int) -> None:
        if versions >= self.max_versions:
            raise ResourceExhausted(
                f"tenant {tenant!r} already stores {self.max_versions} adapter versions, the limit "
                "(--max-adapters-per-tenant); delete some first"
            )
        if used_bytes + new_bytes > self.max_bytes:
            raise ResourceExhausted(
                f"tenant {tenant!r} stores {used_bytes} bytes of adapters; {new_bytes} more would pass its "
                f"quota of {self.max_bytes} bytes (--max-tenant-bytes); delete some first"
            )


@dataclass(frozen=True)
class JobRecord:
    """One fine-tune job as stored; `metrics` is a flat dict (step, epoch, train_loss, ...)."""

    id: str
    tenant: str
    adapter: str
    task: str
    method: str
    """"HEAD_ONLY" | "LORA" | "AUTO" (until the job resolves it)."""
    state: str
    """"QUEUED" | "RUNNING" | "SUCCEEDED" | "FAILED" | "CANCELLED" | "REJECTED"."""
    metrics: dict = field(default_factory=dict, hash=False)
    result_adapter: str = ""
    error: str = ""
    created_at: float = 0.0
    """Unix seconds, unlike AdapterRecord's datetime: FineTuneJob's wire fields are these doubles and every
    stored event snapshot (SQLite and PostgreSQL) holds them as numbers."""
    finished_at: float = 0.0
    """Unix seconds; 0 while the job is QUEUED or RUNNING."""
    promoted: bool = False


class MetadataStore(ABC):
    """Adapter records per tenant. Implementations are safe to call from many threads."""

    @abstractmethod
    def insert_next_version(
        self, draft: AdapterRecord, quota: TenantQuota | None = None, caller: Caller | None = None
    ) -> AdapterRecord:
        """In one transaction: check the tenant's `quota` (ResourceExhausted), version = the largest ever
        given to (tenant, name) + 1, insert, and commit only if `caller` still waits for the answer (else
        roll back and raise its DeadlineExceeded / Cancelled). `draft.version` and `draft.created_at` are
        ignored; the stored record is returned."""

    @abstractmethod
    def usage(self, tenant: str) -> tuple[int, int]:
        """(live versions, their size_bytes together) of one tenant."""

    @abstractmethod
    def get(self, tenant: str, name: str, version: int | None) -> AdapterRecord | None:
        """The given version, or the latest when `version` is None."""

    @abstractmethod
    def versions(self, tenant: str, name: str) -> list[int]:
        """Live versions, ascending."""

    @abstractmethod
    def list(self, tenant: str, prefix: str = "", all_versions: bool = False) -> list[AdapterRecord]:
        """Latest version of each name starting with `prefix` (or every version), by name then version."""

    @abstractmethod
    def delete(self, tenant: str, name: str, version: int | None) -> list[AdapterRecord]:
        """Remove one version, or all of them when `version` is None; returns what was removed."""

    @abstractmethod
    def count(self) -> int:
        """Live adapter versions, all tenants (for the adapters-by-state gauge)."""

    @abstractmethod
    def referenced_blobs(self) -> set[str]:
        """Digests of every file of every live record (for garbage collection)."""

    @abstractmethod
    def ping(self) -> None:
        """Raises unless the store answers a query (the health probe)."""

    @abstractmethod
    def close(self) -> None: ...

    # ---- what several processes sharing one store need (one process: the defaults) ----------------
    @abstractmethod
    def blob_guard(self, exclusive: bool) -> contextlib.AbstractContextManager:
        """Held shared from "every blob of a draft exists" until its record commits, and exclusive while
        blobs no record references are removed, by every process sharing the blob store: a collector
        never removes a blob between a commit's check and its insert."""

    @abstractmethod
    def subscribe(self, on_change: Callable[[RegistryChange], None], on_resync: Callable[[], None]) -> None:
        """Call `on_change` for every change another process makes (`on_resync` when some may have been
        missed). One process alone changes nothing behind its own back: nothing to do."""

    @abstractmethod
    def publish(self, change: RegistryChange) -> None:
        """Tell the other processes (no-op for one process)."""

    def end_job(self, tenant: str, job_id: str, state: str, error: str) -> JobRecord | None:
        """Move a QUEUED/RUNNING job that this process does not run to a final `state` (a cancel taken
        by another replica than the one running it); None if it was already final or is unknown."""
        job = self.get_job(tenant, job_id)
        if job is None or job.state not in ("QUEUED", "RUNNING"):
            return None
        ended = replace(job, state=state, error=error, finished_at=time.time())
        self.save_job(ended)
        self.add_job_event(job_id, error, ended)
        return ended

    @abstractmethod
    def watch_job_leases(self, on_lost: Callable[[set[str]], None]) -> None:
        """Call `on_lost(job ids)` when jobs this process runs were ended elsewhere (a cancel on another
        replica, an expired lease). One process owns every job: nothing to do."""

    # ---- fine-tune jobs ---------------------------------------------------------------------------
    @abstractmethod
    def get_job(self, tenant: str, job_id: str) -> JobRecord | None:
        """One tenant's job, None if unknown (or another tenant's)."""

    @abstractmethod
    def save_job(self, job: JobRecord) -> None:
        """Insert or update the job (its events and files stay)."""

    @abstractmethod
    def list_jobs(self, tenant: str) -> list[JobRecord]:
        """A tenant's jobs, oldest first."""

    @abstractmethod
    def fail_unfinished_jobs(self, reason: str) -> int:
        """Jobs left QUEUED/RUNNING by a process that is gone become FAILED with `reason`; how many."""

    @abstractmethod
    def add_job_event(self, job_id: str, message: str, job: JobRecord) -> int:
        """Append one event (a snapshot of the job); returns its sequence number (1, 2, ...)."""

    @abstractmethod
    def job_events(self, job_id: str, after: int = 0) -> list[tuple[int, str, JobRecord]]:
        """(sequence number, message, snapshot) of the job's events after `after`, in order."""

    @abstractmethod
    def count_jobs_by_state(self) -> dict[str, int]:
        """Jobs of every tenant by state (for the jobs-by-state gauge)."""

    @abstractmethod
    def set_job_files(self, job_id: str, files: dict[str, str]) -> None:
        """File name -> blob digest of the adapter a job trained but did not promote (its artifact)."""

    @abstractmethod
    def job_files(self, job_id: str) -> dict[str, str]:
        """The job's artifact files as `set_job_files` stored them; empty if none."""
