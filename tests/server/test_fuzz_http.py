"""Hostile bodies to every HTTP door route (hypothesis, bounded): each request is answered with a success
or a 4xx carrying the OpenAI error object, never a 500, and the server keeps serving."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.server.harness import running_server

EXAMPLES = int(os.environ.get("HOTLORA_FUZZ_EXAMPLES", "60"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
)
ROUTES = (
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/embeddings",
    "/v1/load_lora_adapter",
    "/v1/unload_lora_adapter",
)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
FIELDS = [
    "model", "prompt", "messages", "input", "max_tokens", "max_completion_tokens", "temperature",
    "top_p", "top_k", "n", "seed", "stop", "stop_token_ids", "stream", "stream_options", "logprobs",
    "top_logprobs", "prompt_logprobs", "presence_penalty", "frequency_penalty", "repetition_penalty",
    "logit_bias", "min_tokens", "ignore_eos", "response_format", "guided_json", "guided_regex",
    "guided_choice", "echo", "encoding_format", "lora_name", "lora_path",
]  # fmt: skip


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory):
    allowed = tmp_path_factory.mktemp("allowed")
    with running_server(
        tiny_model_dir,
        tmp_path_factory.mktemp("data"),
        http_port=0,
        max_new_tokens=4,
        default_max_new_tokens=4,
        max_prompt_tokens=256,
        allowed_local_adapter_dirs=str(allowed),
    ) as run:
        yield run


def _post(run, path: str, data: bytes) -> tuple[int, bytes]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{run.server.http_port}{path}",
        data=data,
        headers={"content-type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _check(status: int, body: bytes) -> None:
    assert status < 500, body[:500]
    if status >= 400:
        error = json.loads(body)["error"]
        assert error["code"] == status and error["message"]


@FUZZ
@given(
    route=st.sampled_from(ROUTES),
    fields=st.dictionaries(st.sampled_from(FIELDS), values, max_size=8),
    base_model=st.booleans(),
)
def test_hostile_json_bodies_never_get_a_500(run, route, fields, base_model):
    if base_model:  # reach past `model` more often
        fields.setdefault("model", run.state.loaded.name)
    data = json.dumps(fields, allow_nan=True).encode()
    _check(*_post(run, route, data))


@FUZZ
@given(route=st.sampled_from(ROUTES), data=st.binary(max_size=200))
def test_arbitrary_bytes_never_get_a_500(run, route, data):
    _check(*_post(run, route, data))


def test_the_server_still_serves_after_the_fuzz(run):
    body = {"model": run.state.loaded.name, "prompt": "still alive", "max_tokens": 2, "temperature": 0}
    status, text = _post(run, "/v1/completions", json.dumps(body).encode())
    assert status == 200 and json.loads(text)["usage"]["completion_tokens"] == 2
