"""The fleet's front door: hotlora.v1.Inference on Ray Serve's gRPC proxy and the OpenAI-compatible HTTP
door on its HTTP proxy, so clients need nothing new.

For each call: the caller's token names the tenant (same tokens file as the replicas), the adapter
reference resolves against the shared registry to one version, and the call goes to a replica with
`tenant/name@N` as its multiplexed model id — to a replica that already holds that version when there is
one. The request is pinned to that version (`name@N`), so a version uploaded meanwhile cannot make the
replica serve something other than what was routed. Uploads, registry and training rpcs go straight to
a replica or any `hotlora serve` on the same stores (Ray Serve's proxy does not carry client streams).

HTTP calls take the same path: the Bearer token names the tenant, the body's `model` (an adapter `name`,
`name@N` or `base:adapter`) resolves and is pinned the same way, and a replica's own HTTP door (on its
loopback port) answers; its bytes stream back as they come, SSE included."""

from __future__ import annotations

import asyncio
import json
import logging

import grpc

from hotlora.adapters.errors import HotloraError, InvalidArgument, Unavailable
from hotlora.adapters.names import format_ref, parse_ref
from hotlora.server.fleet.replica import FORWARDED_HEADERS, FORWARDED_METADATA, ReplicaRpcError

log = logging.getLogger("hotlora.fleet")

ROUTED_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/embeddings")


class HotloraIngress:
    def __init__(self, replicas, tokens_file: str, registry_url: str, timeout_s: float = 300.0):
        from hotlora.adapters.store.postgres_store import PostgresMetadataStore
        from hotlora.adapters.store.shared_stores import default_replica_id
        from hotlora.server.frontend.auth import TokenAuthenticator

        self.replicas = replicas
        self.auth = TokenAuthenticator.from_file(tokens_file) if tokens_file else TokenAuthenticator.dev()
        self.metadata = PostgresMetadataStore(registry_url, "ingress-" + default_replica_id(), connections=4)
        self.timeout_s = timeout_s
        self._base_name: str | None = None

    # ---- hotlora.v1.Inference ------------------------------------------------------------------
    async def Generate(self, request, grpc_context):  # noqa: N802 (the rpc's name)
        return await self._unary("Generate", request, grpc_context)

    async def Classify(self, request, grpc_context):  # noqa: N802
        return await self._unary("Classify", request, grpc_context)

    async def Embed(self, request, grpc_context):  # noqa: N802
        return await self._unary("Embed", request, grpc_context)

    async def GenerateStream(self, request, grpc_context):  # noqa: N802
        try:
            handle, metadata = await self._route(request, grpc_context)
            stream = handle.options(stream=True).call_stream.remote(
                "GenerateStream", request, metadata, self.timeout_s
            )
            async for chunk in stream:
                yield chunk
        except Exception as exc:  # mapped to the caller's status, never a bare INTERNAL for their mistake
            _fail(grpc_context, exc)

    # ---- internals -----------------------------------------------------------------------------
    async def _unary(self, method: str, request, grpc_context):
        try:
            handle, metadata = await self._route(request, grpc_context)
            return await handle.call.remote(method, request, metadata, self.timeout_s)
        except Exception as exc:
            _fail(grpc_context, exc)
            return _empty_response(method)

    async def _route(self, request, grpc_context):
        metadata = tuple(grpc_context.invocation_metadata())
        tenant = self.auth.tenant_for(metadata)
        forwarded = tuple((k, v) for k, v in metadata if k in FORWARDED_METADATA)
        if not request.adapter:
            return self.replicas, forwarded
        handle, pinned = await self._pin(tenant, parse_ref(request.adapter))
        request.adapter = pinned or request.adapter
        return handle, forwarded

    async def _pin(self, tenant: str, parsed: tuple[str, int | None]):
        """(handle, `name@N`) for an adapter reference of `tenant`: the one version it resolves to in the
        shared registry, and a handle that routes to a replica holding it. (replicas, None) for an
        adapter the registry does not know: a replica then says what exists, in the server's own words."""
        name, version = parsed
        record = await asyncio.to_thread(self.metadata.get, tenant, name, version)
        if record is None:
            return self.replicas, None
        pinned = format_ref(record.name, record.version)
        return self.replicas.options(multiplexed_model_id=f"{tenant}/{pinned}"), pinned

    # ---- the OpenAI-compatible HTTP door (Ray Serve's HTTP proxy) ------------------------------
    async def __call__(self, request):
        """Every HTTP request: the door's routes, answered by a replica's own HTTP door. Completions, chat
        completions and embeddings go to a replica holding the adapter `model` names, pinned to its
        version; every other route to any replica."""
        from starlette.responses import JSONResponse, StreamingResponse

        from hotlora.server.http.errors import body_for

        try:
            body = await request.body()
            handle, body = await self._http_route(request, body)
            path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            headers = tuple((k, v) for k, v in request.headers.items() if k.lower() in FORWARDED_HEADERS)
            stream = handle.options(stream=True).http.remote(
                request.method, path, headers, body, self.timeout_s
            )
            status, returned = await stream.__anext__()
        except Exception as exc:  # the door's own error body, as a replica would have answered
            status, error = body_for(_domain_error(exc))
            return JSONResponse(error, status_code=status)
        return StreamingResponse(_rest(stream), status_code=status, headers=dict(returned))

    async def _http_route(self, request, body: bytes):
        """(handle, body) for one HTTP request; the body's `model` pinned to `name@N` when it names an
        adapter the registry holds."""
        if request.method != "POST" or request.url.path not in ROUTED_PATHS:
            return self.replicas, body
        header = request.headers.get("authorization")
        tenant = self.auth.tenant_for([("authorization", header)] if header else [])
        try:
            payload = json.loads(body)
            model = payload["model"]
        except (ValueError, TypeError, KeyError):  # the door says what is wrong with the body
            return self.replicas, body
        if not isinstance(payload, dict) or not isinstance(model, str):
            return self.replicas, body
        from hotlora.server.http.inputs import split_model

        prefix, ref = split_model(model, await self._served_model_name())
        if not ref:
            return self.replicas, body
        try:
            parsed = parse_ref(ref)
        except InvalidArgument:  # no adapter by that name: the door answers 404
            return self.replicas, body
        handle, pinned = await self._pin(tenant, parsed)
        if pinned is None:
            return handle, body
        payload["model"] = prefix + pinned
        return handle, json.dumps(payload).encode()

    async def _served_model_name(self) -> str:
        """The base model's name as the replicas' doors know it (asked once: every replica serves the
        same model with the same flags)."""
        if self._base_name is None:
            self._base_name = await self.replicas.served_model_name.remote()
        return self._base_name


