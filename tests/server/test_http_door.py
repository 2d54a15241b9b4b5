"""The OpenAI-compatible HTTP door against a live server, through the official `openai` client: the
routes, `model` as base / adapter / name@N / base:adapter, the sampling controls, structured output,
vLLM's load/unload bodies, tenancy, errors, and the metrics. Two tenants (a tokens file), tiny model.

Over 400 lines: every route runs against one live server started once per module (the costly part)."""

from __future__ import annotations

import base64
import concurrent.futures as cf
import contextlib
import json
import shutil
import subprocess
import threading
import time
import urllib.request

import numpy as np
import openai
import pytest

from hotlora.v1 import common_pb2, inference_pb2
from tests.server.adapter_utils import make_peft_adapter
from tests.server.harness import running_server
from tests.server.test_metrics import find_or_install_promtool, promtool_check_metrics, samples, scrape, value
from tests.tiny import tiny_tokenizer

TOKENS = {"alpha": "tok-alpha-secret", "beta": "tok-beta-secret"}
LORA = dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"])
SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}, "count": {"type": "integer"}},
    "required": ["answer", "count"],
    "additionalProperties": False,
}
SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}}
# issue 37: every value of `a` holds a `b` and every `b` an `a`; llguidance compiles it, no answer can end
CYCLE = {
    "$defs": {
        "a": {"type": "object", "properties": {"b": {"$ref": "#/$defs/b"}}, "required": ["b"]},
        "b": {"type": "object", "properties": {"a": {"$ref": "#/$defs/a"}}, "required": ["a"]},
    },
    "$ref": "#/$defs/a",
}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("http")
    allowed = root / "allowed"
    outside = root / "outside"
    for d in (allowed, outside):
        d.mkdir()
    make_peft_adapter(allowed / "bot-v1", seed=1, **LORA)
    make_peft_adapter(allowed / "bot-v2", seed=2, **LORA)
    shutil.copytree(allowed / "bot-v1", outside / "bot-v1")
    tokens = root / "tokens"
    tokens.write_text("".join(f"{t} {tok}\n" for t, tok in TOKENS.items()))
    return {"root": root, "allowed": allowed, "outside": outside, "tokens": tokens}


@pytest.fixture(scope="module")
def run(tiny_model_dir, dirs):
    with running_server(
        tiny_model_dir,
        dirs["root"] / "data",
        http_port=0,
        tokens_file=str(dirs["tokens"]),
        allowed_local_adapter_dirs=str(dirs["allowed"]),
        max_new_tokens=64,
        default_max_new_tokens=32,
        max_rpcs_per_tenant=64,
    ) as run:
        yield run


@pytest.fixture(scope="module")
def base(run) -> str:
    return run.state.loaded.name


def client(run, tenant: str | None = "alpha", token: str | None = None) -> openai.OpenAI:
    key = token if token is not None else TOKENS[tenant]
    return openai.OpenAI(base_url=f"http://127.0.0.1:{run.server.http_port}/v1", api_key=key, max_retries=0)


