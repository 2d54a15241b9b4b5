"""Scrape time of /metrics with --adapter-metrics and 1,000 adapters tracked (goal: <= 50 ms).

The server's `Metrics.exposition()` (everything the metrics port sends) on a stand-in server state whose
cache holds 1,000 adapter versions (100 in device slots, 10 pinned) after requests on each of 1,000 adapters:
(a) every adapter had a request since the last scrape (each one's lines formatted again: the worst case),
(b) 10% had, (c) none had. Beside it, prometheus-client's own generate_latest of the same families built as
Metric objects (what the per-adapter text rendering replaces). Median of `--runs` scrapes, CPU time of
this thread (wall time moves with the load average, printed beside it).

    .venv/bin/python benchmarks/adapter_metrics_scrape.py [--adapters 1000] [--runs 15]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

from results_file import write_lines

from hotlora.server.metrics import Metrics


class _Adapters:
    def __init__(self, n: int):
        self.n = n

    def placements(self):
        return [
            (f"tenant{i % 50}", f"adapter{i}@1", "device" if i < 100 else "host", i < 10, i)
            for i in range(self.n)
        ]

    def count_by_state(self):
        return {"stored": self.n, "device": 100, "host": self.n - 100, "pinned": 10}


class _Req:
    def __init__(self, tenant, ref):
        class H:
            pass

        self.tenant, self.adapter = tenant, H()
        self.adapter.ref = ref
        self.prompt_ids, self.output_ids = [1] * 20, [2] * 16
        self.created_at = 0.0
        self.admitted_at, self.first_token_at, self.finished_at = 0.01, 0.12, 1.3
        self.finish_reason = None


class _State:
    def __init__(self, n):
        self.adapters = _Adapters(n)
        self.training = None
        self.engine = None
        self.loaded = None
        self.config = None


def _timed(fn, runs: int) -> tuple[float, float]:
    cpu, wall = [], []
    for _ in range(runs):
        c0, w0 = time.thread_time(), time.perf_counter()
        fn()
        cpu.append(time.thread_time() - c0)
        wall.append(time.perf_counter() - w0)
    return statistics.median(cpu) * 1e3, statistics.median(wall) * 1e3


def _registry_twin(n: int):
    """The same per-adapter families as prometheus-client Metric objects, through its generate_latest."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

    from hotlora.server.adapter_metrics import ADAPTER_E2E_BUCKETS, ADAPTER_TTFT_BUCKETS

    class Twin:
        def describe(self):
            return []

        def collect(self):
            labels = [[f"tenant{i % 50}", f"adapter{i}@1"] for i in range(n)]
            g = GaugeMetricFamily(
                "hotlora_adapter_loaded", "x", labels=["tenant", "adapter", "tier", "pinned"]
            )
            for lab in labels:
                g.add_metric([*lab, "host", "false"], 1)
            yield g
            for name in ("requests", "prompt_tokens", "generation_tokens"):
                c = CounterMetricFamily(f"hotlora_adapter_{name}", "x", labels=["tenant", "adapter"])
                for lab in labels:
                    c.add_metric(lab, 5)
                yield c
            for name, bounds in (("ttft", ADAPTER_TTFT_BUCKETS), ("e2e", ADAPTER_E2E_BUCKETS)):
                h = HistogramMetricFamily(
                    f"hotlora_adapter_{name}_seconds", "x", labels=["tenant", "adapter"]
                )
                for lab in labels:
                    h.add_metric(lab, [(str(b), 5) for b in bounds] + [("+Inf", 5)], 1.5)
                yield h

    r = CollectorRegistry()
    r.register(Twin())
    return lambda: generate_latest(r)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapters", type=int, default=1000)
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = ap.parse_args()
    n = args.adapters

    m = Metrics(adapter_metrics=True, adapter_metrics_cap=n)
    m.state = _State(n)
    reqs = [_Req(f"tenant{i % 50}", f"adapter{i}@1") for i in range(n)]
    for r in reqs:
        m.request_finished(r)
    body = m.exposition()
    series = body.count(b"\nhotlora_adapter_")
    assert m.per_adapter.tracked() == n, m.per_adapter.tracked()

    def all_changed():
        for r in reqs:
            m.request_finished(r)
        t0 = time.thread_time()
        m.exposition()
        return time.thread_time() - t0

    def tenth_changed():
        for r in reqs[: n // 10]:
            m.request_finished(r)
        t0 = time.thread_time()
        m.exposition()
        return time.thread_time() - t0

    def scrape_only(fn):  # the requests' own recording is the engine's cost, not the scrape's
        cpu = [fn() for _ in range(args.runs)]
        return statistics.median(cpu) * 1e3

    worst = scrape_only(all_changed)
    tenth = scrape_only(tenth_changed)
    none_cpu, none_wall = _timed(m.exposition, args.runs)
    twin_cpu, _ = _timed(_registry_twin(n), max(3, args.runs // 5))
    load = os.getloadavg()[0]
    lines = [
        f"{datetime.date.today()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"load average {load:.1f}; `{' '.join(['benchmarks/adapter_metrics_scrape.py', *sys.argv[1:]])}`",
        "",
        f"{n} adapters tracked, {series} per-adapter samples, {len(body) / 1e6:.2f} MB a scrape; "
        "CPU ms of `Metrics.exposition()` (median of "
        f"{args.runs}; goal <= 50 ms):",
        "",
        "| every adapter changed | 10% changed | none changed (wall) | prometheus-client generate_latest |",
        "|---|---|---|---|",
        f"| {worst:.1f} | {tenth:.1f} | {none_cpu:.1f} ({none_wall:.1f}) | {twin_cpu:.0f} |",
    ]
    print("\n".join(lines))
    if not args.no_write:
        write_lines("Per-adapter metrics scrape", lines)


if __name__ == "__main__":
    main()
