"""Assembly: the gRPC server, health, reflection, the model, the engine, and shutdown.

Start order: bind the port and serve health (NOT_SERVING) first, so probes see the
server while the model loads; then load, then SERVING. Shutdown: NOT_SERVING, stop
accepting, let in-flight work finish within the grace period, then stop."""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
import time
from concurrent import futures
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from hotlora.server.auth import TokenAuthenticator
from hotlora.server.config import ServerConfig
from hotlora.server.idle_watchdog import IdleWatchdog
from hotlora.server.interceptors import ServerInterceptor
from hotlora.server.registry_health import RegistryHealth
from hotlora.server.rpc_admission import RpcAdmission, RpcLimits
from hotlora.server.transport import server_options

log = logging.getLogger("hotlora.server")

SERVICE_NAMES = ("hotlora.v1.Inference", "hotlora.v1.Adapters", "hotlora.v1.Training")


@dataclass
class AppState:
    """What the servicers read; fields fill in as start-up progresses."""

    config: ServerConfig
    loaded: object = None  # LoadedModel
    engine: object = None
    frontend: object = None  # InferenceFrontend
    adapters: object = None  # AdapterService (registry + runtime)
    training: object = None  # FineTuneManager
    metrics: object = None
    draining: bool = False


class HotloraServer:
    def __init__(self, config: ServerConfig):
        self.config = config
        self.state = AppState(config)
        self.auth = (
            TokenAuthenticator.from_file(config.tokens_file)
            if config.tokens_file
            else TokenAuthenticator.dev()
        )
        self.metrics = None
        if config.metrics_port >= 0:
            from hotlora.server.metrics import Metrics

            self.metrics = Metrics(
                expose_adapter_names=config.expose_adapter_names,
                vllm_compatible=config.vllm_compatible_metrics,
            )
            self.state.metrics = self.metrics
        self.health = health.HealthServicer(experimental_non_blocking=True)
        self.admission = RpcAdmission(RpcLimits(config.rpc_limit, config.tenant_rpc_limit))
        self.interceptor = ServerInterceptor(
            self.auth,
            self.metrics,
            admission=self.admission,
            watchdog=IdleWatchdog(config.request_idle_seconds),
        )
        # no maximum_concurrent_rpcs: the interceptor admits calls (grpc's own cap would refuse a call
        # after the interceptor counted it, and never tell it)
        self.grpc = grpc.server(
            futures.ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="hotlora-rpc"),
            interceptors=[self.interceptor],
            options=server_options(config),
        )
        self._register_services()
        self.port = None
        self.metrics_port = None
        self.http = None  # HttpServer of the OpenAI-compatible door, once bound
        self.http_port = None
        self.registry_health: RegistryHealth | None = None
        self._stopped = threading.Event()

    def _register_services(self):
        from hotlora.server.adapters_service import AdaptersServicer
        from hotlora.server.inference_service import InferenceServicer
        from hotlora.server.training_service import TrainingServicer
        from hotlora.v1 import (
            adapters_pb2,
            adapters_pb2_grpc,
            inference_pb2,
            inference_pb2_grpc,
            training_pb2,
            training_pb2_grpc,
        )

        inference_pb2_grpc.add_InferenceServicer_to_server(InferenceServicer(self.state), self.grpc)
        adapters_pb2_grpc.add_AdaptersServicer_to_server(AdaptersServicer(self.state), self.grpc)
        training_pb2_grpc.add_TrainingServicer_to_server(TrainingServicer(self.state), self.grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        names = [
            inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name,
            adapters_pb2.DESCRIPTOR.services_by_name["Adapters"].full_name,
            training_pb2.DESCRIPTOR.services_by_name["Training"].full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        ]
        try:
            from hotlora.server.kserve_service import register as register_kserve

            names += register_kserve(self.state, self.grpc)
        except ImportError:
            pass
        self.service_names = names
        if self.config.reflection:
            reflection.enable_server_reflection([*names, reflection.SERVICE_NAME], self.grpc)
        self._set_health(False)

    def _set_health(self, serving: bool):
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", *self.service_names):
            self.health.set(name, status)

    # ---- lifecycle ----------------------------------------------------------------
    def bind(self) -> int:
        cfg = self.config
        address = f"{cfg.host}:{cfg.port}"
        if cfg.tls_cert:
            with open(cfg.tls_key, "rb") as f:
                key = f.read()
            with open(cfg.tls_cert, "rb") as f:
                cert = f.read()
            ca = open(cfg.tls_client_ca, "rb").read() if cfg.tls_client_ca else None
            creds = grpc.ssl_server_credentials(
                [(key, cert)], root_certificates=ca, require_client_auth=bool(ca)
            )
            self.port = self.grpc.add_secure_port(address, creds)
        else:
            self.port = self.grpc.add_insecure_port(address)
        if not self.port:
            raise RuntimeError(f"could not bind the gRPC port {address}")
        if self.metrics is not None:
            self.metrics_port = self.metrics.start_http(cfg.metrics_host or cfg.host, cfg.metrics_port)
        if cfg.http_port >= 0:
            from hotlora.server.http_door import HttpDoor
            from hotlora.server.http_server import HttpServer

            door = HttpDoor(self.state, self.auth, self.admission, self.metrics)
            self.http = HttpServer(door.app, cfg.http_host or cfg.host, cfg.http_port)
            self.http_port = self.http.port
        return self.port

    def start(self) -> None:
        if self.port is None:
            self.bind()
        self.grpc.start()
        if self.http is not None:
            self.http.start()
            log.info(
                "OpenAI-compatible HTTP on %s:%d", self.config.http_host or self.config.host, self.http_port
            )
        log.info(
            "listening on %s:%d (health NOT_SERVING until the model is ready)", self.config.host, self.port
        )

    def load(self) -> None:
        """Load the model and everything that needs it, then report SERVING."""
        from hotlora.server.engine import Engine, EngineLimits
        from hotlora.server.frontend import InferenceFrontend
        from hotlora.server.model_loading import load_model

        cfg = self.config
        t0 = time.monotonic()
        loaded = load_model(
            cfg.model,
            cfg.cache_dir,
            cfg.device,
            cfg.dtype,
            kv_cache_bytes=cfg.kv_cache_bytes,
            kv_block_size=cfg.kv_block_size,
            runner=cfg.runner,
        )
        if not cfg.prefix_caching:
            loaded.model.kv_config = dataclasses.replace(loaded.model.kv_config, prefix_caching=False)
        self.state.loaded = loaded
        runtime, adapters = None, None
        try:
            from hotlora.server.adapters_setup import setup_adapters
        except ImportError:
            setup_adapters = None
        if setup_adapters is not None:
            runtime, adapters = setup_adapters(self.state, loaded)
        limits = EngineLimits(
            cfg.max_batch_size, cfg.max_queue, cfg.max_queue_per_tenant, cfg.max_prefill_tokens
        )
        engine = Engine(
            loaded.model,
            loaded.tokenizer,
            limits=limits,
            runtime=runtime,
            observer=self.metrics,
            task_share=cfg.train_share,
            static_decode=_decode_graphs(cfg, loaded, runtime),
            task_idle_grace_s=cfg.train_idle_grace_ms / 1000.0,
        )
        engine.start()
        self.state.engine = engine
        self.state.adapters = adapters
        self.state.frontend = InferenceFrontend(engine, loaded.tokenizer, cfg, adapters)
        try:
            from hotlora.server.training_setup import setup_training
        except ImportError:
            setup_training = None
        if setup_training is not None:
            self.state.training = setup_training(self.state)
        if self.metrics is not None:
            self.metrics.attach(self.state)
        if adapters is not None:
            self.registry_health = RegistryHealth(
                adapters.registry.check, self._registry_health_changed, cfg.health_check_seconds
            )
            self.registry_health.start()
        self.ready_seconds = time.monotonic() - t0
        self._set_health(True)
        log.info(
            "ready: model %s on %s/%s in %.2f s", loaded.name, loaded.device, loaded.dtype, self.ready_seconds
        )

    def _registry_health_changed(self, healthy: bool) -> None:
        if not self.state.draining:
            self._set_health(healthy)

    def shutdown(self, grace: float | None = None) -> None:
        if self._stopped.is_set():
            return
        grace = self.config.grace_seconds if grace is None else grace
        log.info("draining (grace %.1f s)", grace)
        self.state.draining = True
        self._set_health(False)
        if self.registry_health is not None:
            self.registry_health.stop()
        engine = self.state.engine
        if self.state.training is not None:
            # running jobs end FAILED ("server stopped"); they would otherwise hold the engine
            self.state.training.close()
        if engine is not None:
            engine.drain()
        deadline = time.monotonic() + grace
        while engine is not None and not engine.idle and time.monotonic() < deadline:
            time.sleep(0.05)
        self.grpc.stop(max(0.0, deadline - time.monotonic())).wait()
        if self.http is not None:
            self.http.stop(max(0.5, deadline - time.monotonic()))
        if engine is not None:
            engine.stop()
        if self.state.adapters is not None:
            self.state.adapters.close()
        if self.metrics is not None:
            self.metrics.stop_http()
        self.interceptor.close()
        self._stopped.set()
        log.info("stopped")

    def serve_forever(self) -> None:
        """Start, load, and block until SIGTERM/SIGINT, then drain gracefully."""
        stop = threading.Event()

        def on_signal(signum, frame):
            log.info("signal %d: shutting down", signum)
            stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        self.start()
        print(
            f"hotlora: gRPC on {self.config.host}:{self.port}"
            + (f", metrics on :{self.metrics_port}" if self.metrics_port else "")
            + (f", HTTP on :{self.http_port}" if self.http_port else ""),
            flush=True,
        )
        loader = threading.Thread(target=self._load_or_die, args=(stop,), daemon=True)
        loader.start()
        while not stop.wait(0.5):
            pass
        self.shutdown()

    def _load_or_die(self, stop: threading.Event) -> None:
        try:
            self.load()
            print("hotlora: ready", flush=True)
        except Exception:
            log.exception("start-up failed")
            self.exit_code = 1
            stop.set()


def _decode_graphs(cfg, loaded, runtime):
    """CUDA graphs for decode steps: on a CUDA device, with hotlora's runner, unless --no-cuda-graphs."""
    if not cfg.cuda_graphs or loaded.device.type != "cuda" or loaded.runner_kind != "runner":
        return None
    from hotlora.server.runner.decode_graphs import StaticDecode

    plan = getattr(runtime, "graph_plan", None)
    done = getattr(runtime, "end_forward", None) if plan is not None else None
    return StaticDecode(loaded.model, capture=True, lora_plan=plan, lora_done=done)