def post(run, path: str, body, tenant: str = "alpha") -> tuple[int, str]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{run.server.http_port}{path}",
        data=data,
        headers={"authorization": f"Bearer {TOKENS[tenant]}", "content-type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def grpc_generate(run, tenant="alpha", **kw):
    params = kw.pop("params", {})
    req = inference_pb2.GenerateRequest(params=common_pb2.SamplingParams(**params), **kw)
    return run.inference.Generate(req, metadata=[("authorization", f"Bearer {TOKENS[tenant]}")], timeout=60)


@pytest.fixture(scope="module")
def bot(run, dirs):
    """alpha's adapter `bot`, two versions, stored and loaded through vLLM's load_lora_adapter body."""
    for version in ("bot-v1", "bot-v2"):
        status, text = post(
            run, "/v1/load_lora_adapter", {"lora_name": "bot", "lora_path": str(dirs["allowed"] / version)}
        )
        assert status == 200, text
        assert "Success" in text
    return "bot"


# ---- routes and `model` ---------------------------------------------------------------------------------
def test_models_lists_the_base_and_only_the_callers_adapters(run, base, bot):
    alpha = {m.id for m in client(run, "alpha").models.list()}
    assert alpha == {base, "bot", "bot@1", "bot@2"}
    assert {m.id for m in client(run, "beta").models.list()} == {base}


@pytest.mark.parametrize(
    "model, adapter",
    [("BASE", ""), ("bot", "bot"), ("bot@1", "bot@1"), ("BASE:bot@1", "bot@1")],
)
def test_greedy_completion_equals_grpc_generate(run, base, bot, model, adapter):
    model = model.replace("BASE", base)
    resp = client(run).completions.create(model=model, prompt="hello world", max_tokens=12, temperature=0)
    ref = grpc_generate(run, prompt="hello world", adapter=adapter, params={"max_new_tokens": 12})
    assert resp.choices[0].text == ref.text
    assert resp.choices[0].finish_reason == ("length" if ref.finish_reason == "length" else "stop")
    assert resp.usage.completion_tokens == len(ref.token_ids)
    assert resp.usage.prompt_tokens == ref.usage.prompt_tokens


def test_adapter_versions_give_different_text(run, bot):
    c = client(run)
    texts = {
        m: c.completions.create(model=m, prompt="hello world", max_tokens=12, temperature=0).choices[0].text
        for m in ("bot@1", "bot@2")
    }
    assert texts["bot@1"] != texts["bot@2"]
    assert (
        c.completions.create(model="bot", prompt="hello world", max_tokens=12, temperature=0).choices[0].text
        == texts["bot@2"]
    )


def test_chat_and_streamed_chat_agree_with_grpc(run, base):
    c = client(run)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    whole = c.chat.completions.create(model=base, messages=messages, max_tokens=16, temperature=0)
    ref = grpc_generate(
        run,
        messages=[common_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in messages],
        params={"max_new_tokens": 16},
    )
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].message.content == ref.text
    chunks = list(
        c.chat.completions.create(
            model=base,
            messages=messages,
            max_tokens=16,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == ref.text
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finals == ["length" if ref.finish_reason == "length" else "stop"]
    assert chunks[-1].usage.completion_tokens == len(ref.token_ids)


def test_streamed_completion_ends_with_done(run, base):
    status, text = post(
        run,
        "/v1/completions",
        {"model": base, "prompt": "abc", "max_tokens": 4, "temperature": 0, "stream": True},
    )
    assert status == 200
    events = [line[len("data: ") :] for line in text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]) == (
        grpc_generate(run, prompt="abc", params={"max_new_tokens": 4}).text
    )


def test_embeddings_equal_grpc_embed_as_floats_and_base64(run, base, bot):
    c = client(run)
    ref = run.inference.Embed(
        inference_pb2.EmbedRequest(texts=["one", "two words"], adapter="bot"),
        metadata=[("authorization", f"Bearer {TOKENS['alpha']}")],
        timeout=60,
    )
    for fmt in (None, "float", "base64"):  # unasked, the client asks for base64 and decodes it itself
        kw = {} if fmt is None else {"encoding_format": fmt}
        resp = c.embeddings.create(model="bot", input=["one", "two words"], **kw)
        assert [d.index for d in resp.data] == [0, 1]
        for d, e in zip(resp.data, ref.embeddings, strict=True):
            got = (
                np.frombuffer(base64.b64decode(d.embedding), "<f4").tolist()
                if fmt == "base64"
                else d.embedding
            )
            assert got == pytest.approx(list(e.values), abs=1e-6)


# ---- sampling controls ----------------------------------------------------------------------------------
def test_logprobs_of_greedy_tokens_are_the_top_ones(run, base):
    c = client(run)
    resp = c.completions.create(model=base, prompt="hello", max_tokens=6, temperature=0, logprobs=3)
    lp = resp.choices[0].logprobs
    assert len(lp.token_logprobs) == len(lp.tokens) == resp.usage.completion_tokens == 6
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        # greedy picks the most likely token; tokens that decode alike (partial UTF-8) share a dict key
        assert 1 <= len(top) <= 3 and chosen >= max(top.values()) - 1e-5
        assert chosen <= 0
    chat = c.chat.completions.create(
        model=base, messages=[{"role": "user", "content": "hi"}], max_tokens=5, temperature=0,
        logprobs=True, top_logprobs=2,
    )  # fmt: skip
    content = chat.choices[0].logprobs.content
    assert len(content) == 5
    assert all(
        len(t.top_logprobs) == 2 and t.logprob == pytest.approx(t.top_logprobs[0].logprob) for t in content
    )
    assert "".join(t.token for t in content) == chat.choices[0].message.content


def test_grpc_generate_returns_logprobs_too(run):
    resp = grpc_generate(run, prompt="hello", params={"max_new_tokens": 4, "logprobs": 2})
    assert [t.token_id for t in resp.logprobs] == list(resp.token_ids)
    assert all(len(t.top) == 2 and t.top[0].token_id == t.token_id for t in resp.logprobs)


def test_n_samples_are_seeded_and_reproducible(run, base):
    c = client(run)
    kw = dict(model=base, prompt="tell me", max_tokens=10, temperature=1.0, n=3, seed=7, logprobs=0)
    first, again = c.completions.create(**kw), c.completions.create(**kw)
    assert [ch.index for ch in first.choices] == [0, 1, 2]
    texts = [ch.text for ch in first.choices]
    assert texts == [ch.text for ch in again.choices]
    assert len(set(texts)) > 1  # sample i draws with seed + i
    assert first.usage.completion_tokens == sum(len(ch.logprobs.tokens) for ch in first.choices)
    assert first.usage.prompt_tokens == len(tiny_tokenizer()("tell me")["input_ids"])  # counted once


def test_seed_reproduces_whatever_else_is_in_the_batch(run, base):
    c = client(run)
    kw = dict(model=base, prompt="seeded", max_tokens=12, temperature=1.0, seed=1234)
    alone = c.completions.create(**kw).choices[0].text
    with cf.ThreadPoolExecutor(6) as pool:
        others = [
            pool.submit(c.completions.create, model=base, prompt=f"noise {i}", max_tokens=20)
            for i in range(5)
        ]
        crowded = pool.submit(c.completions.create, **kw)
        assert crowded.result().choices[0].text == alone
        [f.result() for f in others]


def test_repetition_penalty_stops_repeats_and_matches_grpc(run, base):
    free = grpc_generate(run, prompt="hello world", params={"max_new_tokens": 12})
    assert len(set(free.token_ids)) < len(free.token_ids)  # greedy repeats a token here
    penalised = grpc_generate(
        run, prompt="hello world", params={"max_new_tokens": 12, "repetition_penalty": 10}
    )
    assert len(set(penalised.token_ids)) == len(penalised.token_ids)
    http = client(run).completions.create(
        model=base, prompt="hello world", max_tokens=12, temperature=0, extra_body={"repetition_penalty": 10}
    )
    assert http.choices[0].text == penalised.text


def test_presence_and_frequency_penalties_change_greedy_text_as_on_grpc(run, base):
    free = grpc_generate(run, prompt="hello world", params={"max_new_tokens": 12})
    for field in ("presence_penalty", "frequency_penalty"):
        ref = grpc_generate(run, prompt="hello world", params={"max_new_tokens": 12, field: 2.0})
        assert ref.token_ids != free.token_ids
        http = client(run).completions.create(
            model=base, prompt="hello world", max_tokens=12, temperature=0, **{field: 2.0}
        )
        assert http.choices[0].text == ref.text


def test_logit_bias_min_tokens_and_stop_token_ids(run, base):
    c = client(run)
    x = tiny_tokenizer().convert_tokens_to_ids("x")
    forced = c.completions.create(
        model=base, prompt="a", max_tokens=5, temperature=0, logit_bias={str(x): 100}
    )
    assert forced.choices[0].text == "xxxxx"
    stopped = c.completions.create(
        model=base, prompt="a", max_tokens=5, temperature=0, logit_bias={str(x): 100},
        extra_body={"stop_token_ids": [x]},
    )  # fmt: skip
    assert (stopped.choices[0].text, stopped.choices[0].finish_reason) == ("", "stop")
    assert stopped.usage.completion_tokens == 1
    # min_tokens holds the stop token back: the biased token cannot end the output before 3 tokens
    held = c.completions.create(
        model=base, prompt="a", max_tokens=5, temperature=0, logit_bias={str(x): 100},
        extra_body={"stop_token_ids": [x], "min_tokens": 3},
    )  # fmt: skip
    assert held.usage.completion_tokens == 4 and held.choices[0].finish_reason == "stop"
    assert "x" not in held.choices[0].text


# ---- structured output ----------------------------------------------------------------------------------
def _check(obj: dict) -> None:
    assert (
        set(obj) == {"answer", "count"} and obj["answer"] in ("yes", "no") and isinstance(obj["count"], int)
    )


def test_json_schema_output_parses_and_validates(run, base):
    resp = client(run).chat.completions.create(
        model=base,
        messages=[{"role": "user", "content": "answer in JSON"}],
        max_tokens=48,
        temperature=0,
        response_format=SCHEMA_FORMAT,
    )
    assert resp.choices[0].finish_reason == "stop"
    _check(json.loads(resp.choices[0].message.content))


def test_guided_regex_and_choice_on_grpc(run):
    regex = grpc_generate(
        run, prompt="x", params={"max_new_tokens": 10, "guided": common_pb2.Guided(regex="[0-9]{3}-[a-c]{2}")}
    )
    import re

    assert re.fullmatch("[0-9]{3}-[a-c]{2}", regex.text)
    choice = grpc_generate(
        run,
        prompt="x",
        params={
            "max_new_tokens": 10,
            "guided": common_pb2.Guided(choice=common_pb2.ChoiceList(choices=["red", "green"])),
        },
    )
    assert choice.text in ("red", "green")


@contextlib.contextmanager
def engine_held(run, waiting: int):
    """The engine busy with a background task until `waiting` requests are queued: they are then
    admitted together, in one batch."""
    release = threading.Event()

    class Hold:
        def step(self) -> bool:
            release.wait(30)
            return False

    engine = run.state.engine
    engine.submit_task(Hold())
    try:
        yield
        deadline = time.monotonic() + 30
        while engine.num_waiting < waiting and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.num_waiting == waiting
    finally:
        release.set()


def test_constrained_and_free_requests_share_a_batch_and_are_both_right(run, base):
    c = client(run)
    free_alone = (
        c.completions.create(model=base, prompt="free text", max_tokens=40, temperature=0).choices[0].text
    )
    before = samples(scrape(run))
    with cf.ThreadPoolExecutor(2) as pool:
        with engine_held(run, waiting=2):
            constrained = pool.submit(
                c.completions.create, model=base, prompt="json please", max_tokens=40, temperature=0,
                extra_body={"response_format": SCHEMA_FORMAT},
            )  # fmt: skip
            free = pool.submit(
                c.completions.create, model=base, prompt="free text", max_tokens=40, temperature=0
            )
        _check(json.loads(constrained.result().choices[0].text))
        assert free.result().choices[0].text == free_alone
    after = samples(scrape(run))

    def multi_row_decodes(ss):
        total = value(ss, "hotlora_batch_size_count", kind="decode")
        return total - value(ss, "hotlora_batch_size_bucket", kind="decode", le="1.0")

    assert multi_row_decodes(after) > multi_row_decodes(before)  # decode steps ran both rows together


def test_a_schema_with_no_finite_value_is_refused_before_generating(run, base):
    for extra in (
        {"guided_json": CYCLE},
        {"response_format": {"type": "json_schema", "json_schema": {"schema": CYCLE}}},
    ):
        status, text = post(run, "/v1/completions", {"model": base, "prompt": "hi", "max_tokens": 8, **extra})
        assert status == 400, text
        assert "admits no finite value" in json.loads(text)["error"]["message"]
    import grpc

    with pytest.raises(grpc.RpcError) as exc:
        grpc_generate(
            run,
            prompt="x",
            params={"max_new_tokens": 4, "guided": common_pb2.Guided(json_schema=json.dumps(CYCLE))},
        )
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "'#/$defs/a'" in exc.value.details()


def test_an_answer_the_grammar_engine_gives_up_on_is_an_error_never_stop(run, base):
    # recursion through patternProperties, which the schema check leaves to llguidance: it compiles, and its
    # matcher gives up after `{` (ParserTooComplex on the infinite forced prefix)
    schema = {
        "type": "object",
        "patternProperties": {"^x$": {"$ref": "#"}},
        "required": ["x"],
        "additionalProperties": False,
    }
    body = {"model": base, "prompt": "hi", "max_tokens": 8, "guided_json": schema}
    status, text = post(run, "/v1/completions", body)
    assert status == 400, text  # before: 200, finish_reason "stop", text "{"
    assert "could not follow the guided json_schema" in json.loads(text)["error"]["message"]
    status, text = post(run, "/v1/completions", {**body, "stream": True})
    assert status == 200
    events = [line[len("data: ") :] for line in text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])
    assert "could not follow" in error["error"]["message"]
    assert all(json.loads(e)["choices"][0]["finish_reason"] is None for e in events[:-2])


