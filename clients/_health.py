"""The standard `grpc.health.v1.Health/Check` call.

Uses the `grpcio-health-checking` stubs when installed. A client-only install (grpcio, protobuf, rich) may
lack them; the two messages are tiny (one string field in, one enum field out), so they are encoded here by
hand instead of failing.
"""

from __future__ import annotations

from collections.abc import Callable

CHECK_METHOD = "/grpc.health.v1.Health/Check"
STATUS_NAMES = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _encode_request(service: str) -> bytes:
    data = service.encode()
    return b"\x0a" + _varint(len(data)) + data if data else b""


def _decode_response(raw: bytes) -> str:
    """HealthCheckResponse {ServingStatus status = 1;} -> the status name (unknown fields skipped)."""
    status, i = 0, 0

    def read_varint() -> int:
        nonlocal i
        shift = value = 0
        while True:
            if i >= len(raw):
                raise ValueError("truncated health response")
            b = raw[i]
            i += 1
            value |= (b & 0x7F) << shift
            if not b & 0x80:
                return value
            shift += 7

    while i < len(raw):
        key = read_varint()
        field, wire = key >> 3, key & 7
        if wire == 0:
            value = read_varint()
            if field == 1:
                status = value
        elif wire == 2:
            length = read_varint()  # (not `i += read_varint()`: that reads `i` before the call moves it)
            i += length
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        else:
            raise ValueError(f"unexpected wire type {wire} in health response")
    return STATUS_NAMES.get(status, str(status))


def codec() -> tuple[Callable[[str], object], Callable[[object], bytes], Callable[[bytes], object], Callable]:
    """(make_request, serialize, deserialize, status_name) for Health/Check."""
    try:
        from grpc_health.v1 import health_pb2
    except ImportError:
        return (lambda s: s), _encode_request, _decode_response, (lambda resp: resp)
    return (
        lambda s: health_pb2.HealthCheckRequest(service=s),
        health_pb2.HealthCheckRequest.SerializeToString,
        health_pb2.HealthCheckResponse.FromString,
        lambda resp: health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status),
    )
