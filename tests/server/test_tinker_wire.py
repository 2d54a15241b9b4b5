"""The Tinker wire: our vendored proto is the SDK's (descriptor for descriptor), and what the SDK encodes we
decode, what we encode the SDK decodes (its own tinker/proto conversion functions on both sides)."""

from __future__ import annotations

import numpy as np
import pytest
from google.protobuf import descriptor_pb2
from tinker import types
from tinker.proto import tinker_public_pb2
from tinker.proto.request_conv import _tensor_data_to_proto, forward_backward_request_to_proto
from tinker.proto.response_conv import deserialize_forward_backward_output, deserialize_sample_response

from hotlora.adapters.errors import InvalidArgument
from hotlora.server.tinker import wire


def test_our_descriptor_is_the_sdks_so_the_wire_is_the_same():
    theirs = descriptor_pb2.FileDescriptorProto()
    tinker_public_pb2.DESCRIPTOR.CopyToProto(theirs)
    ours = descriptor_pb2.FileDescriptorProto()
    wire._pool().FindFileByName(theirs.name).CopyToProto(ours)
    for fdp in (ours, theirs):  # json_name is derived from the field name; one side spells it out
        _clear_json_names(fdp.message_type)
    assert ours == theirs


def _clear_json_names(messages):
    for m in messages:
        for f in m.field:
            f.ClearField("json_name")
        _clear_json_names(m.nested_type)


def _request(**kw):
    data = [
        types.Datum(
            model_input=types.ModelInput.from_ints([5, 6, 7]),
            loss_fn_inputs={"target_tokens": [6, 7, 8], "weights": [0.0, 1.0, 0.5]},
        ),
        types.Datum(model_input=types.ModelInput.from_ints([9]), loss_fn_inputs={"target_tokens": [10]}),
    ]
    req = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(data=data, **kw), model_id="s:train:0", seq_id=3
    )
    return forward_backward_request_to_proto(req)


def test_a_forward_backward_the_sdk_encodes_is_decoded():
    msg = _request(loss_fn="ppo", loss_fn_config={"clip_low_threshold": 0.7})
    msg.forward_only = True
    call = wire.parse_forward_backward(msg.SerializeToString())
    assert (call.model_id, call.seq_id, call.loss_fn, call.forward_only) == ("s:train:0", 3, "ppo", True)
    assert call.loss_fn_config == {"clip_low_threshold": pytest.approx(0.7)}
    (t0, in0), (t1, in1) = call.data
    assert t0 == [5, 6, 7] and t1 == [9]
    assert in0["target_tokens"].tolist() == [6, 7, 8] and in0["weights"].tolist() == [0.0, 1.0, 0.5]
    assert in1["target_tokens"].tolist() == [10]


def test_sparse_csr_loss_inputs_are_densified():
    import torch

    dense = torch.zeros(4, 8, dtype=torch.int64)
    dense[0, 1], dense[2, 5] = 3, 4
    td = types.TensorData.from_torch_sparse(dense)
    msg = tinker_public_pb2.ForwardBackwardRequest(model_id="m", seq_id=1, loss_fn="cross_entropy")
    d = msg.data.add()
    d.loss_fn_inputs["target_tokens"].CopyFrom(_tensor_data_to_proto(td))
    assert td.sparse_crow_indices is not None  # the SDK chose CSR
    call = wire.parse_forward_backward(msg.SerializeToString())
    assert call.data[0][1]["target_tokens"].tolist() == dense.tolist()


@pytest.mark.parametrize(
    "damage, words",
    [
        (lambda m: setattr(m.data[0].model_input[0].encoded_text, "tokens", b"\x01\x02\x03"), "int32"),
        (lambda m: m.data[0].loss_fn_inputs["weights"].shape.append(7), "does not hold"),
        (lambda m: setattr(m.data[0].loss_fn_inputs["weights"], "dtype", 0), "dtype"),
    ],
)
def test_malformed_bodies_are_refused_with_a_message(damage, words):
    msg = _request(loss_fn="cross_entropy")
    damage(msg)
    with pytest.raises(InvalidArgument, match=words):
        wire.parse_forward_backward(msg.SerializeToString())
    with pytest.raises(InvalidArgument, match="not a ForwardBackwardRequest"):
        wire.parse_forward_backward(b"\xff\xff\xff")


def test_outputs_we_encode_are_what_the_sdk_reads():
    lps = [np.array([-0.5, -1.25], np.float32), np.array([-2.0], np.float32)]
    losses = [np.array([0.5, 1.25], np.float32), np.array([0.0], np.float32)]
    out = deserialize_forward_backward_output(wire.forward_backward_output(lps, losses, {"loss:sum": 1.75}))
    assert out.metrics == {"loss:sum": 1.75}
    assert [o["logprobs"].tolist() for o in out.loss_fn_outputs] == [[-0.5, -1.25], [-2.0]]
    assert [o["elementwise_loss"].tolist() for o in out.loss_fn_outputs] == [[0.5, 1.25], [0.0]]

    seqs = [wire.Sequence([4, 2], [-0.25, -3.0], stop=True), wire.Sequence([7], [-1.0], stop=False)]
    res = deserialize_sample_response(wire.sample_response(seqs, [None, -1.5, -0.5]))
    assert [s.tokens for s in res.sequences] == [[4, 2], [7]]
    assert [s.logprobs for s in res.sequences] == [[-0.25, -3.0], [-1.0]]
    assert [s.stop_reason for s in res.sequences] == ["stop", "length"]
    assert res.prompt_logprobs[0] is None and res.prompt_logprobs[1:] == [-1.5, -0.5]
