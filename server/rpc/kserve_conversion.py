"""Wire <-> domain conversion for the KServe / Triton protocol (package `inference`).

The message classes come from a private descriptor pool built from the vendored
proto/kserve descriptor set, not from *_pb2 modules: tritonclient registers the same
`inference.*` names in protobuf's default pool, and two different files defining one
name there is a "duplicate symbol" error. A private pool never meets it, and the wire
format is the same (the descriptors are identical, see tests/server/test_kserve.py)."""

from __future__ import annotations

import functools
import importlib.resources
import json
import math
import struct
from dataclasses import dataclass

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from hotlora.adapters.errors import InvalidArgument, ResourceExhausted
from hotlora.server.frontend.inference import GenerateInput

SERVICE = "inference.GRPCInferenceService"
BASE_MODEL = "base"
TEXT_INPUT = "text_input"
# what the client's parameter means -> GenerateInput field
GENERATION_PARAMS = {
    "max_tokens": "max_new_tokens",
    "max_new_tokens": "max_new_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "seed": "seed",
    "stop": "stop",
}
# reserved by the protocol or set by the stock clients themselves: accepted and ignored
RESERVED_PARAMS = ("priority", "timeout", "headers", "binary_data_output")
RESERVED_PREFIXES = ("triton_", "sequence_")


@functools.cache
def descriptor_files() -> tuple[descriptor_pb2.FileDescriptorProto, ...]:
    """The vendored protocol's files, dependencies first (proto/generate.sh builds the set)."""
    data = importlib.resources.files("hotlora.kserve_pb").joinpath("inference.binpb").read_bytes()
    return tuple(descriptor_pb2.FileDescriptorSet.FromString(data).file)


@functools.cache
def pool() -> descriptor_pool.DescriptorPool:
    p = descriptor_pool.DescriptorPool()
    for fdp in descriptor_files():
        p.AddSerializedFile(fdp.SerializeToString())
    return p


@functools.cache
def message_class(name: str):
    return message_factory.GetMessageClass(pool().FindMessageTypeByName(f"inference.{name}"))


class _Messages:
    """`pb.ModelInferRequest` etc.: the message classes of package `inference`."""

    def __getattr__(self, name: str):
        return message_class(name)


pb = _Messages()


# ---- models ---------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ModelSpec:
    """A model as KServe clients see it: the base model or one adapter."""

    name: str
    versions: tuple[str, ...]  # oldest first
    version: str  # the one a request resolves to
    task: str  # CAUSAL_LM | SEQ_CLS
    adapter_ref: str  # "" = base model, else name@N
    labels: tuple[str, ...] = ()

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return (TensorSpec(TEXT_INPUT, "BYTES", (-1,)),)

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        if self.task == "SEQ_CLS":
            return (
                TensorSpec("label", "BYTES", (-1,)),
                TensorSpec("probabilities", "FP32", (-1, len(self.labels))),
            )
        return (TensorSpec("text_output", "BYTES", (-1,)),)


def adapter_ref(name: str, version: str) -> str:
    """Model name + model_version ("" = latest) -> an adapter reference."""
    if "@" in name:
        if version:
            raise InvalidArgument(f"model {name!r} already pins a version; leave model_version empty")
        return name
    if not version:
        return name
    if not version.isdigit() or int(version) < 1:
        raise InvalidArgument(
            f"model_version must be a positive integer or empty for the latest (got {version!r})"
        )
    return f"{name}@{int(version)}"


# ---- tensors ---------------------------------------------------------------------------
def decode_bytes(raw: bytes, count: int, name: str) -> list[bytes]:
    """Triton BYTES serialization: per element a 4-byte little-endian length, then the bytes."""
    out, off = [], 0
    while off < len(raw):
        if len(out) == count:  # more elements than the shape says: stop decoding here
            raise InvalidArgument(
                f"input {name!r}: the raw contents hold more than the {count} elements the shape says"
            )
        if off + 4 > len(raw):
            raise InvalidArgument(f"input {name!r}: truncated BYTES length prefix at offset {off}")
        (n,) = struct.unpack_from("<I", raw, off)
        off += 4
        if off + n > len(raw):
            raise InvalidArgument(
                f"input {name!r}: element {len(out)} claims {n} bytes, only {len(raw) - off} remain"
            )
        out.append(raw[off : off + n])
        off += n
    if len(out) != count:
        raise InvalidArgument(
            f"input {name!r}: the shape says {count} elements, the raw contents hold {len(out)}"
        )
    return out


