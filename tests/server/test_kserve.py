"""The KServe / Triton protocol on the hotlora port, driven by the stock tritonclient
(sync and asyncio) in the same process as the server."""

from __future__ import annotations

import asyncio
import json
import threading

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
import tritonclient.grpc.aio as tc_aio
from google.protobuf import descriptor_pb2
from tritonclient.utils import InferenceServerException

from hotlora.server.rpc import kserve_conversion as kc
from hotlora.v1 import common_pb2, inference_pb2
from tests.server.adapter_utils import make_peft_adapter, make_seq_cls_adapter
from tests.server.harness import running_server

ALICE, BOB = "alice-token", "bob-token"
H = {"authorization": f"Bearer {ALICE}"}
H_BOB = {"authorization": f"Bearer {BOB}"}
META = (("authorization", f"Bearer {ALICE}"),)
NEW = 8
LABELS = ["neg", "neu", "pos"]


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    tokens = tmp_path_factory.mktemp("auth") / "tokens"
    tokens.write_text(f"alice {ALICE}\nbob {BOB}\n")
    data = tmp_path_factory.mktemp("data")
    with running_server(tiny_model_dir, data, tokens_file=str(tokens), adapter_slots=3, max_rank=16) as run:
        yield run


@pytest.fixture(scope="module")
def client(server):
    c = tc.InferenceServerClient(server.address)
    yield c
    c.close()


def _files(directory) -> dict[str, bytes]:
    return {
        f"file:1/{n}": (directory / n).read_bytes()
        for n in ("adapter_config.json", "adapter_model.safetensors")
    }


@pytest.fixture(scope="module")
def gen_adapter(server, client, tmp_path_factory):
    d = make_peft_adapter(
        tmp_path_factory.mktemp("peft") / "g",
        seed=3,
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj", "down_proj"],
    )
    client.load_model("support-bot", headers=H, config="{}", files=_files(d))
    return "support-bot"


@pytest.fixture(scope="module")
def cls_adapter(server, client, tmp_path_factory):
    d = make_seq_cls_adapter(tmp_path_factory.mktemp("peft") / "c")
    client.load_model("sentiment", headers=H, config=json.dumps({"labels": LABELS}), files=_files(d))
    return "sentiment"


def _text_input(*texts: str):
    t = tc.InferInput("text_input", [len(texts)], "BYTES")
    t.set_data_from_numpy(np.array([s.encode() for s in texts], dtype=object))
    return t


def _generate(server, prompt, adapter=""):
    return server.inference.Generate(
        inference_pb2.GenerateRequest(
            prompt=prompt, adapter=adapter, params=common_pb2.SamplingParams(max_new_tokens=NEW)
        ),
        metadata=META,
        timeout=60,
    )


def _status(exc_info) -> str:
    return exc_info.value.status()


def _clear_json_names(messages):
    for m in messages:
        for f in m.field:
            f.ClearField("json_name")
        _clear_json_names(m.nested_type)


def test_our_descriptors_are_tritons_so_the_wire_format_is_the_same():
    import tritonclient.grpc.model_config_pb2 as triton_config
    import tritonclient.grpc.service_pb2 as triton_service

    for mod in (triton_service, triton_config):
        theirs = descriptor_pb2.FileDescriptorProto()
        mod.DESCRIPTOR.CopyToProto(theirs)
        ours = descriptor_pb2.FileDescriptorProto()
        kc.pool().FindFileByName(theirs.name).CopyToProto(ours)
        for fdp in (ours, theirs):  # json_name is derived from the field name; one side spells it out
            _clear_json_names(fdp.message_type)
        assert ours == theirs, f"{theirs.name} differs from tritonclient's"


def test_server_live_ready_and_metadata(client):
    assert client.is_server_live(headers=H) and client.is_server_ready(headers=H)
    meta = client.get_server_metadata(headers=H, as_json=True)
    assert meta["name"] == "hotlora" and "model_repository" in meta["extensions"]
    base = client.get_model_metadata("base", headers=H, as_json=True)
    assert base["versions"] == ["1"] and base["platform"] == "hotlora"
    assert base["inputs"] == [{"name": "text_input", "datatype": "BYTES", "shape": ["-1"]}]
    assert base["outputs"] == [{"name": "text_output", "datatype": "BYTES", "shape": ["-1"]}]
    assert client.is_model_ready("base", headers=H)
    assert not client.is_model_ready("no-such-model", headers=H)
    cfg = client.get_model_config("base", headers=H, as_json=True)["config"]
    assert cfg["model_transaction_policy"]["decoupled"] is True


def test_infer_on_the_base_model_gives_generate_s_text(server, client):
    prompts = ["hello world", "the quick brown fox"]
    res = client.infer("base", [_text_input(*prompts)], parameters={"max_tokens": NEW}, headers=H)
    got = [b.decode() for b in res.as_numpy("text_output")]
    assert got == [_generate(server, p).text for p in prompts]
    assert res.get_output("text_output").shape == [2]
    params = res.get_response().parameters
    assert params["finish_reason"].string_param == "length,length"


