"""Server reflection describes every service it lists, KServe's included, so a reflection client (grpcurl,
`hotlora describe`) can build the messages and call each one. Before, KServe's service was listed but
describing it answered NOT_FOUND: its messages live in a private descriptor pool."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import message_factory

from hotlora.clients.cli import main
from hotlora.clients.describe import REFLECTION_SERVICES, ServerDescriptors
from hotlora.server.rpc import kserve_conversion as kc
from hotlora.v1 import adapters_pb2, inference_pb2, training_pb2
from tests.server.harness import running_server

TOKEN = "tok-reflection"
EXPECTED = {
    "hotlora.v1.Inference": inference_pb2.DESCRIPTOR.services_by_name["Inference"],
    "hotlora.v1.Adapters": adapters_pb2.DESCRIPTOR.services_by_name["Adapters"],
    "hotlora.v1.Training": training_pb2.DESCRIPTOR.services_by_name["Training"],
    kc.SERVICE: kc.pool().FindServiceByName(kc.SERVICE),
}


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory):
    with running_server(tiny_model_dir, tmp_path_factory.mktemp("data")) as r:
        yield r


def _shape(service) -> list[tuple]:
    """What a caller needs of each method: its name, streaming and its messages' fields."""

    def fields(message):
        return [(f.name, f.number, f.type) for f in message.fields]

    return [
        (m.name, m.client_streaming, m.server_streaming, fields(m.input_type), fields(m.output_type))
        for m in service.methods
    ]


def test_reflection_describes_every_listed_service_as_the_server_defines_it(run):
    server = ServerDescriptors(run.channel)
    listed = server.service_names()
    assert {*EXPECTED, "grpc.health.v1.Health"} <= set(listed)
    described = {s.full_name: s for s in server.services()}  # raises KeyError naming one it cannot describe
    assert set(described) == set(listed) - set(REFLECTION_SERVICES)
    for name, served in EXPECTED.items():
        assert _shape(described[name]) == _shape(served), name
    assert len(described[kc.SERVICE].methods) > 10  # KServe: ServerLive ... RepositoryModelUnload


def test_a_reflection_client_calls_kserve_with_the_messages_it_was_given(run):
    """As grpcurl does: messages built from the reflected descriptors alone, sent by method path."""
    server = ServerDescriptors(run.channel)
    for rpc, request in (("ServerLive", {}), ("ModelReady", {"name": "base"})):
        method = server.find(f"{kc.SERVICE}.{rpc}")
        request_cls = message_factory.GetMessageClass(method.input_type)
        response_cls = message_factory.GetMessageClass(method.output_type)
        call = run.channel.unary_unary(
            f"/{kc.SERVICE}/{rpc}",
            request_serializer=request_cls.SerializeToString,
            response_deserializer=response_cls.FromString,
        )
        reply = call(request_cls(**request), timeout=30)
        assert reply.live if rpc == "ServerLive" else reply.ready


def test_hotlora_describe_lists_and_describes(run, capsys):
    assert main(["describe", "--address", run.address]) == 0
    out = capsys.readouterr().out
    assert f"{kc.SERVICE}\n  ServerLive(ServerLiveRequest) returns (ServerLiveResponse)" in out
    assert "  ModelStreamInfer(stream ModelInferRequest) returns (stream ModelStreamInferResponse)" in out
    assert "  GenerateStream(GenerateRequest) returns (stream GenerateChunk)" in out

    assert main(["describe", "--address", run.address, "inference.ModelInferRequest"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("inference.ModelInferRequest is a message:\nmessage ModelInferRequest {")
    assert "  map<string, .inference.InferParameter> parameters = 4;" in out
    assert "  repeated .inference.ModelInferRequest.InferInputTensor inputs = 5;" in out

    assert main(["describe", "--address", run.address, "hotlora.v1.Inference.Generate"]) == 0
    assert capsys.readouterr().out == (
        "hotlora.v1.Inference.Generate is a method:\n"
        "rpc Generate ( .hotlora.v1.GenerateRequest ) returns ( .hotlora.v1.GenerateResponse );\n"
    )

    assert main(["describe", "--address", run.address, "inference.NoSuchThing"]) == 1
    err = capsys.readouterr().err
    assert "NOT_FOUND: the server describes no service, method, message or enum named" in err


def test_describe_sends_the_token_reflection_needs(tiny_model_dir, tmp_path, capsys):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"acme {TOKEN}\n")
    with running_server(tiny_model_dir, tmp_path / "data", tokens_file=str(tokens)) as r:
        assert main(["describe", "--address", r.address]) == 1
        assert capsys.readouterr().err.startswith("error: UNAUTHENTICATED")
        assert main(["describe", "--address", r.address, "--token", TOKEN, kc.SERVICE]) == 0
        assert "rpc ModelInfer ( .inference.ModelInferRequest )" in capsys.readouterr().out
        with pytest.raises(grpc.RpcError):  # and the library alone, without the token, is refused too
            ServerDescriptors(r.channel).service_names()
