"""The row format of adapter records and fine-tune jobs in the SQL stores (SQLite and PostgreSQL): column
lists and the conversions between rows and records. Times are stored as unix seconds."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from hotlora.adapters.store.metadata_store import AdapterRecord, JobRecord

COLUMNS = (
    "tenant, name, version, task, rank, alpha, target_modules, labels, sha256, size_bytes, created_at, "
    "source, description"
)


JOB_COLUMNS = (
    "id, tenant, adapter, task, method, state, metrics, result_adapter, error, created_at, finished_at, "
    "promoted"
)


def job_row(job: JobRecord) -> tuple:
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


def job_from_row(row: tuple) -> JobRecord:
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


def record_from_row(row: tuple, files: dict[str, str]) -> AdapterRecord:
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
