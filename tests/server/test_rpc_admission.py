"""Issue 12, finding 1: no client, with or without a token, can take the handler pool.

Callers that never send their request body, never finish an upload or leave a stream idle: calls without
a token are refused before a handler thread is spent, a tenant holds at most its share of the pool, idle
calls are cut off (--request-idle-seconds), connections are closed when idle or too old, and health keeps
answering throughout. Small pools (--workers 4) make every claim a count, not a timing."""

from __future__ import annotations

import contextlib
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from hotlora.server.rpc import kserve_conversion as kc
from hotlora.v1 import adapters_pb2, common_pb2, inference_pb2
from tests.server.adapter_utils import make_peft_adapter, upload_chunks
from tests.server.harness import running_server
from tests.server.test_metrics import scrape, value
from tests.server.test_registry_resources import _infer_request

TOKENS = {"alpha": "tok-alpha-admission", "beta": "tok-beta-admission"}
WORKERS = 4
GENERATE = "/hotlora.v1.Inference/Generate"


def md(tenant: str):
    return (("authorization", f"Bearer {TOKENS[tenant]}"),)


@pytest.fixture(scope="module")
def tokens_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("auth") / "tokens"
    path.write_text("".join(f"{t} {tok}\n" for t, tok in TOKENS.items()))
    return path


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory, tokens_file):
    with running_server(
        tiny_model_dir,
        tmp_path_factory.mktemp("data"),
        tokens_file=str(tokens_file),
        workers=WORKERS,
        max_rpcs_per_tenant=2,
        request_idle_seconds=1.0,
    ) as run:
        yield run


class Stalled:
    """Calls whose client opens the stream, sends `first` (or nothing) and then nothing more."""

    def __init__(self, channel):
        self.channel = channel
        self.release = threading.Event()
        self.calls = []

    def _requests(self, first):
        if first is not None:
            yield first
        self.release.wait(60)

    def open(self, method, metadata=(), first=None, response_streaming=False):
        factory = self.channel.stream_stream if response_streaming else self.channel.stream_unary
        rpc = factory(method)  # raw bytes both ways: the server gets whatever we send
        if response_streaming:
            call = rpc(self._requests(first), metadata=metadata, timeout=60)
        else:
            call = rpc.future(self._requests(first), metadata=metadata, timeout=60)
        self.calls.append(call)
        return call

    def close(self):
        self.release.set()
        for c in self.calls:
            c.cancel()


@contextlib.contextmanager
def stalled(run):
    s = Stalled(run.channel)
    try:
        yield s
    finally:
        s.close()


def code_of(call, timeout=30) -> grpc.StatusCode:
    """The status a call ended with (unary or streaming answer: both are futures)."""
    err = call.exception(timeout=timeout)
    return grpc.StatusCode.OK if err is None else err.code()


