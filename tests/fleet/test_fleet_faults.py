"""Two `hotlora serve` replicas on a PostgreSQL and an S3 server of this module's own, under traffic,
while those servers fail: PostgreSQL stopped and restarted, the object store frozen (SIGSTOP: it accepts
connections and never answers), callers that give up while the server waits, and two replicas racing
the same name and the same quota. What holds: a clear status at once (UNAVAILABLE with the store's name,
never INTERNAL, never a hang to the caller's deadline), adapters already resolved keep being served,
health NOT_SERVING on every replica while it lasts and SERVING after without a restart, a fine-tune
either keeps its lease or ends saying why, nothing committed that a caller was told failed.

Each test waits on states (health, statuses, job states, metrics) with deadlines, never on sleeps."""

from __future__ import annotations

import threading
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hotlora.v1 import adapters_pb2, common_pb2, inference_pb2, training_pb2
from tests.fleet.replicas import Replica
from tests.fleet_stores import S3_ENV, SharedStores, postgres_server, s3_server
from tests.server.adapter_utils import make_peft_adapter, upload_chunks
from tests.server.training_utils import TERMINAL, marker_examples, seq_cls, wait_state

TOKENS = {"ops": "tok-ops-faults", "racer": "tok-racer-faults"}
QUOTA = 10  # --max-adapters-per-tenant
LEASE_S = 20.0  # an outage of a few seconds: the lease usually outlives it (both outcomes are checked)
STORE_BOUND_S = 2.0  # --registry-timeout-seconds
WAIT_S = 90.0  # the longest any state is waited for (a loaded 2-core machine)
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SHORT = common_pb2.SamplingParams(max_new_tokens=4)


def md(tenant: str = "ops"):
    return (("authorization", f"Bearer {TOKENS[tenant]}"),)


@pytest.fixture(scope="module")
def fleet(tiny_model_dir, tmp_path_factory, monkeypatch_module):
    for k, v in S3_ENV.items():
        monkeypatch_module.setenv(k, v)
    root = tmp_path_factory.mktemp("fleet-faults")
    tokens = root / "tokens"
    tokens.write_text("".join(f"{t} {tok}\n" for t, tok in TOKENS.items()))
    flags = ("--tokens-file", str(tokens), "--health-check-seconds", "0.3",
             "--registry-timeout-seconds", str(STORE_BOUND_S), "--max-adapters-per-tenant", str(QUOTA),
             "--metrics-port", "0", "--max-rpcs-per-tenant", "8")  # fmt: skip
    with postgres_server(root) as pg, s3_server(root) as s3:
        stores = SharedStores(pg.new_database(), f"s3://{s3.new_bucket()}/fleet", s3.endpoint)
        replicas = []
        try:
            for name in ("a", "b"):
                replicas.append(
                    Replica(tiny_model_dir, root / name, stores, name=name, job_lease_s=LEASE_S, extra=flags)
                )
            adapter = make_peft_adapter(root / "peft", seed=3, r=4, lora_alpha=8, target_modules=["q_proj"])
            yield Fleet(pg, s3, *replicas, adapter)
        finally:
            s3.thaw()
            for r in replicas:
                r.stop()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


class Fleet:
    def __init__(self, pg, s3, a: Replica, b: Replica, adapter_dir):
        self.pg, self.s3, self.a, self.b, self.adapter_dir = pg, s3, a, b, adapter_dir
        self.replicas = (a, b)

    def upload(self, replica, name: str, tenant: str = "ops", timeout: float = 30):
        return replica.adapters.UploadAdapter(
            upload_chunks(name, self.adapter_dir, chunk=1024), metadata=md(tenant), timeout=timeout
        )

    def generate(self, replica, adapter: str = "", timeout: float = 30):
        return replica.inference.Generate(
            inference_pb2.GenerateRequest(prompt="the quick brown fox", adapter=adapter, params=SHORT),
            metadata=md(),
            timeout=timeout,
        )

    def versions(self, replica, name: str, tenant: str = "ops") -> list[int]:
        got = replica.adapters.ListAdapters(
            adapters_pb2.ListAdaptersRequest(prefix=name, all_versions=True), metadata=md(tenant), timeout=30
        )
        return sorted(a.version for a in got.adapters if a.name == name)


def _code(call) -> tuple[grpc.StatusCode, str, float]:
    """(status, details, seconds) of a call."""
    t0 = time.monotonic()
    try:
        call()
        code, details = grpc.StatusCode.OK, ""
    except grpc.RpcError as err:
        code, details = err.code(), err.details() or ""
    return code, details, time.monotonic() - t0


