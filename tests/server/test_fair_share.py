"""Issue 12, findings 3 and 5: one request or one tenant cannot take the engine or the device slots.

Finding 3 has two halves. At the edge (ours): a request's tokens, all its texts together, are a limit
(--max-request-tokens) checked before it reaches the engine. In the engine (issue 11, the lead's): no
forward pass holds more than --max-prefill-tokens, so a huge Embed is split and another tenant's short
request runs between its parts (tests/server/test_paged_kv.py shows the interleaving)."""

from __future__ import annotations

import grpc
import pytest
import torch

from hotlora.server.rpc import kserve_conversion as kc
from hotlora.v1 import common_pb2, inference_pb2
from tests.server.adapter_utils import make_peft_adapter, upload_chunks
from tests.server.harness import running_server

TOKENS = {"alpha": "tok-alpha-fair", "beta": "tok-beta-fair"}


def md(tenant: str):
    return (("authorization", f"Bearer {TOKENS[tenant]}"),)


@pytest.fixture(scope="module")
def tokens_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("auth") / "tokens"
    path.write_text("".join(f"{t} {tok}\n" for t, tok in TOKENS.items()))
    return path


def _text(tok, n: int) -> str:
    """A text of exactly `n` tokens for the tiny byte-level tokenizer."""
    text = "a" * n
    while len(tok(text)["input_ids"]) > n:
        text = text[:-1]
    return text


# ---- finding 3, the edge ------------------------------------------------------------------------------
def test_the_tokens_of_one_request_are_a_limit(tiny_model_dir, tmp_path, tiny_tok):
    with running_server(
        tiny_model_dir, tmp_path, max_prompt_tokens=64, max_request_tokens=100, max_texts=8
    ) as run:
        submitted = []
        engine = run.state.engine
        real_submit = engine.submit
        engine.submit = lambda req: submitted.append(req) or real_submit(req)
        sixty = _text(tiny_tok, 60)
        ok = run.inference.Embed(inference_pb2.EmbedRequest(texts=[sixty]), timeout=30)
        assert len(ok.embeddings) == 1
        with pytest.raises(grpc.RpcError) as e:  # each text is within --max-prompt-tokens, the two are not
            run.inference.Embed(inference_pb2.EmbedRequest(texts=[sixty, sixty]), timeout=30)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "120 tokens together" in e.value.details() and "--max-request-tokens" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:  # absurd requests are refused before tokenizing
            run.inference.Embed(inference_pb2.EmbedRequest(texts=["z" * 3000] * 2), timeout=30)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "100-token limit" in e.value.details()
        # a KServe batch of prompts counts together too
        req = kc.pb.ModelInferRequest(model_name="base")
        req.inputs.add(name="text_input", datatype="BYTES", shape=[2])
        req.raw_input_contents.append(kc.encode_bytes([sixty.encode()] * 2))
        infer = run.channel.unary_unary(
            f"/{kc.SERVICE}/ModelInfer",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=kc.pb.ModelInferResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as e:
            infer(req, timeout=30)
        assert (
            e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            and "--max-request-tokens" in e.value.details()
        )
        assert len(submitted) == 1  # only the first Embed reached the engine


# ---- finding 3, the engine ------------------------------------------------------------------
def test_a_huge_embed_is_split_so_no_forward_passes_the_prefill_budget(tiny_model_dir, tmp_path, tiny_tok):
    budget = 32
    with running_server(
        tiny_model_dir, tmp_path, max_prefill_tokens=budget, max_prompt_tokens=64, max_request_tokens=256
    ) as run:
        forwards: list[tuple[str, int, int]] = []
        metrics = run.state.metrics
        real = metrics.forward_finished

        def spy(kind, rows, tokens, seconds):
            forwards.append((kind, rows, tokens))
            real(kind, rows, tokens, seconds)

        metrics.forward_finished = spy
        texts = [_text(tiny_tok, 60) + str(i) for i in range(4)]  # 4 x ~60 tokens: 240 >> 32
        whole = run.inference.Embed(inference_pb2.EmbedRequest(texts=texts), timeout=60)
        short = run.inference.Generate(
            inference_pb2.GenerateRequest(prompt="hi", params=common_pb2.SamplingParams(max_new_tokens=2)),
            timeout=60,
        )
        assert len(short.token_ids) <= 2
        prefills = [f for f in forwards if f[0] == "prefill"]
        assert prefills and max(tokens for _, _, tokens in prefills) <= budget, prefills
        # splitting changes no answer: each text embeds as it does alone
        for text, got in zip(texts, whole.embeddings, strict=True):
            alone = run.inference.Embed(inference_pb2.EmbedRequest(texts=[text]), timeout=60)
            assert torch.allclose(
                torch.tensor(got.values), torch.tensor(alone.embeddings[0].values), atol=1e-4
            )


# ---- finding 5 --------------------------------------------------------------------------------------
def test_one_tenant_cannot_pin_every_device_slot(tiny_model_dir, tmp_path, tokens_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("peft")
    dirs = [
        make_peft_adapter(root / f"p{i}", seed=i, r=2, lora_alpha=4, target_modules=["q_proj"])
        for i in range(3)
    ]
    with running_server(
        tiny_model_dir, tmp_path, tokens_file=str(tokens_file), adapter_slots=2, max_pins_per_tenant=1
    ) as run:
        a = run.adapters
        a.UploadAdapter(upload_chunks("a1", dirs[0]), metadata=md("alpha"), timeout=30)
        a.UploadAdapter(upload_chunks("a2", dirs[1]), metadata=md("alpha"), timeout=30)
        a.UploadAdapter(upload_chunks("b1", dirs[2]), metadata=md("beta"), timeout=30)
        assert a.LoadAdapter(
            common_pb2.AdapterRef(name="a1", pin=True), metadata=md("alpha"), timeout=30
        ).pinned
        with pytest.raises(grpc.RpcError) as e:
            a.LoadAdapter(common_pb2.AdapterRef(name="a2", pin=True), metadata=md("alpha"), timeout=30)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-pins-per-tenant" in e.value.details()
        assert not a.GetAdapter(common_pb2.AdapterRef(name="a2"), metadata=md("alpha"), timeout=10).pinned
        # KServe: pin "false" is false (it used to be bool("false"), i.e. a pin)
        load = run.channel.unary_unary(
            f"/{kc.SERVICE}/RepositoryModelLoad",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=kc.pb.RepositoryModelLoadResponse.FromString,
        )
        req = kc.pb.RepositoryModelLoadRequest(model_name="a2")
        req.parameters["pin"].string_param = "false"
        load(req, metadata=md("alpha"), timeout=30)
        assert not a.GetAdapter(common_pb2.AdapterRef(name="a2"), metadata=md("alpha"), timeout=10).pinned
        # another tenant's adapter still finds a slot, at once
        resp = run.inference.Generate(
            inference_pb2.GenerateRequest(prompt="hi", adapter="b1"), metadata=md("beta"), timeout=10
        )
        assert resp.adapter == "b1@1"
