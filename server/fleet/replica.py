"""One Ray Serve replica: a whole hotlora server (base model, engine, adapter cache) on a loopback port,
on the shared registry (PostgreSQL + S3).

Requests arrive as hotlora.v1 messages with the caller's authorization and go through that server's own
interceptor (auth, admission, limits, error mapping) unchanged. Adapters are Ray Serve multiplexed
models: the id `tenant/name@N` routes a request to a replica that has loaded that version, and a
replica loads a version through the shared registry the first time it is asked for it. Eviction stays
with our own byte-budget cache: Ray's multiplexing LRU only decides where requests go."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import uuid
from pathlib import Path

import grpc

from hotlora.server.config import ServerConfig

log = logging.getLogger("hotlora.fleet")

UNARY = ("Generate", "Classify", "Embed")
STREAMING = ("GenerateStream",)
FORWARDED_METADATA = ("authorization", "x-request-id")
# what the HTTP ingress passes on to a replica's door, and what comes back (hop-by-hop headers stay behind)
FORWARDED_HEADERS = ("authorization", "x-request-id", "content-type", "accept")
RETURNED_HEADERS = ("content-type", "x-request-id", "cache-control")
HTTP_CHUNK = 65536


class ReplicaRpcError(Exception):
    """The replica's server answered with a gRPC error; carried back to the ingress as code + details."""

    def __init__(self, code: str, details: str):
        super().__init__(code, details)
        self.code, self.details = code, details


def replica_config(fleet: ServerConfig) -> ServerConfig:
    """The fleet's settings for one replica's inner server: loopback only, ports of its own (gRPC and the
    HTTP door, both reached only through the ingress), its own spool directory (nothing in it is shared),
    no metrics port (Ray runs many on one node)."""
    return dataclasses.replace(
        fleet,
        host="127.0.0.1",
        port=0,
        metrics_port=-1,
        http_port=0,
        http_host="127.0.0.1",
        metrics_host="",
        data_dir=str(Path(fleet.data_dir) / f"replica-{uuid.uuid4().hex[:8]}"),
        replica_id="",
    )


class HotloraReplica:
    def __init__(self, config: ServerConfig):
        from hotlora.server.app import HotloraServer
        from hotlora.v1 import inference_pb2_grpc

        self.server = HotloraServer(replica_config(config))
        self.server.start()
        self.server.load()
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.server.port}")
        self.inference = inference_pb2_grpc.InferenceStub(self.channel)
        self.loads: collections.Counter[str] = collections.Counter()

    async def warm(self, model_id: str) -> str:
        """Load `tenant/name@N` into this replica's device slots (through the shared registry)."""
        tenant, ref = model_id.split("/", 1)
        await asyncio.to_thread(self.server.state.adapters.load, tenant, ref)
        self.loads[model_id] += 1
        return ref

    async def call(self, method: str, request, metadata: tuple, timeout: float):
        if method not in UNARY:
            raise ValueError(f"{method} is not a unary Inference rpc")
        await self._ensure_adapter()
        rpc = getattr(self.inference, method)
        try:
            return await asyncio.to_thread(rpc, request, metadata=metadata, timeout=timeout)
        except grpc.RpcError as err:
            raise ReplicaRpcError(err.code().name, err.details() or "") from None

    async def call_stream(self, method: str, request, metadata: tuple, timeout: float):
        if method not in STREAMING:
            raise ValueError(f"{method} is not a streaming Inference rpc")
        await self._ensure_adapter()
        stream = getattr(self.inference, method)(request, metadata=metadata, timeout=timeout)
        done = object()
        try:
            while (chunk := await asyncio.to_thread(next, stream, done)) is not done:
                yield chunk
        except grpc.RpcError as err:
            raise ReplicaRpcError(err.code().name, err.details() or "") from None
        finally:
            stream.cancel()

    async def http(self, method: str, path: str, headers: tuple, body: bytes, timeout: float):
        """Forward one HTTP request to this replica's own door on loopback; yields (status, headers) and
        then the response body as it arrives (an SSE stream stays a stream)."""
        import http.client

        await self._ensure_adapter()
        conn = http.client.HTTPConnection("127.0.0.1", self.server.http_port, timeout=timeout)
        try:
            await asyncio.to_thread(conn.request, method, path, body=body or None, headers=dict(headers))
            response = await asyncio.to_thread(conn.getresponse)
            kept = tuple((k, v) for k, v in response.getheaders() if k.lower() in RETURNED_HEADERS)
            yield response.status, kept
            while chunk := await asyncio.to_thread(response.read1, HTTP_CHUNK):
                yield chunk
        finally:
            conn.close()  # a client that left: the door's stream sees the socket close and stops

    def served_model_name(self) -> str:
        """The base model's name in the HTTP door's `model` (what the door itself compares against)."""
        loaded = self.server.state.loaded
        return self.server.config.served_model_name or (loaded.name if loaded is not None else "hotlora")

    def load_counts(self) -> tuple[str, dict[str, int]]:
        """(this replica's id, loads per multiplexed id): how well affinity held."""
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id, dict(self.loads)

    async def _ensure_adapter(self) -> None:
        from ray import serve

        model_id = serve.get_multiplexed_model_id()
        if model_id:
            await self.adapter(model_id)  # the multiplexed loader `deployment_class` adds

    def __del__(self):
        server = getattr(self, "server", None)
        if server is not None:
            self.channel.close()
            server.shutdown(grace=1.0)


def deployment_class(max_adapters: int) -> type[HotloraReplica]:
    """HotloraReplica with Ray Serve's multiplexed loader keeping up to `max_adapters` ids per replica
    for routing (the decorator takes its size when the class is made)."""
    from ray import serve

    class MultiplexedHotloraReplica(HotloraReplica):
        @serve.multiplexed(max_num_models_per_replica=max_adapters)
        async def adapter(self, model_id: str) -> str:
            return await self.warm(model_id)

    MultiplexedHotloraReplica.__name__ = "HotloraReplica"
    return MultiplexedHotloraReplica
