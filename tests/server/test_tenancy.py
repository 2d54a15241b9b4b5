"""Two tenants on one server (a tokens file): the same adapter name is two different adapters, and
neither tenant can see, use, export, load or delete the other's. Every Adapters and Inference rpc."""

from __future__ import annotations

import hashlib

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hotlora.v1 import adapters_pb2, common_pb2, inference_pb2
from tests.server.adapter_utils import make_peft_adapter, peft_greedy, upload_chunks
from tests.server.harness import running_server
from tests.tiny import tiny_tokenizer

TOKENS = {"alpha": "tok-alpha-secret", "beta": "tok-beta-secret"}
NEW = 8
PROMPT = "hello tenants"


class As:
    """The Adapters and Inference stubs with one caller's metadata on every call."""

    def __init__(self, run, token: str | None):
        self.run = run
        self.md = [] if token is None else [("authorization", f"Bearer {token}")]

    def upload(self, name, directory, labels=()):
        return self.run.adapters.UploadAdapter(
            upload_chunks(name, directory, labels), metadata=self.md, timeout=30
        )

    def list(self):
        resp = self.run.adapters.ListAdapters(
            adapters_pb2.ListAdaptersRequest(all_versions=True), metadata=self.md, timeout=10
        )
        return sorted((a.tenant, a.name, a.version, a.sha256) for a in resp.adapters)

    def get(self, ref):
        return self.run.adapters.GetAdapter(common_pb2.AdapterRef(name=ref), metadata=self.md, timeout=10)

    def delete(self, ref):
        return self.run.adapters.DeleteAdapter(common_pb2.AdapterRef(name=ref), metadata=self.md, timeout=10)

    def load(self, ref, pin=False):
        return self.run.adapters.LoadAdapter(
            common_pb2.AdapterRef(name=ref, pin=pin), metadata=self.md, timeout=30
        )

    def unload(self, ref):
        return self.run.adapters.UnloadAdapter(common_pb2.AdapterRef(name=ref), metadata=self.md, timeout=30)

    def export(self, ref):
        files: dict[str, bytes] = {}
        for c in self.run.adapters.ExportAdapter(
            common_pb2.AdapterRef(name=ref), metadata=self.md, timeout=30
        ):
            files[c.filename] = files.get(c.filename, b"") + c.data
        return files

    def _greq(self, adapter):
        return inference_pb2.GenerateRequest(
            prompt=PROMPT, adapter=adapter, params=common_pb2.SamplingParams(max_new_tokens=NEW)
        )

    def generate(self, adapter=""):
        return list(self.run.inference.Generate(self._greq(adapter), metadata=self.md, timeout=60).token_ids)

    def stream(self, adapter=""):
        return [
            t
            for c in self.run.inference.GenerateStream(self._greq(adapter), metadata=self.md, timeout=60)
            for t in c.token_ids
        ]

    def classify(self, adapter):
        return self.run.inference.Classify(
            inference_pb2.ClassifyRequest(adapter=adapter, texts=["good"]), metadata=self.md, timeout=60
        )

    def embed(self, adapter=""):
        resp = self.run.inference.Embed(
            inference_pb2.EmbedRequest(adapter=adapter, texts=["x y"]), metadata=self.md, timeout=60
        )
        return list(resp.embeddings[0].values)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft")
    kw = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    return {
        "alpha": make_peft_adapter(root / "a", seed=11, **kw),
        "beta": make_peft_adapter(root / "b", seed=22, **kw),
        "cls": make_peft_adapter(
            root / "cls", seed=33, task="SEQ_CLS", num_labels=2, r=4, lora_alpha=8, target_modules=["q_proj"]
        ),
    }


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory):
    tokens = tmp_path_factory.mktemp("auth") / "tokens"
    beta_digest = hashlib.sha256(TOKENS["beta"].encode()).hexdigest()
    tokens.write_text(f"# tenants\nalpha {TOKENS['alpha']}\nbeta sha256:{beta_digest}\n")
    with running_server(
        tiny_model_dir, tmp_path_factory.mktemp("data"), tokens_file=str(tokens), adapter_slots=2, max_rank=16
    ) as r:
        yield r


@pytest.fixture(scope="module")
def tenants(run, dirs):
    alpha, beta = As(run, TOKENS["alpha"]), As(run, TOKENS["beta"])
    assert alpha.upload("shared", dirs["alpha"]).tenant == "alpha"
    assert beta.upload("shared", dirs["beta"]).tenant == "beta"
    alpha.upload("alpha-only", dirs["alpha"])
    alpha.upload("alpha-cls", dirs["cls"], labels=["neg", "pos"])
    return alpha, beta


def _code(fn, *args):
    with pytest.raises(grpc.RpcError) as e:
        fn(*args)
    return e.value.code()


