"""What a server offers, read through gRPC server reflection: `hotlora describe` (as `grpcurl list` and
`grpcurl describe`, with nothing else to install).

    hotlora describe                                   every service and its methods
    hotlora describe inference.GRPCInferenceService    one service, method, message or enum, as proto text

From Python: `ServerDescriptors(channel)` resolves names to protobuf descriptors
(`.services()`, `.find(name)`), which also give dynamic message classes to call a service with."""

from __future__ import annotations

import argparse
import collections
import sys
from collections.abc import Sequence

import grpc
from google.protobuf import descriptor, descriptor_pool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

REFLECTION_SERVICES = ("grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection")

_Details = collections.namedtuple("_Details", ("method", "timeout", "metadata", "credentials"))


class _CallDefaults(grpc.StreamStreamClientInterceptor):
    """Adds the bearer token and a deadline to each reflection call (the reflection client sends neither)."""

    def __init__(self, metadata: Sequence[tuple[str, str]] | None, timeout: float | None):
        self.metadata, self.timeout = list(metadata or ()), timeout

    def intercept_stream_stream(self, continuation, details, request_iterator):
        metadata = [*(details.metadata or ()), *self.metadata]
        timeout = details.timeout if details.timeout is not None else self.timeout
        details = _Details(details.method, timeout, metadata, details.credentials)
        return continuation(details, request_iterator)


class ServerDescriptors:
    """The server's services and the types they use, fetched through reflection as they are asked for."""

    def __init__(
        self,
        channel: grpc.Channel,
        metadata: Sequence[tuple[str, str]] | None = None,
        timeout: float | None = 30.0,
    ):
        self._db = ProtoReflectionDescriptorDatabase(
            grpc.intercept_channel(channel, _CallDefaults(metadata, timeout))
        )
        self.pool = descriptor_pool.DescriptorPool(self._db)

    def service_names(self) -> list[str]:
        """Every service the server lists, in its order (sorted)."""
        return list(self._db.get_services())

    def services(self) -> list[descriptor.ServiceDescriptor]:
        """Each listed service described (reflection itself left out). A listed service the server cannot
        describe raises KeyError naming it."""
        out = []
        for name in self.service_names():
            if name in REFLECTION_SERVICES:
                continue
            try:
                out.append(self.pool.FindServiceByName(name))
            except KeyError:
                raise KeyError(f"the server lists {name} but its reflection cannot describe it") from None
        return out

    def find(self, name: str):
        """The service, method (`Service.Method`), message or enum called `name` (fully qualified)."""
        name = name.lstrip(".")
        finders = (self.pool.FindServiceByName, self.pool.FindMessageTypeByName, self.pool.FindEnumTypeByName)
        for find in finders:
            try:
                return find(name)
            except KeyError:
                pass
        service, _, method = name.rpartition(".")
        if service:
            try:
                found = self.pool.FindServiceByName(service).methods_by_name.get(method)
            except KeyError:
                found = None
            if found is not None:
                return found
        raise KeyError(f"the server describes no service, method, message or enum named {name!r}")


# ---- rendering as proto text ---------------------------------------------------------------------------
_SCALARS = {
    getattr(descriptor.FieldDescriptor, f"TYPE_{t.upper()}"): t
    for t in (
        "double float int64 uint64 int32 fixed64 fixed32 bool string bytes uint32 sfixed32 sfixed64 "
        "sint32 sint64".split()
    )
}


def _type_name(field: descriptor.FieldDescriptor) -> str:
    if field.message_type is not None:
        return f".{field.message_type.full_name}"
    if field.enum_type is not None:
        return f".{field.enum_type.full_name}"
    return _SCALARS[field.type]


def _is_repeated(field: descriptor.FieldDescriptor) -> bool:
    repeated = getattr(field, "is_repeated", None)  # protobuf >= 5.28; `label` is deprecated there
    return repeated if isinstance(repeated, bool) else field.label == field.LABEL_REPEATED


