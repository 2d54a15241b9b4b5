"""Adapter metadata and fine-tune jobs in PostgreSQL, shared by a fleet of replicas (docs/design.md §7).

Same contract as the SQLite store: a version is visible only once its row commits, version numbers come
from a counter that outlives deletions, a tenant's quota is checked in the committing transaction (under
a per-tenant advisory lock, so racing uploads on different replicas cannot all pass it). Besides:
- every delete NOTIFYs the other replicas in its own transaction (delivered when it commits), so they
  drop the cached weights at once; `publish` sends unloads the same way;
- a job is held by the replica that runs it with a lease on the database clock; a replica that stops
  renewing it (dead, cut off) has its jobs failed with that reason by whichever replica sweeps first
  (`FOR UPDATE SKIP LOCKED`: several sweepers never fail the same job twice)."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterator

from hotlora.adapters.caller import Caller, bounded, current_caller
from hotlora.adapters.errors import Unavailable
from hotlora.adapters.store.breaker import Breaker
from hotlora.adapters.store.metadata_rows import COLUMNS, JOB_COLUMNS, job_from_row, job_row, record_from_row
from hotlora.adapters.store.metadata_store import AdapterRecord, JobRecord, MetadataStore, TenantQuota
from hotlora.adapters.store.postgres_pool import PoolBusy, PostgresPool
from hotlora.adapters.store.postgres_schema import BLOB_LOCK, migrate
from hotlora.adapters.store.postgres_watchdog import ConnectionWatchdog
from hotlora.adapters.store.postgres_watchers import ChangeListener, LeaseKeeper
from hotlora.adapters.store.registry_changes import RegistryChange

log = logging.getLogger("hotlora.registry")

CHANNEL = "hotlora_registry"
ACTIVE = ("QUEUED", "RUNNING")
TERMINAL = ("SUCCEEDED", "FAILED", "CANCELLED", "REJECTED")
_NOW = "extract(epoch from clock_timestamp())"  # the database's clock: replicas' clocks may differ


class PostgresMetadataStore(MetadataStore):
    def __init__(
        self,
        url: str,
        replica_id: str,
        connections: int = 8,
        job_lease_s: float = 30.0,
        timeout_s: float = 5.0,
    ):
        import psycopg  # noqa: F401 (fail here, with the install hint below, not mid-request)

        self.url = url
        self.replica_id = replica_id
        self.job_lease_s = job_lease_s
        self.timeout_s = timeout_s
        """The longest one call (waiting for a connection and its statements) may take; less when the
        caller's deadline comes first."""
        self._where = _redact(url)
        self._breaker = Breaker(f"the adapter registry {self._where}", probe=self._probe)
        self._watchdog = ConnectionWatchdog()
        self._pool = PostgresPool(url, connection_bounds(timeout_s), connections)
        self._claimed: set[str] = set()  # active jobs this replica saved (and so holds a lease on)
        self._listener: ChangeListener | None = None
        self._keeper: LeaseKeeper | None = None
        try:
            migration_s = max(60.0, timeout_s)  # another replica may be migrating: wait for it
            with self._conn(timeout_s=migration_s) as conn:
                for setting in ("statement_timeout", "lock_timeout"):  # this transaction only
                    conn.execute(f"SET LOCAL {setting} = {int(migration_s * 1000)}")
                before = migrate(conn, self._where)
        except Unavailable as exc:
            self.close()
            raise Unavailable(f"cannot reach the registry database {self._where}: {exc.message}") from exc
        log.info("registry %s: schema ready (was version %d)", self._where, before)

    @contextlib.contextmanager
    def _conn(self, timeout_s: float | None = None, probe: bool = False) -> Iterator:
        """A pooled connection for one call: committed when the block ends, rolled back if it raises;
        bounded by `timeout_s` (default: the store's) and by the caller's deadline and cancellation.
        While the database is known down it raises Unavailable at once (unless `probe`)."""
        caller = current_caller()
        budget = bounded(timeout_s or self.timeout_s)
        if not probe:
            self._breaker.admit()
        deadline = time.monotonic() + budget
        conn = self._borrow(deadline, budget)
        try:
            with self._bounded(conn, deadline, caller):
                yield conn
                conn.commit()
        except BaseException:
            self._roll_back(conn)
            raise
        finally:
            self._pool.give_back(conn)

    def _borrow(self, deadline: float, budget: float):
        import psycopg

        try:
            return self._pool.borrow(deadline)
        except PoolBusy as exc:  # the database may be fine: this replica is saturated
            raise Unavailable(
                f"the adapter registry {self._where} is unavailable ({exc} for {budget:.3g} s); retry later"
            ) from exc
        except psycopg.OperationalError as exc:  # a connection could not be made
            why = f"cannot connect: {str(exc).strip().splitlines()[0]}"
            if not self._breaker.down:
                log.warning("registry database %s: %s", self._where, why)
            self._breaker.failed(why)
            raise Unavailable(
                f"the adapter registry {self._where} is unavailable ({why}); retry later"
            ) from exc

    def _roll_back(self, conn) -> None:
        """After a failed block: end its transaction (bounded), or drop the connection."""
        from psycopg.pq import TransactionStatus

        if conn.closed or conn.broken or conn.info.transaction_status == TransactionStatus.IDLE:
            return
        try:
            with self._bounded(conn, time.monotonic() + self.timeout_s, None):
                conn.rollback()
        except Exception:
            conn.close()  # not given back to the pool

    @contextlib.contextmanager
    def _bounded(self, conn, deadline: float, caller: Caller | None) -> Iterator[None]:
        """Statements on `conn` until `deadline` (else the watchdog cuts it); psycopg's failures become
        Unavailable, or the caller's DeadlineExceeded / Cancelled when it went away first."""
        import psycopg

        with self._watchdog.watch(conn, max(0.0, deadline - time.monotonic()), caller) as watch:
            try:
                yield
            except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                if watch.cut == "caller" and caller is not None:
                    gone = caller.gone()
                    if gone is not None:
                        raise type(gone)(f"{gone.message}; the registry call was abandoned") from exc
                lost = watch.cut == "timeout" or conn.broken or conn.closed
                why = f"no answer within {self.timeout_s:g} s" if watch.cut == "timeout" else str(exc)
                if not self._breaker.down:  # once per outage, not once per call
                    log.warning("registry database %s: %s", self._where, why)
                if lost:
                    self._breaker.failed(why)
                raise Unavailable(
                    f"the adapter registry {self._where} is unavailable ({why}); retry later"
                ) from exc
        self._breaker.succeeded()

    def ping(self) -> None:
        with self._conn() as conn:
            conn.execute("SELECT 1").fetchone()

    def _probe(self) -> None:
        with self._conn(probe=True) as conn:
            conn.execute("SELECT 1").fetchone()

    @contextlib.contextmanager
    def blob_guard(self, exclusive: bool) -> Iterator[None]:
        # A session lock on a borrowed connection: released if this process dies (its session ends). The
        # statements are bounded; the time between them (the caller's blob checks) is not theirs to bound.
        caller = current_caller()
        budget = bounded(self.timeout_s)
        self._breaker.admit()
        deadline = time.monotonic() + budget
        conn = self._borrow(deadline, budget)
        try:
            conn.autocommit = True
            with self._bounded(conn, deadline, caller):
                if exclusive:
                    conn.execute("SELECT pg_advisory_lock(%s)", (BLOB_LOCK,))
                else:
                    conn.execute("SELECT pg_advisory_lock_shared(%s)", (BLOB_LOCK,))
            try:
                yield
            finally:
                fn = "pg_advisory_unlock" if exclusive else "pg_advisory_unlock_shared"
                with self._bounded(conn, time.monotonic() + self.timeout_s, None):
                    conn.execute(f"SELECT {fn}(%s)", (BLOB_LOCK,))
        finally:
            with contextlib.suppress(Exception):  # a cut connection: the pool closes it anyway
                conn.autocommit = False
            self._pool.give_back(conn)

    # ---- adapters -----------------------------------------------------------------------------------
    def insert_next_version(
        self, draft: AdapterRecord, quota: TenantQuota | None = None, caller: Caller | None = None
    ) -> AdapterRecord:
        with self._conn() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", ("tenant:" + draft.tenant,))
            if quota is not None:
                versions, used = _usage(conn, draft.tenant)
                quota.check(draft.tenant, versions, used, draft.size_bytes)
            (version,) = conn.execute(
                "INSERT INTO version_counters (tenant, name, last_version) VALUES (%s, %s, 1) "
                "ON CONFLICT (tenant, name) DO UPDATE SET last_version = version_counters.last_version + 1 "
                "RETURNING last_version",
                (draft.tenant, draft.name),
            ).fetchone()
            conn.execute(
                f"INSERT INTO adapters ({COLUMNS}) VALUES "
                "(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                (
                    draft.tenant, draft.name, version, draft.task, draft.rank, draft.alpha,
                    json.dumps(list(draft.target_modules)), json.dumps(list(draft.labels)),
                    draft.sha256, draft.size_bytes, time.time(), draft.source, draft.description,
                ),
            )  # fmt: skip
            with conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO adapter_files (tenant, name, version, filename, sha256) "
                    "VALUES (%s, %s, %s, %s, %s)",
                    [(draft.tenant, draft.name, version, f, sha) for f, sha in sorted(draft.files.items())],
                )
            stored = _records(
                conn, "tenant = %s AND name = %s AND version = %s", (draft.tenant, draft.name, version)
            )[0]
            if caller is not None:  # last, inside the transaction: a caller told it failed gets nothing
                caller.check(f"committing {stored.ref}")
            return stored

    def get(self, tenant: str, name: str, version: int | None) -> AdapterRecord | None:
        if version is None:
            where = (
                "tenant = %s AND name = %s AND version = "
                "(SELECT MAX(version) FROM adapters WHERE tenant = %s AND name = %s)"
            )
            args: tuple = (tenant, name, tenant, name)
        else:
            where, args = "tenant = %s AND name = %s AND version = %s", (tenant, name, version)
        with self._conn() as conn:
            found = _records(conn, where, args)
        return found[0] if found else None

    def versions(self, tenant: str, name: str) -> list[int]:
        rows = self._all(
            "SELECT version FROM adapters WHERE tenant = %s AND name = %s ORDER BY version", (tenant, name)
        )
        return [v for (v,) in rows]

    def list(self, tenant: str, prefix: str = "", all_versions: bool = False) -> list[AdapterRecord]:
        where = "tenant = %s AND substr(name, 1, %s) = %s"  # no LIKE: '_' is legal in names
        if not all_versions:
            where += (
                " AND version = (SELECT MAX(version) FROM adapters AS b "
                "WHERE b.tenant = adapters.tenant AND b.name = adapters.name)"
            )
        with self._conn() as conn:
            return _records(conn, where, (tenant, len(prefix), prefix))

    def delete(self, tenant: str, name: str, version: int | None) -> list[AdapterRecord]:
        if version is None:
            where, args = "tenant = %s AND name = %s", (tenant, name)
        else:
            where, args = "tenant = %s AND name = %s AND version = %s", (tenant, name, version)
        with self._conn() as conn, conn.transaction():
            # the counter row serialises this delete against a commit of the same name
            conn.execute(
                "SELECT 1 FROM version_counters WHERE tenant = %s AND name = %s FOR UPDATE", (tenant, name)
            )
            removed = _records(conn, where, args)
            conn.execute(f"DELETE FROM adapters WHERE {where}", args)
            if removed:
                change = RegistryChange(
                    "delete", tenant, name, tuple(r.version for r in removed), self.replica_id
                )
                conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, change.encode()))
        return removed

    def count(self) -> int:
        return int(self._all("SELECT COUNT(*) FROM adapters")[0][0])

    def usage(self, tenant: str) -> tuple[int, int]:
        with self._conn() as conn:
            return _usage(conn, tenant)

    def referenced_blobs(self) -> set[str]:
        rows = self._all("SELECT sha256 FROM adapter_files UNION SELECT sha256 FROM finetune_job_files")
        return {sha for (sha,) in rows}

    # ---- change notification ------------------------------------------------------------------------
    def publish(self, change: RegistryChange) -> None:
        with self._conn() as conn:
            conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, change.encode()))

    def subscribe(self, on_change: Callable[[RegistryChange], None], on_resync: Callable[[], None]) -> None:
        if self._listener is not None:
            raise RuntimeError("the registry already has a subscriber")
        self._listener = ChangeListener(self.url, CHANNEL, on_change, on_resync, self._where)
        self._listener.start()

    # ---- fine-tune jobs -----------------------------------------------------------------------------
    def save_job(self, job: JobRecord) -> None:
        # Claims (or renews) the lease when active; never rewrites a job another replica ended.
        updates = ", ".join(
            f"{c} = excluded.{c}" for c in (*JOB_COLUMNS.split(", ")[1:], "owner", "lease_until")
        )
        active = job.state in ACTIVE
        self._all(
            f"INSERT INTO finetune_jobs ({JOB_COLUMNS}, owner, lease_until) VALUES "
            f"(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, {_NOW} + %s) "
            f"ON CONFLICT (id) DO UPDATE SET {updates} WHERE finetune_jobs.state IN ('QUEUED', 'RUNNING')",
            (*_pg_job_row(job), self.replica_id, self.job_lease_s if active else 0.0),
            fetch=False,
        )
        if active:
            self._claimed.add(job.id)
        else:
            self._claimed.discard(job.id)

    def get_job(self, tenant: str, job_id: str) -> JobRecord | None:
        rows = self._all(
            f"SELECT {JOB_COLUMNS} FROM finetune_jobs WHERE tenant = %s AND id = %s", (tenant, job_id)
        )
        return job_from_row(rows[0]) if rows else None

    def list_jobs(self, tenant: str) -> list[JobRecord]:
        rows = self._all(
            f"SELECT {JOB_COLUMNS} FROM finetune_jobs WHERE tenant = %s ORDER BY created_at, id", (tenant,)
        )
        return [job_from_row(r) for r in rows]

    def fail_unfinished_jobs(self, reason: str) -> int:
        """Other replicas' jobs are theirs while their leases run: only expired ones are failed."""
        return len(self.expire_job_leases())

    def expire_job_leases(self) -> list[JobRecord]:
        """Fail every active job whose lease ran out; returns them (each failed by exactly one sweeper)."""
        with self._conn() as conn, conn.transaction():
            rows = conn.execute(
                f"SELECT id, owner FROM finetune_jobs WHERE state IN ('QUEUED', 'RUNNING') "
                f"AND lease_until < {_NOW} FOR UPDATE SKIP LOCKED"
            ).fetchall()
            failed = []
            for job_id, owner in rows:
                reason = (
                    f"replica {owner or '?'} stopped renewing its lease on the job (it died or lost the "
                    "registry); submit the job again"
                )
                (row,) = conn.execute(
                    "UPDATE finetune_jobs SET state = 'FAILED', error = %s, finished_at = %s, "
                    f"lease_until = 0 WHERE id = %s RETURNING {JOB_COLUMNS}",
                    (reason, time.time(), job_id),
                ).fetchall()
                job = job_from_row(row)
                _insert_event(conn, job_id, reason, job)
                failed.append(job)
        for job in failed:
            log.warning("fine-tune job %s FAILED: %s", job.id, job.error)
        return failed

    def renew_job_leases(self) -> set[str]:
        """Extend this replica's leases; returns the claimed jobs it no longer holds (ended elsewhere)."""
        # Only jobs claimed before the UPDATE starts: their rows committed before it, so it sees them.
        claimed = set(self._claimed)
        rows = self._all(
            f"UPDATE finetune_jobs SET lease_until = {_NOW} + %s "
            "WHERE owner = %s AND state IN ('QUEUED', 'RUNNING') RETURNING id",
            (self.job_lease_s, self.replica_id),
        )
        lost = claimed - {r[0] for r in rows}
        self._claimed -= lost
        return lost

    def watch_job_leases(self, on_lost: Callable[[set[str]], None]) -> None:
        if self._keeper is not None:
            raise RuntimeError("job leases are already watched")
        self._keeper = LeaseKeeper(self, on_lost, self.job_lease_s / 3)
        self._keeper.start()

    def add_job_event(self, job_id: str, message: str, job: JobRecord) -> int:
        with self._conn() as conn, conn.transaction():
            row = conn.execute(
                "SELECT state FROM finetune_jobs WHERE id = %s FOR UPDATE", (job_id,)
            ).fetchone()
            if row is not None and row[0] in TERMINAL and row[0] != job.state:
                return 0  # ended elsewhere (cancel, expired lease): a late event would contradict it
            return _insert_event(conn, job_id, message, job)

    def job_events(self, job_id: str, after: int = 0) -> list[tuple[int, str, JobRecord]]:
        rows = self._all(
            "SELECT seq, message, job FROM finetune_events WHERE job_id = %s AND seq > %s ORDER BY seq",
            (job_id, after),
        )
        return [(seq, msg, job_from_row(tuple(json.loads(j)))) for seq, msg, j in rows]

    def count_jobs_by_state(self) -> dict[str, int]:
        return dict(self._all("SELECT state, COUNT(*) FROM finetune_jobs GROUP BY state"))

    def set_job_files(self, job_id: str, files: dict[str, str]) -> None:
        with self._conn() as conn, conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO finetune_job_files (job_id, filename, sha256) VALUES (%s, %s, %s) "
                "ON CONFLICT (job_id, filename) DO UPDATE SET sha256 = excluded.sha256",
                [(job_id, f, sha) for f, sha in sorted(files.items())],
            )

    def job_files(self, job_id: str) -> dict[str, str]:
        return dict(self._all("SELECT filename, sha256 FROM finetune_job_files WHERE job_id = %s", (job_id,)))

    def close(self) -> None:
        for watcher in (self._listener, self._keeper):
            if watcher is not None:
                watcher.stop()
        self._breaker.close()
        self._pool.close()
        self._watchdog.close()

    def _all(self, sql: str, args: tuple = (), fetch: bool = True) -> list:
        with self._conn() as conn:
            cur = conn.execute(sql, args)
            return cur.fetchall() if fetch else []


