"""Domain errors -> HTTP status and the OpenAI error object, the HTTP twin of the gRPC status table
(docs/design.md §3): `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

from hotlora.adapters import errors
from hotlora.server.rpc.interceptors import MAX_DETAILS_CHARS

# (status, OpenAI error type) per domain error
STATUS_OF: dict[type, tuple[int, str]] = {
    errors.InvalidArgument: (400, "invalid_request_error"),
    errors.Unauthenticated: (401, "authentication_error"),
    errors.PermissionDenied: (403, "permission_error"),
    errors.NotFound: (404, "not_found_error"),
    errors.AlreadyExists: (409, "conflict_error"),
    errors.FailedPrecondition: (422, "unprocessable_entity_error"),
    errors.Cancelled: (499, "cancelled_error"),
    errors.Unavailable: (503, "service_unavailable_error"),
    errors.DeadlineExceeded: (504, "timeout_error"),
}


def status_for(exc: BaseException) -> tuple[int, str]:
    if isinstance(exc, errors.ResourceExhausted):
        # The transient limits (queues, calls in flight, quotas) say what to do next; anything else is a
        # request too large for this server, which no retry fixes.
        msg = exc.message
        if "retry" in msg or "first" in msg:
            return 429, "rate_limit_error"
        return 413, "request_too_large_error"
    for cls in type(exc).__mro__:
        if cls in STATUS_OF:
            return STATUS_OF[cls]
    return 500, "internal_error"


def error_body(message: str, type_: str, status: int, param: str | None = None) -> dict:
    if len(message) > MAX_DETAILS_CHARS:
        message = f"{message[:MAX_DETAILS_CHARS]}... ({len(message) - MAX_DETAILS_CHARS} more characters)"
    return {"error": {"message": message, "type": type_, "param": param, "code": status}}


def body_for(exc: BaseException) -> tuple[int, dict]:
    status, type_ = status_for(exc)
    if status == 500:
        return status, error_body("internal error; the server log has the details", type_, status)
    return status, error_body(getattr(exc, "message", str(exc)), type_, status)
