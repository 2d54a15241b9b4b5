"""Two `hotlora serve` processes on one PostgreSQL + S3: what one replica does, the other serves."""

from __future__ import annotations

import time

import grpc
import pytest

from hotlora.v1 import adapters_pb2, common_pb2, inference_pb2, training_pb2
from tests.fleet.replicas import Replica
from tests.server.adapter_utils import make_peft_adapter, upload_chunks
from tests.server.training_utils import TERMINAL, marker_examples, seq_cls

LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
PROMPT = "the quick brown fox"


@pytest.fixture(scope="module")
def fleet(tiny_model_dir, tmp_path_factory, postgres, s3):
    from tests.fleet_stores import SharedStores

    stores = SharedStores(postgres.new_database(), f"s3://{s3.new_bucket()}/fleet", s3.endpoint)
    root = tmp_path_factory.mktemp("fleet")
    a = Replica(tiny_model_dir, root / "a", stores, name="replica-a")
    try:
        b = Replica(tiny_model_dir, root / "b", stores, name="replica-b")
    except BaseException:
        a.stop()
        raise
    yield a, b
    for r in (a, b):
        r.stop()


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft")
    return [make_peft_adapter(root / f"a{i}", seed=i + 1, **LORA) for i in range(2)]


def _gen(replica, adapter: str = "") -> inference_pb2.GenerateResponse:
    return replica.inference.Generate(
        inference_pb2.GenerateRequest(
            prompt=PROMPT, adapter=adapter, params=common_pb2.SamplingParams(max_new_tokens=8)
        ),
        timeout=60,
    )


def test_upload_on_a_is_served_by_b_and_a_new_version_on_b_by_a(fleet, adapter_dirs):
    a, b = fleet
    first = a.adapters.UploadAdapter(upload_chunks("shared-bot", adapter_dirs[0]), timeout=60)
    t0 = time.monotonic()
    on_b = _gen(b, "shared-bot")  # no wait, no retry: committed on A means servable on B
    servable_after = time.monotonic() - t0
    assert (first.version, on_b.adapter) == (1, "shared-bot@1")
    assert on_b.token_ids == _gen(a, "shared-bot").token_ids
    assert on_b.token_ids != _gen(b).token_ids, "the adapter changed nothing: the test proves nothing"

    second = b.adapters.UploadAdapter(upload_chunks("shared-bot", adapter_dirs[1]), timeout=60)
    assert second.version == 2
    latest, pinned = _gen(a, "shared-bot"), _gen(a, "shared-bot@1")
    assert (latest.adapter, pinned.adapter) == ("shared-bot@2", "shared-bot@1")
    assert latest.token_ids == _gen(b, "shared-bot@2").token_ids
    assert pinned.token_ids == on_b.token_ids
    assert latest.token_ids != pinned.token_ids
    assert servable_after < 5.0


def test_delete_on_a_is_not_found_on_b_within_a_second(fleet, adapter_dirs):
    a, b = fleet
    a.adapters.UploadAdapter(upload_chunks("doomed", adapter_dirs[0]), timeout=60)
    b.adapters.LoadAdapter(common_pb2.AdapterRef(name="doomed"), timeout=60)  # cached on B
    assert _gen(b, "doomed").adapter == "doomed@1"
    a.adapters.DeleteAdapter(common_pb2.AdapterRef(name="doomed"), timeout=30)
    deleted_at = time.monotonic()
    while True:
        try:
            _gen(b, "doomed")
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.NOT_FOUND, err
            break
        assert time.monotonic() - deleted_at < 1.0, "B still serves a version deleted on A after 1 s"
    with pytest.raises(grpc.RpcError) as err:
        b.adapters.GetAdapter(common_pb2.AdapterRef(name="doomed"), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_unload_on_a_evicts_on_b(fleet, adapter_dirs):
    a, b = fleet
    a.adapters.UploadAdapter(upload_chunks("warm", adapter_dirs[1]), timeout=60)
    ref = common_pb2.AdapterRef(name="warm")
    b.adapters.LoadAdapter(ref, timeout=60)
    assert b.adapters.GetAdapter(ref, timeout=10).state == adapters_pb2.ADAPTER_STATE_DEVICE
    a.adapters.UnloadAdapter(ref, timeout=30)
    deadline = time.monotonic() + 2.0
    while b.adapters.GetAdapter(ref, timeout=10).state != adapters_pb2.ADAPTER_STATE_STORED:
        assert time.monotonic() < deadline, "B kept an adapter unloaded on A"
        time.sleep(0.05)


def test_fine_tune_submitted_to_b_runs_once_and_is_served_by_a(fleet):
    a, b = fleet
    job = b.training.CreateFineTune(
        seq_cls("fleet-cls", marker_examples(24, 3), method=training_pb2.METHOD_HEAD_ONLY,
                promote=training_pb2.PROMOTE_ALWAYS), timeout=30,
    )  # fmt: skip
    # watched on the replica that does not run it
    events = list(a.training.WatchFineTune(common_pb2.JobRef(id=job.id), timeout=120))
    final = events[-1].job
    assert final.state == training_pb2.JOB_STATE_SUCCEEDED, final.error
    assert final.result_adapter == "fleet-cls@1"
    started = [e for e in events if e.message.startswith("running")]
    assert len(started) == 1, [e.message for e in events]
    assert b.training.GetFineTune(common_pb2.JobRef(id=job.id), timeout=10).state == final.state
    versions = a.adapters.ListAdapters(
        adapters_pb2.ListAdaptersRequest(prefix="fleet-cls", all_versions=True), timeout=10
    ).adapters
    assert [v.version for v in versions] == [1]  # promoted once
    got = a.inference.Classify(
        inference_pb2.ClassifyRequest(adapter="fleet-cls", texts=["abc zz", "abc"]), timeout=60
    )
    assert [r.label for r in got.results] and all(r.label in ("yes", "no") for r in got.results)


def test_cancel_on_a_stops_a_job_running_on_b(fleet):
    from tests.server.training_utils import long_lm_job, wait_state

    a, b = fleet
    job = b.training.CreateFineTune(long_lm_job("fleet-long"), timeout=30)
    wait_state(b.training, job.id, {training_pb2.JOB_STATE_RUNNING}, timeout=60)
    a.training.CancelFineTune(common_pb2.JobRef(id=job.id), timeout=10)
    ended = wait_state(b.training, job.id, TERMINAL, timeout=10)
    assert ended.state == training_pb2.JOB_STATE_CANCELLED
    # B stops training it: its next job is not stuck behind the cancelled one
    again = b.training.CreateFineTune(
        seq_cls("fleet-after", marker_examples(24, 5), method=training_pb2.METHOD_HEAD_ONLY,
                promote=training_pb2.PROMOTE_ALWAYS), timeout=30,
    )  # fmt: skip
    # the cancelled job alone would keep B busy for tens of minutes (thousands of steps a fold): the next one
    # ending well within this ceiling (about a minute at load 14 on 2 cores) shows B stopped it
    done = wait_state(b.training, again.id, TERMINAL, timeout=300)
    assert done.state == training_pb2.JOB_STATE_SUCCEEDED, done.error
