"""Adapter metadata and fine-tune jobs in one SQLite file: the `MetadataStore` of a single process."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from pathlib import Path

from hotlora.adapters.caller import Caller
from hotlora.adapters.errors import FailedPrecondition
from hotlora.adapters.store.metadata_rows import COLUMNS, JOB_COLUMNS, job_from_row, job_row, record_from_row
from hotlora.adapters.store.metadata_store import AdapterRecord, JobRecord, MetadataStore, TenantQuota
from hotlora.adapters.store.registry_changes import RegistryChange
from hotlora.adapters.store.sqlite_pool import ConnectionPool

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

    def insert_next_version(
        self, draft: AdapterRecord, quota: TenantQuota | None = None, caller: Caller | None = None
    ) -> AdapterRecord:
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
                    f"INSERT INTO adapters ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
                if caller is not None:  # last, inside the transaction: a caller told it failed gets nothing
                    caller.check(f"committing {draft.name}@{version}")
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
        updates = ", ".join(f"{c} = excluded.{c}" for c in JOB_COLUMNS.split(", ")[1:])
        self._all(
            f"INSERT INTO finetune_jobs ({JOB_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            f"ON CONFLICT (id) DO UPDATE SET {updates}",
            job_row(job),
        )

    def get_job(self, tenant: str, job_id: str) -> JobRecord | None:
        row = self._one(
            f"SELECT {JOB_COLUMNS} FROM finetune_jobs WHERE tenant = ? AND id = ?", (tenant, job_id)
        )
        return None if row is None else job_from_row(row)

    def list_jobs(self, tenant: str) -> list[JobRecord]:
        rows = self._all(
            f"SELECT {JOB_COLUMNS} FROM finetune_jobs WHERE tenant = ? ORDER BY created_at, id", (tenant,)
        )
        return [job_from_row(r) for r in rows]

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
                    (job_id, seq, time.time(), message, json.dumps(job_row(job))),
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
        return [(seq, msg, job_from_row(tuple(json.loads(j)))) for seq, msg, j in rows]

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
    rows = conn.execute(f"SELECT {COLUMNS} FROM adapters WHERE {where} ORDER BY name, version", args)
    out = []
    for row in rows.fetchall():
        files = conn.execute(
            "SELECT filename, sha256 FROM adapter_files WHERE tenant = ? AND name = ? AND version = ?",
            row[:3],
        ).fetchall()
        out.append(record_from_row(row, dict(files)))
    return out
