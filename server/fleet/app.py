"""`hotlora serve-fleet`: a Ray Serve application of hotlora replicas behind Ray Serve's gRPC proxy
(hotlora.v1) and its HTTP proxy (the OpenAI-compatible door).

    hotlora serve-fleet --replicas 2 --grpc-port 9000 --registry postgresql://... --blob-store s3://... \\
        --tokens-file tokens.txt [every `hotlora serve` flag]

On a machine without a Ray cluster it starts a local one; with RAY_ADDRESS set it joins that cluster.
`build_app` is also what `serve run hotlora.server.fleet.app:app_from_env` and the KubeRay RayService in
deploy/k8s/ use."""

from __future__ import annotations

import os

from pydantic import model_validator

from hotlora.server.config import ServerConfig, config_from_args
from hotlora.server.flags import config_class, config_from, flag

GRPC_SERVICER = "hotlora.v1.inference_pb2_grpc.add_InferenceServicer_to_server"
APP_NAME = "hotlora"


@config_class(frozen=True)
class FleetConfig:
    """`serve-fleet`'s own flags (declared once, as `hotlora serve`'s are; server/flags.py), beside the
    ServerConfig every replica serves (its --port/--host are the replicas' own loopback ports)."""

    server: ServerConfig
    replicas: int = flag(2, "Ray Serve replicas, each holding the base model", ge=1)
    replica_cpus: float = flag(1.0, "CPUs Ray reserves for one replica", gt=0)
    max_adapters_per_replica: int = flag(
        32, "adapter versions one replica is routed as holding (Ray Serve multiplexing)", ge=1
    )
    grpc_port: int = flag(9000, "port of Ray Serve's gRPC proxy (it binds every interface)", ge=1, le=65535)
    ray_http_port: int = flag(
        8000,
        "port of Ray Serve's HTTP proxy: the fleet's OpenAI-compatible HTTP door (docs/http.md)",
        ge=1,
        le=65535,
    )
    ray_http_host: str = flag(
        "127.0.0.1",
        "address Ray Serve's HTTP proxy binds (loopback by default; 0.0.0.0 for other machines)",
        min_length=1,
        must="an address (127.0.0.1, 0.0.0.0, ...)",
    )

    @model_validator(mode="after")
    def _check_together(self):
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
        if self.grpc_port == self.ray_http_port:
            problems.append(f"--grpc-port and --ray-http-port must differ (both {self.grpc_port})")
        if problems:
            raise ValueError("\n".join(problems))
        return self


def fleet_config_from(args=None, environ=None) -> FleetConfig:
    """The replicas' ServerConfig and the fleet's own flags from one command line and environment
    (flag > HOTLORA_<FLAG> > default). Raises ConfigError naming each bad flag."""
    return config_from(FleetConfig, args, environ, server=config_from_args(args, environ))


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
    """For `serve run` / a RayService: the replicas' settings from HOTLORA_* variables and the fleet's
    (HOTLORA_REPLICAS, HOTLORA_MAX_ADAPTERS_PER_REPLICA, ...), read as `hotlora serve-fleet` reads them."""
    return build_app(fleet_config_from())
