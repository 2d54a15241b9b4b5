"""Hostile input to the KServe door's parameters and shapes, and undecodable bytes to every rpc of every
door (hypothesis, bounded). As in test_fuzz_rpcs: a correct answer or a caller's status (never INTERNAL,
UNKNOWN or a hang), the registry unchanged, the server healthy."""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st

from hotlora.server.rpc import kserve_conversion as kc
from tests.server.test_fuzz_rpcs import FUZZ, _registry, call, server  # noqa: F401 (the fixture)

SERVICE = f"/{kc.SERVICE}/"
# every rpc whose request is one message, and the client-streaming ones
UNARY = [
    "/hotlora.v1.Inference/Generate",
    "/hotlora.v1.Inference/Embed",
    "/hotlora.v1.Inference/Classify",
    "/hotlora.v1.Adapters/ListAdapters",
    "/hotlora.v1.Adapters/GetAdapter",
    "/hotlora.v1.Adapters/DeleteAdapter",
    "/hotlora.v1.Adapters/LoadAdapter",
    "/hotlora.v1.Adapters/UnloadAdapter",
    "/hotlora.v1.Training/GetFineTune",
    "/hotlora.v1.Training/ListFineTunes",
    "/hotlora.v1.Training/CancelFineTune",
    SERVICE + "ModelInfer",
    SERVICE + "ModelMetadata",
    SERVICE + "ModelConfig",
    SERVICE + "ModelReady",
    SERVICE + "ModelStatistics",
    SERVICE + "RepositoryIndex",
    SERVICE + "RepositoryModelUnload",
]
SERVER_STREAMING = ["/hotlora.v1.Inference/GenerateStream", "/hotlora.v1.Adapters/ExportAdapter"]
CLIENT_STREAMING = ["/hotlora.v1.Adapters/UploadAdapter"]

# bytes that are rarely a valid message: truncated varints and lengths, bad wire types, random
garbage = st.one_of(
    st.binary(min_size=1, max_size=64),
    st.sampled_from(
        [b"\xff", b"\x0a\xff\xff\xff\xff\x0f", b"\x0a\x05ab", b"\x0f", b"\x12\x80\x80\x80\x80\x10"]
    ),
)


def _no_delete(method: str) -> bool:
    # random bytes may decode to a valid DeleteAdapter of a fixture; skip the ones that would
    return not method.endswith(("DeleteAdapter", "RepositoryModelUnload"))


@FUZZ
@given(method=st.sampled_from([m for m in UNARY if _no_delete(m)]), data=garbage)
def test_undecodable_unary_requests(server, method, data):  # noqa: F811
    call(method.rsplit("/", 1)[-1] + " bytes", lambda: server.channel.unary_unary(method)(data, timeout=30))


@FUZZ
@given(method=st.sampled_from(SERVER_STREAMING), data=garbage)
def test_undecodable_streaming_requests(server, method, data):  # noqa: F811
    call(
        method.rsplit("/", 1)[-1] + " bytes",
        lambda: list(server.channel.unary_stream(method)(data, timeout=30)),
    )


@FUZZ
@given(method=st.sampled_from(CLIENT_STREAMING), messages=st.lists(garbage, min_size=1, max_size=3))
def test_undecodable_client_streams(server, method, messages):  # noqa: F811
    call(
        method.rsplit("/", 1)[-1] + " bytes",
        lambda: server.channel.stream_unary(method)(iter(messages), timeout=30),
    )
    assert _registry(server) == server.snapshot


# ---- KServe parameters and shapes ----------------------------------------------------------------
hostile_json = st.one_of(
    st.sampled_from(
        ["[" * 50_000, "{" * 1000, '["a", 1]', "[bad", "[]", '["' + "x" * 300 + '"]', "1e999", ""]
    ),
    st.text(max_size=20),
)
param_value = st.one_of(
    st.booleans().map(lambda v: ("bool_param", v)),
    st.integers(-(2**63), 2**63 - 1).map(lambda v: ("int64_param", v)),
    st.integers(0, 2**64 - 1).map(lambda v: ("uint64_param", v)),
    st.floats(allow_nan=True, allow_infinity=True).map(lambda v: ("double_param", v)),
    hostile_json.map(lambda v: ("string_param", v)),
)
param_key = st.one_of(
    st.sampled_from(
        ["max_tokens", "max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop", "priority"]
        + ["triton_enable_empty_final_response", "sequence_id", "adapter", "pin", "config", ""]
    ),
    st.text(max_size=12),
)
dims = st.one_of(st.integers(-3, 4), st.integers(2**31, 2**63 - 1))
shapes = st.one_of(st.just([1]), st.lists(dims, max_size=5))


