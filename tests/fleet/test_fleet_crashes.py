"""SIGKILL a replica of a fleet (one PostgreSQL + S3) during uploads and during a fine-tune: the other
replica never sees a partial version, garbage collection leaves no orphan blob, and no job stays RUNNING
past its lease."""

from __future__ import annotations

import random
import threading
import time

import grpc
import pytest

from hotlora.adapters.store.s3_blob_store import S3Options
from hotlora.adapters.store.shared_stores import StoreConfig, open_registry
from hotlora.v1 import common_pb2, training_pb2
from tests.fleet.replicas import Replica
from tests.fleet_stores import SharedStores
from tests.server.adapter_utils import make_peft_adapter, upload_chunks
from tests.server.training_utils import long_lm_job, wait_state

LEASE_S = 2.0


@pytest.fixture
def stores(postgres, s3) -> SharedStores:
    return SharedStores(postgres.new_database(), f"s3://{s3.new_bucket()}/fleet", s3.endpoint)


def _open(stores: SharedStores, tmp_path):
    """The registry as a third process sees it (opening it collects orphaned blobs)."""
    return open_registry(
        StoreConfig(
            tmp_path / "inspect",
            registry=stores.registry,
            blob_store=stores.blob_store,
            s3=S3Options(endpoint_url=stores.endpoint),
            replica_id="inspector",
        )
    )


@pytest.mark.slow
def test_sigkill_during_uploads_leaves_no_partial_version_and_no_orphan_blob(
    tiny_model_dir, tmp_path, stores
):
    dirs = [make_peft_adapter(tmp_path / f"p{i}", seed=i + 1, r=4, lora_alpha=8, target_modules=["q_proj"])
            for i in range(4)]  # fmt: skip
    b = Replica(tiny_model_dir, tmp_path / "b", stores, name="b", job_lease_s=LEASE_S)
    acked: list[tuple[int, int]] = []
    try:
        for trial in range(2):
            a = Replica(tiny_model_dir, tmp_path / f"a{trial}", stores, name=f"a{trial}", job_lease_s=LEASE_S)
            stop = threading.Event()

            def upload_forever(a=a, stop=stop, trial=trial):
                i = 0
                while not stop.is_set():
                    try:
                        got = a.adapters.UploadAdapter(upload_chunks(f"up-{trial}", dirs[i % 4], chunk=1024))
                        acked.append((trial, got.version))
                    except grpc.RpcError:
                        return
                    i += 1

            workers = [threading.Thread(target=upload_forever) for _ in range(2)]
            for w in workers:
                w.start()
            time.sleep(random.Random(trial).uniform(0.5, 2.0))
            a.kill()
            stop.set()
            for w in workers:
                w.join(30)
            # every version B lists is whole: it exports and serves
            listed = b.adapters.ListAdapters(_list_all(f"up-{trial}"), timeout=10).adapters
            assert {v for t, v in acked if t == trial} <= {x.version for x in listed}
            for x in listed:
                ref = common_pb2.AdapterRef(name=f"up-{trial}@{x.version}")
                files = list(b.adapters.ExportAdapter(ref, timeout=30))
                assert {c.filename for c in files} == {"adapter_config.json", "adapter_model.safetensors"}
    finally:
        b.stop()
    assert acked, "the kills landed before any upload: the trial proved nothing"
    registry = _open(stores, tmp_path)
    try:
        assert set(registry.blobs.list()) == registry.metadata.referenced_blobs()
    finally:
        registry.close()


@pytest.mark.slow
def test_sigkill_during_a_fine_tune_fails_it_on_the_survivor_when_its_lease_ends(
    tiny_model_dir, tmp_path, stores
):
    a = Replica(tiny_model_dir, tmp_path / "a", stores, name="doomed-a", job_lease_s=LEASE_S)
    b = Replica(tiny_model_dir, tmp_path / "b", stores, name="survivor-b", job_lease_s=LEASE_S)
    try:
        job = a.training.CreateFineTune(long_lm_job("orphan"), timeout=30)
        wait_state(b.training, job.id, {training_pb2.JOB_STATE_RUNNING}, timeout=60)
        a.kill()
        killed_at = time.monotonic()
        ended = wait_state(
            b.training,
            job.id,
            {training_pb2.JOB_STATE_FAILED},
            timeout=LEASE_S * 2 + 5,  # the lease, one sweep interval, and a loaded machine
        )
        took = time.monotonic() - killed_at
        assert "doomed-a stopped renewing its lease" in ended.error
        assert took <= LEASE_S * 2 + 5
        listed = b.adapters.ListAdapters(_list_all("orphan"), timeout=10).adapters
        assert list(listed) == []  # nothing half-promoted
    finally:
        for r in (a, b):
            r.stop()
    registry = _open(stores, tmp_path)
    try:
        assert registry.metadata.count_jobs_by_state().get("RUNNING", 0) == 0
    finally:
        registry.close()


def _list_all(prefix: str):
    from hotlora.v1 import adapters_pb2

    return adapters_pb2.ListAdaptersRequest(prefix=prefix, all_versions=True)
