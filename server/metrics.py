"""Prometheus metrics (prometheus-client), served over HTTP on --metrics-port."""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger("hotlora.metrics")

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("hotlora_requests", "gRPC calls by method and status", ["rpc", "code"], registry=r)
        self.rpc_seconds = Histogram("hotlora_rpc_duration_seconds", "gRPC call duration", ["rpc"],
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("hotlora_e2e_request_latency_seconds", "generation request latency, queue to last token",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("hotlora_prompt_tokens", "prompt tokens of finished generations", registry=r)
        self.generation_tokens = Counter("hotlora_generation_tokens", "generated tokens", registry=r)
        self.running = Gauge("hotlora_num_requests_running", "generation requests in the running batch", registry=r)
        self.waiting = Gauge("hotlora_num_requests_waiting", "requests waiting for admission", registry=r)
        self._server = None
        self._thread = None

    def attach(self, state) -> None:
        engine = state.engine
        self.running.set_function(lambda: engine.num_running)
        self.waiting.set_function(lambda: engine.num_waiting)

    def rpc_finished(self, method: str, code: str, seconds: float) -> None:
        rpc = method.rsplit("/", 1)[-1]
        self.requests.labels(rpc, code).inc()
        self.rpc_seconds.labels(rpc).observe(seconds)

    def request_finished(self, req) -> None:
        self.prompt_tokens.inc(len(req.prompt_ids))
        self.generation_tokens.inc(len(req.output_ids))
        if req.finished_at is not None:
            self.e2e.observe(req.finished_at - req.created_at)

    def forward_finished(self, kind: str, rows: int, tokens: int, seconds: float) -> None:
        pass

    def start_http(self, host: str, port: int) -> int:
        self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        return self._server.server_port

    def stop_http(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