def _empty_response(method: str):
    from hotlora.v1 import inference_pb2

    return {
        "Generate": inference_pb2.GenerateResponse,
        "Classify": inference_pb2.ClassifyResponse,
        "Embed": inference_pb2.EmbedResponse,
    }[method]()


async def _rest(stream):
    """The response body after (status, headers): bytes as the replica's door sends them."""
    try:
        async for chunk in stream:
            yield chunk
    except Exception as exc:  # the status line is gone: the error travels as an event, as the door's do
        from hotlora.server.http.errors import body_for

        log.warning("fleet ingress: an HTTP response broke off: %s", exc)
        yield f"data: {json.dumps(body_for(_domain_error(exc))[1])}\n\n".encode()


def _domain_error(exc: BaseException) -> BaseException:
    """A failure on the way to or from a replica, as the domain error it stands for."""
    exc = getattr(exc, "cause", None) or exc  # Ray wraps a replica's exception in a RayTaskError
    if _replica_gone(exc):
        return Unavailable("the replica serving this call stopped; retry (another replica takes it)")
    if isinstance(exc, StopAsyncIteration):
        return Unavailable("the replica answered nothing; retry")
    if not isinstance(exc, HotloraError | ReplicaRpcError):
        log.error("fleet ingress: unexpected error", exc_info=exc)
    return exc


def _fail(grpc_context, exc: BaseException) -> None:
    from hotlora.server.rpc.interceptors import status_for

    exc = _domain_error(exc)
    if isinstance(exc, ReplicaRpcError):
        code, details = grpc.StatusCode[exc.code], exc.details
    elif isinstance(exc, HotloraError):
        code, details = status_for(exc), exc.message
    else:
        code, details = grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}"[:500]
    grpc_context.set_code(code)
    grpc_context.set_details(details)


def _replica_gone(exc: BaseException) -> bool:
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

    return isinstance(exc, ActorDiedError | ActorUnavailableError | RayActorError)
