"""Server commands of the `hotlora` CLI: `serve` and `prepare-model`.
Registered by hotlora.clients.cli; torch is imported only when a command runs."""

from __future__ import annotations

import signal
import sys
import threading

from hotlora.server.config import ServerConfig, add_config_arguments, config_from_args
from hotlora.server.flags import add_flags, env_name, flag_fields
from hotlora.server.fleet.app import FleetConfig, fleet_config_from


def register_commands(subparsers) -> None:
    serve = subparsers.add_parser(
        "serve",
        help="serve the base model and adapters over gRPC",
        description="Serve one resident base model and many tenants' LoRA adapters over gRPC. "
        "Every flag also reads HOTLORA_<FLAG> from the environment (e.g. HOTLORA_PORT=50052).",
    )
    add_config_arguments(serve)
    serve.set_defaults(func=_serve)
    fleet = subparsers.add_parser(
        "serve-fleet",
        help="serve replicas on Ray Serve behind its gRPC and HTTP proxies, on shared stores (docs/fleet.md)",
        description="Ray Serve replicas of `hotlora serve` on one PostgreSQL + S3 registry, adapters routed "
        "to replicas that hold them (multiplexing). Takes every `serve` flag for the replicas.",
    )
    add_config_arguments(fleet)
    add_flags(fleet, FleetConfig)
    fleet.set_defaults(func=_serve_fleet)
    prep = subparsers.add_parser(
        "prepare-model",
        help="dequantize the embedded default model once into the per-user cache",
    )
    add_config_arguments(prep)
    prep.set_defaults(func=_prepare)


def server_variables() -> set[str]:
    """The HOTLORA_<FLAG> variables `serve`, `serve-fleet` and `prepare-model` read."""
    return {env_name(f.name) for cls in (ServerConfig, FleetConfig) for f in flag_fields(cls)}


def _config(args):
    try:
        return config_from_args(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None


def _serve(args) -> int:
    cfg = _config(args)
    if cfg is None:
        return 2
    from hotlora.server.logs import setup_logging, startup_phase

    setup_logging(cfg.log_level, cfg.log_format)
    with startup_phase("imports (torch, transformers, grpc)", announce=True):
        from hotlora.adapters.errors import HotloraError
        from hotlora.server.app import HotloraServer
        from hotlora.server.port_binding import PortUnavailable

    try:
        server = HotloraServer(cfg)
    except HotloraError as exc:  # e.g. a tokens file that lists one token twice
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    try:
        server.serve_forever()
    except PortUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return getattr(server, "exit_code", 0)


def _serve_fleet(args) -> int:
    try:
        fleet = fleet_config_from(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from hotlora.server.fleet.app import start_serve
    from hotlora.server.logs import setup_logging

    setup_logging(fleet.server.log_level, fleet.server.log_format)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    start_serve(fleet)
    print(
        f"hotlora: fleet of {fleet.replicas} replica(s) ready, gRPC on :{fleet.grpc_port}, "
        f"OpenAI-compatible HTTP on {fleet.ray_http_host}:{fleet.ray_http_port}",
        flush=True,
    )
    stop.wait()
    from ray import serve

    serve.shutdown()
    return 0


def _prepare(args) -> int:
    cfg = _config(args)
    if cfg is None:
        return 2
    from hotlora.server.logs import setup_logging

    setup_logging(cfg.log_level, cfg.log_format)
    if cfg.model:
        print(f"--model {cfg.model} is used as it is; nothing to prepare")
        return 0
    from hotlora.server.model_loading import prepare_default_model

    print(prepare_default_model(cfg.cache_dir))
    return 0
