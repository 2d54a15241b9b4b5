"""`hotlora serve-fleet`: a Ray Serve application of hotlora replicas behind Ray Serve's gRPC proxy
(hotlora.v1) and its HTTP proxy (the OpenAI-compatible door).

    hotlora serve-fleet --replicas 2 --grpc-port 9000 --registry postgresql://... --blob-store s3://... \\
        --tokens-file tokens.txt [every `hotlora serve` flag]

On a machine without a Ray cluster it starts a local one; with RAY_ADDRESS set it joins that cluster.
`build_app` is also what `serve run hotlora.server.fleet.app:app_from_env` and the KubeRay RayService in
deploy/k8s/ use."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from hotlora.server.config import ServerConfig

GRPC_SERVICER = "hotlora.v1.inference_pb2_grpc.add_InferenceServicer_to_server"
APP_NAME = "hotlora"


@dataclass(frozen=True)
class FleetConfig:
    server: ServerConfig
    """What every replica serves (its --port/--host are the replicas' own loopback ports)."""
    replicas: int = 2
    """Ray Serve replicas, each holding the base model."""
    replica_cpus: float = 1.0
    """CPUs Ray reserves for one replica."""
    max_adapters_per_replica: int = 32
    """Adapter versions one replica is routed as holding (Ray Serve's multiplexing LRU)."""
    grpc_port: int = 9000
    """Port of Ray Serve's gRPC proxy (it binds every interface)."""
    ray_http_port: int = 8000
    """Port of Ray Serve's HTTP proxy: the fleet's OpenAI-compatible HTTP door (docs/http.md)."""
    ray_http_host: str = "127.0.0.1"
    """Address Ray Serve's HTTP proxy binds (loopback unless asked: `0.0.0.0` serves other machines)."""

    def __post_init__(self):
        problems = []
        if not self.server.registry or not self.server.blob_store:
            problems.append(
                "serve-fleet needs the shared stores: --registry postgresql://... and --blob-store s3://..."
            )
        if not self.server.tokens_file:
            problems.append(
                "serve-fleet listens on every interface (Ray Serve's gRPC proxy binds [::]): "
                "give --tokens-file"
            )
        if self.replicas < 1 or self.max_adapters_per_replica < 1:
            problems.append("--replicas and --max-adapters-per-replica must be at least 1")
        if self.replica_cpus <= 0:
            problems.append(f"--replica-cpus must be more than 0 (got {self.replica_cpus})")
        for flag, port in (("--grpc-port", self.grpc_port), ("--ray-http-port", self.ray_http_port)):
            if not 1 <= port <= 65535:
                problems.append(f"{flag} must be 1..65535 (got {port})")
        if not self.ray_http_host:
            problems.append("--ray-http-host must name an address (127.0.0.1, 0.0.0.0, ...)")
        if self.grpc_port == self.ray_http_port:
            problems.append(f"--grpc-port and --ray-http-port must differ (both {self.grpc_port})")
        if problems:
            raise ValueError("invalid configuration:\n  " + "\n  ".join(problems))


def build_app(fleet: FleetConfig):
    from ray import serve

    from hotlora.server.fleet.ingress import HotloraIngress
    from hotlora.server.fleet.replica import deployment_class

    replica = serve.deployment(
        deployment_class(fleet.max_adapters_per_replica),
        name="HotloraReplica",
        num_replicas=fleet.replicas,
        ray_actor_options={"num_cpus": fleet.replica_cpus},
        max_ongoing_requests=max(8, fleet.server.max_batch_size),
        health_check_period_s=5,
    ).bind(fleet.server)
    ingress = serve.deployment(HotloraIngress, name="HotloraIngress", ray_actor_options={"num_cpus": 0})
    return ingress.bind(replica, fleet.server.tokens_file, fleet.server.registry)


def start_serve(fleet: FleetConfig) -> None:
    """Start (or join) Ray, start Serve with the gRPC proxy, deploy the application."""
    import ray
    from ray import serve
    from ray.serve.config import HTTPOptions, gRPCOptions

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, include_dashboard=False)
    serve.start(
        http_options=HTTPOptions(host=fleet.ray_http_host, port=fleet.ray_http_port),
        grpc_options=gRPCOptions(port=fleet.grpc_port, grpc_servicer_functions=[GRPC_SERVICER]),
    )
    serve.run(build_app(fleet), name=APP_NAME)


def app_from_env(args: dict | None = None):
    """For `serve run` / a RayService: the replicas' settings from HOTLORA_* variables (as for
    `hotlora serve`), the fleet's from HOTLORA_REPLICAS, HOTLORA_MAX_ADAPTERS_PER_REPLICA, ..."""
    from hotlora.server.config import ServerConfig, _convert

    kwargs = {}
    for f in dataclasses.fields(ServerConfig):
        raw = os.environ.get("HOTLORA_" + f.name.upper())
        if raw is not None:
            kwargs[f.name] = _convert(f.name, f.type, raw)
    fleet = FleetConfig(
        ServerConfig(**kwargs),
        replicas=int(os.environ.get("HOTLORA_REPLICAS", "2")),
        replica_cpus=float(os.environ.get("HOTLORA_REPLICA_CPUS", "1")),
        max_adapters_per_replica=int(os.environ.get("HOTLORA_MAX_ADAPTERS_PER_REPLICA", "32")),
        ray_http_host=os.environ.get("HOTLORA_RAY_HTTP_HOST", "127.0.0.1"),
    )
    return build_app(fleet)
