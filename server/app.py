"""The process: the gRPC server, health, reflection, the HTTP and metrics ports, start-up and shutdown
(what it serves is built by `server.assembly.assemble`).

Start order: bind the port and serve health (NOT_SERVING) first, so probes see the
server while the model loads; then load, then SERVING. Shutdown: NOT_SERVING, stop
accepting, let in-flight work finish within the grace period, then stop."""

from __future__ import annotations

import logging
import signal
import threading
import time
from concurrent import futures
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from hotlora.adapters.observer import NO_OBSERVER, Observer
from hotlora.adapters.service import AdapterService
from hotlora.adapters.training.finetune_jobs import FineTuneManager
from hotlora.kernels.omp_teams import release_thread_team
from hotlora.server.assembly import Components, assemble
from hotlora.server.config import ServerConfig
from hotlora.server.engine.scheduler import Engine
from hotlora.server.frontend.auth import TokenAuthenticator
from hotlora.server.frontend.inference import InferenceFrontend
from hotlora.server.http.door import HttpDoor
from hotlora.server.http.server import HttpServer
from hotlora.server.logs import startup_phase
from hotlora.server.metrics import Metrics
from hotlora.server.model_loading import LoadedModel
from hotlora.server.port_binding import PortUnavailable, bind_port
from hotlora.server.registry_health import RegistryHealth
from hotlora.server.rpc import reflection
from hotlora.server.rpc.adapters_service import AdaptersServicer
from hotlora.server.rpc.admission import RpcAdmission, RpcLimits
from hotlora.server.rpc.idle_watchdog import IdleWatchdog
from hotlora.server.rpc.inference_service import InferenceServicer
from hotlora.server.rpc.interceptors import ServerInterceptor
from hotlora.server.rpc.kserve_conversion import descriptor_files as kserve_files
from hotlora.server.rpc.kserve_service import register as register_kserve
from hotlora.server.rpc.training_service import TrainingServicer
from hotlora.server.rpc.transport import server_options
from hotlora.server.tinker.service import TinkerService
from hotlora.v1 import (
    adapters_pb2,
    adapters_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
    training_pb2,
    training_pb2_grpc,
)

log = logging.getLogger("hotlora.server")

SERVICE_NAMES = ("hotlora.v1.Inference", "hotlora.v1.Adapters", "hotlora.v1.Training")


@dataclass
class AppState:
    """What the servicers read; the components are None until the model is loaded (`install`)."""

    config: ServerConfig
    loaded: LoadedModel | None = None
    engine: Engine | None = None
    frontend: InferenceFrontend | None = None
    adapters: AdapterService | None = None  # registry + cache
    training: FineTuneManager | None = None
    tinker: TinkerService | None = None  # the Tinker API (HTTP door, /api/v1)
    metrics: Metrics | None = None  # None: --metrics-port -1
    draining: bool = False

    def install(self, c: Components) -> None:
        self.loaded, self.engine, self.adapters, self.training = c.loaded, c.engine, c.adapters, c.training
        self.tinker = c.tinker
        self.frontend = c.frontend  # last: the inference door serves once it is set