def _infer_request(model, shape, texts, params, datatype, raw):
    req = kc.pb.ModelInferRequest(model_name=model)
    req.inputs.add(name="text_input", datatype=datatype, shape=shape)
    if raw:
        req.raw_input_contents.append(kc.encode_bytes(texts))
    else:
        req.inputs[0].contents.bytes_contents.extend(texts)
    for key, (kind, value) in params.items():
        setattr(req.parameters[key], kind, value)
    return req


def _rpc(run, name, response):
    return run.channel.unary_unary(
        SERVICE + name,
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=getattr(kc.pb, response).FromString,
    )


sane_params = st.dictionaries(
    st.sampled_from(["max_tokens", "temperature", "seed"]),
    st.sampled_from([("int64_param", 2), ("double_param", 0.5), ("int64_param", 7)]),
    max_size=2,
)


@FUZZ
@given(
    model=st.sampled_from(["base", "gen", "cls", "gen@1", "nobody", ""]),
    shape=st.one_of(st.none(), shapes),  # None: the shape the texts have
    texts=st.one_of(
        st.lists(st.text(min_size=1, max_size=20).map(str.encode), min_size=1, max_size=3),
        st.lists(st.binary(max_size=30), max_size=4),
    ),
    params=st.one_of(sane_params, st.dictionaries(param_key, param_value, max_size=4)),
    datatype=st.sampled_from(["BYTES", "BYTES", "FP32", ""]),
    raw=st.booleans(),
)
def test_kserve_infer_parameters_and_shapes(server, model, shape, texts, params, datatype, raw):  # noqa: F811
    shape = [len(texts)] if shape is None else shape
    req = _infer_request(model, shape, texts, params, datatype, raw)
    resp = call("ModelInfer", lambda: _rpc(server, "ModelInfer", "ModelInferResponse")(req, timeout=30))
    if resp is not None:
        assert resp.model_name in ("base", "gen", "cls")


@FUZZ
@given(
    model=st.sampled_from(["gen", "cls", "base", "new-one", ""]),
    config=st.one_of(st.none(), hostile_json, st.sampled_from(['{"labels": "[bad"}', '{"parameters": 5}'])),
    pin=st.one_of(st.none(), param_value),
    files=st.dictionaries(
        st.sampled_from(
            ["file:1/adapter_config.json", "file:1/adapter_model.safetensors", "file:x", "file:"]
        ),
        st.binary(max_size=64),
        max_size=2,
    ),
)
def test_kserve_repository_load_parameters(server, model, config, pin, files):  # noqa: F811
    req = kc.pb.RepositoryModelLoadRequest(model_name=model)
    if config is not None:
        req.parameters["config"].string_param = config
    if pin is not None:
        kind, value = pin
        if kind in ("bool_param", "int64_param", "string_param"):
            setattr(req.parameters["pin"], kind, value)
    for key, data in files.items():
        req.parameters[key].bytes_param = data
    load = _rpc(server, "RepositoryModelLoad", "RepositoryModelLoadResponse")
    call("RepositoryModelLoad", lambda: load(req, timeout=30))
    unload = _rpc(server, "RepositoryModelUnload", "RepositoryModelUnloadResponse")
    if model in ("gen", "cls"):  # leave no pin behind for the next example
        unload(kc.pb.RepositoryModelUnloadRequest(model_name=model), timeout=30)
    assert _registry(server) == server.snapshot


@FUZZ
@given(texts=st.lists(st.binary(max_size=8), max_size=3), claimed=st.integers(0, 2**32 - 1))
def test_kserve_lying_bytes_lengths(server, texts, claimed):  # noqa: F811
    req = _infer_request("base", [len(texts) + 1], texts, {}, "BYTES", True)
    req.raw_input_contents[0] += struct.pack("<I", claimed)
    call("ModelInfer raw", lambda: _rpc(server, "ModelInfer", "ModelInferResponse")(req, timeout=30))


def test_server_is_healthy_after_the_kserve_fuzzing(server):  # noqa: F811
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    health = health_pb2_grpc.HealthStub(server.channel)
    status = health.Check(health_pb2.HealthCheckRequest(), timeout=30).status
    assert status == health_pb2.HealthCheckResponse.SERVING
    assert _registry(server) == server.snapshot
    assert server.state.engine.num_running == 0
