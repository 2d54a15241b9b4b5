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

TOKENS = {
    "ops": "tok-ops-faults",
    "racer": "tok-racer-faults",
    "steady-pg": "tok-steady-pg",
    "steady-s3": "tok-steady-s3",
    "gave-up": "tok-gave-up",  # versions of its own: --max-adapters-per-tenant is 10
}
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


def _uploads_by_outcome(replica) -> dict[str, int]:
    """UploadAdapter calls the replica has finished handling, by outcome (its metrics)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{replica.metrics_port}/metrics", timeout=10).read()
    counts: dict[str, int] = {}
    for line in text.decode().splitlines():
        if line.startswith("hotlora_adapter_uploads_total{"):
            outcome = line.split('outcome="', 1)[1].split('"', 1)[0]
            counts[outcome] = counts.get(outcome, 0) + int(float(line.rsplit(" ", 1)[1]))
    return counts


def _uploads_finished(replica) -> int:
    return sum(_uploads_by_outcome(replica).values())


class Traffic:
    """Steady calls on both replicas from threads while a fault comes and goes: a generate with an adapter
    both replicas had resolved, one of the base model, and an upload of a new name (by `tenant`, until it
    has QUOTA - 1 versions), each in turn, every `pause_s`. Records every outcome; `rounds` counts the
    loops' turns; `stop()` ends the loops after their current calls."""

    def __init__(self, fleet: Fleet, adapter: str, tenant: str, pause_s: float = 0.1):
        self.fleet, self.adapter, self.tenant, self.pause_s = fleet, adapter, tenant, pause_s
        self.rounds = 0
        self.generates: list[tuple[grpc.StatusCode, str]] = []
        self.uploads: dict[str, tuple[grpc.StatusCode, str, int]] = {}  # name -> (code, details, version)
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, args=(r,), daemon=True) for r in fleet.replicas]

    def __enter__(self) -> Traffic:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(WAIT_S * 2)
            assert not t.is_alive(), "a call of the steady traffic never returned"

    def _loop(self, replica) -> None:
        n = 0
        while not self._stop.is_set():
            for adapter in (self.adapter, ""):
                code, details, _ = _code(lambda a=adapter: self.fleet.generate(replica, a, timeout=60))
                self.generates.append((code, details))
            stored = sum(code == grpc.StatusCode.OK for code, _, _ in list(self.uploads.values()))
            if stored < QUOTA - 1:
                name, got = f"{replica.name}-{n}", []
                code, details, _ = _code(
                    lambda g=got, nm=name: g.append(self.fleet.upload(replica, nm, self.tenant, timeout=60))
                )
                self.uploads[name] = (code, details, got[0].version if got else 0)
            n += 1
            self.rounds += 1
            self._stop.wait(self.pause_s)

    def check(self, store_words: str) -> None:
        """Every generate served; every upload either acknowledged and stored once, or refused with
        UNAVAILABLE naming the store and stored never (a retry is the first version)."""
        assert self.generates and self.uploads, "no traffic ran"
        failed = [g for g in self.generates if g[0] != grpc.StatusCode.OK]
        assert not failed, failed[:3]
        codes = {code for code, _, _ in self.uploads.values()}
        assert codes <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, codes
        assert grpc.StatusCode.UNAVAILABLE in codes, "no upload met the fault: the test proves nothing"
        for name, (code, details, version) in self.uploads.items():
            stored = self.fleet.versions(self.fleet.a, name, self.tenant)
            if code == grpc.StatusCode.OK:
                assert stored == [version] == [1], (name, stored)
            else:
                assert store_words in details and "retry later" in details, details
                assert stored == [], f"{name}: told UNAVAILABLE, yet stored as {stored}"


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

    traffic = Traffic(fleet, "warm", "steady-pg").__enter__()
    _until("steady traffic before the fault", lambda: len(traffic.uploads) >= 2)
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
    rounds = traffic.rounds
    _until("steady traffic after the fault", lambda: traffic.rounds >= rounds + 2)
    traffic.stop()
    traffic.check("adapter registry")
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
    assert fleet.generate(a, "warm-s3").adapter == "warm-s3@1"
    traffic = Traffic(fleet, "warm-s3", "steady-s3").__enter__()
    _until("steady traffic before the fault", lambda: len(traffic.uploads) >= 2)
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
    rounds = traffic.rounds
    _until("steady traffic after the fault", lambda: traffic.rounds >= rounds + 2)
    traffic.stop()
    traffic.check("blob store")
    assert fleet.generate(b, "cold-s3").adapter == "cold-s3@1"
    assert fleet.upload(b, "during-s3").version == 1


@pytest.mark.parametrize("how", ["deadline", "cancel"])
@pytest.mark.parametrize("store", ["object store", "database"])
def test_an_upload_whose_caller_gave_up_is_never_committed(fleet, store, how):
    a = fleet.a
    name = f"gave-up-{store.split()[0][:6]}-{how}"
    frozen = fleet.s3 if store == "object store" else fleet.pg
    before = _uploads_by_outcome(a)
    frozen.freeze()
    try:
        if how == "deadline":
            # the caller's deadline passes while the replica waits on the store (before the store's own bound)
            code, details, _ = _code(lambda: fleet.upload(a, name, "gave-up", timeout=STORE_BOUND_S / 2))
            assert code == grpc.StatusCode.DEADLINE_EXCEEDED, (code, details)
        else:
            sent = threading.Event()

            def chunks():
                yield from upload_chunks(name, fleet.adapter_dir, chunk=1024)
                sent.set()  # grpc has taken the last chunk

            call = a.adapters.UploadAdapter.future(chunks(), metadata=md("gave-up"), timeout=WAIT_S)
            _until("the upload's chunks sent", sent.is_set)
            # cancelled while the replica waits on the frozen store (its bound is STORE_BOUND_S); on a very
            # busy machine it may still be reading the chunks, and must not commit then either
            threading.Event().wait(STORE_BOUND_S / 4)
            if not call.cancel():  # ended first: on a very busy machine, the store's own bound
                assert call.exception().code() == grpc.StatusCode.UNAVAILABLE, call.exception()
                how = "the store's bound"
    finally:
        frozen.thaw()
    wanted = {"deadline": "deadline_exceeded", "cancel": "cancelled"}.get(how, "unavailable")
    _until(
        f"the replica finished the abandoned upload as {wanted}",
        lambda: sum(_uploads_by_outcome(a).values()) > sum(before.values()),
    )
    after = _uploads_by_outcome(a)
    assert {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)} in (
        {wanted: 1},
        {"cancelled": 1},  # a deadline passed in the replica ends as CANCELLED too
    ), (before, after)
    _until_health(fleet, SERVING)
    assert fleet.versions(a, name, "gave-up") == []
    assert fleet.upload(a, name, "gave-up").version == 1  # the caller's retry is the first version
