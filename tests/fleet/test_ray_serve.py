"""Ray Serve with 2 replicas on one PostgreSQL + S3: 8 adapters, 200 requests through Ray Serve's gRPC
proxy with no new client metadata, one replica killed mid-run (`ray.kill` on its actor). Every request
is answered — the ones in flight on the killed replica are retried by the client's policy (UNAVAILABLE:
retry, as docs/fleet.md says) — and affinity holds: at most 2 loads of an adapter per replica. The same
fleet's OpenAI-compatible door on Ray Serve's HTTP proxy answers the official `openai` client as the gRPC
proxy answers hotlora.v1 (Ray starts once for both: it is slow to start)."""

from __future__ import annotations

import collections
import concurrent.futures
import threading
import time

import grpc
import pytest

from hotlora.v1 import common_pb2, inference_pb2, inference_pb2_grpc
from tests.fleet_stores import free_port
from tests.server.adapter_utils import make_peft_adapter

ray = pytest.importorskip("ray", reason="ray[serve] is a dev dependency: run `make setup`")

TOKEN = "fleet-secret"
ADAPTERS = 8
REQUESTS = 200
KILL_AFTER = 60
RETRYABLE = (grpc.StatusCode.UNAVAILABLE,)


def _register_adapters(stores, tmp_path) -> list[str]:
    """Upload straight to the shared stores, as any replica's UploadAdapter would."""
    from hotlora.adapters.base_model_info import BaseModelInfo
    from hotlora.adapters.peft.format import AdapterLimits, parse_peft_adapter
    from hotlora.adapters.store.s3_blob_store import S3Options
    from hotlora.adapters.store.shared_stores import StoreConfig, open_registry
    from tests.adapters.conftest import read_dir
    from tests.tiny import build_tiny_llama

    base = BaseModelInfo.from_model(build_tiny_llama(0))
    registry = open_registry(
        StoreConfig(tmp_path / "uploader", registry=stores.registry, blob_store=stores.blob_store,
                    s3=S3Options(endpoint_url=stores.endpoint), replica_id="uploader")
    )  # fmt: skip
    try:
        names = []
        for i in range(ADAPTERS):
            files = read_dir(make_peft_adapter(tmp_path / f"p{i}", seed=i + 1, r=4, lora_alpha=8,
                                               target_modules=["q_proj", "v_proj"]))  # fmt: skip
            weights = parse_peft_adapter(files, base, AdapterLimits())
            names.append(registry.commit("acme", f"bot-{i}", files, weights).ref)
        return names
    finally:
        registry.close()


def _replica_actors() -> list[str]:
    return sorted(
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if "HotloraReplica" in a["name"] and a["namespace"] == "serve"
    )


def _load_counts(handle, want: int, timeout: float = 60.0) -> dict[str, dict[str, int]]:
    """Each replica's loads, asked until `want` distinct replicas answered (routing picks one per call)."""
    seen: dict[str, dict[str, int]] = {}
    deadline = time.monotonic() + timeout
    while len(seen) < want and time.monotonic() < deadline:
        replica, counts = handle.load_counts.remote().result(timeout_s=30)
        seen[replica] = counts
    return seen


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_replicas_answer_every_request_through_a_kill_with_adapter_affinity(
    tiny_model_dir, tmp_path, shared_stores
):
    from ray import serve

    from hotlora.server.config import ServerConfig
    from hotlora.server.fleet.app import APP_NAME, FleetConfig, start_serve

    refs = _register_adapters(shared_stores, tmp_path)
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(f"acme {TOKEN}\n")
    server = ServerConfig(
        model=str(tiny_model_dir), data_dir=str(tmp_path / "replicas"), tokens_file=str(tokens),
        device="cpu", workers=8, max_rpcs_per_tenant=16, max_rank=16, adapter_slots=8, grace_seconds=1.0,
        **shared_stores.server_flags(),
    )  # fmt: skip
    port, http_port = free_port(), free_port()
    fleet = FleetConfig(
        server,
        replicas=2,
        replica_cpus=0.5,
        max_adapters_per_replica=ADAPTERS,
        grpc_port=port,
        ray_http_port=http_port,  # Ray's default 8000 is the HTTP door's default too
    )
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        start_serve(fleet)
        handle = serve.get_deployment_handle("HotloraReplica", app_name=APP_NAME)
        _check_the_door(port, refs)
        _check_the_http_door(http_port, port, refs)
        before_kill = _run_with_a_kill(port, refs, handle)
        assert before_kill["answered"] == REQUESTS, before_kill
        after = _load_counts(handle, want=2)
        counts = {**before_kill["counts"], **after}
        for replica, loads in counts.items():
            assert all(n <= 2 for n in loads.values()), (replica, loads)
        total_loads = sum(n for loads in counts.values() for n in loads.values())
        print(f"loads per replica {counts}; retries {before_kill['retries']}; killed {before_kill['killed']}")
        # affinity: far fewer loads than requests (without it, up to one load per request per replica)
        assert total_loads <= 3 * ADAPTERS, counts
        assert before_kill["killed"], "no replica was killed: the test proved nothing about failover"
    finally:
        serve.shutdown()
        ray.shutdown()


