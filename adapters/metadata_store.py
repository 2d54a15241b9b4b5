"""Adapter metadata (DESIGN.md §7: SQLite now, PostgreSQL for a fleet), behind `MetadataStore`.

Versions come from a per-(tenant, name) counter that outlives deletions, so `name@N` always means the same
bytes: a deleted version number is never handed out again.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

from hotlora.adapters.errors import FailedPrecondition, ResourceExhausted
from hotlora.adapters.names import format_ref
from hotlora.adapters.registry_changes import RegistryChange
from hotlora.adapters.sqlite_pool import ConnectionPool

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


class MetadataStore(ABC):
    """Adapter records per tenant. Implementations are safe to call from many threads."""

    @abstractmethod
    def insert_next_version(self, draft: AdapterRecord, quota: TenantQuota | None = None) -> AdapterRecord:
        """In one transaction: check the tenant's `quota` (ResourceExhausted), version = the largest ever
        given to (tenant, name) + 1, then insert. `draft.version` and `draft.created_at` are ignored; the
        stored record is returned."""

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

    @abstractmethod
    def get_job(self, tenant: str, job_id: str) -> JobRecord | None: ...

    @abstractmethod
    def save_job(self, job: JobRecord) -> None: ...

    @abstractmethod
    def add_job_event(self, job_id: str, message: str, job: JobRecord) -> int: ...


SCHEMA_VERSION = 2
_SCHEMA = """
CREATE TABLE version_counters (
    tenant TEXT NOT NULL, name TEXT NOT NULL, last_version INTEGER NOT NULL,
    PRIMARY KEY (tenant, name));
CREATE TABLE adapters (
    tenant TEXT NOT NULL, name TEXT NOT NULL, version INTEGER NOT NULL,
    task TEXT NOT NULL, rank INTEGER NOT NULL, alpha REAL NOT NULL,
    target_modules TEXT NOT NULL, labels TEXT NOT NULL,
    sha256 TEXT NOT NULL, size_bytes INTEGER NOT NULL, created_at REAL NOT NULL,
    source TEXT NOT NULL, description TEXT NOT NULL,
    PRIMARY KEY (tenant, name, version));
CREATE TABLE adapter_files (
    tenant TEXT NOT NULL, name TEXT NOT NULL, version INTEGER NOT NULL,
    filename TEXT NOT NULL, sha256 TEXT NOT NULL,
    PRIMARY KEY (tenant, name, version, filename),
    FOREIGN KEY (tenant, name, version) REFERENCES adapters ON DELETE CASCADE);
CREATE INDEX adapter_files_by_sha256 ON adapter_files (sha256);
"""
# Version 2: fine-tune jobs, their progress events, and the files of adapters a job trained but did not
# promote (kept as job artifacts, never resolvable by name).
_SCHEMA_V2 = """
CREATE TABLE finetune_jobs (
    id TEXT PRIMARY KEY, tenant TEXT NOT NULL, adapter TEXT NOT NULL, task TEXT NOT NULL,
    method TEXT NOT NULL, state TEXT NOT NULL, metrics TEXT NOT NULL, result_adapter TEXT NOT NULL,
    error TEXT NOT NULL, created_at REAL NOT NULL, finished_at REAL NOT NULL, promoted INTEGER NOT NULL);
CREATE INDEX finetune_jobs_by_tenant ON finetune_jobs (tenant, created_at);
CREATE TABLE finetune_events (
    job_id TEXT NOT NULL REFERENCES finetune_jobs ON DELETE CASCADE, seq INTEGER NOT NULL,
    at REAL NOT NULL, message TEXT NOT NULL, job TEXT NOT NULL,
    PRIMARY KEY (job_id, seq));
CREATE TABLE finetune_job_files (
    job_id TEXT NOT NULL REFERENCES finetune_jobs ON DELETE CASCADE, filename TEXT NOT NULL,
    sha256 TEXT NOT NULL, PRIMARY KEY (job_id, filename));
