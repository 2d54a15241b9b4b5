"""Server commands of the `hotlora` CLI: `serve` and `prepare-model`.
Registered by hotlora.clients.cli; torch is imported only when a command runs."""

from __future__ import annotations

import sys

from hotlora.server.config import add_config_arguments, config_from_args


def register_commands(subparsers) -> None:
    serve = subparsers.add_parser(
        "serve",
        help="serve the base model and adapters over gRPC",
        description="Serve one resident base model and many tenants' LoRA adapters over gRPC. "
        "Every flag also reads HOTLORA_<FLAG> from the environment (e.g. HOTLORA_PORT=50052).",
    )
    add_config_arguments(serve)
    serve.set_defaults(func=_serve)
    prep = subparsers.add_parser(
        "prepare-model",
        help="dequantize the embedded default model once into the per-user cache",
    )
    add_config_arguments(prep)
    prep.set_defaults(func=_prepare)


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
    from hotlora.server.logs import setup_logging

    setup_logging(cfg.log_level, cfg.log_format)
    from hotlora.adapters.errors import HotloraError
    from hotlora.server.app import HotloraServer

    try:
        server = HotloraServer(cfg)
    except HotloraError as exc:  # e.g. a tokens file that lists one token twice
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    server.serve_forever()
    return getattr(server, "exit_code", 0)


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
