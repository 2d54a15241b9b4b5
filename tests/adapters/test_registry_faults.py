"""The registry's shared stores failing under it, on real PostgreSQL and S3 servers of this module's own
(stopped, restarted or frozen here without touching the session's): every call ends within its bound or
its caller's deadline, with UNAVAILABLE rather than a hang, references already resolved keep resolving,
and nothing is committed for a caller that stopped waiting."""

from __future__ import annotations

import os
import threading
import time

import pytest

from hotlora.adapters.caller import Caller, serving
from hotlora.adapters.errors import Cancelled, DeadlineExceeded, Unavailable
from hotlora.adapters.peft.format import AdapterLimits, parse_peft_adapter
from hotlora.adapters.store.metadata_store import TenantQuota
from hotlora.adapters.store.s3_blob_store import S3Options
from hotlora.adapters.store.shared_stores import StoreConfig, open_registry
from tests.fleet_stores import S3_ENV, postgres_server, s3_server

BOUND_S = 1.0  # the stores' own bound in these tests
SLACK_S = 20.0  # a call returns within this: far below "forever", far above the bound on a loaded machine


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    saved = {k: os.environ.get(k) for k in S3_ENV}
    os.environ.update(S3_ENV)
    root = tmp_path_factory.mktemp("faulty-stores")
    with postgres_server(root) as pg, s3_server(root) as s3:
        yield pg, s3
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def faults(servers):
    """(PostgreSQL, S3) for a test that breaks them: running and thawed again after it."""
    pg, s3 = servers
    yield pg, s3
    s3.thaw()
    if pg.process.poll() is None:
        pg.thaw()
    else:
        pg.start()