def healthy(run) -> bool:
    resp = health_pb2_grpc.HealthStub(run.channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
    return resp.status == health_pb2.HealthCheckResponse.SERVING


def generate(run, tenant, timeout=10):
    return run.inference.Generate(
        inference_pb2.GenerateRequest(prompt="hi"), metadata=md(tenant), timeout=timeout
    )


def test_calls_without_a_token_are_refused_before_taking_a_handler_thread(server):
    with stalled(server) as s:
        anon = [s.open(GENERATE) for _ in range(3 * WORKERS)]  # no metadata, no body, ever
        assert healthy(server)
        assert generate(server, "beta").finish_reason in ("length", "eos")
        assert [code_of(c) for c in anon] == [grpc.StatusCode.UNAUTHENTICATED] * len(anon)


def test_a_tenant_holding_calls_open_gets_only_its_share(server):
    with stalled(server) as s:
        mine = [s.open(GENERATE, md("alpha")) for _ in range(WORKERS)]  # bodies never sent
        # --max-rpcs-per-tenant 2: two are admitted (and held), the rest refused at once
        assert healthy(server)
        assert generate(server, "beta").finish_reason in ("length", "eos")
        codes = sorted(code_of(c).name for c in mine)
    assert codes == ["CANCELLED", "CANCELLED", "RESOURCE_EXHAUSTED", "RESOURCE_EXHAUSTED"], codes
    # the refusal names the flag; the held ones were cut off by --request-idle-seconds
    with stalled(server) as s:
        held = [s.open(GENERATE, md("alpha")) for _ in range(2)]
        admission = server.server.admission
        for _ in range(6000):  # the client sends the calls asynchronously: wait until both are admitted
            if admission.in_flight("alpha") == 2:
                break
            threading.Event().wait(0.01)
        with pytest.raises(grpc.RpcError) as e:
            generate(server, "alpha")
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-rpcs-per-tenant" in e.value.details()
        assert [code_of(c) for c in held] == [grpc.StatusCode.CANCELLED] * 2
    assert generate(server, "alpha").finish_reason in ("length", "eos")  # leases were given back


def test_idle_uploads_and_streams_are_cut_off_and_counted_as_cancelled(server):
    before = scrape(server)
    first_chunk = adapters_pb2.UploadChunk(name="never-finished").SerializeToString()
    stream_infer = f"/{kc.SERVICE}/ModelStreamInfer"
    with stalled(server) as s:
        upload = s.open("/hotlora.v1.Adapters/UploadAdapter", md("alpha"), first=first_chunk)
        infer = s.open(stream_infer, md("beta"), response_streaming=True)
        assert code_of(upload) == grpc.StatusCode.CANCELLED
        assert code_of(infer) == grpc.StatusCode.CANCELLED
    assert healthy(server)
    # the caller sees CANCELLED as soon as the call is cut; the handler thread counts it when it wakes
    # from its blocked read, a moment later on a busy machine: wait for the count (bounded)
    wanted = {
        rpc: value(before, "hotlora_requests_total", rpc=rpc, code="CANCELLED") + 1
        for rpc in ("UploadAdapter", "ModelStreamInfer")
    }
    deadline = time.monotonic() + 60
    while True:
        after = scrape(server)
        counted = {rpc: value(after, "hotlora_requests_total", rpc=rpc, code="CANCELLED") for rpc in wanted}
        if counted == wanted or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert counted == wanted
    for rpc in wanted:
        assert value(after, "hotlora_requests_total", rpc=rpc, code="INTERNAL") == 0


def test_reflection_needs_a_token_when_a_tokens_file_is_set(server):
    stub = reflection_pb2_grpc.ServerReflectionStub(server.channel)
    ask = [reflection_pb2.ServerReflectionRequest(list_services="")]
    with pytest.raises(grpc.RpcError) as e:
        list(stub.ServerReflectionInfo(iter(ask), timeout=10))
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    (answer,) = stub.ServerReflectionInfo(iter(ask), metadata=md("alpha"), timeout=10)
    names = {s.name for s in answer.list_services_response.service}
    assert "hotlora.v1.Inference" in names


def test_idle_reflection_streams_without_a_token_hold_nothing(server):
    with stalled(server) as s:
        idle = [
            s.open("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", response_streaming=True)
            for _ in range(2 * WORKERS)
        ]
        assert healthy(server)
        assert generate(server, "alpha").finish_reason in ("length", "eos")
        assert {code_of(c) for c in idle} == {grpc.StatusCode.UNAUTHENTICATED}


@pytest.mark.parametrize(
    "limits",
    [
        dict(connection_idle_seconds=0.5),
        # a grace only a hung call outlasts: the first Generate may still run when the age is reached
        dict(connection_max_age_seconds=0.5, connection_age_grace_seconds=60),
    ],
    ids=["idle", "max-age"],
)
def test_connections_are_closed_when_idle_or_too_old(tiny_model_dir, tmp_path, limits):
    with running_server(tiny_model_dir, tmp_path, **limits) as run:
        states: list[grpc.ChannelConnectivity] = []
        went_idle = threading.Event()

        def watch(state):
            states.append(state)
            if state == grpc.ChannelConnectivity.IDLE and grpc.ChannelConnectivity.READY in states:
                went_idle.set()

        run.channel.subscribe(watch, try_to_connect=False)
        try:
            assert run.inference.Generate(inference_pb2.GenerateRequest(prompt="x"), timeout=30).token_ids
            assert went_idle.wait(30), f"the server never closed the connection: {states}"
        finally:
            run.channel.unsubscribe(watch)
        assert run.inference.Generate(inference_pb2.GenerateRequest(prompt="x"), timeout=30).token_ids


def test_one_kserve_stream_has_at_most_max_stream_requests_in_flight(tiny_model_dir, tmp_path):
    """Each streamed request runs on a thread of its own; the stream stops reading past the cap."""
    dirs = [
        make_peft_adapter(tmp_path / f"p{i}", seed=i, r=2, lora_alpha=4, target_modules=["q_proj"])
        for i in (1, 2)
    ]
    with running_server(tiny_model_dir, tmp_path / "data", adapter_slots=1, max_stream_requests=2) as run:
        for name, d in zip(("pinned", "waits"), dirs, strict=True):
            run.adapters.UploadAdapter(upload_chunks(name, d), timeout=30)
        run.adapters.LoadAdapter(common_pb2.AdapterRef(name="pinned", pin=True), timeout=30)
        stream = run.channel.stream_stream(
            f"/{kc.SERVICE}/ModelStreamInfer",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=kc.pb.ModelStreamInferResponse.FromString,
        )
        release = threading.Event()

        def requests():
            for _ in range(6):  # none can be admitted: the only slot is pinned
                yield _infer_request("waits")
            release.wait(60)

        call = stream(requests(), timeout=60)
        engine = run.state.engine
        seen = []
        for _ in range(100):
            seen.append(engine.num_waiting)
            if seen[-1] >= 2 and len(seen) > 20:
                break
            threading.Event().wait(0.02)
        release.set()
        call.cancel()
        assert max(seen) == 2, seen