class HotloraServer:
    def __init__(self, config: ServerConfig):
        self.config = config
        self.state = AppState(config)
        self.auth = (
            TokenAuthenticator.from_file(config.tokens_file)
            if config.tokens_file
            else TokenAuthenticator.dev()
        )
        self.metrics: Metrics | None = None
        if config.metrics_port >= 0:
            self.metrics = Metrics(
                expose_adapter_names=config.expose_adapter_names,
                vllm_compatible=config.vllm_compatible_metrics,
                adapter_metrics=config.adapter_metrics,
                adapter_metrics_cap=config.adapter_metrics_cap,
            )
            self.state.metrics = self.metrics
        self.observer: Observer = self.metrics if self.metrics is not None else NO_OBSERVER
        self.health = health.HealthServicer(experimental_non_blocking=True)
        self.admission = RpcAdmission(RpcLimits(config.rpc_limit, config.tenant_rpc_limit))
        self.interceptor = ServerInterceptor(
            self.auth,
            self.observer,
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
        names += register_kserve(self.state, self.grpc)
        self.service_names = names
        if self.config.reflection:
            files = [pb.DESCRIPTOR for pb in (inference_pb2, adapters_pb2, training_pb2, health_pb2)]
            reflection.enable(self.grpc, names, files, kserve_files())
        self._set_health(False)

    def _set_health(self, serving: bool):
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", *self.service_names):
            self.health.set(name, status)

    # ---- lifecycle ----------------------------------------------------------------
    def bind(self) -> int:
        """Bind the metrics, HTTP and gRPC ports (each may be 0: a free one). Raises PortUnavailable naming
        the port and its flag, with nothing left bound."""
        cfg = self.config
        with startup_phase("ports") as phase:
            try:
                if self.metrics is not None:
                    host = cfg.metrics_host or cfg.host
                    self.metrics_port = bind_port(
                        "Prometheus metrics", "--metrics-port", host, cfg.metrics_port,
                        lambda: self.metrics.start_http(host, cfg.metrics_port), can_be_off=True,
                    )  # fmt: skip
                if cfg.http_port >= 0:
                    door = HttpDoor(self.state, self.auth, self.admission, self.metrics)
                    host = cfg.http_host or cfg.host
                    self.http = bind_port(
                        "the OpenAI-compatible HTTP door", "--http-port", host, cfg.http_port,
                        lambda: HttpServer(door.app, host, cfg.http_port, cfg.http_header_timeout_seconds),
                        can_be_off=True,
                    )  # fmt: skip
                    self.http_port = self.http.port
                # last: an unstarted gRPC server cannot give its port back (stop() is a no-op before start)
                self.port = bind_port("gRPC", "--port", cfg.host, cfg.port, self._add_grpc_port)
            except PortUnavailable:
                self._unbind()
                raise
            phase.note = self._ports_line()
        return self.port

    def _add_grpc_port(self) -> int:
        cfg = self.config
        address = f"[{cfg.host}]:{cfg.port}" if ":" in cfg.host else f"{cfg.host}:{cfg.port}"
        if not cfg.tls_cert:
            return self.grpc.add_insecure_port(address)
        with open(cfg.tls_key, "rb") as f:
            key = f.read()
        with open(cfg.tls_cert, "rb") as f:
            cert = f.read()
        ca = open(cfg.tls_client_ca, "rb").read() if cfg.tls_client_ca else None
        creds = grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=bool(ca))
        return self.grpc.add_secure_port(address, creds)

    def _unbind(self) -> None:
        """Release what `bind` bound before a port failed (an in-process caller may try again)."""
        if self.metrics is not None:
            self.metrics.stop_http()
        if self.http is not None:
            self.http.sock.close()
        self.port = self.metrics_port = self.http = self.http_port = None

    def _ports_line(self) -> str:
        cfg = self.config
        ports = [f"gRPC on {cfg.host}:{self.port}"]
        if self.metrics_port is not None:
            ports.append(f"metrics on {cfg.metrics_host or cfg.host}:{self.metrics_port}")
        if self.http_port is not None:
            ports.append(f"HTTP on {cfg.http_host or cfg.host}:{self.http_port}")
        return ", ".join(ports)

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
        t0 = time.monotonic()
        components = assemble(self.config, self.observer)  # logs its phases
        self.state.install(components)
        loaded, adapters = components.loaded, components.adapters
        if self.metrics is not None:
            self.metrics.attach(self.state)
        self.registry_health = RegistryHealth(
            adapters.registry.check,
            self._registry_health_changed,
            self.config.health_check_seconds,
            # a shared store's calls end within their bounds (S3: two tries); a local disk answers at once
            timeout_s=2 * self.config.registry_timeout_seconds + 1.0,
        )
        self.registry_health.start()
        release_thread_team()  # loading ran parallel torch ops here; the engine thread serves from now on
        self.ready_seconds = time.monotonic() - t0
        self._set_health(True)
        log.info(
            "ready: model %s on %s/%s in %.2f s (health SERVING)",
            loaded.name,
            loaded.device,
            loaded.dtype,
            self.ready_seconds,
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
        if self.state.tinker is not None:
            self.state.tinker.close()  # open futures fail ("the server stopped"); checkpoints are on disk
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
        print(f"hotlora: {self._ports_line()}", flush=True)
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
