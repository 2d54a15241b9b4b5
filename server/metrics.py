"""Prometheus metrics (prometheus-client), served over HTTP on --metrics-port.

The server's components call the observer methods below (`rpc_finished`, `request_finished`,
`forward_finished`, `adapter_cache_event`, ...); gauges that describe current state (running and
waiting requests, adapters and fine-tune jobs by state, memory, the vLLM-style LoRA info gauge)
are read at scrape time from the attached AppState. Names follow prometheus.io conventions:
prefix `hotlora_`, base units, counters end in `_total`, and every label has a bounded value set
(no per-request labels; adapter names only behind `expose_adapter_names`, top-N)."""

from __future__ import annotations

import collections
import logging
import re
import sys
import threading
import time

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector

import hotlora

log = logging.getLogger("hotlora.metrics")

# Buckets span a tiny model on CPU (sub-millisecond steps) to the default model on a busy CPU
# (seconds per token, minutes per request) and GPU (milliseconds per token).
TTFT_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
)
ITL_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.015,
    0.02,
    0.025,
    0.03,
    0.04,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
)
E2E_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
)
QUEUE_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
)
RPC_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    25.0,
    60.0,
    120.0,
    300.0,
    600.0,
)
FORWARD_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
LOAD_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 512)
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
REQUEST_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000)

FORWARD_KINDS = ("prefill", "decode")
FINISH_REASONS = ("length", "stop", "eos", "cancelled", "deadline", "error")
CACHE_EVENTS = ("hit", "miss", "eviction")
CACHE_TIERS = ("device", "host")
ADAPTER_STATES = ("stored", "host", "device", "pinned")
JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled", "rejected")
UPLOAD_OUTCOMES = (
    "ok",
    "invalid_config",
    "invalid_tensor",
    "too_large",
    "unsupported_option",
    "does_not_fit",
    "cancelled",
)
HTTP_ROUTES = (
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/embeddings",
    "/v1/models",
    "/v1/load_lora_adapter",
    "/v1/unload_lora_adapter",
)
MAX_OUTCOMES = 32  # more distinct upload outcomes than this are counted as "other"
MAX_LORA_NAMES = 16  # adapter names in hotlora_lora_requests_info, most requested first
_LABEL_RE = re.compile(r"^[a-z][a-z0-9_]{0,39}$")


class Metrics:
    def __init__(self, expose_adapter_names: bool = False, vllm_compatible: bool = False):
        """expose_adapter_names: list running/waiting adapter names (tenant/name@N, top 16) in
        hotlora_lora_requests_info; off by default because they are tenants' names.
        vllm_compatible: also export vLLM's names of the gauges LoRA-aware routers read."""
        self.expose_adapter_names = expose_adapter_names
        self.vllm_compatible = vllm_compatible
        # `*_created` series double the exposition and no dashboard uses them (process-wide switch)
        disable_created_metrics()
        self.registry = CollectorRegistry()
        r = self.registry
        self.state = None
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
        self._job_counts: dict[str, int] = {}

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
        r.register(_StateCollector(self))
        self.vllm_registry = CollectorRegistry()
        if vllm_compatible:
            self.vllm_registry.register(_VllmCollector(self))
        self._server = None
        self._thread = None

    # ---- wiring --------------------------------------------------------------------------
    def attach(self, state) -> None:
        """Called once the model is loaded; scrape-time gauges read from `state` from now on."""
        self.state = state
        engine = state.engine
        self.running.set_function(lambda: engine.num_running)
        self.waiting.set_function(lambda: engine.num_waiting)
        share = getattr(state.config, "train_share", None)
        if share is not None:
            self.train_share_limit.set(share)

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
        outcome = outcome if _LABEL_RE.match(outcome or "") else "other"
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
        counts = self._read_job_counts()
        if counts is not None:
            self._job_counts = counts

    def set_train_share(self, share: float) -> None:
        self.train_share.set(min(1.0, max(0.0, share)))

    # ---- HTTP ------------------------------------------------------------------------------
    def start_http(self, host: str, port: int) -> int:
        self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        return self._server.server_port

    def exposition(self, vllm: bool = False) -> bytes:
        """The text exposition of every metric; with `vllm`, vLLM's gauge names too (the HTTP door's
        /metrics, where llm-d looks for them)."""
        text = generate_latest(self.registry)
        return text + generate_latest(self.vllm_registry) if vllm else text

    def stop_http(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    # ---- scrape-time reads ---------------------------------------------------------------
    def _read_job_counts(self) -> dict[str, int] | None:
        training = getattr(self.state, "training", None)
        if training is None or not hasattr(training, "count_by_state"):
            return None
        try:
            return {str(k).lower(): int(v) for k, v in training.count_by_state().items()}
        except Exception:
            log.debug("training.count_by_state() failed", exc_info=True)
            return None

    def _read_adapter_counts(self) -> dict[str, int] | None:
        adapters = getattr(self.state, "adapters", None)
        if adapters is None or not hasattr(adapters, "count_by_state"):
            return None
        try:
            return {str(k).lower(): int(v) for k, v in adapters.count_by_state().items()}
        except Exception:
            log.debug("adapters.count_by_state() failed", exc_info=True)
            return None


def _finish_reason(reason) -> str:
    """A FinishReason's label value (its wire string); a request that never got one counts as an error."""
    if reason is None:
        return "error"
    return str(reason) if reason in FINISH_REASONS else "other"


def _adapter_name(req) -> str | None:
    handle = getattr(req, "adapter", None)
    ref = getattr(handle, "ref", None) if handle is not None else None
    if not isinstance(ref, str) or not ref:
        return None
    tenant = getattr(req, "tenant", "") or ""
    return f"{tenant}/{ref}" if tenant else ref


def _adapter_ref(req) -> str | None:
    ref = getattr(getattr(req, "adapter", None), "ref", None)
    return ref if isinstance(ref, str) and ref else None


def _top(names: list[str], n: int = MAX_LORA_NAMES) -> list[str]:
    return [name for name, _ in collections.Counter(names).most_common(n)]


class _StateCollector:
    """Gauges computed at scrape time: build info, adapters and jobs by state, LoRA request info,
    CUDA memory. Families are always emitted (possibly without samples) so that dashboards and
    alert rules find every name; samples appear once the state they describe exists."""

    def __init__(self, metrics: Metrics):
        self.m = metrics

    def describe(self):  # registration must not call collect() before the server has state
        return []

    def collect(self):
        m = self.m
        state = m.state
        yield self._build_info(state)

        adapters = GaugeMetricFamily(
            "hotlora_adapters",
            "adapters by state (stored = all committed versions; "
            "host, device = resident in that tier; pinned = never evicted)",
            labels=["state"],
        )
        # without an adapter subsystem every state is 0; with one, the states it reports
        counts = m._read_adapter_counts()
        if counts is None:
            counts = dict.fromkeys(ADAPTER_STATES, 0)
        for k, v in counts.items():
            if _LABEL_RE.match(k):
                adapters.add_metric([k], v)
        yield adapters

        jobs = GaugeMetricFamily("hotlora_finetune_jobs", "fine-tune jobs by state", labels=["state"])
        job_counts = dict.fromkeys(JOB_STATES, 0)
        fresh = m._read_job_counts()
        if fresh is not None:
            m._job_counts = fresh
        job_counts.update({k: v for k, v in m._job_counts.items() if _LABEL_RE.match(k)})
        for k, v in job_counts.items():
            jobs.add_metric([k], v)
        yield jobs

        yield from self._lora_info(state)
        yield from self._cuda_memory()

    def _build_info(self, state):
        info = GaugeMetricFamily(
            "hotlora_build_info",
            "hotlora version and the served model (value 1)",
            labels=["version", "model", "device", "dtype"],
        )
        loaded = getattr(state, "loaded", None)
        if loaded is not None:
            dtype = str(getattr(loaded, "dtype", "")).removeprefix("torch.")
            info.add_metric(
                [
                    hotlora.__version__,
                    str(getattr(loaded, "name", "")),
                    str(getattr(loaded, "device", "")),
                    dtype,
                ],
                1,
            )
        else:
            info.add_metric([hotlora.__version__, "", "", ""], 1)
        return info

    def _lora_info(self, state):
        info = GaugeMetricFamily(
            "hotlora_lora_requests_info",
            "vLLM-style LoRA routing info; value = scrape unix time. Adapter names (tenant/name@N, top "
            f"{MAX_LORA_NAMES}) only with expose_adapter_names",
            labels=["running_lora_adapters", "waiting_lora_adapters", "max_lora"],
        )
        running_n = GaugeMetricFamily(
            "hotlora_lora_adapters_running", "distinct adapters among running generation requests"
        )
        waiting_n = GaugeMetricFamily(
            "hotlora_lora_adapters_waiting", "distinct adapters among waiting requests"
        )
        engine = getattr(state, "engine", None)
        if engine is not None:
            running, waiting = _engine_adapters(engine)
            slots = getattr(state.config, "adapter_slots", 0)
            if self.m.expose_adapter_names:
                labels = [",".join(_top(running)), ",".join(_top(waiting)), str(slots)]
            else:
                labels = ["", "", str(slots)]
            info.add_metric(labels, time.time())
            running_n.add_metric([], len(set(running)))
            waiting_n.add_metric([], len(set(waiting)))
        yield info
        yield running_n
        yield waiting_n

    def _cuda_memory(self):
        allocated = GaugeMetricFamily(
            "hotlora_cuda_memory_allocated_bytes",
            "CUDA memory held by tensors, per device",
            labels=["device"],
        )
        reserved = GaugeMetricFamily(
            "hotlora_cuda_memory_reserved_bytes",
            "CUDA memory reserved by the caching allocator, per device",
            labels=["device"],
        )
        peak = GaugeMetricFamily(
            "hotlora_cuda_memory_max_allocated_bytes",
            "peak CUDA memory held by tensors since start, per device",
            labels=["device"],
        )
        torch = sys.modules.get("torch")  # never import torch just for metrics
        try:
            if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
                for i in range(torch.cuda.device_count()):
                    dev = f"cuda:{i}"
                    allocated.add_metric([dev], torch.cuda.memory_allocated(i))
                    reserved.add_metric([dev], torch.cuda.memory_reserved(i))
                    peak.add_metric([dev], torch.cuda.max_memory_allocated(i))
        except Exception:
            log.debug("reading CUDA memory failed", exc_info=True)
        yield allocated
        yield reserved
        yield peak


class _VllmCollector:
    """vLLM's gauge names, as the Gateway API Inference Extension (llm-d) reads them from the model server's
    HTTP port. Kept out of the main registry: names with ':' are reserved for recording rules, and
    `promtool check metrics` flags them. Adapter names in vllm:lora_requests_info are those a caller puts
    in `model` (name@N, without the tenant), top MAX_LORA_NAMES, and only with expose_adapter_names."""

    def __init__(self, metrics: Metrics):
        self.m = metrics

    def describe(self):
        return []

    def collect(self):
        state = self.m.state
        running = GaugeMetricFamily("vllm:num_requests_running", "requests in the running batch")
        waiting = GaugeMetricFamily("vllm:num_requests_waiting", "requests waiting for admission")
        kv = GaugeMetricFamily("vllm:kv_cache_usage_perc", "fraction of KV cache blocks in use (0..1)")
        info = GaugeMetricFamily(
            "vllm:lora_requests_info",
            "running and waiting LoRA adapters (comma-separated) and adapter slots; value = scrape unix time",
            labels=["running_lora_adapters", "waiting_lora_adapters", "max_lora"],
        )
        engine = getattr(state, "engine", None)
        if engine is not None:
            run_reqs, wait_reqs = engine.running_requests(), engine.waiting_requests()
            running.add_metric([], len(run_reqs))
            waiting.add_metric([], len(wait_reqs))
            kv.add_metric([], engine.kv_cache_usage)
            names = ["", ""]
            if self.m.expose_adapter_names:
                names = [
                    ",".join(_top([r for r in map(_adapter_ref, reqs) if r]))
                    for reqs in (run_reqs, wait_reqs)
                ]
            info.add_metric([*names, str(getattr(state.config, "adapter_slots", 0))], time.time())
        yield running
        yield waiting
        yield kv
        yield info


def _engine_adapters(engine) -> tuple[list[str], list[str]]:
    """Adapter names of running and waiting requests (one entry per request, base-only left out)."""
    running = [n for n in (_adapter_name(row.req) for row in list(getattr(engine, "_running", ()))) if n]
    waiting: list[str] = []
    cond = getattr(engine, "_cond", None)
    queues = getattr(engine, "_waiting", None)
    if cond is not None and queues is not None and cond.acquire(timeout=0.05):
        try:
            reqs = [req for q in queues.values() for req in q]
        finally:
            cond.release()
        waiting = [n for n in (_adapter_name(r) for r in reqs) if n]
    return running, waiting