def _health(replica) -> int:
    stub = health_pb2_grpc.HealthStub(replica.channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status


def _until(what: str, check) -> None:
    deadline = time.monotonic() + WAIT_S
    while not check():
        assert time.monotonic() < deadline, f"not reached in {WAIT_S:.0f} s: {what}"
        time.sleep(0.05)


def _until_health(fleet: Fleet, status: int) -> None:
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
    _until(f"health {name} on both replicas", lambda: all(_health(r) == status for r in fleet.replicas))


def _uploads_finished(replica) -> int:
    """UploadAdapter calls the replica has finished handling, whatever their outcome (its metrics)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{replica.metrics_port}/metrics", timeout=10).read()
    return int(
        sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.decode().splitlines()
            if line.startswith("hotlora_adapter_uploads_total{")
        )
    )


def test_two_replicas_racing_one_name_and_one_quota_store_each_version_once(fleet):
    acked, over_quota, others = [], [], []

    def race(replica, n: int):
        for _ in range(n):
            try:
                acked.append(fleet.upload(replica, "race", tenant="racer").version)
            except grpc.RpcError as err:
                (over_quota if err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED else others).append(
                    (err.code(), err.details())
                )

    threads = [threading.Thread(target=race, args=(r, 5)) for r in fleet.replicas for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S * 2)
    assert not others, others
    assert sorted(acked) == list(range(1, QUOTA + 1)), "a version number was handed out twice or lost"
    assert len(over_quota) == 30 - QUOTA
    assert "--max-adapters-per-tenant" in over_quota[0][1]
    for replica in fleet.replicas:
        assert fleet.versions(replica, "race", tenant="racer") == list(range(1, QUOTA + 1))


def test_postgres_restart_under_uploads_generates_and_a_fine_tune(fleet):
    a, b = fleet.a, fleet.b
    fleet.upload(a, "warm")
    for r in fleet.replicas:
        assert fleet.generate(r, "warm").adapter == "warm@1"  # resolved and cached on both
    job = b.training.CreateFineTune(
        seq_cls("tuned", marker_examples(24, 3), method=training_pb2.METHOD_HEAD_ONLY,
                promote=training_pb2.PROMOTE_ALWAYS), metadata=md(), timeout=30,
    )  # fmt: skip
    wait_state(b.training, job.id, {training_pb2.JOB_STATE_RUNNING}, metadata=md(), timeout=WAIT_S)

    fleet.pg.stop()
    try:
        _until_health(fleet, NOT_SERVING)
        for r in fleet.replicas:
            code, details, _ = _code(lambda r=r: fleet.generate(r, "warm"))
            assert code == grpc.StatusCode.OK, details  # resolved before: still served
            code, details, _ = _code(lambda r=r: fleet.generate(r))
            assert code == grpc.StatusCode.OK, details  # the base model needs no registry
            code, details, seconds = _code(lambda r=r: fleet.upload(r, "during", timeout=60))
            assert code == grpc.StatusCode.UNAVAILABLE, (code, details)
            assert "adapter registry" in details and "retry later" in details
            assert seconds < 30, "the upload waited far past the store's bound"
            code, details, _ = _code(lambda r=r: fleet.generate(r, "never-seen"))
            assert code == grpc.StatusCode.UNAVAILABLE, (code, details)
    finally:
        fleet.pg.start()
    _until_health(fleet, SERVING)
    assert fleet.upload(a, "after").version == 1  # at once: no restart, no retry
    assert fleet.upload(b, "after").version == 2
    for r in fleet.replicas:
        assert fleet.versions(r, "during") == []

    ended = wait_state(a.training, job.id, TERMINAL, metadata=md(), timeout=WAIT_S * 2)
    if ended.state == training_pb2.JOB_STATE_SUCCEEDED:  # its lease outlived the outage
        assert ended.result_adapter == "tuned@1"
        assert fleet.versions(a, "tuned") == [1]
    else:  # its lease ran out: failed, saying so, by whichever replica swept first
        assert ended.state == training_pb2.JOB_STATE_FAILED, ended
        assert "lease" in ended.error or "registry" in ended.error, ended.error
        assert fleet.versions(a, "tuned") == []
    on_b = b.training.GetFineTune(common_pb2.JobRef(id=job.id), metadata=md(), timeout=10)
    assert on_b.state == ended.state


def test_a_frozen_object_store_refuses_uploads_and_cold_loads_and_serves_what_is_cached(fleet):
    a, b = fleet.a, fleet.b
    fleet.upload(a, "warm-s3")
    fleet.upload(a, "cold-s3")  # in A's memory (the upload offers it there), never loaded on B
    assert fleet.generate(b, "warm-s3").adapter == "warm-s3@1"  # loaded on B
    fleet.s3.freeze()
    try:
        code, details, seconds = _code(lambda: fleet.upload(a, "during-s3", timeout=60))
        assert code == grpc.StatusCode.UNAVAILABLE, (code, details)
        assert "blob store" in details and "retry later" in details
        assert seconds < 30, "the upload waited far past the store's bound"
        _until_health(fleet, NOT_SERVING)
        code, details, _ = _code(lambda: fleet.generate(b, "warm-s3"))
        assert code == grpc.StatusCode.OK, details
        code, details, _ = _code(lambda: fleet.generate(a, "cold-s3"))
        assert code == grpc.StatusCode.OK, details  # in A's memory since its upload
        code, details, seconds = _code(lambda: fleet.generate(b, "cold-s3", timeout=60))
        assert code == grpc.StatusCode.UNAVAILABLE, (code, details)
        assert "blob store" in details
        assert seconds < 30
    finally:
        fleet.s3.thaw()
    _until_health(fleet, SERVING)
    assert fleet.generate(b, "cold-s3").adapter == "cold-s3@1"
    assert fleet.upload(b, "during-s3").version == 1


@pytest.mark.parametrize("store", ["object store", "database"])
def test_an_upload_whose_caller_gave_up_is_never_committed(fleet, store):
    a = fleet.a
    name = "gave-up-" + store.split()[0][:6]
    frozen = fleet.s3 if store == "object store" else fleet.pg
    finished = _uploads_finished(a)
    frozen.freeze()
    try:
        # the caller's deadline passes while the replica waits on the store (before the store's own bound)
        code, details, _ = _code(lambda: fleet.upload(a, name, timeout=STORE_BOUND_S / 2))
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED, (code, details)
    finally:
        frozen.thaw()
    _until("the replica finished the abandoned upload", lambda: _uploads_finished(a) > finished)
    _until_health(fleet, SERVING)
    assert fleet.versions(a, name) == []
    assert fleet.upload(a, name).version == 1  # the caller's retry is the first version
