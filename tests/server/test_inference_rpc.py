"""hotlora.v1.Inference over real gRPC, against an in-process server on the tiny model."""

from __future__ import annotations

import math
import threading
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from hotlora.v1 import common_pb2, inference_pb2
from tests.server.harness import running_server

MAX_PROMPT_TOKENS = 256
MAX_NEW_TOKENS = 1000


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory):
    with running_server(
        tiny_model_dir,
        tmp_path_factory.mktemp("data"),
        max_prompt_tokens=MAX_PROMPT_TOKENS,
        max_new_tokens=MAX_NEW_TOKENS,
        default_max_new_tokens=16,
    ) as r:
        yield r


def gen_request(prompt="a", n=24, messages=(), **params) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(
        prompt=prompt,
        messages=[common_pb2.ChatMessage(role=r, content=c) for r, c in messages],
        params=common_pb2.SamplingParams(max_new_tokens=n, **params),
    )


def hf_greedy(model, tok, ids: list[int], n: int) -> list[int]:
    x = torch.tensor([ids])
    out = model.generate(
        x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id
    )
    return out[0, len(ids) :].tolist()


# a bound for waits on what the server must do: only a server that never does it reaches it (a loaded
# machine makes it later, not wrong)
WAIT = 60.0


def wait_until(pred, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def health_status(channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=30).status


# ---- Generate / GenerateStream ---------------------------------------------------------


def test_generate_greedy_matches_the_model(run, tiny_llama, tiny_tok):
    resp = run.inference.Generate(gen_request("The quick brown fox", 24), timeout=30)
    ids = tiny_tok("The quick brown fox")["input_ids"]
    assert list(resp.token_ids) == hf_greedy(tiny_llama, tiny_tok, ids, 24)
    assert resp.text == tiny_tok.decode(list(resp.token_ids), skip_special_tokens=True)
    assert resp.finish_reason == "length"
    assert resp.usage.prompt_tokens == len(ids) and resp.usage.completion_tokens == 24
    assert resp.adapter == ""


def test_default_max_new_tokens_applies_when_zero(run):
    resp = run.inference.Generate(gen_request("a", 0), timeout=30)
    assert resp.usage.completion_tokens == 16 and resp.finish_reason == "length"


def test_stream_concatenates_to_the_unary_result(run):
    req = gen_request("Once upon a time", 40, stop=[])
    unary = run.inference.Generate(req, timeout=30)
    chunks = list(run.inference.GenerateStream(req, timeout=30))
    assert len(chunks) > 1  # really streamed, not one message at the end
    assert "".join(c.text for c in chunks) == unary.text
    assert [t for c in chunks for t in c.token_ids] == list(unary.token_ids)
    assert all(not c.finish_reason and not c.HasField("usage") for c in chunks[:-1])
    last = chunks[-1]
    assert last.finish_reason == "length"
    assert last.usage.completion_tokens == 40 and last.usage.prompt_tokens == unary.usage.prompt_tokens


def test_stream_stop_string_never_leaks(run):
    full = run.inference.Generate(gen_request("The quick brown fox jumps", 120), timeout=30).text
    i = next(i for i in range(10, len(full) - 3) if all(32 < ord(c) < 127 for c in full[i : i + 3]))
    stop = full[i : i + 3]
    chunks = list(
        run.inference.GenerateStream(gen_request("The quick brown fox jumps", 120, stop=[stop]), timeout=30)
    )
    text = "".join(c.text for c in chunks)
    assert text == full[: full.find(stop)]
    assert chunks[-1].finish_reason == "stop"


def test_seeded_sampling_is_reproducible_over_the_wire(run):
    req = gen_request("a", 30, temperature=1.0, seed=99)
    a = run.inference.Generate(req, timeout=30)
    b = run.inference.Generate(req, timeout=30)
    greedy = run.inference.Generate(gen_request("a", 30), timeout=30)
    assert list(a.token_ids) == list(b.token_ids)
    assert list(a.token_ids) != list(greedy.token_ids)


def test_chat_messages_use_the_template(run, tiny_tok):
    messages = [("system", "be brief"), ("user", "hello there")]
    resp = run.inference.Generate(gen_request("", 12, messages=messages), timeout=30)
    as_dicts = [{"role": r, "content": c} for r, c in messages]
    templ = tiny_tok.apply_chat_template(
        as_dicts, add_generation_prompt=True, tokenize=True, return_dict=True
    )
    assert resp.usage.prompt_tokens == len(templ["input_ids"])
    # the same tokens as sending the rendered template as a raw prompt
    rendered = tiny_tok.apply_chat_template(as_dicts, add_generation_prompt=True, tokenize=False)
    assert rendered.endswith("<|assistant|>")
    raw = run.inference.Generate(gen_request(rendered, 12), timeout=30)
    assert list(resp.token_ids) == list(raw.token_ids)


# ---- Embed / Classify -------------------------------------------------------------------


def test_embed_shapes_and_values(run, tiny_llama, tiny_tok):
    texts = ["hello", "a longer sentence here"]
    resp = run.inference.Embed(inference_pb2.EmbedRequest(texts=texts), timeout=30)
    assert len(resp.embeddings) == 2
    with torch.no_grad():
        for emb, text in zip(resp.embeddings, texts, strict=True):
            assert len(emb.values) == tiny_llama.config.hidden_size
            h = tiny_llama.model(torch.tensor([tiny_tok(text)["input_ids"]])).last_hidden_state[0].mean(0)
            torch.testing.assert_close(torch.tensor(list(emb.values)), h, atol=1e-4, rtol=1e-4)


def test_classify_without_adapter_is_failed_precondition(run):
    with pytest.raises(grpc.RpcError) as err:
        run.inference.Classify(inference_pb2.ClassifyRequest(texts=["hi"]), timeout=10)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "classification head" in err.value.details()


def test_unknown_adapter_is_not_found(run):
    req = gen_request("a", 4)
    req.adapter = "no-such-adapter"
    with pytest.raises(grpc.RpcError) as err:
        run.inference.Generate(req, timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no-such-adapter" in err.value.details()


# ---- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (gen_request("a", 4, temperature=-1.0), "temperature must be a finite number >= 0"),
        (gen_request("a", 4, temperature=math.nan), "temperature must be a finite number >= 0"),
        (gen_request("a", 4, top_p=1.5), "top_p must be in [0, 1]"),
        (gen_request("a", 4, messages=[("user", "hi")]), "either prompt or messages, not both"),
        (gen_request("", 4), "a prompt or at least one message is required"),
        (gen_request("", 4, messages=[("wizard", "hi")]), "role 'wizard' is not one of"),
    ],
    ids=[
        "negative-temperature",
        "nan-temperature",
        "top-p-over-1",
        "prompt-and-messages",
        "neither",
        "bad-role",
    ],
)
def test_generate_invalid_argument(run, request_, message):
    for call in (
        run.inference.Generate,
        lambda r, timeout: list(run.inference.GenerateStream(r, timeout=timeout)),
    ):
        with pytest.raises(grpc.RpcError) as err:
            call(request_, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in err.value.details()


@pytest.mark.parametrize(
    ("texts", "message"), [([], "at least one text is required"), (["fine", ""], "texts[1] is empty")]
)
def test_embed_invalid_argument(run, texts, message):
    with pytest.raises(grpc.RpcError) as err:
        run.inference.Embed(inference_pb2.EmbedRequest(texts=texts), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.value.details()


def test_max_new_tokens_over_the_limit(run):
    with pytest.raises(grpc.RpcError) as err:
        run.inference.Generate(gen_request("a", MAX_NEW_TOKENS + 1), timeout=10)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"limit of {MAX_NEW_TOKENS}" in err.value.details()


def test_prompt_over_max_prompt_tokens(run):
    with pytest.raises(grpc.RpcError) as err:
        run.inference.Generate(gen_request("x" * (MAX_PROMPT_TOKENS + 1), 4), timeout=10)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"at most {MAX_PROMPT_TOKENS}" in err.value.details()


def test_short_deadline_on_long_generation(run):
    engine = run.state.engine
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        run.inference.Generate(gen_request("a", MAX_NEW_TOKENS), timeout=0.3)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # the server dropped the row too (1000 tokens would take seconds more)
    wait_until(lambda: engine.num_running == 0, WAIT, "the expired request to leave the engine")
    assert time.monotonic() - t0 < 1.5


def test_cancelled_stream_frees_the_engine_row(run):
    engine = run.state.engine
    call = run.inference.GenerateStream(gen_request("a", MAX_NEW_TOKENS), timeout=30)
    it = iter(call)
    next(it)
    next(it)
    assert engine.num_running == 1
    call.cancel()
    wait_until(lambda: engine.num_running == 0, WAIT, "the cancelled stream's row to leave the engine")
    # and the server still answers
    assert run.inference.Generate(gen_request("a", 3), timeout=10).usage.completion_tokens == 3


def test_concurrent_streams_are_batched_and_correct(run):
    prompts = ["a", "b", "The quick brown fox jumps", "Once upon a time"]
    alone = [list(run.inference.Generate(gen_request(p, 30), timeout=30).token_ids) for p in prompts]
    results: dict[int, list[int]] = {}

    def go(i):
        results[i] = [
            t
            for c in run.inference.GenerateStream(gen_request(prompts[i], 30), timeout=30)
            for t in c.token_ids
        ]

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert [results[i] for i in range(len(prompts))] == alone


# ---- health, reflection, draining --------------------------------------------------------


def test_reflection_lists_the_services(run):
    stub = reflection_pb2_grpc.ServerReflectionStub(run.channel)
    responses = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
    )
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert {
        "hotlora.v1.Inference",
        "hotlora.v1.Adapters",
        "hotlora.v1.Training",
        "grpc.health.v1.Health",
    } <= names


def test_health_follows_load_and_drain(tiny_model_dir, tmp_path):
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    with running_server(tiny_model_dir, tmp_path, load=False) as r:
        assert health_status(r.channel) == not_serving
        assert health_status(r.channel, "hotlora.v1.Inference") == not_serving
        with pytest.raises(grpc.RpcError) as err:  # calls before the model is ready
            r.inference.Generate(gen_request("a", 4), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "loading" in err.value.details()

        r.server.load()
        assert health_status(r.channel) == serving
        assert health_status(r.channel, "hotlora.v1.Inference") == serving

        # drain while a long stream runs: NOT_SERVING, new work refused, the stream finishes
        stream = r.inference.GenerateStream(gen_request("a", 200), timeout=30)
        it = iter(stream)
        first = next(it)
        stopper = threading.Thread(target=r.server.shutdown, kwargs={"grace": 20.0})
        stopper.start()
        try:
            wait_until(lambda: r.state.draining, WAIT, "draining")
            assert health_status(r.channel) == not_serving
            with pytest.raises(grpc.RpcError) as err:
                r.inference.Generate(gen_request("b", 4), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            rest = list(it)
            assert rest[-1].finish_reason == "length"
            assert len(first.token_ids) + sum(len(c.token_ids) for c in rest) == 200
        finally:
            stopper.join(30)
        assert not stopper.is_alive()