def test_load_adapter_from_files_then_infer_matches_generate(server, client, gen_adapter):
    res = client.infer(gen_adapter, [_text_input("hello world")], parameters={"max_tokens": NEW}, headers=H)
    text = res.as_numpy("text_output")[0].decode()
    reference = _generate(server, "hello world", gen_adapter)
    assert text == reference.text and reference.adapter == "support-bot@1"
    assert res.get_response().parameters["adapter"].string_param == "support-bot@1"
    assert (res.get_response().model_name, res.get_response().model_version) == ("support-bot", "1")
    assert text != _generate(server, "hello world").text  # the adapter changes the output
    # model_version pins a version
    pinned = client.infer(
        gen_adapter,
        [_text_input("hello world")],
        model_version="1",
        parameters={"max_tokens": NEW},
        headers=H,
    )
    assert pinned.as_numpy("text_output")[0].decode() == text


@pytest.mark.parametrize("empty_final", [False, True])
def test_streaming_generation_concatenates_to_generate_s_text(server, client, gen_adapter, empty_final):
    got, done = [], threading.Event()

    def callback(result, error):
        got.append((result, error))
        if error is not None or result.get_response().parameters["triton_final_response"].bool_param:
            done.set()

    client.start_stream(callback=callback, headers=H)
    try:
        client.async_stream_infer(
            gen_adapter,
            [_text_input("hello world")],
            parameters={"max_tokens": NEW},
            enable_empty_final_response=empty_final,
        )
        assert done.wait(60)
    finally:
        client.stop_stream()
    assert all(err is None for _, err in got)
    assert len(got) > 2  # one response per chunk
    finals = [r.get_response().parameters["triton_final_response"].bool_param for r, _ in got]
    assert finals == [False] * (len(got) - 1) + [True]
    if empty_final:
        assert got[-1][0].as_numpy("text_output") is None
    pieces = [r.as_numpy("text_output") for r, _ in got]
    text = "".join(p[0].decode() for p in pieces if p is not None)
    assert text == _generate(server, "hello world", gen_adapter).text


def test_stream_errors_arrive_in_the_stream_and_it_goes_on(client):
    got, done = [], threading.Event()

    def callback(result, error):
        got.append((result, error))
        if len(got) == 2 or (
            result is not None and result.get_response().parameters["triton_final_response"].bool_param
        ):
            done.set()

    client.start_stream(callback=callback, headers=H)
    try:
        client.async_stream_infer("no-such-model", [_text_input("x")])
        client.async_stream_infer("base", [_text_input("x")], parameters={"max_tokens": 2})
        assert done.wait(60)
    finally:
        client.stop_stream()
    errors = [e for _, e in got if e is not None]
    assert len(errors) == 1 and "no-such-model" in errors[0].message()
    assert any(r is not None for r, _ in got)


def test_repository_index_and_unload(client, gen_adapter):
    index = client.get_model_repository_index(headers=H, as_json=True)["models"]
    entry = {(m["name"], m["version"]): m for m in index}
    assert entry[("base", "1")]["state"] == "READY"
    assert entry[("support-bot", "1")]["state"] == "READY"
    assert "hotlora state DEVICE" in entry[("support-bot", "1")]["reason"]
    client.unload_model(gen_adapter, headers=H)
    index = client.get_model_repository_index(headers=H, as_json=True)["models"]
    entry = {(m["name"], m["version"]): m for m in index}
    assert "hotlora state DEVICE" not in entry[("support-bot", "1")]["reason"]
    client.load_model(gen_adapter, headers=H)  # no files: back into a device slot
    index = client.get_model_repository_index(headers=H, as_json=True)["models"]
    assert "DEVICE" in {(m["name"]): m for m in index}["support-bot"]["reason"]


def test_classification_adapter_outputs_label_and_probabilities(server, client, cls_adapter):
    meta = client.get_model_metadata(cls_adapter, headers=H, as_json=True)
    assert [o["name"] for o in meta["outputs"]] == ["label", "probabilities"]
    assert meta["outputs"][1] == {"name": "probabilities", "datatype": "FP32", "shape": ["-1", "3"]}
    texts = ["good movie", "bad", "it was fine I guess"]
    res = client.infer(cls_adapter, [_text_input(*texts)], headers=H)
    probs = res.as_numpy("probabilities")
    labels = [b.decode() for b in res.as_numpy("label")]
    assert probs.dtype == np.float32 and probs.shape == (3, 3)
    reference = server.inference.Classify(
        inference_pb2.ClassifyRequest(adapter=cls_adapter, texts=texts), metadata=META, timeout=60
    )
    for row, label, r in zip(probs, labels, reference.results, strict=True):
        assert label == r.label
        np.testing.assert_allclose(row, [s.score for s in r.scores], rtol=1e-5, atol=1e-6)
    only = client.infer(
        cls_adapter, [_text_input("bad")], outputs=[tc.InferRequestedOutput("label")], headers=H
    )
    assert only.as_numpy("probabilities") is None and only.as_numpy("label")[0].decode() == labels[1]


