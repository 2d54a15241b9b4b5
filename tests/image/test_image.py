"""The container image, built and run as a user would, called from outside through its published ports:
health, Generate over gRPC, a chat completion over HTTP, an adapter upload, /metrics; then stopped.

Marked `image` (not in `make test`: the build alone takes many minutes): `make image-test`. podman, runc and
debootstrap come from apt-get (deploy/image/podman.sh); the Debian base image is made by debootstrap once."""

from __future__ import annotations

import json
import time
import urllib.request

import pytest
import torch
from safetensors.torch import save_file

from tests.image import containers

# the first test's timeout covers the image build (many minutes, most of them pip)
pytestmark = [pytest.mark.image, pytest.mark.timeout(5400)]

MODEL = "SmolLM2-135M-Instruct"
QUESTION = "What is the capital of France?"
FIGURES: dict[str, float] = {}


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    FIGURES["build_s"] = containers.build(tmp_path_factory.mktemp("build") / "build.log")
    FIGURES["image_mb"] = containers.image_bytes() / 1e6
    return containers.IMAGE


@pytest.fixture(scope="module")
def served(image, tmp_path_factory):
    with containers.running(tmp_path_factory.mktemp("tokens")) as c:
        FIGURES["first_start_to_serving_s"] = c.ready_s
        yield c
    print("\nimage figures:", json.dumps({k: round(v, 1) for k, v in FIGURES.items()}))


def _post(url: str, token: str, body: dict) -> dict:
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    request = urllib.request.Request(url, json.dumps(body).encode(), headers)
    with urllib.request.urlopen(request, timeout=300) as reply:
        return json.loads(reply.read())


def _adapter_for_the_default_model(folder, seed: int = 7):
    """A PEFT LoRA of SmolLM2-135M's shapes (q_proj, v_proj; rank 8), written as PEFT writes one."""
    hidden, kv, layers, rank = 576, 192, 30, 8
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(layers):
        for module, out in (("q_proj", hidden), ("v_proj", kv)):
            prefix = f"base_model.model.model.layers.{i}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, hidden, generator=gen) * 0.1
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out, rank, generator=gen) * 0.1
    folder.mkdir()
    save_file(tensors, folder / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 16,
              "target_modules": ["q_proj", "v_proj"], "base_model_name_or_path": MODEL}  # fmt: skip
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def test_health_then_generate_over_grpc(served):
    with served.client() as client:
        assert client.health() == "SERVING"
        reply = client.generate(messages=[{"role": "user", "content": QUESTION}])
    assert "Paris" in reply.text, reply.text
    assert reply.usage.completion_tokens > 0


def test_a_chat_completion_over_http(served):
    messages = [{"role": "user", "content": QUESTION}]
    chat = {"model": MODEL, "messages": messages, "max_tokens": 16, "temperature": 0}
    reply = _post(f"{served.http_url}/v1/chat/completions", served.token, chat)
    assert "Paris" in reply["choices"][0]["message"]["content"], reply


def test_an_uploaded_adapter_serves_at_once(served, tmp_path):
    folder = _adapter_for_the_default_model(tmp_path / "adapter")
    with served.client() as client:
        stored = client.upload_adapter(folder, "support-bot")
        assert (stored.name, stored.version, stored.rank) == ("support-bot", 1, 8)
        base = client.generate("Once upon a time", max_new_tokens=12)
        tuned = client.generate("Once upon a time", adapter="support-bot", max_new_tokens=12)
    assert tuned.adapter == "support-bot@1"
    assert tuned.token_ids != base.token_ids  # the adapter changes what the model says


def test_metrics_count_what_was_served(served):
    with urllib.request.urlopen(f"{served.metrics_url}/metrics", timeout=60) as reply:
        text = reply.read().decode()
    assert 'hotlora_requests_total{code="OK",rpc="Generate"}' in text
    assert 'hotlora_requests_total{code="OK",rpc="UploadAdapter"} 1.0' in text
    assert 'hotlora_http_requests_total{route="/v1/chat/completions",status="200"} 1.0' in text


def test_no_compiler_inside_and_the_shipped_kernels_load(served):
    probe = containers.podman(
        "exec", served.name, "python", "-c",
        "import json, shutil; from hotlora.kernels import native; "
        "print(json.dumps({'compilers': [c for c in ('cc', 'gcc', 'c++', 'g++') if shutil.which(c)], "
        "'prebuilt': str(native.prebuilt()), 'reason': native.unavailable_reason()}))",
    )  # fmt: skip
    found = json.loads(probe.stdout)
    assert found["compilers"] == []
    if found["reason"] is not None:  # only a CPU without AVX-512 may lack them
        assert "the CPU lacks" in found["reason"], found
    else:
        assert found["prebuilt"].startswith("/opt/hotlora/kernels/_hotlora_kernels-"), found
        logs = served.logs()
        assert "cannot run here" not in logs and "building hotlora's C kernels" not in logs


def test_the_image_healthcheck_passes(served):
    done = containers.podman("healthcheck", "run", served.name, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_sigterm_drains_and_exits_cleanly(served):
    started = time.monotonic()
    assert served.stop() == 0, served.logs()[-3000:]
    FIGURES["stop_s"] = time.monotonic() - started
