"""Per-adapter routing signals (--adapter-metrics): which adapter versions are loaded where, and each
adapter's requests, tokens and latency. What a LoRA-aware router (llm-d's scorer, a Ray Serve policy) reads
to send an adapter's traffic to a replica that already holds it.

Privacy: the series carry tenants' names and their adapters' names (`tenant`, `adapter` labels), so with
--adapter-metrics on, the metrics port (and the HTTP door's /metrics) must not be public; docs/operations.md.

Cardinality: at most `cap` adapters get series of their own; traffic of any other is counted under
tenant="(other)", adapter="(other)". A tracked adapter with no request for IDLE_SECONDS gives its series up
to a newcomer when the table is full (its series ends; rate() reads that as a reset). The loaded gauge lists
at most `cap` versions (device slots first, then pinned, then the most recently used host copies); the rest
are summed into one "(other)" sample per tier and pin.

Rendered as text here, not through prometheus-client's registry: at 1,000 adapters the families have ~25,000
samples, which generate_latest formats in ~0.8 s; an adapter's lines are formatted once per change (under
~50 ms for 1,000 changed adapters: benchmarks/adapter_metrics_scrape.py)."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

# coarser than the server-wide histograms': each bucket is a series per adapter
ADAPTER_TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ADAPTER_E2E_BUCKETS = (0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 240.0)
IDLE_SECONDS = 600.0
OTHER = "(other)"

_COUNTERS = (
    ("hotlora_adapter_requests", "finished generation requests per adapter version"),
    ("hotlora_adapter_prompt_tokens", "prompt tokens of finished generation requests per adapter version"),
    ("hotlora_adapter_generation_tokens", "tokens generated per adapter version"),
)
_HISTOGRAMS = (
    (
        "hotlora_adapter_time_to_first_token_seconds",
        "generation request arrival to its first token, per adapter version",
        ADAPTER_TTFT_BUCKETS,
    ),
    (
        "hotlora_adapter_e2e_request_latency_seconds",
        "generation request arrival to its last token, per adapter version",
        ADAPTER_E2E_BUCKETS,
    ),
)
LOADED = "hotlora_adapter_loaded"
_LOADED_HELP = "adapter versions held in memory, by tier (device slot or host) and pin"
FAMILY_NAMES = (LOADED, *(n for n, _ in _COUNTERS), *(n for n, _, _ in _HISTOGRAMS))


@dataclass(frozen=True)
class Placement:
    """One adapter version held in memory: `tier` device (in a slot) or host."""

    tenant: str
    ref: str  # name@N
    tier: str
    pinned: bool
    recency: int = 0  # larger = used more recently


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(tenant: str, ref: str) -> str:
    return f'tenant="{_escape(tenant)}",adapter="{_escape(ref)}"'


def _number(v: float) -> str:
    if isinstance(v, int):
        return str(v)
    return repr(float(v)) if math.isfinite(v) else ("+Inf" if v > 0 else "-Inf" if v < 0 else "NaN")


def _le(b: float) -> str:
    return repr(float(b))


@dataclass(eq=False)
class _Series:
    labels: str
    counts: list[int] = field(default_factory=lambda: [0, 0, 0])  # requests, prompt, generated
    buckets: list[list[int]] = field(default_factory=lambda: [[0] * (len(b) + 1) for _, _, b in _HISTOGRAMS])
    sums: list[float] = field(default_factory=lambda: [0.0] * len(_HISTOGRAMS))
    seen: float = 0.0  # monotonic time of its last request
    version: int = 0  # observations so far
    text: tuple[int, list[str]] | None = None  # (version, its lines per family) as formatted at a scrape

    def observe(self, prompt: int, generated: int, latencies: tuple[float | None, ...]) -> None:
        self.counts[0] += 1
        self.counts[1] += prompt
        self.counts[2] += generated
        for i, seconds in enumerate(latencies):
            if seconds is None:
                continue
            bounds = _HISTOGRAMS[i][2]
            k = next((j for j, b in enumerate(bounds) if seconds <= b), len(bounds))
            self.buckets[i][k] += 1
            self.sums[i] += seconds
        self.version += 1

    def render(self) -> list[str]:
        lab = self.labels
        out = [f"{name}_total{{{lab}}} {c}\n" for (name, _), c in zip(_COUNTERS, self.counts, strict=True)]
        for (name, _, bounds), counts, total in zip(_HISTOGRAMS, self.buckets, self.sums, strict=True):
            lines, running = [], 0
            for b, c in zip((*map(_le, bounds), "+Inf"), counts, strict=True):
                running += c
                lines.append(f'{name}_bucket{{{lab},le="{b}"}} {running}\n')
            lines.append(f"{name}_count{{{lab}}} {running}\n{name}_sum{{{lab}}} {_number(total)}\n")
            out.append("".join(lines))
        return out


class AdapterMetrics:
    """The per-adapter series of one server. `request_finished` runs on the engine thread, `render` on the
    scraping thread; one lock, held only to update or copy, never while formatting many lines."""

    def __init__(self, enabled: bool, cap: int = 1000, clock=time.monotonic):
        self.enabled = enabled
        self.cap = cap
        self._clock = clock
        self._lock = threading.Lock()
        self._series: dict[tuple[str, str], _Series] = {}
        self._other = _Series(_labels(OTHER, OTHER))

    def request_finished(
        self,
        tenant: str,
        ref: str,
        prompt_tokens: int,
        generated_tokens: int,
        ttft: float | None,
        e2e: float | None,
    ) -> None:
        if not self.enabled:
            return
        now = self._clock()
        with self._lock:
            series = self._series.get((tenant, ref)) or self._admit(tenant, ref, now)
            series.seen = now
            series.observe(prompt_tokens, generated_tokens, (ttft, e2e))

    def _admit(self, tenant: str, ref: str, now: float) -> _Series:
        """A series for a new adapter if the cap allows (taking an idle one's place), else "(other)"."""
        if len(self._series) >= self.cap:
            idle = min(self._series.items(), key=lambda kv: kv[1].seen)
            if now - idle[1].seen < IDLE_SECONDS:
                return self._other
            del self._series[idle[0]]
        series = self._series[(tenant, ref)] = _Series(_labels(tenant, ref))
        return series

    def tracked(self) -> int:
        with self._lock:
            return len(self._series)

    # ---- exposition ----------------------------------------------------------------------
    def empty_families(self):
        """A prometheus-client collector of the families without samples, for a registry where the flag is
        off: the names stay listed for dashboards and alert rules."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        class Empty:
            def describe(self):
                return []

            def collect(self):
                yield GaugeMetricFamily(LOADED, _LOADED_HELP, labels=["tenant", "adapter", "tier", "pinned"])
                for name, help_text in _COUNTERS:
                    yield CounterMetricFamily(name, help_text, labels=["tenant", "adapter"])
                for name, help_text, _ in _HISTOGRAMS:
                    yield HistogramMetricFamily(name, help_text, labels=["tenant", "adapter"])

        return Empty()

    def render(self, placements: Iterable[Placement] = ()) -> str:
        """The text exposition of the per-adapter families (HELP/TYPE always, so dashboards find the names;
        samples only when enabled)."""
        loaded = self._render_loaded(placements) if self.enabled else []
        blocks: list[list[str]] = []
        if self.enabled:
            with self._lock:
                series = list(self._series.values())
                if self._other.counts[0]:
                    series.append(self._other)
                # a copy of the changed ones' numbers, formatted outside the lock
                copies = [
                    (s, s.version, list(s.counts), [list(b) for b in s.buckets], list(s.sums))
                    for s in series
                    if s.text is None or s.text[0] != s.version
                ]
            for s, version, counts, buckets, sums in copies:
                s.text = (version, _Series(s.labels, counts, buckets, sums).render())
            blocks = [s.text[1] for s in series]
        out = [f"# HELP {LOADED} {_LOADED_HELP}\n"]
        out.append(f"# TYPE {LOADED} gauge\n")
        out += loaded
        for i, (name, help_text) in enumerate(_COUNTERS):
            out.append(f"# HELP {name}_total {help_text}\n# TYPE {name}_total counter\n")
            out += [b[i] for b in blocks if b]
        for i, (name, help_text, _) in enumerate(_HISTOGRAMS):
            out.append(f"# HELP {name} {help_text}\n# TYPE {name} histogram\n")
            out += [b[len(_COUNTERS) + i] for b in blocks if b]
        return "".join(out)

    def _render_loaded(self, placements: Iterable[Placement]) -> list[str]:
        ranked = sorted(placements, key=lambda p: (p.tier != "device", not p.pinned, -p.recency))
        lines = []
        rest: dict[tuple[str, str], int] = {}
        for i, p in enumerate(ranked):
            pinned = "true" if p.pinned else "false"
            if i < self.cap:
                lab = _labels(p.tenant, p.ref)
                lines.append(f'{LOADED}{{{lab},tier="{p.tier}",pinned="{pinned}"}} 1\n')
            else:
                rest[(p.tier, pinned)] = rest.get((p.tier, pinned), 0) + 1
        other = _labels(OTHER, OTHER)
        lines += [f'{LOADED}{{{other},tier="{t}",pinned="{p}"}} {n}\n' for (t, p), n in sorted(rest.items())]
        return lines