def _pg_job_row(job: JobRecord) -> tuple:
    row = list(job_row(job))
    row[-1] = bool(row[-1])  # promoted: BOOLEAN here, INTEGER in SQLite
    return tuple(row)


def _insert_event(conn, job_id: str, message: str, job: JobRecord) -> int:
    (seq,) = conn.execute(
        "SELECT COALESCE(MAX(seq), 0) + 1 FROM finetune_events WHERE job_id = %s", (job_id,)
    ).fetchone()
    conn.execute(
        "INSERT INTO finetune_events (job_id, seq, at, message, job) VALUES (%s, %s, %s, %s, %s)",
        (job_id, seq, time.time(), message, json.dumps(job_row(job))),
    )
    return seq


def _usage(conn, tenant: str) -> tuple[int, int]:
    n, size = conn.execute(
        "SELECT COUNT(*), COALESCE(SUM(size_bytes), 0) FROM adapters WHERE tenant = %s", (tenant,)
    ).fetchone()
    return int(n), int(size)


def _records(conn, where: str, args: tuple) -> list[AdapterRecord]:
    rows = conn.execute(
        f"SELECT {COLUMNS} FROM adapters WHERE {where} ORDER BY name, version", args
    ).fetchall()
    out = []
    for row in rows:
        files = conn.execute(
            "SELECT filename, sha256 FROM adapter_files WHERE tenant = %s AND name = %s AND version = %s",
            row[:3],
        ).fetchall()
        out.append(record_from_row(row, dict(files)))
    return out


def connection_bounds(timeout_s: float) -> dict:
    """libpq settings that bound what the server and the network can bound: connecting, a statement or a
    lock wait on a live server, unanswered sends and a silent peer (the watchdog does the rest)."""
    ms = int(timeout_s * 1000)
    return {
        "connect_timeout": max(2, math.ceil(timeout_s)),
        "options": (
            f"-c statement_timeout={ms} -c lock_timeout={ms} -c idle_in_transaction_session_timeout={4 * ms}"
        ),
        "keepalives": 1,
        "keepalives_idle": max(1, math.ceil(timeout_s)),
        "keepalives_interval": 1,
        "keepalives_count": 3,
        "tcp_user_timeout": ms,
    }


def _redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))
