"""Prometheus metrics (prometheus-client), served over HTTP on --metrics-port.

The server's components call the observer methods below (`rpc_finished`, `request_finished`,
`forward_finished`, `adapter_cache_event`, ...); gauges that describe current state (running and
waiting requests, adapters and fine-tune jobs by state, memory, the vLLM-style LoRA info gauge)
are read at scrape time from the attached AppState (metrics_collectors.py). Names follow
prometheus.io conventions: prefix `hotlora_`, base units, counters end in `_total`, and every label has a
bounded value set (no per-request labels; adapter names only behind `expose_adapter_names`, top-N)."""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector

from hotlora.server.adapter_metrics import AdapterMetrics, Placement
from hotlora.server.metrics_buckets import (
    BATCH_BUCKETS,
    CACHE_TIERS,
    E2E_BUCKETS,
    FINISH_REASONS,
    FORWARD_BUCKETS,
    FORWARD_KINDS,
    HTTP_ROUTES,
    ITL_BUCKETS,
    LABEL_RE,
    LOAD_BUCKETS,
    MAX_OUTCOMES,
    QUEUE_BUCKETS,
    REQUEST_TOKEN_BUCKETS,
    RPC_BUCKETS,
    STEP_BUCKETS,
    TOKEN_BUCKETS,
    TTFT_BUCKETS,
    UPLOAD_OUTCOMES,
)
from hotlora.server.metrics_collectors import StateCollector, VllmCollector, read_job_counts

if TYPE_CHECKING:
    from hotlora.server.app import AppState

log = logging.getLogger("hotlora.metrics")


