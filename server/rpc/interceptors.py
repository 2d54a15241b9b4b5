"""The one place where callers are authenticated and admitted, where request bytes become messages, and
where domain errors become gRPC statuses. Servicers read the caller's tenant with `current_tenant()`.

`intercept_service` runs on grpcio's polling thread, before a handler thread is spent: a call without a
valid token, or over its tenant's share of the handler pool (`RpcAdmission`), is answered there with a
handler that aborts at once on a small side pool, without waiting for the request body. Every admitted
call is served through a request-streaming handler, so its body is read here: the wait is bounded by the
`IdleWatchdog`, and a body that is not a valid message is INVALID_ARGUMENT, not grpc's INTERNAL."""

from __future__ import annotations

import contextvars
import logging
import time
from concurrent import futures

import grpc

from hotlora.adapters import errors
from hotlora.adapters.caller import Caller, serving
from hotlora.server.logs import log_rpc, request_fields
from hotlora.server.rpc.admission import RpcAdmission
from hotlora.server.rpc.idle_watchdog import CallActivity, IdleWatchdog

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

# health answers without a token (probes); reflection needs one when a tokens file is set
_OPEN_PREFIXES = ("/grpc.health.v1.",)
_UNRECORDED_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")
SIDE_THREADS = 8  # refusals and health checks: never queued behind the tenants' handler threads

_tenant: contextvars.ContextVar[str] = contextvars.ContextVar("tenant", default="default")


def current_tenant() -> str:
    return _tenant.get()


def status_for(exc: BaseException) -> grpc.StatusCode:
    for cls in type(exc).__mro__:
        if cls in STATUS_OF:
            return STATUS_OF[cls]
    return grpc.StatusCode.INTERNAL