@pytest.fixture
def open_registry_on(faults, tmp_path):
    pg, s3 = faults
    database, bucket = pg.new_database(), s3.new_bucket()
    opened = []

    def open_one(timeout_s: float = BOUND_S, name: str = "r"):
        reg = open_registry(
            StoreConfig(
                tmp_path / name,
                registry=database,
                blob_store=f"s3://{bucket}/faults",
                timeout_s=timeout_s,
                s3=S3Options(endpoint_url=s3.endpoint, timeout_s=timeout_s),
                replica_id=name,
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


def _timed(fn):
    """(outcome or the exception it raised, seconds); fails the test if the call does not return."""
    out: dict = {}

    def run():
        t0 = time.monotonic()
        try:
            out["result"] = fn()
        except Exception as exc:
            out["result"] = exc
        out["seconds"] = time.monotonic() - t0

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(SLACK_S * 3)
    assert "seconds" in out, f"the call still hangs after {SLACK_S * 3:.0f} s"
    return out["result"], out["seconds"]


def _until_answers(reg) -> None:
    deadline = time.monotonic() + SLACK_S * 3
    while True:
        try:
            reg.check()
            return
        except Unavailable:
            assert time.monotonic() < deadline, "the registry did not come back after its stores did"
            time.sleep(0.05)


@pytest.mark.parametrize("fault", ["frozen", "stopped"])
def test_a_database_outage_refuses_commits_at_once_and_still_resolves_what_was_resolved(
    fault, faults, open_registry_on, upload
):
    pg, _ = faults
    files, weights = upload
    reg = open_registry_on()
    kept = reg.commit("t", "kept", files, weights)
    assert reg.resolve("t", "kept") == kept  # remembered
    pg.freeze() if fault == "frozen" else pg.stop()

    got, seconds = _timed(lambda: reg.resolve("t", "kept"))
    assert got == kept, got
    assert seconds < SLACK_S
    for call in (
        lambda: reg.resolve("t", "never-resolved"),
        lambda: reg.commit("t", "during", files, weights),
        reg.check,  # the health probe
    ):
        got, seconds = _timed(call)
        assert isinstance(got, Unavailable), got
        assert "the adapter registry" in got.message and "retry later" in got.message
        assert seconds < SLACK_S
    # known down: the next calls do not wait at all (a breaker; a probe retries in the background)
    got, seconds = _timed(lambda: reg.commit("t", "during", files, weights))
    assert isinstance(got, Unavailable) and seconds < 0.5, (got, seconds)

    pg.thaw() if fault == "frozen" else pg.start()
    _until_answers(reg)
    assert reg.metadata.versions("t", "during") == []  # nothing committed behind the callers' backs
    assert reg.commit("t", "during", files, weights).version == 1


def test_a_caller_deadline_ends_store_calls_before_the_stores_own_bound(faults, open_registry_on, upload):
    pg, s3 = faults
    files, weights = upload
    reg = open_registry_on(timeout_s=60.0)  # the stores' own bound is far off

    def with_deadline(fn, seconds=0.5):
        with serving(Caller(time.monotonic() + seconds)):
            return fn()

    pg.freeze()
    got, seconds = _timed(lambda: with_deadline(lambda: reg.resolve("t", "x")))
    pg.thaw()
    assert isinstance(got, DeadlineExceeded), got
    assert seconds < SLACK_S
    _until_answers(reg)

    s3.freeze()
    got, seconds = _timed(lambda: with_deadline(lambda: reg.commit("t", "slow", files, weights)))
    s3.thaw()
    assert isinstance(got, DeadlineExceeded), got
    assert seconds < SLACK_S
    _until_answers(reg)
    assert reg.metadata.versions("t", "slow") == []


class _QuotaThatCancels(TenantQuota):
    """Checked inside the committing transaction: the caller cancels right then."""

    def __init__(self, cancelled: threading.Event):
        super().__init__(max_versions=100, max_bytes=1 << 40)
        object.__setattr__(self, "cancelled", cancelled)

    def check(self, *args) -> None:
        super().check(*args)
        self.cancelled.set()


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_a_commit_whose_caller_left_during_its_transaction_is_rolled_back(
    kind, open_registry_on, upload, tmp_path
):
    files, weights = upload
    reg = open_registry_on() if kind == "postgresql" else open_registry(StoreConfig(tmp_path / "local"))
    cancelled = threading.Event()
    try:
        with serving(Caller(None, waiting=lambda: not cancelled.is_set())), pytest.raises(Cancelled):
            reg.commit("t", "late", files, weights, quota=_QuotaThatCancels(cancelled))
        assert cancelled.is_set(), "the quota was not checked: the test proves nothing"
        assert reg.metadata.versions("t", "late") == []
        assert reg.commit("t", "late", files, weights).version == 1  # the number was not used up
    finally:
        if kind == "sqlite":
            reg.close()


def test_an_object_store_outage_refuses_uploads_and_cold_loads_and_both_work_after(
    faults, open_registry_on, upload, base_info
):
    _, s3 = faults
    files, weights = upload
    reg = open_registry_on()
    cold = reg.commit("t", "cold", files, weights)
    s3.freeze()
    for call in (
        lambda: reg.commit("t", "during", {**files, "README.md": b"new bytes"}, weights),
        lambda: reg.load_weights(cold, base_info, AdapterLimits()),
        reg.check,
    ):
        got, seconds = _timed(call)
        assert isinstance(got, Unavailable), got
        assert "the adapter blob store" in got.message and "retry later" in got.message
        assert seconds < SLACK_S
    assert reg.resolve("t", "cold") == cold  # the database still answers
    s3.thaw()
    _until_answers(reg)
    assert reg.load_weights(cold, base_info, AdapterLimits()).rank == weights.rank
    assert reg.commit("t", "during", files, weights).version == 1


def test_a_lease_outlives_a_database_outage_longer_than_it_while_its_replica_lives(open_registry_on, faults):
    from hotlora.adapters.store.metadata_store import JobRecord
    from hotlora.adapters.store.postgres_watchers import LeaseKeeper

    pg, _ = faults
    lease_s = 1.0
    a, b, dead = (open_registry_on(name=n) for n in ("a", "b", "dead"))
    for reg in (a, b, dead):
        reg.metadata.job_lease_s = lease_s
    for owner, job_id in ((b, "alive"), (dead, "orphan")):
        owner.metadata.save_job(JobRecord(job_id, "t", job_id, "SEQ_CLS", "HEAD_ONLY", "RUNNING"))
    lost = []
    # the keepers' rounds are driven here, one at a time (their threads would run them every interval)
    keeper_a, keeper_b = (LeaseKeeper(r.metadata, lost.extend, interval_s=lease_s / 3) for r in (a, b))
    pg.stop()
    for keeper in (keeper_a, keeper_b):
        keeper.round()  # cut off: nothing renewed
    time.sleep(lease_s * 1.5)  # the outage outlasts every lease (the database clock runs on meanwhile)
    pg.start()
    _until_answers(a)
    _until_answers(b)
    keeper_a.round()  # back first: it fails nobody yet, though both leases ran out
    assert a.metadata.get_job("t", "alive").state == "RUNNING"
    assert a.metadata.get_job("t", "orphan").state == "RUNNING"
    keeper_b.round()  # the living owner renews its lease
    keeper_a._sweep_after = 0.0  # its grace (two intervals) is over
    keeper_a.round()
    assert a.metadata.get_job("t", "alive").state == "RUNNING"
    orphan = a.metadata.get_job("t", "orphan")
    assert orphan.state == "FAILED" and "replica dead stopped renewing its lease" in orphan.error
    assert lost == []
