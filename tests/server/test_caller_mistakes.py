"""Issue 12, findings 8, 9 and 10: a caller's mistake is answered as one (INVALID_ARGUMENT, CANCELLED,
RESOURCE_EXHAUSTED), is counted so in the metrics, leaves no traceback in the log, and cannot forge log
lines; KServe inputs are sized before they are decoded."""

from __future__ import annotations

import json
import logging
import struct
import threading

import grpc
import pytest

from hotlora.adapters.errors import Cancelled
from hotlora.server.logs import ACCESS_LOGGER
from hotlora.server.rpc import kserve_conversion as kc
from hotlora.server.rpc.adapters_service import AdaptersServicer
from hotlora.v1 import adapters_pb2, inference_pb2
from tests.server.adapter_utils import make_peft_adapter, upload_chunks
from tests.server.harness import running_server
from tests.server.test_metrics import scrape, value

MAX_MESSAGE = 1 << 20
MAX_TEXTS = 8


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("peft")
    gen = make_peft_adapter(root / "gen", seed=1, r=2, lora_alpha=4, target_modules=["q_proj"])
    with running_server(
        tiny_model_dir, tmp_path_factory.mktemp("data"), max_message_bytes=MAX_MESSAGE, max_texts=MAX_TEXTS
    ) as run:
        run.adapters.UploadAdapter(upload_chunks("gen", gen), timeout=30)
        run.gen_dir = gen
        yield run


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture()
def logged():
    handler = Records()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield handler.records
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


def counted(run, rpc: str, code: str) -> float:
    return value(scrape(run), "hotlora_requests_total", rpc=rpc, code=code)


def status(fn) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value


# ---- finding 8 ---------------------------------------------------------------------------------------
def test_newlines_in_request_ids_and_names_do_not_forge_log_lines(server, logged):
    forged = "r1\n2099-01-01 00:00:00,000 ERROR hotlora.rpc: forged line"
    server.inference.Generate(inference_pb2.GenerateRequest(prompt="hi", request_id=forged), timeout=30)
    status(lambda: server.inference.Generate(inference_pb2.GenerateRequest(prompt="x", adapter="a\r\nb")))
    text = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    lines = [text.format(r) for r in logged if r.name == ACCESS_LOGGER]
    assert len(lines) == 2
    assert all("\n" not in line and "\r" not in line for line in lines), lines
    assert "request_id=r1\\x0a2099-01-01" in lines[0] and "adapter=a\\x0d\\x0ab" in lines[1]


# ---- finding 9 ---------------------------------------------------------------------------------------
GARBAGE = b"\xff\xff\xff\xff\x0f"  # a field tag with a varint that never ends


@pytest.mark.parametrize(
    "method",
    ["/hotlora.v1.Inference/Generate", "/hotlora.v1.Adapters/GetAdapter", f"/{kc.SERVICE}/ModelInfer"],
)
def test_undecodable_messages_are_invalid_argument(server, method, logged):
    before = counted(server, method.rsplit("/", 1)[-1], "INVALID_ARGUMENT")
    err = status(lambda: server.channel.unary_unary(method)(GARBAGE, timeout=10))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert "not a valid protobuf message" in err.details()
    assert counted(server, method.rsplit("/", 1)[-1], "INVALID_ARGUMENT") == before + 1
    assert not [r for r in logged if r.exc_info], "a caller's bytes logged a traceback"


def test_an_undecodable_upload_chunk_is_invalid_argument(server):
    first = adapters_pb2.UploadChunk(name="garbled").SerializeToString()
    upload = server.channel.stream_unary("/hotlora.v1.Adapters/UploadAdapter")
    err = status(lambda: upload(iter([first, GARBAGE]), timeout=10))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()


def _load(server, config: str | None = None, **params):
    req = kc.pb.RepositoryModelLoadRequest(model_name="gen")
    if config is not None:
        req.parameters["config"].string_param = config
    for k, v in params.items():
        if isinstance(v, bool):
            req.parameters[k].bool_param = v
        else:
            req.parameters[k].string_param = v
    rpc = server.channel.unary_unary(
        f"/{kc.SERVICE}/RepositoryModelLoad",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=kc.pb.RepositoryModelLoadResponse.FromString,
    )
    return rpc(req, timeout=30)


def _infer(server, shape=(1,), raw: bytes | None = None, **params):
    req = kc.pb.ModelInferRequest(model_name="base")
    req.inputs.add(name="text_input", datatype="BYTES", shape=list(shape))
    req.raw_input_contents.append(raw if raw is not None else struct.pack("<I", 2) + b"hi")
    for k, v in params.items():
        req.parameters[k].string_param = v
    rpc = server.channel.unary_unary(
        f"/{kc.SERVICE}/ModelInfer",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=kc.pb.ModelInferResponse.FromString,
    )
    return rpc(req, timeout=30)


def _with_files(server, config: str):
    """A RepositoryModelLoad that uploads: the config is read before the files are validated."""
    req = kc.pb.RepositoryModelLoadRequest(model_name="from-files")
    req.parameters["config"].string_param = config
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        req.parameters[f"file:1/{name}"].bytes_param = (server.gen_dir / name).read_bytes()
    rpc = server.channel.unary_unary(
        f"/{kc.SERVICE}/RepositoryModelLoad",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=kc.pb.RepositoryModelLoadResponse.FromString,
    )
    return rpc(req, timeout=30)


