"""Per-adapter routing signals (--adapter-metrics): loaded versions by tier and pin, requests, tokens and
latency per adapter, the cap, and GetAdapter / GET /v1/models saying where each version is loaded."""

from __future__ import annotations

import json
import urllib.request

import pytest

from hotlora.server.adapter_metrics import OTHER, AdapterMetrics, Placement
from hotlora.v1 import adapters_pb2, common_pb2, inference_pb2
from tests.server.adapter_utils import make_peft_adapter, upload_chunks
from tests.server.harness import running_server
from tests.server.test_metrics import (
    find_or_install_promtool,
    promtool_check_metrics,
    samples,
    scrape,
    value,
)


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    with running_server(tiny_model_dir, data, adapter_metrics=True, http_port=0) as r:
        for i, name in enumerate(("alpha", "beta")):
            d = make_peft_adapter(tmp_path_factory.mktemp(name), seed=i + 1, r=4, lora_alpha=8,
                                  target_modules=["q_proj", "v_proj"])  # fmt: skip
            r.adapters.UploadAdapter(upload_chunks(name, d), timeout=30)
        yield r


def generate(run, adapter, n=4):
    req = inference_pb2.GenerateRequest(
        adapter=adapter, prompt="hello there", params=common_pb2.SamplingParams(max_new_tokens=n)
    )
    return run.inference.Generate(req, timeout=30)


def wait_for(run, predicate, tries=250):
    """The engine records a request just after it sends the last token: poll the scrape until it shows."""
    import time

    for _ in range(tries):
        ss = samples(scrape(run))
        if predicate(ss):
            return ss
        time.sleep(0.02)
    return ss


def test_requests_and_tokens_are_counted_per_adapter_version(run):
    a = dict(tenant="default", adapter="alpha@1")
    b = dict(tenant="default", adapter="beta@1")
    before = samples(scrape(run))
    replies = [generate(run, "alpha", 3), generate(run, "alpha", 5), generate(run, "beta", 4)]
    generate(run, "", 2)  # the base model has no series

    def moved(ss):
        def d(labels):
            return value(ss, "hotlora_adapter_requests_total", **labels) - value(
                before, "hotlora_adapter_requests_total", **labels
            )

        return d(a) >= 2 and d(b) >= 1

    after = wait_for(run, moved)

    def delta(name, labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("hotlora_adapter_requests_total", a) == 2
    assert delta("hotlora_adapter_requests_total", b) == 1
    assert delta("hotlora_adapter_generation_tokens_total", a) == sum(
        r.usage.completion_tokens for r in replies[:2]
    )
    assert delta("hotlora_adapter_prompt_tokens_total", b) == replies[2].usage.prompt_tokens
    for hist in (
        "hotlora_adapter_time_to_first_token_seconds",
        "hotlora_adapter_e2e_request_latency_seconds",
    ):
        assert delta(hist + "_count", a) == 2
        assert delta(hist + "_bucket", {**a, "le": "+Inf"}) == 2
    names = {dict(ls).get("adapter") for (n, ls) in after if n.startswith("hotlora_adapter_requests")}
    assert names <= {"alpha@1", "beta@1"}, names  # nothing for the base model
    # vLLM's info gauge is kept; with --adapter-metrics it names the adapters in flight
    assert any(n == "hotlora_lora_requests_info" for n, _ in after)


def test_loaded_gauge_getadapter_and_models_say_where_each_version_is(run):
    generate(run, "beta", 2)
    run.adapters.LoadAdapter(common_pb2.AdapterRef(name="alpha", pin=True), timeout=30)
    try:
        ss = samples(scrape(run))
        alpha = value(
            ss, "hotlora_adapter_loaded", tenant="default", adapter="alpha@1", tier="device", pinned="true"
        )
        assert alpha == 1
        beta = [dict(ls) for n, ls in ss if n == "hotlora_adapter_loaded" and dict(ls)["adapter"] == "beta@1"]
        assert len(beta) == 1 and beta[0]["pinned"] == "false" and beta[0]["tier"] in ("device", "host")

        got = run.adapters.GetAdapter(common_pb2.AdapterRef(name="alpha@1"), timeout=10)
        assert got.state == adapters_pb2.ADAPTER_STATE_DEVICE
        assert got.pinned and got.device == "cpu" and got.replica

        req = urllib.request.Request(f"http://127.0.0.1:{run.server.http_port}/v1/models")
        with urllib.request.urlopen(req, timeout=10) as resp:
            cards = {c["id"]: c for c in json.load(resp)["data"]}
        placed = cards["alpha@1"]["placement"]
        assert placed == {"state": "device", "pinned": True, "device": "cpu", "replica": got.replica}
        assert "placement" not in cards["alpha"]  # the unversioned alias names no one version
    finally:
        run.adapters.UnloadAdapter(common_pb2.AdapterRef(name="alpha"), timeout=30)
    ss = samples(scrape(run))
    assert not [ls for n, ls in ss if n == "hotlora_adapter_loaded" and dict(ls)["adapter"] == "alpha@1"]
    got = run.adapters.GetAdapter(common_pb2.AdapterRef(name="alpha@1"), timeout=10)
    assert not got.pinned and got.device == ""


def test_live_exposition_passes_promtool(run):
    promtool = find_or_install_promtool()
    generate(run, "alpha", 2)
    text = scrape(run)
    assert "hotlora_adapter_requests_total{" in text
    promtool_check_metrics(promtool, text)


# ---- the table itself ------------------------------------------------------------------------
class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def _families(text):
    from prometheus_client.parser import text_string_to_metric_families

    return {f.name: f for f in text_string_to_metric_families(text)}


def test_the_cap_pools_newcomers_into_other_and_an_idle_series_gives_way():
    clock = Clock()
    m = AdapterMetrics(True, cap=2, clock=clock)
    m.request_finished("t1", "a@1", 5, 3, 0.1, 0.3)
    m.request_finished("t1", "b@1", 5, 3, 0.1, 0.3)
    clock.now += 10
    m.request_finished("t2", "c@1", 7, 2, 0.2, 0.4)  # table full, nobody idle: counted as (other)
    text = m.render()
    ss = samples(text)
    assert value(ss, "hotlora_adapter_requests_total", tenant=OTHER, adapter=OTHER) == 1
    assert value(ss, "hotlora_adapter_prompt_tokens_total", tenant=OTHER, adapter=OTHER) == 7
    assert not [ls for n, ls in ss if dict(ls).get("adapter") == "c@1"]
    assert m.tracked() == 2
    m.request_finished("t1", "a@1", 1, 1, 0.1, 0.1)  # a stays busy
    clock.now += 3600  # b idle for an hour: c takes its place
    m.request_finished("t1", "a@1", 1, 1, 0.1, 0.1)
    m.request_finished("t2", "c@1", 7, 2, 0.2, 0.4)
    ss = samples(m.render())
    assert value(ss, "hotlora_adapter_requests_total", tenant="t2", adapter="c@1") == 1
    assert value(ss, "hotlora_adapter_requests_total", tenant="t1", adapter="a@1") == 3
    assert not [ls for n, ls in ss if dict(ls).get("adapter") == "b@1"]
    assert m.tracked() == 2


def test_histogram_buckets_are_cumulative_and_a_changed_series_is_rendered_again():
    m = AdapterMetrics(True, cap=10)
    m.request_finished("t", "a@1", 1, 1, 0.07, 0.3)
    m.request_finished("t", "a@1", 1, 1, 7.0, 100.0)
    ss = samples(m.render())
    ttft = "hotlora_adapter_time_to_first_token_seconds"
    assert value(ss, ttft + "_bucket", tenant="t", adapter="a@1", le="0.05") == 0
    assert value(ss, ttft + "_bucket", tenant="t", adapter="a@1", le="0.1") == 1
    assert value(ss, ttft + "_bucket", tenant="t", adapter="a@1", le="10.0") == 2
    assert value(ss, ttft + "_sum", tenant="t", adapter="a@1") == pytest.approx(7.07)
    m.request_finished("t", "a@1", 1, 1, 0.07, 0.3)  # after a scrape formatted it: formatted again
    ss = samples(m.render())
    assert value(ss, ttft + "_count", tenant="t", adapter="a@1") == 3


def test_loaded_gauge_lists_device_then_pinned_then_recent_and_sums_the_rest():
    m = AdapterMetrics(True, cap=2)
    ps = [
        Placement("t", "old@1", "host", False, 1),
        Placement("t", "new@1", "host", False, 9),
        Placement("t", "slot@1", "device", False, 2),
        Placement("t", "pin@1", "host", True, 0),
    ]
    ss = samples(m.render(ps))
    shown = {dict(ls)["adapter"]: v for n, ls in ss if n == "hotlora_adapter_loaded" for v in [ss[(n, ls)]]}
    assert shown == {"slot@1": 1, "pin@1": 1, OTHER: 2}


def test_names_a_tenant_chose_are_escaped_and_off_means_no_samples():
    m = AdapterMetrics(True, cap=10)
    m.request_finished('we"ird\\ten\nant', "a@1", 1, 1, 0.1, 0.1)
    ss = samples(m.render())
    assert value(ss, "hotlora_adapter_requests_total", tenant='we"ird\\ten\nant', adapter="a@1") == 1
    off = AdapterMetrics(False)
    off.request_finished("t", "a@1", 1, 1, 0.1, 0.1)
    fams = _families(off.render([Placement("t", "a@1", "device", False)]))
    assert {"hotlora_adapter_loaded", "hotlora_adapter_requests"} <= set(fams)  # names for dashboards
    assert all(not f.samples for f in fams.values())


def test_dashboard_per_adapter_view_queries_what_the_server_exports(run):
    from tests.server.test_deploy import DASHBOARD, _dashboard_exprs, promql_metric_names

    generate(run, "beta", 2)
    fams = _families(scrape(run))
    exported = set(fams) | {s.name for f in fams.values() for s in f.samples}
    exported |= {
        f"{n}{x}" for n, f in fams.items() if f.type == "histogram" for x in ("_bucket", "_count", "_sum")
    }
    exported |= {f"{n}_total" for n, f in fams.items() if f.type == "counter"}
    dash = json.loads(DASHBOARD.read_text())
    per_adapter = [(t, e) for t, e in _dashboard_exprs(dash) if "hotlora_adapter_" in e and "adapter=~" in e]
    assert {"Requests per adapter", "Adapter versions loaded per instance", "Time to first token per adapter",
            "End-to-end latency per adapter"} <= {t for t, _ in per_adapter}  # fmt: skip
    for title, expr in per_adapter:
        assert promql_metric_names(expr) <= exported, title
    variable = next(v for v in dash["templating"]["list"] if v["name"] == "adapter")
    assert promql_metric_names(variable["query"]["query"]) <= exported
