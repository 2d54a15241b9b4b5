"""Pure helpers of the client: enum names, filenames, the health codec, argument parsing."""

import pytest
from grpc_health.v1 import health_pb2

from hotlora.clients import _common as c
from hotlora.clients import _health
from hotlora.clients._commands import layer_list
from hotlora.v1 import common_pb2, training_pb2


@pytest.mark.parametrize("value", ["SEQ_CLS", "seq_cls", "seq-cls", "TASK_SEQ_CLS", common_pb2.TASK_SEQ_CLS])
def test_task_names(value):
    assert c.to_enum(*c.TASK, value, "task") == common_pb2.TASK_SEQ_CLS


def test_enum_names_round_trip():
    assert c.to_enum(*c.PROMOTE, "always", "promote") == training_pb2.PROMOTE_ALWAYS
    assert c.to_enum(*c.METHOD, "HEAD_ONLY", "method") == training_pb2.METHOD_HEAD_ONLY
    assert c.enum_name(*c.JOB_STATE, training_pb2.JOB_STATE_REJECTED) == "REJECTED"
    assert c.enum_name(*c.TASK, 99) == "99"
    with pytest.raises(c.ClientError, match="allowed: HEAD_ONLY, LORA, AUTO"):
        c.to_enum(*c.METHOD, "QLORA", "method")
    with pytest.raises(c.ClientError):
        c.to_enum(*c.METHOD, 42, "method")


@pytest.mark.parametrize("name", ["adapter_config.json", "adapter_model.safetensors", "a..b", ".hidden"])
def test_safe_filename_accepts_plain_names(name):
    assert c.safe_filename(name) == name


@pytest.mark.parametrize("name", ["", ".", "..", "../x", "x/..", "/abs", "a/b", "a\\b", "nul\x00", "C:x"])
def test_safe_filename_refuses(name):
    with pytest.raises(c.ClientError):
        c.safe_filename(name)


@pytest.mark.parametrize("service", ["", "hotlora.v1.Inference", "x" * 300])
def test_hand_written_health_request_matches_protobuf(service):
    assert (
        _health._encode_request(service) == health_pb2.HealthCheckRequest(service=service).SerializeToString()
    )


@pytest.mark.parametrize("status", ["UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN"])
def test_hand_written_health_response_decoder(status):
    raw = health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.ServingStatus.Value(status))
    assert _health._decode_response(raw.SerializeToString()) == status
    # unknown fields (a newer server) are skipped
    assert _health._decode_response(raw.SerializeToString() + b"\x12\x03abc\x18\x05") == status


def test_channel_options_explicit_message_limits():
    opts = dict(c.channel_options([("grpc.max_receive_message_length", 1), ("grpc.enable_retries", 0)]))
    assert opts["grpc.max_send_message_length"] == c.MAX_MESSAGE_BYTES
    assert opts["grpc.max_receive_message_length"] == 1 and opts["grpc.enable_retries"] == 0


def test_layer_list():
    assert layer_list("1,3-5, 9") == [1, 3, 4, 5, 9]
