"""Limits a caller can hit (docs/limits.md): each one answers RESOURCE_EXHAUSTED (or DEADLINE_EXCEEDED at
the caller's deadline) with a message naming the limit, the server stays healthy, and one tenant flooding
its queue does not starve another."""

from __future__ import annotations

import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hotlora.v1 import common_pb2, inference_pb2
from tests.server.adapter_utils import make_peft_adapter, upload_chunks
from tests.server.harness import running_server

TOKENS = {"alpha": "tok-alpha-1f3a", "beta": "tok-beta-77c2"}
LIMITS = dict(
    max_prompt_tokens=64,
    max_new_tokens=16,
    default_max_new_tokens=4,
    max_texts=3,
    max_message_bytes=1 << 20,
    max_queue_per_tenant=3,
    max_queue=5,
    max_upload_bytes=48_000,
    max_adapters_per_tenant=2,
    adapter_slots=1,
    max_rank=16,
)


def md(tenant: str):
    return (("authorization", f"Bearer {TOKENS[tenant]}"),)


@pytest.fixture(scope="module")
def tokens_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("auth") / "tokens"
    path.write_text("".join(f"{t} {tok}\n" for t, tok in TOKENS.items()))
    return path


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft")
    small = dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    return {
        "a": make_peft_adapter(root / "a", seed=1, **small),
        "b": make_peft_adapter(root / "b", seed=2, **small),
        "big": make_peft_adapter(
            root / "big",
            seed=3,
            r=16,
            lora_alpha=16,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        ),
    }


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory, tokens_file):
    with running_server(
        tiny_model_dir, tmp_path_factory.mktemp("data"), tokens_file=str(tokens_file), **LIMITS
    ) as run:
        yield run


def _gen(run, tenant="alpha", timeout=30, **kw):
    params = kw.pop("params", None) or common_pb2.SamplingParams(max_new_tokens=4)
    return run.inference.Generate(
        inference_pb2.GenerateRequest(params=params, **kw), metadata=md(tenant), timeout=timeout
    )


def _code(fn):
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value.code(), e.value.details()


def assert_healthy(run, tenant="alpha"):
    health = health_pb2_grpc.HealthStub(run.channel)
    assert (
        health.Check(health_pb2.HealthCheckRequest(), timeout=30).status
        == health_pb2.HealthCheckResponse.SERVING
    )
    assert _gen(run, tenant, prompt="still fine").finish_reason in ("length", "eos")


def test_grpc_message_size_limit(server):
    code, details = _code(lambda: _gen(server, prompt="x" * (2 << 20)))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in details
    assert_healthy(server)


def test_prompt_token_limit(server):
    _gen(server, prompt="y" * 60)
    code, details = _code(lambda: _gen(server, prompt="y" * 70))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "at most 64" in details
    # absurd texts are refused before tokenizing them
    code, details = _code(lambda: _gen(server, prompt="z" * (64 * 32 + 1)))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "64-token limit" in details
    code, _ = _code(lambda: _gen(server, messages=[common_pb2.ChatMessage(role="user", content="m" * 80)]))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_max_new_tokens_limit_and_default(server):
    code, details = _code(
        lambda: _gen(server, prompt="hi", params=common_pb2.SamplingParams(max_new_tokens=17))
    )
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "limit of 16" in details
    resp = _gen(server, prompt="hi", params=common_pb2.SamplingParams(max_new_tokens=16))
    assert len(resp.token_ids) <= 16
    resp = _gen(server, prompt="hi", params=common_pb2.SamplingParams(max_new_tokens=0))
    assert len(resp.token_ids) <= 4  # --default-max-new-tokens
    if resp.finish_reason == "length":
        assert len(resp.token_ids) == 4


def test_texts_per_request_limit(server):
    ok = server.inference.Embed(
        inference_pb2.EmbedRequest(texts=["a", "b", "c"]), metadata=md("alpha"), timeout=30
    )
    assert len(ok.embeddings) == 3
    code, details = _code(
        lambda: server.inference.Embed(
            inference_pb2.EmbedRequest(texts=["a"] * 4), metadata=md("alpha"), timeout=30
        )
    )
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "the limit is 3" in details


def test_upload_bytes_limit_leaves_registry_unchanged(server, adapters):
    before = server.adapters.ListAdapters(common_pb2_list(), metadata=md("beta"))
    code, details = _code(
        lambda: server.adapters.UploadAdapter(upload_chunks("too-big", adapters["big"]), metadata=md("beta"))
    )
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-upload-bytes" in details
    assert server.adapters.ListAdapters(common_pb2_list(), metadata=md("beta")) == before