def _run_with_a_kill(port: int, refs: list[str], handle) -> dict:
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = inference_pb2_grpc.InferenceStub(channel)
    metadata = (("authorization", f"Bearer {TOKEN}"),)
    _wait_ready(stub, metadata)
    counts_before: dict[str, dict[str, int]] = {}
    sent = collections.Counter()
    lock = threading.Lock()
    killed: list[str] = []
    retries = collections.Counter()

    def one(i: int) -> str:
        name = refs[i % ADAPTERS].split("@")[0]
        with lock:
            sent["n"] += 1
            if sent["n"] == KILL_AFTER and not killed:
                counts_before.update(_load_counts(handle, want=2))
                victim = _replica_actors()[0]
                ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
                killed.append(victim)
        req = inference_pb2.GenerateRequest(
            prompt=f"hello {i}", adapter=name, params=common_pb2.SamplingParams(max_new_tokens=4)
        )
        for attempt in range(6):  # the documented client policy: retry UNAVAILABLE with backoff
            try:
                return stub.Generate(req, metadata=metadata, timeout=60).adapter
            except grpc.RpcError as err:
                if err.code() not in RETRYABLE or attempt == 5:
                    raise
                retries[err.code().name] += 1
                time.sleep(0.2 * 2**attempt)
        raise AssertionError("unreachable")

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(one, range(REQUESTS)))
    channel.close()
    assert all(a.endswith("@1") for a in answers), collections.Counter(answers)
    return {"answered": len(answers), "counts": counts_before, "killed": killed, "retries": dict(retries)}


def _check_the_door(port: int, refs: list[str]) -> None:
    """Existing clients, no new metadata: streams arrive, errors keep their status and message."""
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = inference_pb2_grpc.InferenceStub(channel)
    metadata = (("authorization", f"Bearer {TOKEN}"),)
    _wait_ready(stub, metadata)
    req = inference_pb2.GenerateRequest(
        prompt="stream me", adapter=refs[0], params=common_pb2.SamplingParams(max_new_tokens=5)
    )
    chunks = list(stub.GenerateStream(req, metadata=metadata, timeout=60))
    whole = stub.Generate(req, metadata=metadata, timeout=60)
    assert [t for c in chunks for t in c.token_ids] == list(whole.token_ids) and whole.adapter == refs[0]
    for md, adapter, code in (
        ((), refs[0], grpc.StatusCode.UNAUTHENTICATED),
        (metadata, "no-such-bot", grpc.StatusCode.NOT_FOUND),
    ):
        with pytest.raises(grpc.RpcError) as err:
            stub.Generate(inference_pb2.GenerateRequest(prompt="x", adapter=adapter), metadata=md, timeout=60)
        assert err.value.code() == code, err.value.details()
    channel.close()


