"""Fine-tune jobs across tenants, limits and restarts: never RUNNING forever, never a half-written adapter."""

from __future__ import annotations

import grpc
import pytest

from hotlora.adapters.store.metadata_store import JobRecord
from hotlora.adapters.store.sqlite_store import SqliteMetadataStore
from hotlora.v1 import adapters_pb2, common_pb2, training_pb2
from tests.server.harness import running_server
from tests.server.training_utils import long_lm_job, marker_examples, seq_cls, wait_state, watch

TOKENS = {"alpha": "tok-alpha", "beta": "tok-beta", "gamma": "tok-gamma"}


def _md(tenant):
    return [("authorization", f"Bearer {TOKENS[tenant]}")]


def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code()


def test_jobs_are_per_tenant_and_bounded(tiny_model_dir, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("".join(f"{t} {tok}\n" for t, tok in TOKENS.items()))
    with running_server(
        tiny_model_dir, tmp_path / "data", tokens_file=str(tokens), max_jobs=2, max_jobs_per_tenant=1
    ) as run:
        tr = run.training
        a = tr.CreateFineTune(long_lm_job("shared-name"), metadata=_md("alpha"), timeout=30)
        assert a.tenant == "alpha"
        assert (
            _code(lambda: tr.CreateFineTune(long_lm_job("other"), metadata=_md("alpha")))
            == grpc.StatusCode.RESOURCE_EXHAUSTED
        )
        ref = common_pb2.JobRef(id=a.id)
        for call in (tr.GetFineTune, tr.CancelFineTune):
            assert _code(lambda call=call: call(ref, metadata=_md("beta"))) == grpc.StatusCode.NOT_FOUND
        assert _code(lambda: list(tr.WatchFineTune(ref, metadata=_md("beta")))) == grpc.StatusCode.NOT_FOUND
        assert not tr.ListFineTunes(training_pb2.ListFineTunesRequest(), metadata=_md("beta")).jobs
        b = tr.CreateFineTune(long_lm_job("shared-name"), metadata=_md("beta"), timeout=30)
        assert (
            _code(lambda: tr.CreateFineTune(long_lm_job("x"), metadata=_md("gamma")))
            == grpc.StatusCode.RESOURCE_EXHAUSTED
        )  # two jobs on the server: the total limit
        assert _code(lambda: tr.GetFineTune(ref)) == grpc.StatusCode.UNAUTHENTICATED
        assert tr.GetFineTune(ref, metadata=_md("alpha")).state in (
            training_pb2.JOB_STATE_QUEUED,
            training_pb2.JOB_STATE_RUNNING,
        )
        for tenant, job in (("alpha", a), ("beta", b)):
            tr.CancelFineTune(common_pb2.JobRef(id=job.id), metadata=_md(tenant))
        # a finished job frees the slot
        c = tr.CreateFineTune(
            seq_cls("small", marker_examples(20, seed=0)), metadata=_md("gamma"), timeout=30
        )
        _, c = watch(tr, c.id, metadata=_md("gamma"))
        assert c.state in (training_pb2.JOB_STATE_SUCCEEDED, training_pb2.JOB_STATE_REJECTED)


def test_stopping_the_server_mid_job_leaves_a_failed_job_and_no_adapter(tiny_model_dir, tmp_path):
    data = tmp_path / "data"
    with running_server(tiny_model_dir, data) as run:
        job = run.training.CreateFineTune(long_lm_job("interrupted"), timeout=30)
        wait_state(run.training, job.id, {training_pb2.JOB_STATE_RUNNING}, min_step=3)
    with running_server(tiny_model_dir, data) as run:
        job = run.training.GetFineTune(common_pb2.JobRef(id=job.id))
        assert (
            job.state == training_pb2.JOB_STATE_FAILED
            and "server" in job.error
            and "during the job" in job.error
        )
        assert not run.adapters.ListAdapters(adapters_pb2.ListAdaptersRequest(all_versions=True)).adapters
        events, final = watch(run.training, job.id)  # ends at once: the job is over
        assert final.state == training_pb2.JOB_STATE_FAILED


def test_a_job_left_running_by_a_crashed_process_is_failed_on_start(tiny_model_dir, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    store = SqliteMetadataStore(data / "registry.sqlite3")
    for state in ("QUEUED", "RUNNING"):
        store.save_job(
            JobRecord(
                id=f"crashed-{state.lower()}",
                tenant="default",
                adapter="x",
                task="SEQ_CLS",
                method="LORA",
                state=state,
                created_at=1.0,
            )
        )
    store.close()
    with running_server(tiny_model_dir, data) as run:
        jobs = run.training.ListFineTunes(training_pb2.ListFineTunesRequest()).jobs
        assert {j.id for j in jobs} == {"crashed-queued", "crashed-running"}
        for j in jobs:
            assert j.state == training_pb2.JOB_STATE_FAILED and j.error == "server restarted during the job"
        counts = run.state.training.count_by_state()
        assert counts == {"FAILED": 2}