def test_json_object_mode_gives_an_object(run, base):
    resp = client(run).completions.create(
        model=base,
        prompt="{",
        max_tokens=40,
        temperature=0,
        extra_body={"response_format": {"type": "json_object"}},
    )
    if resp.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(resp.choices[0].text), dict)
    else:  # out of tokens inside the object: still a prefix of one
        assert resp.choices[0].text.startswith("{")


# ---- errors and tenancy ---------------------------------------------------------------------------------
def test_unknown_or_missing_token_is_401(run, base):
    with pytest.raises(openai.AuthenticationError) as exc:
        client(run, token="wrong").models.list()
    assert exc.value.status_code == 401 and exc.value.body["type"] == "authentication_error"
    req = urllib.request.Request(f"http://127.0.0.1:{run.server.http_port}/v1/models")  # no header at all
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(req, timeout=10)
    assert missing.value.code == 401


@pytest.mark.parametrize("model", ["", "BASE:", " "])
def test_an_empty_model_is_404_like_any_unknown_model(run, base, model):
    model = model.replace("BASE", base)
    for path, body in (
        ("/v1/completions", {"prompt": "hi", "max_tokens": 2}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
        ("/v1/embeddings", {"input": "hi"}),
    ):
        status, text = post(run, path, {"model": model, **body})
        assert status == 404, (path, text)
        assert json.loads(text)["error"]["type"] == "not_found_error"


def test_another_tenants_adapter_is_404_with_the_openai_error_body(run, bot):
    with pytest.raises(openai.NotFoundError) as exc:
        client(run, "beta").completions.create(model="bot", prompt="hi", max_tokens=2)
    body = exc.value.body
    assert body["type"] == "not_found_error" and "bot" in body["message"]


@pytest.mark.parametrize(
    "extra",
    [
        {"temperature": -1},
        {"n": 1000},
        {"logprobs": 50},
        {"logit_bias": {"999999": 1}},
        {"stop_token_ids": [-5]},
        {"presence_penalty": 3},
        {"min_tokens": 10, "max_tokens": 5},
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 7}}}},
        {"guided_regex": "(unclosed"},
    ],
)
def test_bad_parameters_are_400(run, base, extra):
    status, text = post(run, "/v1/completions", {"model": base, "prompt": "hi", "max_tokens": 4, **extra})
    assert status == 400, text
    assert json.loads(text)["error"]["type"] == "invalid_request_error"


def test_malformed_bodies_and_unknown_routes_get_openai_errors(run, base):
    status, text = post(run, "/v1/completions", b"{not json")
    assert status == 400 and "error" in json.loads(text)
    status, text = post(run, "/v1/nothing-here", {})
    assert status == 404 and "error" in json.loads(text)
    status, text = post(run, "/v1/completions", {"model": base, "prompt": "hi", "max_tokens": 1000})
    assert status == 413 and "max_new_tokens" in json.loads(text)["error"]["message"]


# ---- vLLM's load/unload ---------------------------------------------------------------------------------
def test_load_outside_the_allowed_dirs_is_refused_and_stores_nothing(run, dirs, base):
    before = {m.id for m in client(run).models.list()}
    for path in (dirs["outside"] / "bot-v1", dirs["allowed"] / ".." / "outside" / "bot-v1", "/etc"):
        status, text = post(run, "/v1/load_lora_adapter", {"lora_name": "sneaky", "lora_path": str(path)})
        assert status == 403, text
    assert {m.id for m in client(run).models.list()} == before


def test_files_linked_out_of_the_allowed_dirs_are_refused_unopened(run, dirs, base):
    before = {m.id for m in client(run).models.list()}
    linked = dirs["allowed"] / "linked-out"
    linked.mkdir()
    # a whole, valid adapter outside: today's code loaded it through the links
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (linked / name).symlink_to(dirs["outside"] / "bot-v1" / name)
    passwd = dirs["allowed"] / "passwd"
    passwd.mkdir()
    (passwd / "adapter_config.json").symlink_to("/etc/passwd")
    (passwd / "adapter_model.safetensors").symlink_to(
        dirs["allowed"] / "bot-v1" / "adapter_model.safetensors"
    )
    for path in (linked, passwd):
        status, text = post(run, "/v1/load_lora_adapter", {"lora_name": "sneaky", "lora_path": str(path)})
        assert status == 403, text
        message = json.loads(text)["error"]["message"]
        assert "adapter_config.json" in message and "link to a file outside" in message
        assert "root:" not in message
    assert {m.id for m in client(run).models.list()} == before