def _check_the_http_door(http_port: int, grpc_port: int, refs: list[str]) -> None:
    """The official openai client on Ray Serve's HTTP proxy: an adapter by `model` generates what the gRPC
    proxy generates for it, chat streams arrive in chunks ending with [DONE], errors keep the OpenAI body
    and status."""
    import json
    import urllib.request

    import openai

    base_url = f"http://127.0.0.1:{http_port}/v1"
    client = openai.OpenAI(base_url=base_url, api_key=TOKEN, max_retries=0, timeout=60)
    name = refs[1].split("@")[0]
    prompt = "the fleet says"
    channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
    want = inference_pb2_grpc.InferenceStub(channel).Generate(
        inference_pb2.GenerateRequest(prompt=prompt, adapter=name,
                                      params=common_pb2.SamplingParams(max_new_tokens=8, temperature=0)),
        metadata=(("authorization", f"Bearer {TOKEN}"),), timeout=60,
    )  # fmt: skip
    channel.close()
    assert want.adapter == refs[1] and want.text
    resp = client.completions.create(model=name, prompt=prompt, max_tokens=8, temperature=0)
    assert resp.choices[0].text == want.text, (resp.choices[0].text, want.text)
    assert resp.model == refs[1]  # pinned by the ingress to the version it routed to

    models = [m.id for m in client.models.list().data]  # any replica's door answers
    base = models[0]
    assert refs[1] in models and name in models, models
    via_base = client.completions.create(model=f"{base}:{name}", prompt=prompt, max_tokens=8, temperature=0)
    assert via_base.choices[0].text == want.text
    base_text = client.completions.create(model=base, prompt=prompt, max_tokens=8, temperature=0)
    assert base_text.choices[0].text != want.text, (
        "the adapter changed nothing: the comparison proves nothing"
    )

    messages = [{"role": "user", "content": "tell me a story"}]
    chunks = list(
        client.chat.completions.create(
            model=name, messages=messages, max_tokens=8, temperature=0, stream=True
        )
    )
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) >= 2, chunks
    # streamed, not buffered: 32 tokens arrive spread over the generation, not all at its end
    t0 = time.monotonic()
    long = client.chat.completions.create(
        model=name, messages=messages, max_tokens=32, temperature=0, stream=True,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    arrivals = [time.monotonic() for c in long if c.choices and c.choices[0].delta.content]
    assert len(arrivals) >= 16, len(arrivals)
    spread, total = arrivals[-1] - arrivals[0], arrivals[-1] - t0
    assert spread > 0.25 * total, f"chunks came within {spread:.3f} s of a {total:.3f} s call: buffered"
    body = {"model": name, "messages": messages, "max_tokens": 8, "temperature": 0, "stream": True}
    raw = urllib.request.Request(
        f"{base_url}/chat/completions",
        data=json.dumps(body).encode(),
        headers={"authorization": f"Bearer {TOKEN}", "content-type": "application/json"},
    )
    with urllib.request.urlopen(raw, timeout=60) as resp:
        assert resp.status == 200 and resp.headers["content-type"].startswith("text/event-stream")
        text = resp.read().decode()
    events = [line for line in text.splitlines() if line.startswith("data: ")]
    assert len(events) >= 3 and events[-1] == "data: [DONE]", text

    emb = client.embeddings.create(model=name, input=["one", "two"])
    assert len(emb.data) == 2 and len(emb.data[0].embedding) > 0

    bad = openai.OpenAI(base_url=base_url, api_key="not-a-token", max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError) as err:
        bad.completions.create(model=name, prompt="x", max_tokens=2)
    assert err.value.status_code == 401 and err.value.body["type"] == "authentication_error", err.value.body
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="no-such-bot", prompt="x", max_tokens=2)
    assert err.value.status_code == 404 and "no-such-bot" in err.value.body["message"], err.value.body


def _wait_ready(stub, metadata, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            stub.Generate(inference_pb2.GenerateRequest(prompt="hi"), metadata=metadata, timeout=30)
            return
        except grpc.RpcError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
