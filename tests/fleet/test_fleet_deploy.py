"""The KubeRay RayService and the serve-fleet command name what the code really has."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from hotlora.server.config import ServerConfig

FLEET_K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s" / "fleet"


@pytest.fixture(scope="module")
def manifests():
    yaml = pytest.importorskip("yaml", reason="PyYAML reads the manifests")
    docs = {}
    for path in sorted(FLEET_K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            docs.setdefault(doc["kind"], []).append(doc)
    return docs


def test_the_rayservice_imports_our_app_and_servicer(manifests):
    import yaml

    (svc,) = manifests["RayService"]
    serve_cfg = yaml.safe_load(svc["spec"]["serveConfigV2"])
    (servicer,) = serve_cfg["grpc_options"]["grpc_servicer_functions"]
    module, fn = servicer.rsplit(".", 1)
    assert callable(getattr(importlib.import_module(module), fn))
    (app,) = serve_cfg["applications"]
    module, builder = app["import_path"].split(":")
    assert callable(getattr(importlib.import_module(module), builder))
    assert {d["name"] for d in app["deployments"]} == {"HotloraReplica", "HotloraIngress"}
    assert svc["spec"]["rayClusterConfig"]["rayVersion"] == importlib.import_module("ray").__version__
    kust = manifests["Kustomization"][0]["resources"]
    assert {p.name for p in FLEET_K8S.glob("*.yaml")} - {"kustomization.yaml"} == set(kust)


def test_serve_fleet_refuses_what_cannot_work(tmp_path):
    from hotlora.server.fleet.app import FleetConfig

    with pytest.raises(ValueError, match="needs the shared stores"):
        FleetConfig(ServerConfig(model=""))
    tokens = tmp_path / "tokens"
    tokens.write_text("acme secret\n")
    shared = dict(registry="postgresql://db/x", blob_store="s3://b/p")
    with pytest.raises(ValueError, match="give --tokens-file"):
        FleetConfig(ServerConfig(**shared))
    FleetConfig(ServerConfig(tokens_file=str(tokens), **shared), replicas=2)
