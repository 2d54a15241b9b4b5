"""Helpers of the Tinker API tests: the official SDK pointed at a running hotlora, data built from the tiny
byte-level tokenizer, raw HTTP for what the SDK never sends on purpose (another tenant's ids, seq gaps)."""

from __future__ import annotations

import contextlib
import os

import httpx
import tinker
from tinker import types

from tests.tiny import tiny_tokenizer

EOS = 2
TOKENS = {"alpha": "tml-alpha-secret", "beta": "tml-beta-secret"}


@contextlib.contextmanager
def service_client(port: int, tenant: str = "alpha"):
    """A ServiceClient of `tenant`; its session is finished (the server drops its runs) on the way out."""
    os.environ["TINKER_BASE_URL"] = f"http://127.0.0.1:{port}"
    client = tinker.ServiceClient(api_key=TOKENS[tenant])
    try:
        yield client
    finally:
        client.close("success").result()


def ids(text: str) -> list[int]:
    return tiny_tokenizer()(text, add_special_tokens=False)["input_ids"]


def sft_datum(prompt: list[int], completion: list[int]) -> types.Datum:
    """Cross-entropy on the completion only: input = prompt + completion[:-1], targets shifted by one."""
    seq = prompt + completion
    weights = [0.0] * (len(prompt) - 1) + [1.0] * len(completion)
    return types.Datum(
        model_input=types.ModelInput.from_ints(seq[:-1]),
        loss_fn_inputs={"target_tokens": seq[1:], "weights": weights},
    )


def rl_datum(prompt: list[int], sampled: list[int], sampled_logprobs: list[float], advantage: float):
    seq = prompt + sampled
    pad = len(prompt) - 1
    return types.Datum(
        model_input=types.ModelInput.from_ints(seq[:-1]),
        loss_fn_inputs={
            "target_tokens": seq[1:],
            "logprobs": [0.0] * pad + list(sampled_logprobs),
            "advantages": [0.0] * pad + [advantage] * len(sampled),
        },
    )


def greedy(sampler, prompt: list[int], max_tokens: int = 12) -> list[int]:
    params = types.SamplingParams(max_tokens=max_tokens, temperature=0.0)
    return list(sampler.sample(types.ModelInput.from_ints(prompt), 1, params).result().sequences[0].tokens)


def http(port: int, tenant: str = "alpha") -> httpx.Client:
    return httpx.Client(
        base_url=f"http://127.0.0.1:{port}/api/v1", headers={"X-API-Key": TOKENS[tenant]}, timeout=60
    )
