"""Issue 12, findings 2, 4 and 6: the registry's own resources stay bounded.

File descriptors are counted in /proc/self/fd (the server runs in this process), bytes with the upload
buffer's own accounting; nothing here depends on how fast the machine is."""

from __future__ import annotations

import os
import struct
import time

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hotlora.server import kserve_conversion as kc
from hotlora.v1 import adapters_pb2

from tests.server.adapter_utils import make_peft_adapter, upload_chunks
from tests.server.harness import running_server

TOKENS = {"alpha": "tok-alpha-registry", "beta": "tok-beta-registry"}


def md(tenant: str):
    return (("authorization", f"Bearer {TOKENS[tenant]}"),)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture(scope="module")
def tokens_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("auth") / "tokens"
    path.write_text("".join(f"{t} {tok}\n" for t, tok in TOKENS.items()))
    return path


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    return make_peft_adapter(
        tmp_path_factory.mktemp("peft") / "a", seed=1, r=2, lora_alpha=4, target_modules=["q_proj"]
    )


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory, tokens_file, adapter_dir):
    with running_server(
        tiny_model_dir,
        tmp_path_factory.mktemp("data"),
        tokens_file=str(tokens_file),
        health_check_seconds=0.2,
    ) as run:
        run.adapters.UploadAdapter(upload_chunks("known", adapter_dir), metadata=md("alpha"), timeout=30)
        yield run


def _infer_request(model: str) -> object:
    text = b"hello"
    req = kc.pb.ModelInferRequest(model_name=model)
    req.inputs.add(name="text_input", datatype="BYTES", shape=[1])
    req.raw_input_contents.append(struct.pack("<I", len(text)) + text)
    req.parameters["max_tokens"].int64_param = 1
    return req


def test_streamed_kserve_requests_do_not_leak_registry_connections(server):
    """Each ModelStreamInfer request runs on a thread of its own and reads the registry there."""
    stream = server.channel.stream_stream(
        f"/{kc.SERVICE}/ModelStreamInfer",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=kc.pb.ModelStreamInferResponse.FromString,
    )

    def round_of(n: int) -> list:
        requests = [_infer_request("no-such-model" if i % 4 else "known") for i in range(n)]
        return list(stream(iter(requests), metadata=md("alpha"), timeout=120))

    round_of(20)  # warm: the pool opens its connections, grpc its threads
    before = open_fds()
    answers = round_of(300)
    after = open_fds()
    assert len(answers) >= 300
    assert sum(bool(a.error_message) for a in answers) == 225  # the unknown model, named in each
    assert after - before < 20, f"{after - before} file descriptors more after 300 streamed requests"
    assert (
        server.state.adapters.registry.metadata.open_connections() <= server.state.config.registry_connections
    )


def _health(run) -> int:
    stub = health_pb2_grpc.HealthStub(run.channel)
    return stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status


def _wait_health(run, status, rounds=200):
    for _ in range(rounds):
        if _health(run) == status:
            return True
        time.sleep(0.05)
    return False


def test_health_is_not_serving_while_the_registry_is_unusable(server):
    blobs = server.state.adapters.registry.blobs.root
    moved = blobs.with_name(blobs.name + ".gone")
    assert _health(server) == health_pb2.HealthCheckResponse.SERVING
    os.rename(blobs, moved)  # the blob store's disk is gone
    try:
        assert _wait_health(server, health_pb2.HealthCheckResponse.NOT_SERVING)
    finally:
        os.rename(moved, blobs)
    assert _wait_health(server, health_pb2.HealthCheckResponse.SERVING)
    listed = server.adapters.ListAdapters(adapters_pb2.ListAdaptersRequest(), metadata=md("alpha"))
    assert [a.name for a in listed.adapters] == ["known"]