def test_links_inside_the_allowed_dirs_are_followed(run, dirs):
    snapshot = dirs["allowed"] / "snapshot"  # a Hugging Face cache's layout: links to blobs beside it
    snapshot.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (snapshot / name).symlink_to(dirs["allowed"] / "bot-v1" / name)
    status, text = post(run, "/v1/load_lora_adapter", {"lora_name": "linked", "lora_path": str(snapshot)})
    assert status == 200, text


def test_a_nul_in_lora_path_is_400_with_a_message(run, dirs):
    path = str(dirs["allowed"] / "bot-v1") + "\x00/etc/passwd"
    status, text = post(run, "/v1/load_lora_adapter", {"lora_name": "nul", "lora_path": path})
    assert status == 400, text
    assert json.loads(text)["error"]["message"] == "lora_path must not contain a NUL character"


def test_load_is_idempotent_and_unload_keeps_the_adapter_stored(run, dirs, bot):
    status, text = post(
        run, "/v1/load_lora_adapter", {"lora_name": "bot", "lora_path": str(dirs["allowed"] / "bot-v2")}
    )
    assert status == 200 and "bot@2" in text  # the same files: no new version
    status, text = post(run, "/v1/unload_lora_adapter", {"lora_name": "bot"})
    assert status == 200, text
    svc = run.state.adapters
    assert svc.get("alpha", "bot@2").state == "STORED"
    status, text = post(run, "/v1/unload_lora_adapter", {"lora_name": "ghost"})
    assert status == 404


# ---- metrics --------------------------------------------------------------------------------------------
def test_http_requests_and_vllm_gauges_are_exported_and_promtool_clean(run, base, bot):
    client(run).completions.create(model=base, prompt="hi", max_tokens=2)
    post(run, "/v1/completions", {"model": "nobody", "prompt": "hi"})
    text = scrape(run)
    ss = samples(text)
    assert value(ss, "hotlora_http_requests_total", route="/v1/completions", status="200") >= 1
    assert value(ss, "hotlora_http_requests_total", route="/v1/completions", status="404") >= 1
    promtool = find_or_install_promtool()
    promtool_check_metrics(promtool, text)  # the metrics port: no vLLM names, lint-clean
    assert "vllm:" not in text
    # the HTTP door's /metrics, where llm-d looks: ours and vLLM's gauge names
    with urllib.request.urlopen(f"http://127.0.0.1:{run.server.http_port}/metrics", timeout=10) as resp:
        door = resp.read().decode()
    ds = samples(door)
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
        assert (name, frozenset()) in ds, name
    assert 0.0 <= value(ds, "vllm:kv_cache_usage_perc") <= 1.0
    info = [dict(labels) for (name, labels) in ds if name == "vllm:lora_requests_info"]
    assert info and info[0]["max_lora"] == str(run.state.config.adapter_slots)
    assert set(info[0]) == {"running_lora_adapters", "waiting_lora_adapters", "max_lora"}
    # promtool's only complaint there is the ':' that vLLM's names carry
    res = subprocess.run(
        [promtool, "check", "metrics"], input=door, capture_output=True, text=True, timeout=60
    )
    complaints = [line for line in (res.stdout + res.stderr).splitlines() if line.strip()]
    assert complaints and all("should not contain ':'" in line for line in complaints), complaints