class ServerInterceptor(grpc.ServerInterceptor):
    def __init__(
        self,
        authenticator,
        observer=None,
        *,
        admission: RpcAdmission | None = None,
        watchdog: IdleWatchdog | None = None,
    ):
        self.auth = authenticator
        self.observer = observer  # metrics: rpc_finished(method, code_name, seconds)
        self.admission = admission
        self.watchdog = watchdog or IdleWatchdog(60.0)
        self.side_pool = futures.ThreadPoolExecutor(SIDE_THREADS, thread_name_prefix="hotlora-side")

    def close(self) -> None:
        self.watchdog.close()
        self.side_pool.shutdown(wait=False, cancel_futures=True)

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None:
            return None
        method, metadata = details.method, details.invocation_metadata
        if method.startswith(_OPEN_PREFIXES):
            return self._serve(handler, method, metadata, tenant="", lease=None, side=True)
        try:
            tenant = self.auth.tenant_for(metadata)
        except errors.HotloraError as exc:
            return self._refuse(handler, method, metadata, "", exc)
        try:
            lease = self.admission.enter(tenant) if self.admission is not None else None
        except errors.HotloraError as exc:
            return self._refuse(handler, method, metadata, tenant, exc)
        return self._serve(handler, method, metadata, tenant, lease, side=False)

    # ---- refused before any work ------------------------------------------------------------
    def _refuse(self, handler, method, metadata, tenant, exc: errors.HotloraError):
        """A handler that answers `exc` at once on the side pool; it never reads the request."""
        code, message = status_for(exc), _bounded(exc.message)
        t0 = time.monotonic()

        def refuse(request_iterator, context):
            self._observe(method, code, t0)
            log_rpc(method, code, time.monotonic() - t0, tenant, *request_fields(None, metadata))
            context.abort(code, message)

        refuse.experimental_thread_pool = self.side_pool
        return _handler(handler.response_streaming, refuse, handler.response_serializer)

    # ---- admitted ---------------------------------------------------------------------------
    def _serve(self, handler, method, metadata, tenant: str, lease, side: bool):
        inner = handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
        unary_in = not handler.request_streaming
        deserialize = handler.request_deserializer
        non_blocking = bool(getattr(inner, "experimental_non_blocking", False))

        def begin(request_iterator, context):
            call = CallActivity(context)
            if lease is not None and not context.add_callback(lease.release):
                lease.release()  # the call already ended
            return call

        def argument(request_iterator, call):
            if not unary_in:
                return self._messages(request_iterator, call, deserialize, method)
            try:
                raw = self.watchdog.receive(call, request_iterator)
            except StopIteration:
                raise errors.InvalidArgument(
                    f"{method} takes exactly one request message; got none"
                ) from None
            return _decode_message(raw, deserialize, method)

        if not handler.response_streaming:

            def unary(request_iterator, context):
                t0, call = time.monotonic(), begin(request_iterator, context)
                code, request = grpc.StatusCode.OK, None
                token = _tenant.set(tenant)
                try:
                    request = argument(request_iterator, call)
                    with serving(_caller(context)):
                        return inner(request, context)
                except Exception as exc:
                    code = self._abort(exc, context, method, call)
                finally:
                    _tenant.reset(token)
                    if lease is not None:
                        lease.release()
                    self._finish(method, code, context, t0, tenant, request, metadata)
                # abort (details already set), not `return None`: grpc would log "Exception serializing
                # message!" with a traceback for every refused call
                context.abort(code, _decode(context.details()))

            behavior = unary
        elif non_blocking:  # grpc_health's Watch: answers through a callback, holds no thread

            def watch(request_iterator, context, send_response_callback):
                t0, call = time.monotonic(), begin(request_iterator, context)
                try:
                    request = argument(request_iterator, call)
                    return inner(request, context, send_response_callback)
                except Exception as exc:
                    code = self._abort(exc, context, method, call)
                    self._finish(method, code, context, t0, tenant, None, metadata)
                    context.abort(code, _decode(context.details()))

            watch.experimental_non_blocking = True
            behavior = watch
        else:

            def stream(request_iterator, context):
                call = begin(request_iterator, context)
                return responses(request_iterator, context, call)

            def responses(request_iterator, context, call):
                t0 = time.monotonic()
                code, request = grpc.StatusCode.OK, None
                token = _tenant.set(tenant)
                try:
                    request = argument(request_iterator, call)
                    with serving(_caller(context)):
                        for response in inner(request, context):
                            call.touch()  # a stream busy answering is not idle
                            yield response
                except Exception as exc:
                    code = self._abort(exc, context, method, call)
                finally:
                    _tenant.reset(token)
                    if lease is not None:
                        lease.release()
                    if code == grpc.StatusCode.OK and call.expired:
                        # the watchdog cut it off: a stream whose reader saw the requests end may return
                        # before grpc marks the context inactive (it was counted OK)
                        code = grpc.StatusCode.CANCELLED
                    self._finish(method, code, context, t0, tenant, request, metadata)

            behavior = stream
        if side:
            behavior.experimental_thread_pool = self.side_pool
        return _handler(handler.response_streaming, behavior, handler.response_serializer)

    def _messages(self, request_iterator, call, deserialize, method):
        while True:
            try:
                raw = self.watchdog.receive(call, request_iterator)
            except StopIteration:
                return
            yield _decode_message(raw, deserialize, method)

    # ---- outcomes ---------------------------------------------------------------------------
    def _abort(self, exc, context, method, call: CallActivity) -> grpc.StatusCode:
        if isinstance(exc, errors.HotloraError):
            code = status_for(exc)
            context.set_code(code)
            context.set_details(_bounded(exc.message))
            return code
        already = context.code()  # set by context.abort(), which then raises a bare Exception
        if already is not None and already != grpc.StatusCode.OK:
            return already
        if call.expired or not context.is_active():
            # the client went away, or sent nothing for --request-idle-seconds: its doing, not ours
            log.info("%s ended: %s", method, "idle client" if call.expired else "the client cancelled")
            context.set_code(grpc.StatusCode.CANCELLED)
            return grpc.StatusCode.CANCELLED
        log.exception("unexpected error in %s", method)
        context.set_code(grpc.StatusCode.INTERNAL)
        context.set_details("internal error; the server log has the details")
        return grpc.StatusCode.INTERNAL

    def _finish(self, method, code, context, t0, tenant, request, metadata) -> None:
        if method.startswith(_UNRECORDED_PREFIXES):
            return  # probes and tooling: neither counted nor access-logged (docs/operations.md)
        try:
            if code == grpc.StatusCode.OK and not context.is_active():
                code = grpc.StatusCode.CANCELLED  # answered, but the client was gone
        except Exception:
            pass
        self._observe(method, code, t0)
        log_rpc(method, code, time.monotonic() - t0, tenant, *request_fields(request, metadata))

    def _observe(self, method, code, t0) -> None:
        if self.observer is None:
            return
        try:
            self.observer.rpc_finished(method, code.name, time.monotonic() - t0)
        except Exception:  # metrics never break a call
            log.debug("metrics observer failed", exc_info=True)


def _caller(context) -> Caller:
    """The call's deadline and liveness, for the registry's store calls (adapters/caller.py)."""
    left = context.time_remaining()
    return Caller(None if left is None else time.monotonic() + left, context.is_active)


def _handler(response_streaming: bool, behavior, response_serializer):
    """A request-streaming handler: grpc hands it the call at once instead of first waiting for a body."""
    factory = (
        grpc.stream_stream_rpc_method_handler if response_streaming else grpc.stream_unary_rpc_method_handler
    )
    return factory(behavior, request_deserializer=None, response_serializer=response_serializer)


def _decode_message(raw, deserialize, method: str):
    if deserialize is None:
        return raw
    try:
        return deserialize(raw)
    except Exception as exc:  # protobuf's DecodeError and friends: the bytes are the caller's
        kind = method.rsplit("/", 1)[-1]
        raise errors.InvalidArgument(
            f"the request to {kind} is not a valid protobuf message ({type(exc).__name__}: {exc})"
        ) from None


# Messages may quote the caller's input; clients drop a status whose details pass their metadata limit
# (16 KiB hard) and report RESOURCE_EXHAUSTED "Stream removed" instead.
MAX_DETAILS_CHARS = 2000


def _bounded(message: str) -> str:
    if len(message) <= MAX_DETAILS_CHARS:
        return message
    return f"{message[:MAX_DETAILS_CHARS]}... ({len(message) - MAX_DETAILS_CHARS} more characters)"


def _decode(details) -> str:
    return details.decode("utf-8", "replace") if isinstance(details, bytes) else (details or "")