def _field_line(field: descriptor.FieldDescriptor) -> str:
    entry = field.message_type
    if entry is not None and entry.GetOptions().map_entry:
        key, value = entry.fields_by_name["key"], entry.fields_by_name["value"]
        kind = f"map<{_type_name(key)}, {_type_name(value)}>"
    else:
        kind = ("repeated " if _is_repeated(field) else "") + _type_name(field)
        if field.has_presence and field.containing_oneof is None and field.message_type is None:
            kind = f"optional {kind}"  # proto3 `optional` (a synthetic oneof of one field)
    return f"{kind} {field.name} = {field.number};"


def render_message(message: descriptor.Descriptor, indent: str = "") -> str:
    lines = [f"{indent}message {message.name} {{"]
    real_oneofs = [o for o in message.oneofs if not _synthetic(o)]
    in_oneof = {f.name for o in real_oneofs for f in o.fields}
    for nested in message.nested_types:
        if not nested.GetOptions().map_entry:
            lines.append(render_message(nested, indent + "  "))
    for enum in message.enum_types:
        lines.append(render_enum(enum, indent + "  "))
    for field in message.fields:
        if field.name not in in_oneof:
            lines.append(f"{indent}  {_field_line(field)}")
    for oneof in real_oneofs:
        lines.append(f"{indent}  oneof {oneof.name} {{")
        lines += [f"{indent}    {_field_line(f)}" for f in oneof.fields]
        lines.append(f"{indent}  }}")
    lines.append(f"{indent}}}")
    return "\n".join(lines)


def _synthetic(oneof: descriptor.OneofDescriptor) -> bool:
    """proto3 `optional x` lives in a oneof of its own named `_x`; it is not a oneof the user wrote."""
    return len(oneof.fields) == 1 and oneof.name == f"_{oneof.fields[0].name}"


def render_enum(enum: descriptor.EnumDescriptor, indent: str = "") -> str:
    lines = [f"{indent}enum {enum.name} {{"]
    lines += [f"{indent}  {v.name} = {v.number};" for v in enum.values]
    return "\n".join([*lines, f"{indent}}}"])


def render_method(method: descriptor.MethodDescriptor) -> str:
    request = ("stream " if method.client_streaming else "") + f".{method.input_type.full_name}"
    response = ("stream " if method.server_streaming else "") + f".{method.output_type.full_name}"
    return f"rpc {method.name} ( {request} ) returns ( {response} );"


def render_service(service: descriptor.ServiceDescriptor) -> str:
    lines = [f"service {service.name} {{"]
    lines += [f"  {render_method(m)}" for m in service.methods]
    return "\n".join([*lines, "}"])


def render(found) -> str:
    """`NAME is a KIND:` then its definition, as `grpcurl describe` prints it."""
    for kind, cls, fn in (
        ("service", descriptor.ServiceDescriptor, render_service),
        ("method", descriptor.MethodDescriptor, render_method),
        ("message", descriptor.Descriptor, render_message),
        ("enum", descriptor.EnumDescriptor, render_enum),
    ):
        if isinstance(found, cls):
            return f"{found.full_name} is a {kind}:\n{fn(found)}"
    raise TypeError(f"cannot render {found!r}")


def listing(services: Sequence[descriptor.ServiceDescriptor]) -> str:
    """Each service, then its methods as `Name(Request) returns (Response)`."""
    lines = []
    for service in services:
        lines.append(service.full_name)
        for m in service.methods:
            request = ("stream " if m.client_streaming else "") + m.input_type.name
            response = ("stream " if m.server_streaming else "") + m.output_type.name
            lines.append(f"  {m.name}({request}) returns ({response})")
    return "\n".join(lines)


def cmd_describe(args: argparse.Namespace) -> int:
    from hotlora.clients._commands import _client

    with _client(args) as client:
        server = ServerDescriptors(client.channel, client._metadata, args.timeout or 30.0)
        try:
            text = render(server.find(args.symbol)) if args.symbol else listing(server.services())
        except KeyError as exc:
            print(f"error: NOT_FOUND: {exc.args[0]}", file=sys.stderr)
            return 1
    print(text)
    return 0
