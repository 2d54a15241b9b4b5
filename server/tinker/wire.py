"""The Tinker SDK's protobuf wire (proto/tinker/tinker_public.proto, loaded into a private pool): the
forward_backward request in, ForwardBackwardOutput and SampleResponse out. JSON bodies are schemas.py's.

Token ids travel as little-endian int32 bytes, float tensors as float32 bytes; a BatchedTensor concatenates
the datums' arrays with int64 byte offsets (the inverse of the SDK's tinker/proto/*_conv.py)."""

from __future__ import annotations

import functools
import importlib.resources
import math
from dataclasses import dataclass

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from hotlora.adapters.errors import InvalidArgument

PROTO = "application/x-protobuf"
_INT64, _INT32, _FLOAT32, _BF16 = 2, 3, 1, 4
_NUMPY = {_FLOAT32: np.float32, _INT64: np.int64, _INT32: np.int32}


@functools.cache
def _pool() -> descriptor_pool.DescriptorPool:
    data = importlib.resources.files("hotlora.tinker_pb").joinpath("tinker_public.binpb").read_bytes()
    pool = descriptor_pool.DescriptorPool()
    for fdp in descriptor_pb2.FileDescriptorSet.FromString(data).file:
        pool.AddSerializedFile(fdp.SerializeToString())
    return pool


@functools.cache
def message(name: str):
    return message_factory.GetMessageClass(_pool().FindMessageTypeByName(f"tinker_public.{name}"))


@dataclass(frozen=True)
class ForwardBackwardCall:
    model_id: str
    seq_id: int | None
    loss_fn: str
    loss_fn_config: dict[str, float | str]
    forward_only: bool
    data: list[tuple[list[int], dict[str, np.ndarray]]]
    """Per datum: the input tokens and the loss inputs (dense arrays of their shape)."""


def parse_forward_backward(body: bytes) -> ForwardBackwardCall:
    msg = message("ForwardBackwardRequest")()
    try:
        msg.ParseFromString(body)
    except Exception as exc:
        raise InvalidArgument(f"the forward_backward body is not a ForwardBackwardRequest: {exc}") from None
    config: dict[str, float | str] = {k: v for k, v in msg.loss_fn_config.items()}
    for k, v in msg.loss_fn_config_v2.items():  # the SDK writes both; v2 is the newer and carries strings
        config[k] = v.text if v.WhichOneof("value") == "text" else v.number
    data = []
    for i, datum in enumerate(msg.data):
        tokens: list[int] = []
        for chunk in datum.model_input:
            kind = chunk.WhichOneof("chunk")
            if kind != "encoded_text":
                raise InvalidArgument(
                    f"datum {i}: a model_input chunk of kind {kind!r}: this server trains on text tokens only"
                )
            raw = chunk.encoded_text.tokens
            if len(raw) % 4:
                raise InvalidArgument(f"datum {i}: encoded_text tokens are not int32 values")
            tokens += np.frombuffer(raw, dtype="<i4").tolist()
        inputs = {
            name: _tensor(t, f"datum {i}: loss_fn_inputs[{name!r}]")
            for name, t in datum.loss_fn_inputs.items()
        }
        data.append((tokens, inputs))
    return ForwardBackwardCall(
        model_id=msg.model_id,
        seq_id=msg.seq_id or None,  # the SDK writes a missing seq_id as 0
        loss_fn=msg.loss_fn,
        loss_fn_config=config,
        forward_only=msg.forward_only,
        data=data,
    )


def _tensor(t, where: str) -> np.ndarray:
    dtype = _NUMPY.get(t.dtype)
    if dtype is None:
        raise InvalidArgument(f"{where}: dtype {t.dtype} is not float32, int64 or int32")
    shape = [int(s) for s in t.shape]
    if any(s < 0 for s in shape) or math.prod(shape) > 1 << 26:
        raise InvalidArgument(f"{where}: shape {shape} is not a valid tensor shape")
    item = np.dtype(dtype).itemsize
    if t.WhichOneof("encoding") == "sparse_csr":
        return _dense_from_csr(t.sparse_csr, dtype, shape, where)
    raw = t.dense
    if len(raw) % item:
        raise InvalidArgument(f"{where}: {len(raw)} bytes are not whole {np.dtype(dtype).name} values")
    a = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<"))
    if not shape:
        shape = [a.size]
    if math.prod(shape) != a.size:
        raise InvalidArgument(f"{where}: shape {shape} does not hold its {a.size} values")
    return a.reshape(shape).astype(dtype)


def _dense_from_csr(csr, dtype, shape: list[int], where: str) -> np.ndarray:
    if len(shape) != 2:
        raise InvalidArgument(f"{where}: a sparse CSR tensor needs a 2-D shape (got {shape})")
    values = np.frombuffer(csr.values, dtype=np.dtype(dtype).newbyteorder("<"))
    crow = np.frombuffer(csr.crow_indices, dtype="<i8")
    col = np.frombuffer(csr.col_indices, dtype="<i8")
    rows, cols = shape
    if (
        len(crow) != rows + 1
        or crow[0] != 0
        or np.any(np.diff(crow) < 0)
        or crow[-1] != len(col)
        or len(col) != len(values)
        or (len(col) and (col.min() < 0 or col.max() >= cols))
    ):
        raise InvalidArgument(f"{where}: its sparse CSR indices do not describe a {shape} tensor")
    out = np.zeros(shape, dtype=dtype)
    for r in range(rows):
        out[r, col[crow[r] : crow[r + 1]]] = values[crow[r] : crow[r + 1]]
    return out


def forward_backward_output(logprobs: list[np.ndarray], losses: list[np.ndarray], metrics: dict) -> bytes:
    """One ArrayRecord with `logprobs` and `elementwise_loss` ([T] float32 per datum)."""
    out = message("ForwardBackwardOutput")()
    out.loss_fn_output_type = "ArrayRecord"
    for k, v in metrics.items():
        out.metrics[k] = float(v)
    record = out.loss_fn_outputs.add()
    record.num_datums = len(logprobs)
    for name, arrays in (("logprobs", logprobs), ("elementwise_loss", losses)):
        arrays = [np.ascontiguousarray(a, dtype="<f4") for a in arrays]
        offsets = np.zeros(len(arrays) + 1, dtype="<i8")
        np.cumsum([a.nbytes for a in arrays], out=offsets[1:])
        bt = record.fields[name]
        bt.data = b"".join(a.tobytes() for a in arrays)
        bt.offsets = offsets.tobytes()
        bt.dtype = _FLOAT32
    return out.SerializeToString()


@dataclass(frozen=True)
class Sequence:
    tokens: list[int]
    logprobs: list[float]
    stop: bool
    """True: it ended on EOS or a stop condition; False: on max_tokens (or the context)."""


def sample_response(sequences: list[Sequence], prompt_logprobs: list[float | None] | None) -> bytes:
    out = message("SampleResponse")()
    for s in sequences:
        seq = out.sequences.add()
        seq.stop_reason = 0 if s.stop else 1
        seq.tokens = np.asarray(s.tokens, dtype="<i4").tobytes()
        seq.logprobs = np.asarray(s.logprobs, dtype="<f4").tobytes()
    if prompt_logprobs is not None:
        out.prompt_logprobs = np.asarray(
            [math.nan if lp is None else lp for lp in prompt_logprobs], dtype="<f4"
        ).tobytes()
    return out.SerializeToString()
