"""Gauges computed at scrape time from the server's components: build info, adapters and jobs by state,
running and waiting LoRA adapters, CUDA memory, and vLLM's names of the gauges LoRA-aware routers read."""

from __future__ import annotations

import collections
import logging
import sys
import time
from typing import TYPE_CHECKING

from prometheus_client.core import GaugeMetricFamily

import hotlora
from hotlora.server.metrics_buckets import ADAPTER_STATES, JOB_STATES, LABEL_RE, MAX_LORA_NAMES

if TYPE_CHECKING:
    from hotlora.server.app import AppState
    from hotlora.server.metrics import Metrics

log = logging.getLogger("hotlora.metrics")


def _top(names: list[str], n: int = MAX_LORA_NAMES) -> list[str]:
    return [name for name, _ in collections.Counter(names).most_common(n)]


def _adapter_ref(req) -> str | None:
    return req.adapter.ref if req.adapter is not None else None


def _counts_by_state(component) -> dict[str, int] | None:
    """`component.count_by_state()` with lower-case keys; None before it exists or when its store fails."""
    if component is None:
        return None
    try:
        return {str(k).lower(): int(v) for k, v in component.count_by_state().items()}
    except Exception:
        log.debug("%s.count_by_state() failed", type(component).__name__, exc_info=True)
        return None


def read_job_counts(state: AppState | None) -> dict[str, int] | None:
    """Fine-tune jobs by state (lower case), None before training exists or when the store fails."""
    return None if state is None else _counts_by_state(state.training)


class StateCollector:
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
        counts = None if state is None else _counts_by_state(state.adapters)
        if counts is None:
            counts = dict.fromkeys(ADAPTER_STATES, 0)
        for k, v in counts.items():
            if LABEL_RE.match(k):
                adapters.add_metric([k], v)
        yield adapters

        jobs = GaugeMetricFamily("hotlora_finetune_jobs", "fine-tune jobs by state", labels=["state"])
        job_counts = dict.fromkeys(JOB_STATES, 0)
        fresh = read_job_counts(state)
        if fresh is not None:
            m.job_counts = fresh
        job_counts.update({k: v for k, v in m.job_counts.items() if LABEL_RE.match(k)})
        for k, v in job_counts.items():
            jobs.add_metric([k], v)
        yield jobs

        yield from self._lora_info(state)
        yield from self._cuda_memory()

    def _build_info(self, state: AppState | None):
        info = GaugeMetricFamily(
            "hotlora_build_info",
            "hotlora version and the served model (value 1)",
            labels=["version", "model", "device", "dtype"],
        )
        loaded = state.loaded if state is not None else None
        if loaded is not None:
            dtype = str(loaded.dtype).removeprefix("torch.")
            info.add_metric([hotlora.__version__, str(loaded.name), str(loaded.device), dtype], 1)
        else:
            info.add_metric([hotlora.__version__, "", "", ""], 1)
        return info

    def _lora_info(self, state: AppState | None):
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
        if state is not None and state.engine is not None:
            running, waiting = state.engine.adapter_refs_in_flight()
            slots = state.config.adapter_slots
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


class VllmCollector:
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
        if state is not None and state.engine is not None:
            engine = state.engine
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
            info.add_metric([*names, str(state.config.adapter_slots)], time.time())
        yield running
        yield waiting
        yield kv
        yield info