def encode_bytes(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def text_input(request, max_texts: int) -> tuple[list[str], list[int]]:
    """The prompts/texts of a request and the shape they came in; a shape of more than `max_texts`
    elements is refused before any element is decoded."""
    names = [t.name for t in request.inputs]
    if names != [TEXT_INPUT]:
        raise InvalidArgument(
            f"model {request.model_name!r} takes one input {TEXT_INPUT!r} (BYTES, shape [-1]); "
            f"got {names or 'none'}"
        )
    tensor = request.inputs[0]
    if tensor.datatype != "BYTES":
        raise InvalidArgument(
            f"input {TEXT_INPUT!r} must be BYTES (UTF-8 text); got {tensor.datatype or 'none'}"
        )
    shape = list(tensor.shape)
    if not shape or any(d < 0 for d in shape):
        raise InvalidArgument(
            f"input {TEXT_INPUT!r} needs a concrete shape such as [1] or [batch]; got {shape}"
        )
    count = math.prod(shape)  # Python ints: a product past 2^64 is not wrapped around
    if count == 0:
        raise InvalidArgument(f"input {TEXT_INPUT!r} has no elements (shape {shape})")
    if count > max_texts:
        raise ResourceExhausted(
            f"input {TEXT_INPUT!r} has shape {_short(shape)}, {_short(count)} elements; at most {max_texts} "
            "texts per request (--max-texts)"
        )
    if request.raw_input_contents:
        if len(request.raw_input_contents) != len(request.inputs):
            raise InvalidArgument("raw_input_contents must hold one entry per input")
        items = decode_bytes(request.raw_input_contents[0], count, TEXT_INPUT)
    else:
        items = list(tensor.contents.bytes_contents)
        if len(items) != count:
            raise InvalidArgument(
                f"input {TEXT_INPUT!r}: the shape says {count} elements, contents hold {len(items)}"
            )
    try:
        return [b.decode("utf-8") for b in items], shape
    except UnicodeDecodeError as exc:
        raise InvalidArgument(f"input {TEXT_INPUT!r} must be UTF-8 text: {exc}") from None


def requested_outputs(request, model: ModelSpec) -> list[str]:
    known = [t.name for t in model.outputs]
    asked = [o.name for o in request.outputs] or known
    for name in asked:
        if name not in known:
            raise InvalidArgument(f"model {model.name!r} has no output {name!r}; its outputs are {known}")
    return asked


def add_output(response, name: str, datatype: str, shape, raw: bytes) -> None:
    response.outputs.add(name=name, datatype=datatype, shape=list(shape))
    response.raw_output_contents.append(raw)


def fp32_raw(rows: list[list[float]]) -> bytes:
    return np.asarray(rows, dtype="<f4").tobytes()


def _short(value, limit: int = 80) -> str:
    text = str(value)
    return text if len(text) <= limit else text[:limit] + "..."


# ---- parameters --------------------------------------------------------------------------
def param_value(p):
    which = p.WhichOneof("parameter_choice")
    return None if which is None else getattr(p, which)


_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def param_bool(p, key: str) -> bool:
    """A boolean parameter: bool_param, an integer 0/1, or a string true/false (1/0, yes/no, on/off).
    Anything else is refused: `bool("false")` is True."""
    value = param_value(p)
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise InvalidArgument(f"parameter {key!r} must be a boolean (true or false); got {_short(repr(value))}")


def parse_json(text: str, what: str):
    """json.loads with every failure the caller's: malformed text, nesting too deep, huge numbers."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise InvalidArgument(f"{what} is not valid JSON: {_short(reason, 200)}") from None


def _is_reserved(key: str) -> bool:
    return key in RESERVED_PARAMS or key.startswith(RESERVED_PREFIXES)


def generate_inputs(request, model: ModelSpec, prompts: list[str]) -> list[GenerateInput]:
    base = GenerateInput(adapter=model.adapter_ref, request_id=request.id)
    for key, p in request.parameters.items():
        value = param_value(p)
        if _is_reserved(key):
            continue
        if key not in GENERATION_PARAMS:
            raise InvalidArgument(
                f"unknown parameter {key!r}; generation models take {', '.join(sorted(GENERATION_PARAMS))}"
            )
        field = GENERATION_PARAMS[key]
        try:
            if field == "stop":
                base.stop = _stop_list(value)
            elif field in ("temperature", "top_p"):
                if isinstance(value, bool | bytes):
                    raise TypeError
                setattr(base, field, float(value))
            else:
                if isinstance(value, bool | float | bytes | str):
                    raise TypeError
                setattr(base, field, int(value))
        except (TypeError, ValueError):
            kind = "a number" if field in ("temperature", "top_p") else "an integer"
            if field == "stop":
                kind = "a string or a JSON list of strings"
            raise InvalidArgument(f"parameter {key!r} must be {kind} (got {value!r})") from None
    if base.max_new_tokens < 0 or base.top_k < 0:
        raise InvalidArgument("max_tokens and top_k must be >= 0")
    return [GenerateInput(**{**base.__dict__, "prompt": p, "stop": list(base.stop)}) for p in prompts]


def _stop_list(value) -> list[str]:
    if not isinstance(value, str):
        raise TypeError
    if value.startswith("["):
        items = parse_json(value, "parameter 'stop'")
        if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
            raise ValueError
        return items
    return [value] if value else []


def check_no_params(request, model: ModelSpec) -> None:
    for key in request.parameters:
        if not _is_reserved(key):
            raise InvalidArgument(
                f"model {model.name!r} is a classifier and takes no parameters (got {key!r})"
            )


# ---- metadata ----------------------------------------------------------------------------
def model_metadata(model: ModelSpec, platform: str):
    tm = pb.ModelMetadataResponse.TensorMetadata
    return pb.ModelMetadataResponse(
        name=model.name,
        versions=list(model.versions),
        platform=platform,
        inputs=[tm(name=t.name, datatype=t.datatype, shape=list(t.shape)) for t in model.inputs],
        outputs=[tm(name=t.name, datatype=t.datatype, shape=list(t.shape)) for t in model.outputs],
    )


_CONFIG_TYPES = {"BYTES": "TYPE_STRING", "FP32": "TYPE_FP32"}


def model_config(model: ModelSpec, platform: str):
    cfg = pb.ModelConfig(name=model.name, platform=platform, backend=platform, max_batch_size=0)
    for t in model.inputs:
        cfg.input.add(name=t.name, data_type=_CONFIG_TYPES[t.datatype], dims=list(t.shape))
    for t in model.outputs:
        cfg.output.add(name=t.name, data_type=_CONFIG_TYPES[t.datatype], dims=list(t.shape))
    # generation streams several responses per request, as Triton's decoupled models do
    cfg.model_transaction_policy.decoupled = model.task != "SEQ_CLS"
    cfg.parameters["task"].string_value = model.task
    if model.adapter_ref:
        cfg.parameters["adapter"].string_value = model.adapter_ref
    if model.labels:
        cfg.parameters["labels"].string_value = json.dumps(list(model.labels))
    return cfg


def load_request_files(request, max_bytes: int) -> tuple[dict[str, bytes], dict]:
    """RepositoryModelLoad parameters -> (PEFT files by name, the `config` JSON or {})."""
    files: dict[str, bytes] = {}
    config: dict = {}
    total = 0
    for key, p in request.parameters.items():
        if key.startswith("file:"):
            if p.WhichOneof("parameter_choice") != "bytes_param":
                raise InvalidArgument(f"parameter {key!r} must carry the file's bytes (bytes_param)")
            fname = key[len("file:") :].rsplit("/", 1)[-1]
            if fname in files:
                raise InvalidArgument(f"file {fname!r} given twice")
            total += len(p.bytes_param)
            if total > max_bytes:
                raise ResourceExhausted(
                    f"the files are over the {max_bytes}-byte upload limit (--max-upload-bytes)"
                )
            files[fname] = p.bytes_param
        elif key == "config":
            if p.WhichOneof("parameter_choice") not in (None, "string_param"):
                raise InvalidArgument("parameter 'config' must be a JSON object in a string_param")
            config = parse_json(p.string_param or "{}", "parameter 'config'")
            if not isinstance(config, dict):
                raise InvalidArgument("parameter 'config' must be a JSON object")
    return files, config


def config_labels_description(config: dict) -> tuple[list[str], str]:
    """`labels`/`description` at the top level, or as Triton-style `parameters.<k>.string_value`."""
    params = config.get("parameters") or {}
    if not isinstance(params, dict):
        raise InvalidArgument(
            "config `parameters` must be a JSON object (Triton style: {key: {string_value}})"
        )

    def get(key):
        if key in config:
            return config[key]
        v = params.get(key)
        return v.get("string_value") if isinstance(v, dict) else v

    labels = get("labels") or []
    if isinstance(labels, str):
        labels = (
            parse_json(labels, "config `labels`")
            if labels.startswith("[")
            else [s.strip() for s in labels.split(",") if s.strip()]
        )
    if not isinstance(labels, list) or not all(isinstance(s, str) for s in labels):
        raise InvalidArgument("config `labels` must be a list of strings (or a comma-separated string)")
    description = get("description") or ""
    if not isinstance(description, str):
        raise InvalidArgument("config `description` must be a string")
    return labels, description
