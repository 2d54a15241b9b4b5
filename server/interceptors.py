"""The one place where domain errors become gRPC statuses, and where callers are
authenticated. Servicers read the caller's tenant with `current_tenant()`."""

from __future__ import annotations

import contextvars
import logging
import time

import grpc
from hotlora.adapters import errors
from hotlora.server.logs import log_rpc, request_fields

log = logging.getLogger("hotlora.rpc")

STATUS_OF = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.Cancelled: grpc.StatusCode.CANCELLED,
}

# health and reflection answer without a token (probes and tooling)
_OPEN_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")

_tenant: contextvars.ContextVar[str] = contextvars.ContextVar("tenant", default="default")


def current_tenant() -> str:
    return _tenant.get()


def status_for(exc: BaseException) -> grpc.StatusCode:
    for cls in type(exc).__mro__:
        if cls in STATUS_OF:
            return STATUS_OF[cls]
    return grpc.StatusCode.INTERNAL


class ServerInterceptor(grpc.ServerInterceptor):
    def __init__(self, authenticator, observer=None):
        self.auth = authenticator
        self.observer = observer  # metrics: rpc_finished(method, code_name, seconds)

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None or details.method.startswith(_OPEN_PREFIXES):
            return handler
        method = details.method
        metadata = details.invocation_metadata

        def authenticate():
            return self.auth.tenant_for(metadata)

        if handler.unary_unary or handler.stream_unary:
            inner = handler.unary_unary or handler.stream_unary

            def unary(request, context):
                t0 = time.monotonic()
                code = grpc.StatusCode.OK
                tenant = ""
                try:
                    tenant = authenticate()
                    token = _tenant.set(tenant)
                    try:
                        return inner(request, context)
                    finally:
                        _tenant.reset(token)
                except Exception as exc:
                    code = self._abort(exc, context, method)
                finally:
                    final = self._record(method, code, context, t0)
                    log_rpc(method, final, time.monotonic() - t0, tenant, *request_fields(request, metadata))
                # abort (details already set), not `return None`: grpc would log "Exception serializing
                # message!" with a traceback for every refused call
                context.abort(code, _decode(context.details()))

            factory = (
                grpc.unary_unary_rpc_method_handler
                if handler.unary_unary
                else grpc.stream_unary_rpc_method_handler
            )
        else:
            inner = handler.unary_stream or handler.stream_stream

            def unary(request, context):
                t0 = time.monotonic()
                code = grpc.StatusCode.OK
                tenant = ""
                try:
                    tenant = authenticate()
                    token = _tenant.set(tenant)
                    try:
                        yield from inner(request, context)
                    finally:
                        _tenant.reset(token)
                except Exception as exc:
                    code = self._abort(exc, context, method)
                finally:
                    final = self._record(method, code, context, t0)
                    log_rpc(method, final, time.monotonic() - t0, tenant, *request_fields(request, metadata))

            factory = (
                grpc.unary_stream_rpc_method_handler
                if handler.unary_stream
                else grpc.stream_stream_rpc_method_handler
            )
        return factory(
            unary,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _abort(self, exc, context, method) -> grpc.StatusCode:
        if isinstance(exc, errors.HotloraError):
            code = status_for(exc)
            context.set_code(code)
            context.set_details(_bounded(exc.message))
            return code
        already = context.code()  # set by context.abort(), which then raises a bare Exception
        if already is not None and already != grpc.StatusCode.OK:
            return already
        log.exception("unexpected error in %s", method)
        context.set_code(grpc.StatusCode.INTERNAL)
        context.set_details("internal error; the server log has the details")
        return grpc.StatusCode.INTERNAL

    def _record(self, method, code, context, t0) -> grpc.StatusCode:
        """Count the call; returns the code recorded (OK on a gone client becomes CANCELLED)."""
        try:
            if code == grpc.StatusCode.OK and not context.is_active():
                code = grpc.StatusCode.CANCELLED
            if self.observer is not None:
                self.observer.rpc_finished(method, code.name, time.monotonic() - t0)
        except Exception:  # metrics never break a call
            log.debug("metrics observer failed", exc_info=True)
        return code


# Messages may quote the caller's input; clients drop a status whose details pass their metadata limit
# (16 KiB hard) and report RESOURCE_EXHAUSTED "Stream removed" instead.
MAX_DETAILS_CHARS = 2000


def _bounded(message: str) -> str:
    if len(message) <= MAX_DETAILS_CHARS:
        return message
    return f"{message[:MAX_DETAILS_CHARS]}... ({len(message) - MAX_DETAILS_CHARS} more characters)"


def _decode(details) -> str:
    return details.decode("utf-8", "replace") if isinstance(details, bytes) else (details or "")
