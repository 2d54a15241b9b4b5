"""Adapter metadata (DESIGN.md §7: SQLite now, PostgreSQL for a fleet), behind `MetadataStore`.

Versions come from a per-(tenant, name) counter that outlives deletions, so `name@N` always means the same
bytes: a deleted version number is never handed out again.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from hotlora.adapters.errors import FailedPrecondition
from hotlora.adapters.names import format_ref

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


class MetadataStore(ABC):
    """Adapter records per tenant. Implementations are safe to call from many threads."""

    @abstractmethod
    def insert_next_version(self, draft: AdapterRecord) -> AdapterRecord:
        """In one transaction: version = the largest ever given to (tenant, name) + 1, then insert.
        `draft.version` and `draft.created_at` are ignored; the stored record is returned."""

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
    def referenced_blobs(self) -> set[str]:
        """Digests of every file of every live record (for garbage collection)."""

    @abstractmethod
    def close(self) -> None: ...


SCHEMA_VERSION = 1
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
_COLUMNS = (
    "tenant, name, version, task, rank, alpha, target_modules, labels, sha256, size_bytes, created_at, "
    "source, description"
)


class SqliteMetadataStore(MetadataStore):
    """One SQLite file in WAL mode; one connection per thread (all closed by `close`); synchronous=FULL
    so a committed version survives a crash or power loss."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._conns_lock = threading.Lock()
        self._migrate(self._conn())

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None, timeout=30.0, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            self._local.conn = conn
            with self._conns_lock:
                self._conns.append(conn)
        return conn

    def _migrate(self, conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            (current,) = conn.execute("PRAGMA user_version").fetchone()
            if current > SCHEMA_VERSION:
                raise FailedPrecondition(
                    f"registry {self.path} has schema version {current}; this hotlora reads up to "
                    f"{SCHEMA_VERSION} (upgrade hotlora)"
                )
            if current == 0:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def insert_next_version(self, draft: AdapterRecord) -> AdapterRecord:
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
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
                "INSERT INTO adapter_files (tenant, name, version, filename, sha256) VALUES (?, ?, ?, ?, ?)",
                [(draft.tenant, draft.name, version, f, sha) for f, sha in sorted(draft.files.items())],
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return self.get(draft.tenant, draft.name, version)  # type: ignore[return-value]

    def _records(self, where: str, args: tuple) -> list[AdapterRecord]:
        conn = self._conn()
        rows = conn.execute(f"SELECT {_COLUMNS} FROM adapters WHERE {where} ORDER BY name, version", args)
        out = []
        for row in rows.fetchall():
            files = conn.execute(
                "SELECT filename, sha256 FROM adapter_files WHERE tenant = ? AND name = ? AND version = ?",
                row[:3],
            ).fetchall()
            out.append(_record(row, dict(files)))
        return out

    def get(self, tenant: str, name: str, version: int | None) -> AdapterRecord | None:
        if version is None:
            where = (
                "tenant = ? AND name = ? AND version = "
                "(SELECT MAX(version) FROM adapters WHERE tenant = ? AND name = ?)"
            )
            found = self._records(where, (tenant, name, tenant, name))
        else:
            found = self._records("tenant = ? AND name = ? AND version = ?", (tenant, name, version))
        return found[0] if found else None

    def versions(self, tenant: str, name: str) -> list[int]:
        rows = self._conn().execute(
            "SELECT version FROM adapters WHERE tenant = ? AND name = ? ORDER BY version", (tenant, name)
        )
        return [v for (v,) in rows.fetchall()]

    def list(self, tenant: str, prefix: str = "", all_versions: bool = False) -> list[AdapterRecord]:
        # substr() instead of LIKE: '_' and '%' are legal in names and must not act as wildcards.
        where = "tenant = ? AND substr(name, 1, ?) = ?"
        if not all_versions:
            where += (
                " AND version = (SELECT MAX(version) FROM adapters AS b "
                "WHERE b.tenant = adapters.tenant AND b.name = adapters.name)"
            )
        return self._records(where, (tenant, len(prefix), prefix))

    def delete(self, tenant: str, name: str, version: int | None) -> list[AdapterRecord]:
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            if version is None:
                where, args = "tenant = ? AND name = ?", (tenant, name)
            else:
                where, args = "tenant = ? AND name = ? AND version = ?", (tenant, name, version)
            removed = self._records(where, args)
            conn.execute(f"DELETE FROM adapters WHERE {where}", args)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return removed

    def referenced_blobs(self) -> set[str]:
        rows = self._conn().execute("SELECT DISTINCT sha256 FROM adapter_files")
        return {sha for (sha,) in rows.fetchall()}

    def close(self) -> None:
        with self._conns_lock:
            for conn in self._conns:
                conn.close()
            self._conns.clear()
        self._local = threading.local()


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