class Metrics:
    """Satisfies `hotlora.adapters.observer.Observer`, plus `upload_finished` for the adapters door."""

    def __init__(
        self,
        expose_adapter_names: bool = False,
        vllm_compatible: bool = False,
        adapter_metrics: bool = False,
        adapter_metrics_cap: int = 1000,
    ):
        """expose_adapter_names: list running/waiting adapter names (tenant/name@N, top 16) in
        hotlora_lora_requests_info; off by default because they are tenants' names.
        vllm_compatible: also export vLLM's names of the gauges LoRA-aware routers read.
        adapter_metrics: per-adapter series (server/adapter_metrics.py), at most `adapter_metrics_cap`
        adapters; they name tenants' adapters, so they also turn on expose_adapter_names."""
        self.expose_adapter_names = expose_adapter_names or adapter_metrics
        self.per_adapter = AdapterMetrics(adapter_metrics, adapter_metrics_cap)
        self.vllm_compatible = vllm_compatible
        # `*_created` series double the exposition and no dashboard uses them (process-wide switch)
        disable_created_metrics()
        self.registry = CollectorRegistry()
        r = self.registry
        self.state: AppState | None = None
        self._outcomes_lock = threading.Lock()

        # ---- gRPC ---------------------------------------------------------------------
        self.requests = Counter(
            "hotlora_requests", "gRPC calls by rpc and gRPC status code", ["rpc", "code"], registry=r
        )
        self.rpc_seconds = Histogram(
            "hotlora_rpc_duration_seconds",
            "gRPC call duration by rpc",
            ["rpc"],
            buckets=RPC_BUCKETS,
            registry=r,
        )
        # ---- the HTTP door ------------------------------------------------------------
        self.http_requests = Counter(
            "hotlora_http_requests",
            "HTTP door requests by route and HTTP status",
            ["route", "status"],
            registry=r,
        )
        self.http_seconds = Histogram(
            "hotlora_http_request_duration_seconds",
            "HTTP door request duration by route (streams: until the response starts)",
            ["route"],
            buckets=RPC_BUCKETS,
            registry=r,
        )
        # ---- generation requests (engine) ---------------------------------------------
        self.ttft = Histogram(
            "hotlora_time_to_first_token_seconds",
            "generation request arrival to its first token",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "hotlora_inter_token_latency_seconds",
            "mean time between output tokens, one observation per request of 2+ tokens",
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "hotlora_e2e_request_latency_seconds",
            "generation request arrival to its last token",
            buckets=E2E_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "hotlora_request_queue_time_seconds",
            "generation request arrival to admission into the running batch",
            buckets=QUEUE_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "hotlora_prompt_tokens", "prompt tokens of finished generation requests", registry=r
        )
        self.generation_tokens = Counter("hotlora_generation_tokens", "tokens generated", registry=r)
        self.request_prompt_tokens = Histogram(
            "hotlora_request_prompt_tokens",
            "prompt tokens per request",
            buckets=REQUEST_TOKEN_BUCKETS,
            registry=r,
        )
        self.request_generation_tokens = Histogram(
            "hotlora_request_generation_tokens",
            "generated tokens per request",
            buckets=REQUEST_TOKEN_BUCKETS,
            registry=r,
        )
        self.finished = Counter(
            "hotlora_request_finished",
            "finished generation requests by finish reason",
            ["finish_reason"],
            registry=r,
        )
        self.running = Gauge(
            "hotlora_num_requests_running", "generation requests in the running batch", registry=r
        )
        self.waiting = Gauge("hotlora_num_requests_waiting", "requests waiting for admission", registry=r)
        # ---- forward passes -----------------------------------------------------------
        self.batch_size = Histogram(
            "hotlora_batch_size",
            "rows (sequences) per forward pass, by kind",
            ["kind"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.forward_tokens = Histogram(
            "hotlora_forward_tokens",
            "real (unpadded) tokens per forward pass",
            ["kind"],
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.forward_seconds = Histogram(
            "hotlora_forward_duration_seconds",
            "forward pass duration, by kind",
            ["kind"],
            buckets=FORWARD_BUCKETS,
            registry=r,
        )
        # ---- adapters -----------------------------------------------------------------
        self.cache_hits = Counter(
            "hotlora_adapter_cache_hits", "adapter lookups served from a cache tier", ["tier"], registry=r
        )
        self.cache_misses = Counter(
            "hotlora_adapter_cache_misses", "adapter lookups that missed a cache tier", ["tier"], registry=r
        )
        self.cache_evictions = Counter(
            "hotlora_adapter_cache_evictions", "adapters evicted from a cache tier", ["tier"], registry=r
        )
        self.load_seconds = Histogram(
            "hotlora_adapter_load_seconds",
            "time to load an adapter into a tier (host: from disk, device: from host)",
            ["tier"],
            buckets=LOAD_BUCKETS,
            registry=r,
        )
        self.load_failures = Counter(
            "hotlora_adapter_load_failures", "adapter loads into a tier that failed", ["tier"], registry=r
        )
        self.uploads = Counter(
            "hotlora_adapter_uploads",
            "finished adapter uploads by outcome (ok or the validation failure reason)",
            ["outcome"],
            registry=r,
        )
        # ---- fine-tuning --------------------------------------------------------------
        self.step_seconds = Histogram(
            "hotlora_finetune_step_seconds",
            "duration of one fine-tuning step",
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.train_share = Gauge(
            "hotlora_train_share_ratio",
            "share of engine time used by fine-tuning recently (0..1)",
            registry=r,
        )
        self.train_share_limit = Gauge(
            "hotlora_train_share_limit_ratio",
            "largest share of engine time fine-tuning may take while serving",
            registry=r,
        )
        self.job_counts: dict[str, int] = {}  # as of the last change or scrape

        for kind in FORWARD_KINDS:
            for m in (self.batch_size, self.forward_tokens, self.forward_seconds):
                m.labels(kind)
        for reason in FINISH_REASONS:
            self.finished.labels(reason)
        for tier in CACHE_TIERS:
            for m in (
                self.cache_hits,
                self.cache_misses,
                self.cache_evictions,
                self.load_seconds,
                self.load_failures,
            ):
                m.labels(tier)
        self._outcomes = set(UPLOAD_OUTCOMES)
        for outcome in UPLOAD_OUTCOMES:
            self.uploads.labels(outcome)

        # process_* (resident memory, CPU, fds), python_gc_*, python_info, as on the default registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        r.register(StateCollector(self))
        if not adapter_metrics:  # the per-adapter families, listed without samples (dashboards find them)
            r.register(self.per_adapter.empty_families())
        self.vllm_registry = CollectorRegistry()
        if vllm_compatible:
            self.vllm_registry.register(VllmCollector(self))
        self._server = None
        self._thread = None

    # ---- wiring --------------------------------------------------------------------------
    def attach(self, state: AppState) -> None:
        """Called once the model is loaded; scrape-time gauges read from `state` from now on."""
        self.state = state
        engine = state.engine
        self.running.set_function(lambda: engine.num_running)
        self.waiting.set_function(lambda: engine.num_waiting)
        self.train_share_limit.set(state.config.train_share)

    # ---- observers (called by other components; never raise into them) -------------------
    def rpc_finished(self, method: str, code: str, seconds: float) -> None:
        rpc = method.rsplit("/", 1)[-1]
        self.requests.labels(rpc, code).inc()
        self.rpc_seconds.labels(rpc).observe(seconds)

    def http_finished(self, route: str, status: int, seconds: float) -> None:
        route = route if route in HTTP_ROUTES else "other"
        self.http_requests.labels(route, str(status)).inc()
        self.http_seconds.labels(route).observe(seconds)

    def request_finished(self, req) -> None:
        """A GenerationRequest left the engine (any finish reason)."""
        n_out = len(req.output_ids)
        self.prompt_tokens.inc(len(req.prompt_ids))
        self.generation_tokens.inc(n_out)
        self.request_prompt_tokens.observe(len(req.prompt_ids))
        self.request_generation_tokens.observe(n_out)
        self.finished.labels(_finish_reason(req.finish_reason)).inc()
        if req.admitted_at is not None:
            self.queue_time.observe(max(0.0, req.admitted_at - req.created_at))
        if req.first_token_at is not None:
            self.ttft.observe(max(0.0, req.first_token_at - req.created_at))
            if req.finished_at is not None and n_out >= 2:
                self.itl.observe(max(0.0, req.finished_at - req.first_token_at) / (n_out - 1))
        if req.finished_at is not None:
            self.e2e.observe(max(0.0, req.finished_at - req.created_at))
        if req.adapter is not None and self.per_adapter.enabled:
            ttft = None if req.first_token_at is None else max(0.0, req.first_token_at - req.created_at)
            e2e = None if req.finished_at is None else max(0.0, req.finished_at - req.created_at)
            self.per_adapter.request_finished(
                req.tenant, req.adapter.ref, len(req.prompt_ids), n_out, ttft, e2e
            )

    def forward_finished(self, kind: str, rows: int, tokens: int, seconds: float) -> None:
        kind = kind if kind in FORWARD_KINDS else "other"
        self.batch_size.labels(kind).observe(rows)
        self.forward_tokens.labels(kind).observe(tokens)
        self.forward_seconds.labels(kind).observe(seconds)

    def adapter_cache_event(self, event: str, tier: str) -> None:
        """event: hit | miss | eviction; tier: device | host."""
        if tier not in CACHE_TIERS:
            log.debug("unknown adapter cache tier %r", tier)
            return
        by_event = {"hit": self.cache_hits, "miss": self.cache_misses, "eviction": self.cache_evictions}
        counter = by_event.get(event)
        if counter is None:
            log.debug("unknown adapter cache event %r", event)
            return
        counter.labels(tier).inc()

    def adapter_load_seconds(self, tier: str, seconds: float) -> None:
        """An adapter finished loading into `tier` (host: disk -> host memory; device: host -> slot)."""
        if tier in CACHE_TIERS:
            self.load_seconds.labels(tier).observe(seconds)

    def adapter_load_failed(self, tier: str) -> None:
        """Loading an adapter into `tier` failed (corrupt blob, out of memory, ...)."""
        if tier in CACHE_TIERS:
            self.load_failures.labels(tier).inc()

    def upload_finished(self, outcome: str) -> None:
        """outcome: ok, or a short reason such as invalid_config, invalid_tensor, too_large,
        unsupported_option, does_not_fit. Unknown or excess reasons are counted as `other`."""
        outcome = outcome if LABEL_RE.match(outcome or "") else "other"
        with self._outcomes_lock:
            if outcome not in self._outcomes:
                if len(self._outcomes) >= MAX_OUTCOMES:
                    outcome = "other"
                else:
                    self._outcomes.add(outcome)
        self.uploads.labels(outcome).inc()

    def finetune_step(self, seconds: float) -> None:
        self.step_seconds.observe(seconds)

    def finetune_job_state_changed(self) -> None:
        """A fine-tune job changed state; refresh the job counts (they are read at scrape time too)."""
        counts = read_job_counts(self.state)
        if counts is not None:
            self.job_counts = counts

    def set_train_share(self, share: float) -> None:
        self.train_share.set(min(1.0, max(0.0, share)))

    # ---- HTTP ------------------------------------------------------------------------------
    def start_http(self, host: str, port: int) -> int:
        """Serve `exposition()` on every GET path, as prometheus-client's server does (text format only: the
        per-adapter families are rendered as text, not through its registry)."""
        from prometheus_client.exposition import start_http_server

        self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        if self.per_adapter.enabled:
            self._server.set_app(self._wsgi_app)
        return self._server.server_port

    def _wsgi_app(self, environ, start_response):
        import gzip

        from prometheus_client import CONTENT_TYPE_LATEST
        from prometheus_client.exposition import gzip_accepted

        if environ["REQUEST_METHOD"] not in ("GET", "OPTIONS"):
            start_response("405 Method Not Allowed", [("Allow", "OPTIONS,GET")])
            return [b"# use OPTIONS or GET\n"]
        if environ["REQUEST_METHOD"] == "OPTIONS" or environ.get("PATH_INFO") == "/favicon.ico":
            start_response("200 OK", [("Allow", "OPTIONS,GET")])
            return [b""]
        body = self.exposition()
        headers = [("Content-Type", CONTENT_TYPE_LATEST)]
        if gzip_accepted(environ.get("HTTP_ACCEPT_ENCODING", "")):
            body = gzip.compress(body)
            headers.append(("Content-Encoding", "gzip"))
        start_response("200 OK", headers)
        return [body]

    def exposition(self, vllm: bool = False) -> bytes:
        """The text exposition of every metric; with `vllm`, vLLM's gauge names too (the HTTP door's
        /metrics, where llm-d looks for them)."""
        text = generate_latest(self.registry)
        if self.per_adapter.enabled:
            text += self.per_adapter.render(self._placements()).encode()
        return text + generate_latest(self.vllm_registry) if vllm else text

    def _placements(self) -> list[Placement]:
        """Where each adapter version is held (read only with --adapter-metrics)."""
        state = self.state
        if not self.per_adapter.enabled or state is None or state.adapters is None:
            return []
        try:
            return [Placement(*p) for p in state.adapters.placements()]
        except Exception:
            log.debug("reading adapter placements failed", exc_info=True)
            return []

    def stop_http(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def _finish_reason(reason) -> str:
    """A FinishReason's label value (its wire string); a request that never got one counts as an error."""
    if reason is None:
        return "error"
    return str(reason) if reason in FINISH_REASONS else "other"