"""
_COLUMNS = (
    "tenant, name, version, task, rank, alpha, target_modules, labels, sha256, size_bytes, created_at, "
    "source, description"
)


class SqliteMetadataStore(MetadataStore):
    """One SQLite file in WAL mode behind a bounded connection pool shared by all threads (see
    `ConnectionPool`); synchronous=FULL so a committed version survives a crash or power loss."""

    def __init__(self, path: Path, connections: int = 8):
        self.path = Path(path)
        self._pool = ConnectionPool(self.path, connections, _setup_connection)
        self._blob_lock = threading.Lock()  # one process owns the blob directory
        with self._pool.connection() as conn:
            self._migrate(conn)

    def blob_guard(self, exclusive: bool) -> contextlib.AbstractContextManager:
        return self._blob_lock

    # One process: nobody else changes the registry or runs its jobs.
    def subscribe(self, on_change, on_resync) -> None:
        pass

    def publish(self, change: RegistryChange) -> None:
        pass

    def watch_job_leases(self, on_lost) -> None:
        pass

    def open_connections(self) -> int:
        return self._pool.open_connections()

    def ping(self) -> None:
        """Raises (Unavailable) unless the database answers a query."""
        with self._pool.connection() as conn:
            conn.execute("SELECT COUNT(*) FROM version_counters").fetchone()

    def _migrate(self, conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            (current,) = conn.execute("PRAGMA user_version").fetchone()
            if current > SCHEMA_VERSION:
                raise FailedPrecondition(
                    f"registry {self.path} has schema version {current}; this hotlora reads up to "
                    f"{SCHEMA_VERSION} (upgrade hotlora)"
                )
            steps = {1: _SCHEMA, 2: _SCHEMA_V2}
            for version in range(current + 1, SCHEMA_VERSION + 1):
                for statement in steps[version].split(";"):
                    if statement.strip():
                        conn.execute(statement)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def insert_next_version(self, draft: AdapterRecord, quota: TenantQuota | None = None) -> AdapterRecord:
        with self._pool.connection() as conn:
            conn.execute("BEGIN IMMEDIATE")  # the write lock: no other commit between check and insert
            try:
                if quota is not None:
                    versions, used = _usage(conn, draft.tenant)
                    quota.check(draft.tenant, versions, used, draft.size_bytes)
                (version,) = conn.execute(
                    "INSERT INTO version_counters (tenant, name, last_version) VALUES (?, ?, 1) "
                    "ON CONFLICT (tenant, name) DO UPDATE SET last_version = last_version + 1 "
                    "RETURNING last_version",
                    (draft.tenant, draft.name),
                ).fetchone()
                created = time.time()
                conn.execute(
                    f"INSERT INTO adapters ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        draft.tenant, draft.name, version, draft.task, draft.rank, draft.alpha,
                        json.dumps(list(draft.target_modules)), json.dumps(list(draft.labels)),
                        draft.sha256, draft.size_bytes, created, draft.source, draft.description,
                    ),
                )  # fmt: skip
                conn.executemany(
                    "INSERT INTO adapter_files (tenant, name, version, filename, sha256) "
                    "VALUES (?, ?, ?, ?, ?)",
                    [(draft.tenant, draft.name, version, f, sha) for f, sha in sorted(draft.files.items())],
                )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            return _records(
                conn, "tenant = ? AND name = ? AND version = ?", (draft.tenant, draft.name, version)
            )[0]

    def get(self, tenant: str, name: str, version: int | None) -> AdapterRecord | None:
        if version is None:
            where = (
                "tenant = ? AND name = ? AND version = "
                "(SELECT MAX(version) FROM adapters WHERE tenant = ? AND name = ?)"
            )
            args: tuple = (tenant, name, tenant, name)
        else:
            where, args = "tenant = ? AND name = ? AND version = ?", (tenant, name, version)
        with self._pool.connection() as conn:
            found = _records(conn, where, args)
        return found[0] if found else None

    def versions(self, tenant: str, name: str) -> list[int]:
        with self._pool.connection() as conn:
            rows = conn.execute(
                "SELECT version FROM adapters WHERE tenant = ? AND name = ? ORDER BY version", (tenant, name)
            ).fetchall()
        return [v for (v,) in rows]

    def list(self, tenant: str, prefix: str = "", all_versions: bool = False) -> list[AdapterRecord]:
        # substr() instead of LIKE: '_' and '%' are legal in names and must not act as wildcards.
        where = "tenant = ? AND substr(name, 1, ?) = ?"
        if not all_versions:
            where += (
                " AND version = (SELECT MAX(version) FROM adapters AS b "
                "WHERE b.tenant = adapters.tenant AND b.name = adapters.name)"
            )
        with self._pool.connection() as conn:
            return _records(conn, where, (tenant, len(prefix), prefix))

    def delete(self, tenant: str, name: str, version: int | None) -> list[AdapterRecord]:
        with self._pool.connection() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                if version is None:
                    where, args = "tenant = ? AND name = ?", (tenant, name)
                else:
                    where, args = "tenant = ? AND name = ? AND version = ?", (tenant, name, version)
                removed = _records(conn, where, args)
                conn.execute(f"DELETE FROM adapters WHERE {where}", args)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        return removed

    def count(self) -> int:
        return int(self._one("SELECT COUNT(*) FROM adapters")[0])

    def usage(self, tenant: str) -> tuple[int, int]:
        with self._pool.connection() as conn:
            return _usage(conn, tenant)

    def referenced_blobs(self) -> set[str]:
        with self._pool.connection() as conn:
            rows = conn.execute(
                "SELECT sha256 FROM adapter_files UNION SELECT sha256 FROM finetune_job_files"
            ).fetchall()
        return {sha for (sha,) in rows}

    def _one(self, sql: str, args: tuple = ()):
        with self._pool.connection() as conn:
            return conn.execute(sql, args).fetchone()

    def _all(self, sql: str, args: tuple = ()) -> list:
        with self._pool.connection() as conn:
            return conn.execute(sql, args).fetchall()

    # ---- fine-tune jobs (JobStore) ----------------------------------------------------------------
    def save_job(self, job: JobRecord) -> None:
        # an upsert, not INSERT OR REPLACE: a replace deletes the row first, and its events with it
        updates = ", ".join(f"{c} = excluded.{c}" for c in _JOB_COLUMNS.split(", ")[1:])
        self._all(
            f"INSERT INTO finetune_jobs ({_JOB_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            f"ON CONFLICT (id) DO UPDATE SET {updates}",
            _job_row(job),
        )

    def get_job(self, tenant: str, job_id: str) -> JobRecord | None:
        row = self._one(
            f"SELECT {_JOB_COLUMNS} FROM finetune_jobs WHERE tenant = ? AND id = ?", (tenant, job_id)
        )
        return None if row is None else _job(row)

    def list_jobs(self, tenant: str) -> list[JobRecord]:
        rows = self._all(
            f"SELECT {_JOB_COLUMNS} FROM finetune_jobs WHERE tenant = ? ORDER BY created_at, id", (tenant,)
        )
        return [_job(r) for r in rows]

    def fail_unfinished_jobs(self, reason: str) -> int:
        """Jobs left QUEUED/RUNNING by a process that is gone become FAILED with `reason`."""
        with self._pool.connection() as conn:
            cur = conn.execute(
                "UPDATE finetune_jobs SET state = 'FAILED', error = ?, finished_at = ? "
                "WHERE state IN ('QUEUED', 'RUNNING')",
                (reason, time.time()),
            )
            return cur.rowcount

    def add_job_event(self, job_id: str, message: str, job: JobRecord) -> int:
        """Append one event (a snapshot of the job); returns its sequence number."""
        with self._pool.connection() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                (seq,) = conn.execute(
                    "SELECT COALESCE(MAX(seq), 0) + 1 FROM finetune_events WHERE job_id = ?", (job_id,)
                ).fetchone()
                conn.execute(
                    "INSERT INTO finetune_events (job_id, seq, at, message, job) VALUES (?, ?, ?, ?, ?)",
                    (job_id, seq, time.time(), message, json.dumps(_job_row(job))),
                )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        return seq

    def job_events(self, job_id: str, after: int = 0) -> list[tuple[int, str, JobRecord]]:
        rows = self._all(
            "SELECT seq, message, job FROM finetune_events WHERE job_id = ? AND seq > ? ORDER BY seq",
            (job_id, after),
        )
        return [(seq, msg, _job(tuple(json.loads(j)))) for seq, msg, j in rows]

    def count_jobs_by_state(self) -> dict[str, int]:
        return dict(self._all("SELECT state, COUNT(*) FROM finetune_jobs GROUP BY state"))

    def set_job_files(self, job_id: str, files: dict[str, str]) -> None:
        with self._pool.connection() as conn:
            conn.executemany(
                "INSERT OR REPLACE INTO finetune_job_files (job_id, filename, sha256) VALUES (?, ?, ?)",
                [(job_id, f, sha) for f, sha in sorted(files.items())],
            )

    def job_files(self, job_id: str) -> dict[str, str]:
        return dict(self._all("SELECT filename, sha256 FROM finetune_job_files WHERE job_id = ?", (job_id,)))

    def close(self) -> None:
        self._pool.close()


def _setup_connection(conn: sqlite3.Connection) -> None:
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")


def _usage(conn: sqlite3.Connection, tenant: str) -> tuple[int, int]:
    n, size = conn.execute(
        "SELECT COUNT(*), COALESCE(SUM(size_bytes), 0) FROM adapters WHERE tenant = ?", (tenant,)
    ).fetchone()
    return int(n), int(size)


def _records(conn: sqlite3.Connection, where: str, args: tuple) -> list[AdapterRecord]:
    rows = conn.execute(f"SELECT {_COLUMNS} FROM adapters WHERE {where} ORDER BY name, version", args)
    out = []
    for row in rows.fetchall():
        files = conn.execute(
            "SELECT filename, sha256 FROM adapter_files WHERE tenant = ? AND name = ? AND version = ?",
            row[:3],
        ).fetchall()
        out.append(_record(row, dict(files)))
    return out


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
    finished_at: float = 0.0
    promoted: bool = False


_JOB_COLUMNS = (
    "id, tenant, adapter, task, method, state, metrics, result_adapter, error, created_at, finished_at, "
    "promoted"
)


def _job_row(job: JobRecord) -> tuple:
    return (
        job.id,
        job.tenant,
        job.adapter,
        job.task,
        job.method,
        job.state,
        json.dumps(job.metrics),
        job.result_adapter,
        job.error,
        job.created_at,
        job.finished_at,
        int(job.promoted),
    )


def _job(row: tuple) -> JobRecord:
    (jid, tenant, adapter, task, method, state, metrics, result, error, created, finished, promoted) = row
    return JobRecord(
        jid,
        tenant,
        adapter,
        task,
        method,
        state,
        json.loads(metrics),
        result,
        error,
        created,
        finished,
        bool(promoted),
    )


def _record(row: tuple, files: dict[str, str]) -> AdapterRecord:
    (tenant, name, version, task, rank, alpha, targets, labels, sha, size, created, source, desc) = row
    return AdapterRecord(
        tenant=tenant,
        name=name,
        version=version,
        task=task,
        rank=rank,
        alpha=alpha,
        target_modules=tuple(json.loads(targets)),
        labels=tuple(json.loads(labels)),
        sha256=sha,
        size_bytes=size,
        created_at=datetime.fromtimestamp(created, UTC),
        source=source,
        description=desc,
        files=files,
    )