def common_pb2_list():
    from hotlora.v1 import adapters_pb2

    return adapters_pb2.ListAdaptersRequest(all_versions=True)


def test_adapters_per_tenant_limit(server, adapters):
    for i in range(2):
        server.adapters.UploadAdapter(upload_chunks(f"n{i}", adapters["a"]), metadata=md("beta"))
    code, details = _code(
        lambda: server.adapters.UploadAdapter(upload_chunks("n2", adapters["a"]), metadata=md("beta"))
    )
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "2 adapter versions" in details
    # a new version counts too; another tenant has its own allowance
    code, _ = _code(
        lambda: server.adapters.UploadAdapter(upload_chunks("n0", adapters["a"]), metadata=md("beta"))
    )
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    server.adapters.UploadAdapter(upload_chunks("n0", adapters["a"]), metadata=md("alpha"))
    server.adapters.DeleteAdapter(common_pb2.AdapterRef(name="n0"), metadata=md("alpha"))
    for i in range(2):
        server.adapters.DeleteAdapter(common_pb2.AdapterRef(name=f"n{i}"), metadata=md("beta"))


@pytest.fixture()
def pinned(server, adapters):
    """Adapter `a` pinned in the only device slot, `b` stored: requests for `b` wait in the queue."""
    for name in ("a", "b"):
        server.adapters.UploadAdapter(upload_chunks(name, adapters[name]), metadata=md("alpha"))
    server.adapters.LoadAdapter(common_pb2.AdapterRef(name="a", pin=True), metadata=md("alpha"))
    yield
    server.adapters.DeleteAdapter(common_pb2.AdapterRef(name="a"), metadata=md("alpha"))
    server.adapters.DeleteAdapter(common_pb2.AdapterRef(name="b"), metadata=md("alpha"))


def _wait_for(cond, timeout=60.0):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def _stuck(run, tenant, adapter):
    return run.inference.Generate.future(
        inference_pb2.GenerateRequest(prompt="q", adapter=adapter), metadata=md(tenant), timeout=60
    )


