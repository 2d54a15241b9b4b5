"""Hostile input to every Inference and Adapters rpc (hypothesis, bounded): each call ends with a correct
answer or a non-INTERNAL status, the registry is unchanged, and the server stays healthy.

HOTLORA_FUZZ_REPORT=FILE appends the outcome counts by rpc and status as JSON lines."""

from __future__ import annotations

import collections
import json
import math
import os

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hotlora.v1 import adapters_pb2, common_pb2, inference_pb2
from tests.server.adapter_utils import make_peft_adapter, upload_chunks
from tests.server.harness import running_server

EXAMPLES = int(os.environ.get("HOTLORA_FUZZ_EXAMPLES", "60"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
MAX_NEW = 4
LABELS = ["neg", "pos"]
# statuses a hostile request may earn; INTERNAL/UNKNOWN are bugs, DEADLINE_EXCEEDED a hang
REFUSALS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.PERMISSION_DENIED,
}
OUTCOMES: collections.Counter = collections.Counter()


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("peft")
    gen_dir = make_peft_adapter(root / "gen", seed=1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    cls_dir = make_peft_adapter(
        root / "cls", seed=2, task="SEQ_CLS", num_labels=2, r=2, lora_alpha=4, target_modules=["q_proj"]
    )
    with running_server(
        tiny_model_dir,
        tmp_path_factory.mktemp("data"),
        adapter_slots=4,
        max_rank=8,
        max_new_tokens=MAX_NEW,
        default_max_new_tokens=MAX_NEW,
        max_prompt_tokens=256,
        max_texts=8,
    ) as run:
        run.adapters.UploadAdapter(upload_chunks("gen", gen_dir))
        run.adapters.UploadAdapter(upload_chunks("cls", cls_dir, labels=LABELS))
        run.files = {
            name: {f: (d / f).read_bytes() for f in ("adapter_config.json", "adapter_model.safetensors")}
            for name, d in (("gen", gen_dir), ("cls", cls_dir))
        }
        run.snapshot = _registry(run)
        yield run
    report = os.environ.get("HOTLORA_FUZZ_REPORT")
    if report:
        with open(report, "a") as f:
            f.write(
                json.dumps(
                    {
                        "file": "test_fuzz_rpcs",
                        "examples_per_rpc": EXAMPLES,
                        "outcomes": {f"{k[0]} {k[1]}": v for k, v in sorted(OUTCOMES.items())},
                    }
                )
                + "\n"
            )


def _registry(run):
    resp = run.adapters.ListAdapters(adapters_pb2.ListAdaptersRequest(all_versions=True), timeout=10)
    return sorted((a.name, a.version, a.sha256, a.size_bytes) for a in resp.adapters)


def call(rpc: str, fn):
    """Run one fuzzed call; returns the answer or None when refused with an acceptable status."""
    try:
        out = fn()
    except grpc.RpcError as e:
        OUTCOMES[(rpc, e.code().name)] += 1
        assert e.code() in REFUSALS, f"{rpc}: {e.code().name}: {e.details()}"
        assert e.details(), f"{rpc}: {e.code().name} without a message"
        # the client's own verdict when a status is lost (e.g. details over its metadata limit)
        assert "Stream removed" not in e.details(), f"{rpc}: {e.details()}"
        return None
    OUTCOMES[(rpc, "OK")] += 1
    return out


# ---- strategies ----------------------------------------------------------------------------------------
hostile_text = st.one_of(
    st.text(max_size=40),
    st.sampled_from(
        [
            "",
            "\x00",
            "a\x00b",
            "../../etc/passwd",
            "..",
            "/",
            "gen/../cls",
            "😀" * 10,
            "\u202e",
            "\ufeff",
            "a" * 300,
        ]
    ),
    st.integers(0, 40_000).map(lambda n: "x" * n),  # up to oversized
)
adapter_ref = st.one_of(
    st.sampled_from(
        [
            "",
            "gen",
            "cls",
            "gen@1",
            "cls@1",
            "gen@0",
            "gen@2",
            "gen@-1",
            "gen@",
            "@1",
            "gen@1@1",
            "gen@99999999999999999999999",
            "GEN",
            "gen ",
            " gen",
            "gen\x00",
            "gen/..",
            "../gen",
            "gen@1\x00",
            "a" * 64,
            "a" * 65,
            "a" * 100_000,
            "nobody",
            "cls@01",
        ]
    ),
    st.text(max_size=30),
    st.builds(
        lambda a, b: f"{a}@{b}",
        st.sampled_from(["gen", "cls", "x"]),
        st.one_of(st.integers(-(2**70), 2**70).map(str), st.text(max_size=8)),
    ),
)
floats = st.floats(width=32, allow_nan=True, allow_infinity=True)
roles = st.one_of(
    st.sampled_from(["system", "user", "assistant", "tool", "", "USER", "robot", "\x00"]),
    st.text(max_size=10),
)
sampling = st.builds(
    lambda n, t, p, k, seed, stop: common_pb2.SamplingParams(
        max_new_tokens=n,
        temperature=t,
        top_p=p,
        top_k=k,
        stop=stop,
        **({} if seed is None else {"seed": seed}),
    ),
    st.one_of(st.integers(0, MAX_NEW + 2), st.integers(0, 2**32 - 1)),
    st.one_of(st.just(0.0), floats),
    st.one_of(st.just(0.0), floats),
    st.integers(0, 2**32 - 1),
    st.none() | st.integers(0, 2**64 - 1),
    st.one_of(st.lists(st.text(max_size=5), max_size=20), st.just(["s"] * 10_000), st.just(["s" * 100_000])),
)
hostile_messages = st.lists(
    st.builds(lambda r, c: common_pb2.ChatMessage(role=r, content=c), roles, hostile_text), max_size=4
)
hostile_texts = st.one_of(st.lists(hostile_text, max_size=10), st.just(["t"] * 100_000))
# each field is sane about half the time, so that many examples get all the way to an answer
sane_text = st.text(min_size=1, max_size=30)
sane_params = st.builds(
    lambda n, t, p, k, seed, stop: common_pb2.SamplingParams(
        max_new_tokens=n, temperature=t, top_p=p, top_k=k, seed=seed, stop=stop
    ),
    st.integers(0, MAX_NEW),
    st.floats(0, 2),
    st.floats(0, 1),
    st.integers(0, 50),
    st.integers(0, 2**63 - 1),
    st.lists(st.text(min_size=1, max_size=3), max_size=3),
)
prompts = st.one_of(sane_text, sane_text, hostile_text)
gen_refs = st.one_of(st.sampled_from(["", "gen", "gen@1"]), adapter_ref)
cls_refs = st.one_of(st.sampled_from(["cls", "cls@1"]), adapter_ref)
params_st = st.one_of(sane_params, sane_params, sampling)
messages = st.one_of(st.just([]), hostile_messages)
texts = st.one_of(st.lists(sane_text, min_size=1, max_size=4), hostile_texts)


def _check_generation(resp_ids, finish, req, adapter_out):
    n = req.params.max_new_tokens or MAX_NEW
    assert len(resp_ids) <= n
    assert finish in ("length", "stop", "eos")
    if req.adapter:
        name = req.adapter.split("@")[0]
        assert adapter_out.startswith(name + "@")
    else:
        assert adapter_out == ""


@FUZZ
@given(adapter=gen_refs, prompt=prompts, msgs=messages, params=params_st, rid=st.text(max_size=20))
def test_generate(server, adapter, prompt, msgs, params, rid):
    req = inference_pb2.GenerateRequest(
        adapter=adapter, prompt=prompt, messages=msgs, params=params, request_id=rid
    )
    resp = call("Generate", lambda: server.inference.Generate(req, timeout=30))
    if resp is not None:
        _check_generation(resp.token_ids, resp.finish_reason, req, resp.adapter)
        assert resp.usage.completion_tokens == len(resp.token_ids) and resp.request_id == rid


@FUZZ
@given(adapter=gen_refs, prompt=prompts, msgs=messages, params=params_st, close_after=st.integers(0, 3))
def test_generate_stream(server, adapter, prompt, msgs, params, close_after):
    req = inference_pb2.GenerateRequest(adapter=adapter, prompt=prompt, messages=msgs, params=params)

    def run():
        stream = server.inference.GenerateStream(req, timeout=30)
        chunks = []
        for chunk in stream:
            chunks.append(chunk)
            if close_after and len(chunks) >= close_after and not chunk.finish_reason:
                stream.cancel()  # the client goes away mid-stream
                return None
        return chunks

    chunks = call("GenerateStream", run)
    if chunks:
        ids = [i for c in chunks for i in c.token_ids]
        _check_generation(ids, chunks[-1].finish_reason, req, chunks[-1].adapter)


@FUZZ
@given(adapter=gen_refs, texts=texts)
def test_embed(server, adapter, texts):
    resp = call(
        "Embed",
        lambda: server.inference.Embed(inference_pb2.EmbedRequest(adapter=adapter, texts=texts), timeout=30),
    )
    if resp is not None:
        assert len(resp.embeddings) == len(texts)
        assert all(len(e.values) == 64 and all(math.isfinite(v) for v in e.values) for e in resp.embeddings)


@FUZZ
@given(adapter=cls_refs, texts=texts)
def test_classify(server, adapter, texts):
    resp = call(
        "Classify",
        lambda: server.inference.Classify(
            inference_pb2.ClassifyRequest(adapter=adapter, texts=texts), timeout=30
        ),
    )
    if resp is not None:
        assert resp.adapter.startswith("cls@") and len(resp.results) == len(texts)
        for r in resp.results:
            assert [s.label for s in r.scores] == LABELS
            assert abs(sum(s.score for s in r.scores) - 1) < 1e-4 and r.label in LABELS


@FUZZ
@given(
    ref=st.one_of(st.sampled_from(["gen", "cls@1"]), adapter_ref),
    pin=st.booleans(),
    prefix=hostile_text,
    all_versions=st.booleans(),
)
def test_adapter_rpcs(server, ref, pin, prefix, all_versions):
    a = server.adapters
    r = common_pb2.AdapterRef(name=ref, pin=pin)
    name = ref.split("@")[0]
    for rpc, fn in (
        ("GetAdapter", lambda: a.GetAdapter(r, timeout=10)),
        ("LoadAdapter", lambda: a.LoadAdapter(r, timeout=30)),
        ("UnloadAdapter", lambda: a.UnloadAdapter(r, timeout=30)),
    ):
        got = call(rpc, fn)
        if got is not None:
            assert got.name == name and got.name in ("gen", "cls")
    listed = call(
        "ListAdapters",
        lambda: a.ListAdapters(
            adapters_pb2.ListAdaptersRequest(prefix=prefix, all_versions=all_versions), timeout=10
        ),
    )
    if listed is not None:
        assert all(x.name.startswith(prefix) for x in listed.adapters)
    files = call("ExportAdapter", lambda: _export(a, r))
    if files is not None:
        assert files == server.files[name]
    if name not in ("gen", "cls"):  # deleting the two fixtures would be a correct answer, not a refusal
        assert call("DeleteAdapter", lambda: a.DeleteAdapter(r, timeout=10)) is None
    assert _registry(server) == server.snapshot


def _export(a, ref):
    files: dict[str, bytes] = {}
    for c in a.ExportAdapter(ref, timeout=30):
        files[c.filename] = files.get(c.filename, b"") + c.data
    return files


def test_server_is_healthy_after_the_fuzzing(server):
    health = health_pb2_grpc.HealthStub(server.channel)
    assert (
        health.Check(health_pb2.HealthCheckRequest(), timeout=30).status
        == health_pb2.HealthCheckResponse.SERVING
    )
    for adapter in ("", "gen"):
        resp = server.inference.Generate(
            inference_pb2.GenerateRequest(prompt="hello", adapter=adapter), timeout=30
        )
        assert resp.finish_reason in ("length", "eos")
    for a in ("gen", "cls"):
        server.adapters.UnloadAdapter(common_pb2.AdapterRef(name=a), timeout=10)
    assert server.state.engine.num_running == 0
    assert _registry(server) == server.snapshot
