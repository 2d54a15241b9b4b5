"""Issue 12, findings 2, 4 and 6: the registry's own resources stay bounded.

File descriptors are counted in /proc/self/fd (the server runs in this process), bytes with the upload
buffer's own accounting; nothing here depends on how fast the machine is."""

from __future__ import annotations

import os
import struct
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hotlora.server.rpc import kserve_conversion as kc
from hotlora.v1 import adapters_pb2, common_pb2
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
    return stub.Check(health_pb2.HealthCheckRequest(), timeout=30).status


def _wait_health(run, status, rounds=1200):  # up to 60 s: a loaded machine probes late
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


# ---- findings 4 and 6: upload memory, quotas ---------------------------------------------------------
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def _files(directory) -> dict[str, bytes]:
    return {f: (directory / f).read_bytes() for f in ADAPTER_FILES}


def _size(directory) -> int:
    return sum(len(d) for d in _files(directory).values())


@pytest.fixture(scope="module")
def limited(tiny_model_dir, tmp_path_factory, tokens_file, adapter_dir):
    size = _size(adapter_dir)
    with running_server(
        tiny_model_dir,
        tmp_path_factory.mktemp("data"),
        tokens_file=str(tokens_file),
        max_adapters_per_tenant=5,
        max_tenant_bytes=6 * size,
    ) as run:
        run.size = size
        yield run


def _chunks(name, files: dict[str, bytes], hold: threading.Event | None = None, chunk=512):
    """The upload's messages; with `hold`, everything but the last chunk, then wait for it."""
    messages = [adapters_pb2.UploadChunk(name=name)]
    for fname, data in files.items():
        for off in range(0, len(data), chunk):
            messages.append(adapters_pb2.UploadChunk(filename=fname, data=data[off : off + chunk]))
    for i, m in enumerate(messages):
        if hold is not None and i == len(messages) - 1:
            hold.wait(30)
        yield m


def _stored(run, tenant) -> list[tuple[str, int]]:
    resp = run.adapters.ListAdapters(
        adapters_pb2.ListAdaptersRequest(all_versions=True), metadata=md(tenant), timeout=10
    )
    return sorted((a.name, a.version) for a in resp.adapters)


def _delete_all(run, tenant):
    for name in {n for n, _ in _stored(run, tenant)}:
        run.adapters.DeleteAdapter(common_pb2.AdapterRef(name=name), metadata=md(tenant), timeout=10)


def test_uploads_in_flight_share_one_byte_budget(tiny_model_dir, tmp_path, tokens_file, adapter_dir):
    size = _size(adapter_dir)
    with running_server(
        tiny_model_dir,
        tmp_path,
        tokens_file=str(tokens_file),
        max_upload_bytes=size + 100,
        upload_buffer_bytes=size + size // 2,  # one upload and a half
    ) as run:
        run.size = size
        _one_upload_holds_the_budget(run, adapter_dir)


def _one_upload_holds_the_budget(limited, adapter_dir):
    uploads = limited.state.adapters.uploads
    hold = threading.Event()
    first = limited.adapters.UploadAdapter.future(
        _chunks("first", _files(adapter_dir), hold), metadata=md("alpha"), timeout=60
    )
    try:
        for _ in range(2400):  # until the first upload's bytes (all but its last chunk) are in (60 s at most)
            if uploads.budget.used >= limited.size - 512:
                break
            time.sleep(0.025)
        assert uploads.in_flight() == 1
        with pytest.raises(grpc.RpcError) as e:
            limited.adapters.UploadAdapter(
                _chunks("second", _files(adapter_dir)), metadata=md("beta"), timeout=30
            )
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--upload-buffer-bytes" in e.value.details()
        assert uploads.in_flight() == 1  # the refused upload's spool is gone already
    finally:
        hold.set()
    assert first.result(timeout=30).name == "first"
    assert uploads.budget.used == 0 and uploads.in_flight() == 0
    limited.adapters.UploadAdapter(_chunks("second", _files(adapter_dir)), metadata=md("beta"), timeout=30)
    _delete_all(limited, "alpha")
    _delete_all(limited, "beta")


def test_readme_is_ignored_and_export_streams_from_disk(limited, adapter_dir, monkeypatch):
    files = {**_files(adapter_dir), "README.md": (adapter_dir / "README.md").read_bytes()[:50]}
    out = limited.adapters.UploadAdapter(_chunks("with-card", files), metadata=md("alpha"), timeout=30)
    assert out.size_bytes == limited.size  # the model card is not stored
    registry = limited.state.adapters.registry
    monkeypatch.setattr(registry, "read_files", lambda *a: pytest.fail("export read whole files"))
    monkeypatch.setattr(registry.blobs, "get", lambda *a: pytest.fail("export read whole files"))
    exported: dict[str, bytes] = {}
    for c in limited.adapters.ExportAdapter(common_pb2.AdapterRef(name="with-card"), metadata=md("alpha")):
        exported[c.filename] = exported.get(c.filename, b"") + c.data
    assert exported == _files(adapter_dir)
    monkeypatch.undo()
    _delete_all(limited, "alpha")


def test_a_tenant_cannot_store_more_than_its_byte_quota(tiny_model_dir, tmp_path, tokens_file, adapter_dir):
    size = _size(adapter_dir)
    with running_server(
        tiny_model_dir, tmp_path, tokens_file=str(tokens_file), max_tenant_bytes=size + size // 2
    ) as run:
        run.adapters.UploadAdapter(_chunks("one", _files(adapter_dir)), metadata=md("alpha"), timeout=30)
        with pytest.raises(grpc.RpcError) as e:
            run.adapters.UploadAdapter(_chunks("two", _files(adapter_dir)), metadata=md("alpha"), timeout=30)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert (
            "--max-tenant-bytes" in e.value.details()
            and f"quota of {size + size // 2} bytes" in e.value.details()
        )
        assert _stored(run, "alpha") == [("one", 1)]
        run.adapters.UploadAdapter(_chunks("two", _files(adapter_dir)), metadata=md("beta"), timeout=30)
        _delete_all(run, "alpha")
        run.adapters.UploadAdapter(_chunks("two", _files(adapter_dir)), metadata=md("alpha"), timeout=30)


def test_racing_uploads_store_no_more_than_the_version_limit(limited, adapter_dir):
    """--max-adapters-per-tenant 5 and 12 uploads at once: exactly 5 are stored, the rest refused."""
    files = _files(adapter_dir)
    start = threading.Barrier(12)
    codes: list[grpc.StatusCode] = []
    lock = threading.Lock()

    def upload(i):
        start.wait(30)
        try:
            mine = {**files, "adapter_config.json": files["adapter_config.json"] + b" " * i}  # new blobs
            limited.adapters.UploadAdapter(_chunks(f"race-{i}", mine), metadata=md("beta"), timeout=60)
            code = grpc.StatusCode.OK
        except grpc.RpcError as e:
            code = e.code()
        with lock:
            codes.append(code)

    threads = [threading.Thread(target=upload, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(c.name for c in codes) == ["OK"] * 5 + ["RESOURCE_EXHAUSTED"] * 7
    assert len(_stored(limited, "beta")) == 5
    registry = limited.state.adapters.registry
    assert set(registry.blobs.list()) == registry.metadata.referenced_blobs()  # refused ones left no blob
    _delete_all(limited, "beta")