def test_same_name_is_two_adapters_each_serving_its_own_weights(tenants, dirs):
    alpha, beta = tenants
    ids = tiny_tokenizer()(PROMPT)["input_ids"]
    want_a, want_b = peft_greedy(dirs["alpha"], ids, NEW), peft_greedy(dirs["beta"], ids, NEW)
    assert want_a != want_b
    assert alpha.generate("shared") == alpha.stream("shared") == want_a
    assert beta.generate("shared") == beta.stream("shared") == want_b
    assert alpha.embed("shared") != beta.embed("shared")
    for who, d in ((alpha, dirs["alpha"]), (beta, dirs["beta"])):
        assert (
            who.export("shared")["adapter_model.safetensors"]
            == (d / "adapter_model.safetensors").read_bytes()
        )
        assert (
            who.get("shared").sha256
            == hashlib.sha256((d / "adapter_model.safetensors").read_bytes()).hexdigest()
        )


def test_each_tenant_lists_only_its_own(tenants):
    alpha, beta = tenants
    assert {(t, n) for t, n, _, _ in alpha.list()} == {
        ("alpha", "shared"),
        ("alpha", "alpha-only"),
        ("alpha", "alpha-cls"),
    }
    assert {(t, n) for t, n, _, _ in beta.list()} == {("beta", "shared")}


def test_another_tenants_adapter_is_not_found_on_every_rpc(tenants, dirs):
    alpha, beta = tenants
    before = alpha.list()
    for fn, args in [
        (beta.get, ("alpha-only",)),
        (beta.get, ("alpha-only@1",)),
        (beta.export, ("alpha-only",)),
        (beta.load, ("alpha-only",)),
        (beta.load, ("alpha-only", True)),
        (beta.unload, ("alpha-only",)),
        (beta.delete, ("alpha-only",)),
        (beta.delete, ("alpha-only@1",)),
        (beta.generate, ("alpha-only",)),
        (beta.stream, ("alpha-only",)),
        (beta.embed, ("alpha-only",)),
        (beta.classify, ("alpha-cls",)),
        (beta.get, ("shared@2",)),
    ]:
        assert _code(fn, *args) == grpc.StatusCode.NOT_FOUND, (fn.__name__, args)
    assert alpha.list() == before  # nothing of alpha's was touched
    assert alpha.classify("alpha-cls").results[0].label in ("neg", "pos")


def test_load_and_unload_act_on_the_callers_version_only(tenants):
    alpha, beta = tenants
    a = alpha.load("shared", pin=True)
    assert a.state == adapters_pb2.ADAPTER_STATE_DEVICE and a.pinned and a.tenant == "alpha"
    assert not beta.get("shared").pinned
    assert beta.unload("shared").tenant == "beta"
    assert alpha.get("shared").pinned  # beta's unload did not touch alpha's pin
    assert alpha.unload("shared").state == adapters_pb2.ADAPTER_STATE_STORED


def test_deleting_ones_own_leaves_the_other_tenants_same_name(tenants, dirs):
    alpha, beta = tenants
    want_a = alpha.generate("shared")
    beta.upload("to-delete", dirs["beta"])
    beta.delete("to-delete")
    assert _code(beta.get, "to-delete") == grpc.StatusCode.NOT_FOUND
    extra = beta.upload("shared", dirs["alpha"])  # beta@2 happens to hold alpha's weights
    assert extra.version == 2
    beta.delete("shared")
    assert _code(beta.generate, "shared") == grpc.StatusCode.NOT_FOUND
    assert alpha.generate("shared") == want_a
    assert ("alpha", "shared", 1) in {(t, n, v) for t, n, v, _ in alpha.list()}


@pytest.mark.parametrize("token", [None, "wrong-token", TOKENS["alpha"] + "x", ""])
def test_missing_or_bad_token_is_unauthenticated_on_every_rpc(run, tenants, dirs, token):
    anon = As(run, token)
    calls = [
        (anon.upload, ("sneaky", dirs["alpha"])),
        (anon.list, ()),
        (anon.get, ("shared",)),
        (anon.delete, ("shared",)),
        (anon.load, ("shared",)),
        (anon.unload, ("shared",)),
        (anon.export, ("shared",)),
        (anon.generate, ()),
        (anon.stream, ()),
        (anon.embed, ()),
        (anon.classify, ("alpha-cls",)),
    ]
    for fn, args in calls:
        assert _code(fn, *args) == grpc.StatusCode.UNAUTHENTICATED, (fn.__name__, token)
    alpha = tenants[0]
    assert ("alpha", "shared", 1) in {(t, n, v) for t, n, v, _ in alpha.list()}


def test_health_answers_without_a_token(run):
    stub = health_pb2_grpc.HealthStub(run.channel)
    resp = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING
