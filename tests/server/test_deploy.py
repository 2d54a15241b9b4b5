"""deploy/: lint what can be checked without a cluster (the Dockerfile: tests/image/).

The dashboard's and alert rules' PromQL may reference only metric names a live server exports;
promtool (Debian's `prometheus` package) checks the scrape config and rules."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import grpc
import pytest

from hotlora.v1 import common_pb2, inference_pb2
from tests.server.harness import running_server
from tests.server.test_metrics import find_or_install_promtool, scrape

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "hotlora-dashboard.json"
K8S = DEPLOY / "k8s"
GRPC_PORT = 50051

# Names PromQL may use besides the server's own: Prometheus' synthetic series.
PROMETHEUS_BUILTINS = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
# PromQL words that look like metric names (functions, keywords, aggregations)
_PROMQL_WORDS = set(
    "sum min max avg count rate irate increase delta deriv by without and or unless on ignoring group_left "
    "group_right offset bool histogram_quantile min_over_time max_over_time avg_over_time label_values "
    "le topk bottomk abs clamp_min clamp_max vector time".split()
)


# ---- Prometheus -----
@pytest.fixture(scope="module")
def promtool():
    return find_or_install_promtool()


def test_promtool_accepts_scrape_config_and_rules(promtool):
    for cmd in (["check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")],
                ["check", "rules", str(DEPLOY / "prometheus" / "alerts.yml")]):  # fmt: skip
        res = subprocess.run([promtool, *cmd], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stdout + res.stderr


@pytest.fixture(scope="module")
def exported_names(tiny_model_dir, tmp_path_factory) -> set[str]:
    """Metric and sample names a live server exports after generation traffic."""
    from prometheus_client.parser import text_string_to_metric_families

    with running_server(tiny_model_dir, tmp_path_factory.mktemp("data")) as run:
        for prompt in ("one", "two"):
            run.inference.Generate(inference_pb2.GenerateRequest(
                prompt=prompt, params=common_pb2.SamplingParams(max_new_tokens=4)), timeout=30)  # fmt: skip
        with pytest.raises(grpc.RpcError):
            run.inference.Generate(
                inference_pb2.GenerateRequest(adapter="no-such-adapter", prompt="x"), timeout=30
            )
        text = scrape(run)
    names = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names.update(s.name for s in family.samples)
        if family.type == "counter":
            names.add(family.name + "_total")
        if family.type == "histogram":
            names.update(family.name + suffix for suffix in ("_bucket", "_sum", "_count"))
    return names


def promql_metric_names(expr: str) -> set[str]:
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # label values and strings
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range selectors
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\$\w+", "", expr)  # Grafana variables
    expr = re.sub(r"label_values\(([^,()]+),[^)]*\)", r"\1", expr)  # Grafana: label_values(metric, label)
    words = set(re.findall(r"(?<![\w.])[a-zA-Z_:][a-zA-Z0-9_:]*(?![\w(])", expr))
    return {w for w in words if w not in _PROMQL_WORDS and not re.fullmatch(r"e\d*|Inf|NaN", w)}


def _dashboard_exprs(dash) -> list[tuple[str, str]]:
    out = []
    for panel in dash["panels"]:
        for sub in [panel, *panel.get("panels", [])]:
            for t in sub.get("targets", []):
                out.append((sub["title"], t["expr"]))
    return out


def test_dashboard_is_valid_grafana_json():
    dash = json.loads(DASHBOARD.read_text())
    assert isinstance(dash["schemaVersion"], int) and dash["schemaVersion"] >= 30
    assert dash["uid"] and dash["title"]
    variables = dash["templating"]["list"]
    assert any(v["type"] == "datasource" and v["query"] == "prometheus" for v in variables)
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    graphs = [p for p in dash["panels"] if p["type"] != "row"]
    for p in graphs:
        assert p["targets"], p["title"]
        assert p["datasource"]["uid"] == "${datasource}"
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0
        for t in p["targets"]:
            assert t["expr"].strip() and t["refId"]
    titles = " ".join(p["title"].lower() for p in graphs)
    for topic in ("throughput", "status", "first token", "inter-token", "end-to-end", "queue", "running",
                  "batch size", "hit ratio", "evictions", "load time", "adapters by state", "fine-tune jobs",
                  "step time", "training", "memory"):  # fmt: skip
        assert topic in titles, f"no panel about {topic}"
    exprs = " ".join(e for _, e in _dashboard_exprs(dash))
    for p in ("0.5", "0.99"):
        assert f"histogram_quantile({p}" in exprs


def test_dashboard_queries_only_metrics_the_server_exports(exported_names):
    dash = json.loads(DASHBOARD.read_text())
    variables = [v for v in dash["templating"]["list"] if v["type"] == "query"]
    exprs = _dashboard_exprs(dash) + [(f"${v['name']} variable", v["query"]["query"]) for v in variables]
    for title, expr in exprs:
        names = promql_metric_names(expr)
        assert names, f"{title}: no metric in {expr!r}"
        unknown = names - exported_names - PROMETHEUS_BUILTINS
        assert not unknown, f"panel {title!r} queries {unknown} which the server does not export"


def test_alert_rules_use_only_metrics_the_server_exports(exported_names):
    yaml = pytest.importorskip("yaml", reason="PyYAML is needed to read the alert rules")
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    alerts = [r for g in rules["groups"] for r in g["rules"]]
    names = {r["alert"] for r in alerts}
    assert {"HotloraTargetDown", "HotloraHighTimeToFirstToken", "HotloraQueueGrowing", "HotloraHighErrorRate",
            "HotloraAdapterLoadFailures"} <= names  # fmt: skip
    for r in alerts:
        unknown = promql_metric_names(r["expr"]) - exported_names - PROMETHEUS_BUILTINS
        assert not unknown, f"alert {r['alert']} uses {unknown} which the server does not export"
        assert r["labels"]["severity"] in ("critical", "warning", "info")
        assert r["annotations"]["summary"]


def test_promql_name_extraction():
    q = 'histogram_quantile(0.99, sum by (le, kind) (rate(hotlora_batch_size_bucket{i=~"$instance"}[5m])))'
    assert promql_metric_names(q) == {"hotlora_batch_size_bucket"}
    assert promql_metric_names("label_values(hotlora_build_info, instance)") == {"hotlora_build_info"}
    assert promql_metric_names('up{job="hotlora"} == 0') == {"up"}
    assert promql_metric_names("a_total / ignoring(x) b_total > 1e3") == {"a_total", "b_total"}


# ---- Kubernetes -----
@pytest.fixture(scope="module")
def k8s():
    yaml = pytest.importorskip("yaml", reason="PyYAML is needed to read the Kubernetes manifests")
    docs = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.setdefault(doc["kind"], []).append(doc)
    return docs


def test_k8s_has_every_object(k8s):
    for kind in ("Deployment", "Service", "PersistentVolumeClaim", "Secret", "ConfigMap", "ServiceMonitor"):
        assert kind in k8s, f"deploy/k8s has no {kind}"
    resources = k8s["Kustomization"][0]["resources"]
    for f in resources:
        assert (K8S / f).is_file()
    assert {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"} == set(resources)


def _container(k8s):
    (dep,) = k8s["Deployment"]
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    return dep, pod, c


def test_k8s_probes_use_grpc_health_on_the_grpc_port(k8s):
    dep, pod, c = _container(k8s)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"]["port"] == GRPC_PORT, probe
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["grpc"] == GRPC_PORT
    # the model may take minutes to load on a cold node; the startup probe allows it
    s = c["startupProbe"]
    assert s["periodSeconds"] * s["failureThreshold"] >= 300
    (svc,) = k8s["Service"]
    svc_ports = {p["name"]: p for p in svc["spec"]["ports"]}
    assert svc_ports["grpc"]["port"] == GRPC_PORT and svc_ports["grpc"]["targetPort"] in ("grpc", GRPC_PORT)
    assert svc_ports["metrics"]["targetPort"] in ("metrics", ports["metrics"])
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    (mon,) = k8s["ServiceMonitor"]
    assert mon["spec"]["endpoints"][0]["port"] == "metrics"
    assert mon["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()


def _config_value(k8s, c, name: str, default: str) -> str:
    args = c.get("args", [])
    flag = "--" + name.replace("_", "-")
    if flag in args:
        return args[args.index(flag) + 1]
    env = {e["name"]: e.get("value") for e in c.get("env", [])}
    for cm in k8s["ConfigMap"]:
        env = {**cm["data"], **{k: v for k, v in env.items() if v is not None}}
    return str(env.get("HOTLORA_" + name.upper(), default))


def test_k8s_shutdown_outlasts_the_drain(k8s):
    from hotlora.server.config import ServerConfig

    dep, pod, c = _container(k8s)
    grace = float(_config_value(k8s, c, "grace_seconds", str(ServerConfig.grace_seconds)))
    pre_stop = c["lifecycle"]["preStop"]
    sleep = (
        float(pre_stop["exec"]["command"][-1]) if "exec" in pre_stop else float(pre_stop["sleep"]["seconds"])
    )
    assert sleep > 0, "a preStop sleep lets endpoints be removed before SIGTERM"
    assert pod["terminationGracePeriodSeconds"] > grace + sleep
    # a draining server answers NOT_SERVING; liveness must not restart it mid-drain
    live = c["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] > grace


def test_k8s_serves_with_tokens_on_all_interfaces(k8s):
    dep, pod, c = _container(k8s)
    assert _config_value(k8s, c, "host", "127.0.0.1") == "0.0.0.0"
    tokens = _config_value(k8s, c, "tokens_file", "")
    assert tokens, "without --tokens-file the server refuses to bind 0.0.0.0"
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    secret_vol = next(n for n, v in volumes.items() if "secret" in v)
    assert tokens.startswith(mounts[secret_vol].rstrip("/") + "/")
    (secret,) = k8s["Secret"]
    assert volumes[secret_vol]["secret"]["secretName"] == secret["metadata"]["name"]
    key = tokens.rsplit("/", 1)[-1]
    entries = [
        ln.split() for ln in secret["stringData"][key].splitlines() if ln.strip() and not ln.startswith("#")
    ]
    assert entries and all(len(e) == 2 for e in entries)
    for _, token in entries:
        if token.startswith("sha256:"):
            assert re.fullmatch(r"[0-9a-f]{64}", token[7:])
    # the data dir lives on the claim
    data_dir = _config_value(k8s, c, "data_dir", "")
    claim = next(n for n, v in volumes.items() if "persistentVolumeClaim" in v)
    assert mounts[claim] == data_dir
    assert (
        volumes[claim]["persistentVolumeClaim"]["claimName"]
        == k8s["PersistentVolumeClaim"][0]["metadata"]["name"]
    )
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert _config_value(k8s, c, "metrics_host", "") == "0.0.0.0"


def test_k8s_settings_are_real_server_flags(k8s):
    import dataclasses

    from hotlora.server.config import ServerConfig

    fields = {"HOTLORA_" + f.name.upper() for f in dataclasses.fields(ServerConfig)}
    for cm in k8s["ConfigMap"]:
        unknown = set(cm["data"]) - fields
        assert not unknown, f"ConfigMap sets {unknown}, which are not hotlora serve settings"
