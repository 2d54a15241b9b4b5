"""The PostgreSQL registry's schema, as numbered migrations applied at start-up.

Every replica runs `migrate` when it opens the store; an advisory lock makes the first one apply the
missing steps and the others wait and find nothing left to do. A database newer than this code is
refused (upgrade hotlora) instead of being half-understood."""

from __future__ import annotations

from hotlora.adapters.errors import FailedPrecondition

MIGRATION_LOCK = 0x686F746C6F7261  # "hotlora": pg_advisory_xact_lock key of the migrations
BLOB_LOCK = 0x686F746C6F7262  # shared by commits, exclusive for blob removal (see MetadataStore.blob_guard)

MIGRATIONS: dict[int, str] = {
    1: """
CREATE TABLE version_counters (
    tenant TEXT NOT NULL, name TEXT NOT NULL, last_version INTEGER NOT NULL,
    PRIMARY KEY (tenant, name));
CREATE TABLE adapters (
    tenant TEXT NOT NULL, name TEXT NOT NULL, version INTEGER NOT NULL,
    task TEXT NOT NULL, rank INTEGER NOT NULL, alpha DOUBLE PRECISION NOT NULL,
    target_modules TEXT NOT NULL, labels TEXT NOT NULL,
    sha256 TEXT NOT NULL, size_bytes BIGINT NOT NULL, created_at DOUBLE PRECISION NOT NULL,
    source TEXT NOT NULL, description TEXT NOT NULL,
    PRIMARY KEY (tenant, name, version));
CREATE TABLE adapter_files (
    tenant TEXT NOT NULL, name TEXT NOT NULL, version INTEGER NOT NULL,
    filename TEXT NOT NULL, sha256 TEXT NOT NULL,
    PRIMARY KEY (tenant, name, version, filename),
    FOREIGN KEY (tenant, name, version) REFERENCES adapters ON DELETE CASCADE);
CREATE INDEX adapter_files_by_sha256 ON adapter_files (sha256);
""",
    2: """
CREATE TABLE finetune_jobs (
    id TEXT PRIMARY KEY, tenant TEXT NOT NULL, adapter TEXT NOT NULL, task TEXT NOT NULL,
    method TEXT NOT NULL, state TEXT NOT NULL, metrics TEXT NOT NULL, result_adapter TEXT NOT NULL,
    error TEXT NOT NULL, created_at DOUBLE PRECISION NOT NULL, finished_at DOUBLE PRECISION NOT NULL,
    promoted BOOLEAN NOT NULL);
CREATE INDEX finetune_jobs_by_tenant ON finetune_jobs (tenant, created_at);
CREATE TABLE finetune_events (
    job_id TEXT NOT NULL REFERENCES finetune_jobs ON DELETE CASCADE, seq INTEGER NOT NULL,
    at DOUBLE PRECISION NOT NULL, message TEXT NOT NULL, job TEXT NOT NULL,
    PRIMARY KEY (job_id, seq));
CREATE TABLE finetune_job_files (
    job_id TEXT NOT NULL REFERENCES finetune_jobs ON DELETE CASCADE, filename TEXT NOT NULL,
    sha256 TEXT NOT NULL, PRIMARY KEY (job_id, filename));
""",
    # 3: the replica running a job holds a lease on it, renewed while it lives (database clock).
    3: """
ALTER TABLE finetune_jobs ADD COLUMN owner TEXT NOT NULL DEFAULT '';
ALTER TABLE finetune_jobs ADD COLUMN lease_until DOUBLE PRECISION NOT NULL DEFAULT 0;
CREATE INDEX finetune_jobs_active ON finetune_jobs (state, lease_until);
""",
}
SCHEMA_VERSION = max(MIGRATIONS)


def migrate(conn, where: str) -> int:
    """Apply the missing migrations in one transaction on `conn` (psycopg, not autocommit); returns the
    version found before."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        conn.execute("CREATE TABLE IF NOT EXISTS hotlora_schema (version INTEGER NOT NULL)")
        row = conn.execute("SELECT version FROM hotlora_schema").fetchone()
        current = 0 if row is None else int(row[0])
        if current > SCHEMA_VERSION:
            raise FailedPrecondition(
                f"registry {where} has schema version {current}; this hotlora reads up to "
                f"{SCHEMA_VERSION} (upgrade hotlora)"
            )
        for version in range(current + 1, SCHEMA_VERSION + 1):
            for statement in MIGRATIONS[version].split(";"):
                if statement.strip():
                    conn.execute(statement)
        if row is None:
            conn.execute("INSERT INTO hotlora_schema (version) VALUES (%s)", (SCHEMA_VERSION,))
        else:
            conn.execute("UPDATE hotlora_schema SET version = %s", (SCHEMA_VERSION,))
    return current
