"""The fleet's front door: hotlora.v1.Inference on Ray Serve's gRPC proxy, so clients need nothing new.

For each call: the caller's token names the tenant (same tokens file as the replicas), the adapter
reference resolves against the shared registry to one version, and the call goes to a replica with
`tenant/name@N` as its multiplexed model id — to a replica that already holds that version when there is
one. The request is pinned to that version (`name@N`), so a version uploaded meanwhile cannot make the
replica serve something other than what was routed. Uploads, registry and training rpcs go straight to
a replica or any `hotlora serve` on the same stores (Ray Serve's proxy does not carry client streams)."""

from __future__ import annotations

import asyncio
import logging

import grpc

from hotlora.adapters.errors import HotloraError, Unavailable
from hotlora.adapters.names import format_ref, parse_ref
from hotlora.server.fleet.replica import FORWARDED_METADATA, ReplicaRpcError

log = logging.getLogger("hotlora.fleet")


class HotloraIngress:
    def __init__(self, replicas, tokens_file: str, registry_url: str, timeout_s: float = 300.0):
        from hotlora.adapters.store.postgres_store import PostgresMetadataStore
        from hotlora.adapters.store.shared_stores import default_replica_id
        from hotlora.server.frontend.auth import TokenAuthenticator

        self.replicas = replicas
        self.auth = TokenAuthenticator.from_file(tokens_file) if tokens_file else TokenAuthenticator.dev()
        self.metadata = PostgresMetadataStore(registry_url, "ingress-" + default_replica_id(), connections=4)
        self.timeout_s = timeout_s

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
        name, version = parse_ref(request.adapter)
        record = await asyncio.to_thread(self.metadata.get, tenant, name, version)
        if record is None:  # let a replica say what exists, in the server's own words
            return self.replicas, forwarded
        request.adapter = format_ref(record.name, record.version)
        return self.replicas.options(multiplexed_model_id=f"{tenant}/{request.adapter}"), forwarded


def _empty_response(method: str):
    from hotlora.v1 import inference_pb2

    return {
        "Generate": inference_pb2.GenerateResponse,
        "Classify": inference_pb2.ClassifyResponse,
        "Embed": inference_pb2.EmbedResponse,
    }[method]()


def _fail(grpc_context, exc: BaseException) -> None:
    from hotlora.server.rpc.interceptors import status_for

    exc = getattr(exc, "cause", None) or exc  # Ray wraps a replica's exception in a RayTaskError
    if isinstance(exc, ReplicaRpcError):
        code, details = grpc.StatusCode[exc.code], exc.details
    elif isinstance(exc, HotloraError):
        code, details = status_for(exc), exc.message
    elif _replica_gone(exc):
        exc = Unavailable("the replica serving this call stopped; retry (another replica takes it)")
        code, details = grpc.StatusCode.UNAVAILABLE, exc.message
    else:
        log.exception("fleet ingress: unexpected error")
        code, details = grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}"[:500]
    grpc_context.set_code(code)
    grpc_context.set_details(details)


def _replica_gone(exc: BaseException) -> bool:
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

    return isinstance(exc, ActorDiedError | ActorUnavailableError | RayActorError)