def test_queue_limits_per_tenant_and_total(server, pinned, adapters):
    engine = server.state.engine
    # the only device slot is pinned, so requests for `b` cannot be admitted and stay queued
    stuck = [_stuck(server, "alpha", "b") for _ in range(3)]
    _wait_for(lambda: engine.num_waiting == 3)
    code, details = _code(lambda: _gen(server, "alpha", prompt="one more", adapter="b"))
    assert (
        code == grpc.StatusCode.RESOURCE_EXHAUSTED and "per-tenant limit" in details
    )  # --max-queue-per-tenant
    code, _ = _code(lambda: _gen(server, "alpha", prompt="even for the base model"))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    # another tenant is not refused for alpha's flood, and is served while it waits
    assert _gen(server, "beta", prompt="beta is served").finish_reason in ("length", "eos")
    server.adapters.UploadAdapter(upload_chunks("c", adapters["b"]), metadata=md("beta"))
    try:
        stuck += [_stuck(server, "beta", "c") for _ in range(2)]
        _wait_for(lambda: engine.num_waiting == 5)
        code, details = _code(lambda: _gen(server, "beta", prompt="queue is full"))
        assert (
            code == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue is full (5 waiting" in details
        )  # --max-queue
    finally:
        for f in stuck:
            f.cancel()
        _wait_for(lambda: engine.num_waiting == 0)
        server.adapters.DeleteAdapter(common_pb2.AdapterRef(name="c"), metadata=md("beta"))
    for f in stuck:
        assert f.cancelled() or f.exception().code() == grpc.StatusCode.CANCELLED
    assert_healthy(server, "beta")


def test_all_slots_pinned_fails_with_deadline_not_internal(server, pinned):
    start = time.monotonic()
    code, _ = _code(lambda: _gen(server, prompt="needs b", adapter="b", timeout=1.0))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - start < 5
    code, details = _code(
        lambda: server.adapters.LoadAdapter(
            common_pb2.AdapterRef(name="b", pin=True), metadata=md("alpha"), timeout=10
        )
    )
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "pinned" in details
    _wait_for(lambda: server.state.engine.num_waiting == 0)
    assert _gen(server, prompt="pinned one works", adapter="a").adapter.startswith("a@")
    assert_healthy(server)


def test_fine_tune_limits(tiny_model_dir, tmp_path):
    """--max-jobs, --max-jobs-per-tenant, --max-finetune-examples, --max-finetune-example-tokens."""
    from hotlora.v1 import training_pb2
    from tests.server.training_utils import long_lm_job

    tokens = {"t1": "tok-one", "t2": "tok-two", "t3": "tok-three"}
    path = tmp_path / "tokens"
    path.write_text("".join(f"{t} {tok}\n" for t, tok in tokens.items()))
    meta = {t: (("authorization", f"Bearer {tok}"),) for t, tok in tokens.items()}
    with running_server(
        tiny_model_dir,
        tmp_path / "data",
        tokens_file=str(path),
        max_jobs=2,
        max_jobs_per_tenant=1,
        max_finetune_examples=50,
        max_finetune_example_tokens=32,
    ) as run:
        create = run.training.CreateFineTune

        def refused(tenant, req, code, *words):
            with pytest.raises(grpc.RpcError) as e:
                create(req, metadata=meta[tenant], timeout=30)
            assert e.value.code() == code, e.value.details()
            for w in words:
                assert w in e.value.details()

        jobs = [create(long_lm_job("one"), metadata=meta["t1"], timeout=30)]
        refused("t1", long_lm_job("two"), grpc.StatusCode.RESOURCE_EXHAUSTED, "--max-jobs-per-tenant")
        jobs.append(create(long_lm_job("one"), metadata=meta["t2"], timeout=30))
        refused("t3", long_lm_job("one"), grpc.StatusCode.RESOURCE_EXHAUSTED, "--max-jobs")

        many = long_lm_job("many")
        del many.examples[:]
        many.examples.extend(training_pb2.Example(prompt=f"q{i}", completion=" a") for i in range(51))
        refused("t3", many, grpc.StatusCode.RESOURCE_EXHAUSTED, "51 examples", "50")
        for j, tenant in zip(jobs, ("t1", "t2"), strict=True):
            run.training.CancelFineTune(common_pb2.JobRef(id=j.id), metadata=meta[tenant], timeout=30)

        long_one = long_lm_job("long")
        long_one.examples[0].completion = " word" * 200
        refused("t3", long_one, grpc.StatusCode.RESOURCE_EXHAUSTED, "at most 32 per example")
        ok = run.inference.Generate(
            inference_pb2.GenerateRequest(prompt="still fine"), metadata=meta["t3"], timeout=30
        )
        assert ok.finish_reason in ("length", "eos")


def test_a_flooding_tenant_does_not_starve_another(tiny_model_dir, tmp_path, tokens_file):
    """One decode row (--max-batch-size 1) makes admission order observable: alpha queues 12 long
    requests, then beta sends one; round-robin admits beta's next, long before alpha's flood drains. The
    order is read from the engine's own admission times (on a loaded machine the client's clock saw
    alpha's requests finish while beta's call was still on its way)."""
    with running_server(
        tiny_model_dir,
        tmp_path,
        tokens_file=str(tokens_file),
        max_batch_size=1,
        max_queue_per_tenant=64,
        max_new_tokens=256,
    ) as run:
        engine = run.state.engine
        finished = []
        finish = engine.endings.finish
        engine.endings.finish = lambda req, *a: (finished.append(req), finish(req, *a))[1]
        params = common_pb2.SamplingParams(max_new_tokens=120)
        flood = [
            run.inference.Generate.future(
                inference_pb2.GenerateRequest(prompt=f"flood {i}", params=params),
                metadata=md("alpha"),
                timeout=120,
            )
            for i in range(12)
        ]
        _wait_for(lambda: engine.num_waiting >= 10)
        resp = _gen(
            run, "beta", prompt="me too", params=common_pb2.SamplingParams(max_new_tokens=8), timeout=60
        )
        assert resp.finish_reason in ("length", "eos")
        waiting_after = engine.num_waiting
        for f in flood:
            f.cancel()
        (beta,) = [r for r in finished if r.tenant == "beta"]
        ahead = [
            r for r in finished if r.tenant == "alpha" and beta.created_at < r.admitted_at < beta.admitted_at
        ]
        # none of alpha's queued requests went ahead of beta's (one may have been admitted as beta's arrived)
        assert len(ahead) <= 1, f"{len(ahead)} of alpha's requests were admitted while beta's waited"
        assert waiting_after >= 8, "the flood was no longer queued when beta finished"
        _wait_for(lambda: engine.num_running == 0 and engine.num_waiting == 0, timeout=30)