# ---- prompt log-probabilities and shared prefill ----------------------------------------------------------
def test_prompt_logprobs_score_each_prompt_token_as_generation_would(run, base):
    text = "the cat sat"
    ids = tiny_tokenizer()(text)["input_ids"]
    resp = grpc_generate(run, prompt=text, params={"max_new_tokens": 1, "prompt_logprobs": 2})
    assert [e.token_id for e in resp.prompt_logprobs] == ids[1:]
    for j in (0, 4, len(ids) - 2):  # the logprob of token j+1 after the prompt's first j+1 tokens
        forced = grpc_generate(
            run,
            prompt=tiny_tokenizer().decode(ids[: j + 1]),
            params={"max_new_tokens": 1, "logprobs": 0, "logit_bias": {ids[j + 1]: 100.0}},
        )
        assert forced.token_ids[0] == ids[j + 1]
        assert forced.logprobs[0].logprob == pytest.approx(resp.prompt_logprobs[j].logprob, abs=0.05)
    assert all(e.rank >= 1 and len(e.top) == 2 for e in resp.prompt_logprobs)
    http = client(run).completions.create(
        model=base, prompt=text, max_tokens=1, temperature=0, echo=True, logprobs=1
    )
    lp = http.choices[0].logprobs
    assert http.choices[0].text.startswith(text)
    assert lp.token_logprobs[0] is None and len(lp.tokens) == len(ids) + 1
    assert lp.token_logprobs[1:-1] == pytest.approx([e.logprob for e in resp.prompt_logprobs], abs=1e-4)


def test_samples_of_one_prompt_share_its_prefill(run, base):
    prompt = "shared prefill " * 8  # 120 byte tokens: 7 full KV blocks
    length = len(tiny_tokenizer()(prompt)["input_ids"])

    def prefill_tokens():
        return value(samples(scrape(run)), "hotlora_forward_tokens_sum", kind="prefill")

    before = prefill_tokens()
    resp = client(run).completions.create(
        model=base, prompt=prompt, max_tokens=2, n=4, temperature=1.0, seed=3
    )
    assert len(resp.choices) == 4
    spent = prefill_tokens() - before
    assert spent < 1.5 * length, (spent, length)  # four separate prefills would be 4 x length


def test_a_list_of_prompts_with_n_numbers_choices_prompt_major(run, base):
    prompts = ["first prompt", "second one"]
    resp = client(run).completions.create(model=base, prompt=prompts, max_tokens=6, temperature=0, n=2)
    refs = [grpc_generate(run, prompt=p, params={"max_new_tokens": 6}).text for p in prompts]
    assert [(ch.index, ch.text) for ch in resp.choices] == [
        (0, refs[0]),
        (1, refs[0]),
        (2, refs[1]),
        (3, refs[1]),
    ]
    ids = tiny_tokenizer()
    assert resp.usage.prompt_tokens == sum(len(ids(p)["input_ids"]) for p in prompts)


def test_grpc_n_returns_the_same_samples_as_the_http_door(run, base):
    params = {"max_new_tokens": 8, "temperature": 1.0, "seed": 11, "n": 3}
    whole = grpc_generate(run, prompt="pick one", params=params)
    assert [s.index for s in whole.samples] == [0, 1, 2] and whole.text == whole.samples[0].text
    assert whole.usage.completion_tokens == sum(len(s.token_ids) for s in whole.samples)
    http = client(run).completions.create(
        model=base, prompt="pick one", max_tokens=8, temperature=1.0, seed=11, n=3
    )
    assert [ch.text for ch in http.choices] == [s.text for s in whole.samples]
    streamed = ["", "", ""]
    stream = run.inference.GenerateStream(
        inference_pb2.GenerateRequest(prompt="pick one", params=common_pb2.SamplingParams(**params)),
        metadata=[("authorization", f"Bearer {TOKENS['alpha']}")],
        timeout=60,
    )
    chunks = list(stream)
    for chunk in chunks:
        streamed[chunk.index] += chunk.text
    assert streamed == [s.text for s in whole.samples]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_grpc_n_over_the_limit_is_invalid_argument(run):
    import grpc

    with pytest.raises(grpc.RpcError) as exc:
        grpc_generate(run, prompt="x", params={"max_new_tokens": 2, "n": 17})
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