def test_errors_carry_the_right_status(client, gen_adapter, cls_adapter):
    with pytest.raises(InferenceServerException) as e:
        client.infer("no-such-model", [_text_input("x")], headers=H)
    assert _status(e) == "StatusCode.NOT_FOUND" and "no-such-model" in e.value.message()
    with pytest.raises(InferenceServerException) as e:
        client.get_model_metadata(gen_adapter, model_version="9", headers=H)
    assert _status(e) == "StatusCode.NOT_FOUND"
    wrong = tc.InferInput("text_input", [1], "INT32")
    wrong.set_data_from_numpy(np.array([1], dtype=np.int32))
    with pytest.raises(InferenceServerException) as e:
        client.infer("base", [wrong], headers=H)
    assert _status(e) == "StatusCode.INVALID_ARGUMENT" and "BYTES" in e.value.message()
    with pytest.raises(InferenceServerException) as e:
        client.infer("base", [_text_input("x")], parameters={"max_new_tokenz": 3}, headers=H)
    assert _status(e) == "StatusCode.INVALID_ARGUMENT" and "max_tokens" in e.value.message()
    with pytest.raises(InferenceServerException) as e:
        client.infer("base", [_text_input("x")], outputs=[tc.InferRequestedOutput("label")], headers=H)
    assert _status(e) == "StatusCode.INVALID_ARGUMENT" and "text_output" in e.value.message()
    with pytest.raises(InferenceServerException) as e:
        client.load_model(
            "broken", headers=H, config="{}", files={"file:1/adapter_config.json": b"{not json"}
        )
    assert _status(e) == "StatusCode.INVALID_ARGUMENT"
    with pytest.raises(InferenceServerException) as e:
        client.unload_model("base", headers=H)
    assert _status(e) == "StatusCode.FAILED_PRECONDITION"
    with pytest.raises(InferenceServerException) as e:
        client.get_system_shared_memory_status(headers=H)
    assert _status(e) == "StatusCode.UNIMPLEMENTED"
    with pytest.raises(InferenceServerException) as e:
        client.infer("base", [_text_input("x")])  # no token
    assert _status(e) == "StatusCode.UNAUTHENTICATED"


def test_another_tenant_does_not_see_the_adapter(client, gen_adapter):
    names = {m["name"] for m in client.get_model_repository_index(headers=H_BOB, as_json=True)["models"]}
    assert names == {"base"}
    assert not client.is_model_ready(gen_adapter, headers=H_BOB)
    with pytest.raises(InferenceServerException) as e:
        client.infer(gen_adapter, [_text_input("x")], headers=H_BOB)
    assert _status(e) == "StatusCode.NOT_FOUND"


def test_typed_bytes_contents_are_accepted(server):
    """The stock client sends raw contents; other clients send typed `bytes_contents`."""
    channel = grpc.insecure_channel(server.address)
    try:
        infer = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=kc.pb.ModelInferRequest.SerializeToString,
            response_deserializer=kc.pb.ModelInferResponse.FromString,
        )
        request = kc.pb.ModelInferRequest(model_name="base")
        request.inputs.add(name="text_input", datatype="BYTES", shape=[1]).contents.bytes_contents.append(
            b"hi"
        )
        request.parameters["max_tokens"].int64_param = NEW
        response = infer(request, metadata=META, timeout=60)
    finally:
        channel.close()
    (text,) = kc.decode_bytes(response.raw_output_contents[0], 1, "text_output")
    assert text.decode() == _generate(server, "hi").text


def test_statistics_count_inferences(client):
    before = client.get_inference_statistics("base", headers=H, as_json=True)["model_stats"][0]
    client.infer("base", [_text_input("a", "b")], parameters={"max_tokens": 2}, headers=H)
    after = client.get_inference_statistics("base", headers=H, as_json=True)["model_stats"][0]
    assert int(after["inference_count"]) == int(before.get("inference_count", 0)) + 2
    assert int(after["execution_count"]) == int(before.get("execution_count", 0)) + 1
    assert int(after["inference_stats"]["success"]["count"]) >= 1


def test_asyncio_client_infers(server):
    async def run():
        async with tc_aio.InferenceServerClient(server.address) as c:
            t = tc_aio.InferInput("text_input", [1], "BYTES")
            t.set_data_from_numpy(np.array([b"hello world"], dtype=object))
            res = await c.infer("base", [t], parameters={"max_tokens": NEW}, headers=H)
            return res.as_numpy("text_output")[0].decode()

    assert asyncio.run(run()) == _generate(server, "hello world").text