@pytest.mark.parametrize(
    "config",
    ["[" * 100_000, '{"labels": "[bad"}', '{"parameters": 5}', '{"labels": "' + "[" * 100_000 + '"}'],
    ids=["nested-too-deep", "labels-not-json", "parameters-not-an-object", "labels-nested-too-deep"],
)
def test_kserve_config_mistakes_are_invalid_argument(server, config):
    err = status(lambda: _with_files(server, config))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()


def test_kserve_stop_nested_too_deep_is_invalid_argument(server):
    err = status(lambda: _infer(server, stop="[" * 100_000))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert "stop" in err.details()


@pytest.mark.parametrize("word", ["maybe", "", "2"])
def test_kserve_booleans_are_parsed_strictly(server, word):
    err = status(lambda: _load(server, pin=word))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "'pin' must be a boolean" in err.details()


def test_a_cancelled_upload_is_counted_cancelled_without_a_traceback(server, logged):
    before = counted(server, "UploadAdapter", "CANCELLED")
    sent_one = threading.Event()

    def chunks():
        yield adapters_pb2.UploadChunk(name="cancelled")
        yield adapters_pb2.UploadChunk(filename="adapter_model.safetensors", data=b"x" * 1000)
        sent_one.set()
        threading.Event().wait(30)  # the client gives up before sending more

    call = server.adapters.UploadAdapter.future(chunks(), timeout=60)
    assert sent_one.wait(60)
    call.cancel()
    for _ in range(1200):  # 60 s at most
        if counted(server, "UploadAdapter", "CANCELLED") > before:
            break
        threading.Event().wait(0.05)
    assert counted(server, "UploadAdapter", "CANCELLED") == before + 1
    assert counted(server, "UploadAdapter", "INTERNAL") == 0
    assert not [r for r in logged if r.exc_info], [r.getMessage() for r in logged if r.exc_info]


class _GoneClient:
    """A servicer context whose client has cancelled (grpc may still end the request iterator normally)."""

    def is_active(self) -> bool:
        return False


def test_a_whole_upload_whose_client_cancelled_is_never_stored(server, tmp_path):
    adapter = make_peft_adapter(tmp_path / "a", seed=3, r=2, lora_alpha=4, target_modules=["q_proj"])
    with pytest.raises(Cancelled, match="cancelled the upload"):
        AdaptersServicer(server.state).UploadAdapter(upload_chunks("gone", adapter), _GoneClient())
    listed = server.adapters.ListAdapters(adapters_pb2.ListAdaptersRequest(), timeout=30)
    assert "gone" not in {a.name for a in listed.adapters}


class _LateCancel:
    """A client that cancelled as its last chunk went out: the request iterator ends normally, and grpc
    marks the call cancelled only a moment later (after the handler's first check)."""

    def __init__(self):
        self.checks = 0

    def is_active(self) -> bool:
        self.checks += 1
        return self.checks == 1


def test_a_cut_off_upload_whose_cancel_is_noticed_late_is_cancelled_not_invalid(server):
    chunks = [
        adapters_pb2.UploadChunk(name="cut-off"),
        adapters_pb2.UploadChunk(filename="adapter_model.safetensors", data=b"x" * 1000),
    ]
    with pytest.raises(Cancelled, match="cancelled the upload"):
        AdaptersServicer(server.state).UploadAdapter(iter(chunks), _LateCancel())


def test_an_oversized_chunk_is_not_counted_internal(server, logged):
    chunks = [
        adapters_pb2.UploadChunk(name="oversized"),
        adapters_pb2.UploadChunk(filename="adapter_model.safetensors", data=b"x" * (MAX_MESSAGE + 1)),
    ]
    err = status(lambda: server.adapters.UploadAdapter(iter(chunks), timeout=30))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
    for _ in range(1200):  # the server side of the call ends a moment after the client's (60 s at most)
        if counted(server, "UploadAdapter", "CANCELLED") + counted(
            server, "UploadAdapter", "RESOURCE_EXHAUSTED"
        ):
            break
        threading.Event().wait(0.05)
    assert counted(server, "UploadAdapter", "INTERNAL") == 0
    assert not [r for r in logged if r.exc_info], [r.getMessage() for r in logged if r.exc_info]


# ---- finding 10 --------------------------------------------------------------------------------------
def test_a_shape_whose_element_count_overflows_64_bits_is_refused(server):
    wraps_to_one = [2**32 + 1, 2**32 - 1, 2**32 + 1, 2**32 - 1]  # product = (2^64 - 1)^2 = 1 mod 2^64
    err = status(lambda: _infer(server, shape=wraps_to_one))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
    assert "--max-texts" in err.details()


def test_a_huge_bytes_input_is_refused_before_it_is_decoded(server, monkeypatch):
    decoded = []
    real = kc.decode_bytes
    monkeypatch.setattr(kc, "decode_bytes", lambda *a: decoded.append(1) or real(*a))
    n = 200_000
    err = status(lambda: _infer(server, shape=(n,), raw=b"\x00\x00\x00\x00" * n))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
    assert f"at most {MAX_TEXTS} texts" in err.details()
    assert decoded == []
    # raw contents with more elements than the shape says stop being decoded at the first extra one
    err = status(lambda: _infer(server, shape=(1,), raw=struct.pack("<I", 1) * 2 + b"\x00" * 100))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "more than the 1 elements" in err.details()


def test_the_server_is_fine_after_the_mistakes(server):
    assert server.inference.Generate(inference_pb2.GenerateRequest(prompt="ok"), timeout=30).token_ids
    assert json.loads(json.dumps(counted(server, "Generate", "INTERNAL"))) == 0
