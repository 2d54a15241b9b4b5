"""What only a registry shared by several processes must get right, on real PostgreSQL and S3 servers:
collectors racing commits, quotas across replicas, change notification, job leases, schema versions,
multipart blobs, and refusing half a fleet configuration."""

from __future__ import annotations

import threading
import time

import pytest

from hotlora.adapters.errors import FailedPrecondition, ResourceExhausted
from hotlora.adapters.peft.format import AdapterLimits, parse_peft_adapter
from hotlora.adapters.store.metadata_store import JobRecord, TenantQuota
from hotlora.adapters.store.s3_blob_store import S3BlobStore, S3Options
from hotlora.adapters.store.shared_stores import StoreConfig, open_registry


@pytest.fixture
def replica(shared_stores, tmp_path):
    """`replica(name)` opens one more process's view of the same shared stores."""
    opened = []

    def open_one(name: str, lease_s: float = 30.0):
        reg = open_registry(
            StoreConfig(
                tmp_path / name,
                registry=shared_stores.registry,
                blob_store=shared_stores.blob_store,
                s3=S3Options(endpoint_url=shared_stores.endpoint, multipart_bytes=5 << 20),
                replica_id=name,
                job_lease_s=lease_s,
            )
        )
        opened.append(reg)
        return reg

    yield open_one
    for reg in opened:
        reg.close()


@pytest.fixture
def upload(causal_files, base_info):
    return causal_files, parse_peft_adapter(causal_files, base_info, AdapterLimits())


def _variant(files, i):
    return dict(files, **{"README.md": f"variant {i}".encode()})


def test_collectors_on_other_replicas_never_remove_a_committed_blob(replica, upload):
    files, weights = upload
    a, b = replica("a"), replica("b")
    stop, errors = threading.Event(), []

    def collect():
        while not stop.is_set():
            try:
                b.gc()
            except Exception as exc:  # surfaced below
                errors.append(exc)

    collector = threading.Thread(target=collect)
    collector.start()
    try:
        # each commit brings a new blob, which looks orphaned from its put until its row commits
        made = [a.commit("t", "bot", _variant(files, i), weights) for i in range(25)]
    finally:
        stop.set()
        collector.join()
    assert errors == []
    for record in made:
        assert b.read_files(b.resolve("t", record.ref)) == _variant(files, made.index(record))


def test_a_tenant_quota_holds_across_replicas(replica, upload):
    files, weights = upload
    regs = [replica(f"r{i}") for i in range(3)]
    quota = TenantQuota(max_versions=4, max_bytes=1 << 40)
    results = []

    def work(reg, i):
        for j in range(3):
            try:
                results.append(reg.commit("t", f"n{i}", _variant(files, j), weights, quota=quota).ref)
            except ResourceExhausted:
                results.append(None)

    threads = [threading.Thread(target=work, args=(r, i)) for i, r in enumerate(regs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(r is not None for r in results) == 4
    assert len(regs[0].list("t", all_versions=True)) == 4


def test_other_replicas_hear_of_deletes_within_a_second(replica, upload):
    files, weights = upload
    a, b = replica("a"), replica("b")
    heard, resyncs = [], []
    b.metadata.subscribe(lambda change: heard.append((change, time.monotonic())), lambda: resyncs.append(1))
    a.commit("t", "bot", files, weights)
    a.commit("t", "bot", _variant(files, 1), weights)
    a.delete("t", "bot")
    deleted = time.monotonic()
    while not heard and time.monotonic() - deleted < 1.0:
        time.sleep(0.01)
    assert heard, "no notification within 1 s of the delete"
    change, at = heard[0]
    assert (change.op, change.tenant, change.name, change.versions, change.origin) == (
        "delete", "t", "bot", (1, 2), "a",
    )  # fmt: skip
    assert at - deleted < 1.0 and resyncs == []


def test_an_expired_lease_fails_the_job_exactly_once_and_its_owner_learns_it(replica):
    a, b, c = replica("a", lease_s=1.0), replica("b", lease_s=1.0), replica("c", lease_s=1.0)
    job = JobRecord("j1", "t", "bot", "SEQ_CLS", "HEAD_ONLY", "RUNNING", created_at=time.time())
    a.metadata.save_job(job)
    assert b.metadata.expire_job_leases() == []  # a's lease still runs
    time.sleep(1.2)  # a stops renewing (as if it died)
    swept = []
    sweepers = [
        threading.Thread(target=lambda m=m: swept.extend(m.expire_job_leases()))
        for m in (b.metadata, c.metadata)
    ]
    for t in sweepers:
        t.start()
    for t in sweepers:
        t.join()
    assert [j.id for j in swept] == ["j1"]  # failed by one sweeper, not both
    stored = b.metadata.get_job("t", "j1")
    assert stored.state == "FAILED" and "replica a stopped renewing its lease" in stored.error
    assert a.metadata.renew_job_leases() == {"j1"}  # a, back, learns it lost the job
    a.metadata.save_job(JobRecord(**{**job.__dict__, "state": "SUCCEEDED"}))  # a late write changes nothing
    assert b.metadata.get_job("t", "j1").state == "FAILED"


def test_a_database_of_a_newer_schema_is_refused(replica, shared_stores, tmp_path):
    a = replica("a")
    with a.metadata._conn() as conn:
        conn.execute("UPDATE hotlora_schema SET version = 99")
    with pytest.raises(FailedPrecondition, match="schema version 99.*upgrade hotlora"):
        replica("b")


def test_replicas_starting_together_migrate_once(shared_stores, replica):
    regs, errors = [], []

    def start(i):
        try:
            regs.append(replica(f"s{i}"))
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(regs) == 3


def test_a_large_blob_goes_up_in_parts_and_reads_back_verified(replica):
    reg = replica("a")
    assert isinstance(reg.blobs, S3BlobStore)
    data = bytes(range(256)) * (6 * 4096)  # 6 MiB: two parts of 5 MiB
    sha = reg.blobs.put(data)
    assert reg.blobs.get(sha) == data
    assert b"".join(reg.blobs.iter_chunks(sha, 1 << 20)) == data
    head = reg.blobs.client.head_object(Bucket=reg.blobs.location.bucket, Key=reg.blobs._key(sha))
    assert head["ETag"].strip('"').endswith("-2")  # a multipart upload's ETag counts its parts


def test_half_a_fleet_configuration_is_refused(tmp_path):
    with pytest.raises(ValueError, match="go together"):
        StoreConfig(tmp_path, registry="postgresql://db/x")
    with pytest.raises(ValueError, match="s3://bucket/prefix"):
        StoreConfig(tmp_path, registry="postgresql://db/x", blob_store="/mnt/blobs")
