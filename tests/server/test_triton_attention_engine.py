"""The engine with its runner attending through the Triton kernels (the CUDA path: on a GPU, compiled;
elsewhere the CPU runner forced onto it, under TRITON_INTERPRET=1): greedy tokens equal transformers'
`generate`, with decode rows and prefill chunks in one step, a prompt read in chunks, and a prompt whose
first blocks the prefix cache serves (a chunk after cached context)."""

from __future__ import annotations

import time

import pytest
import torch

from hotlora.server.engine.requests import GenerationRequest
from hotlora.server.engine.runner import runner_from_model
from hotlora.server.engine.runner.attention import AttentionPath
from hotlora.server.engine.sampling import SamplingParams
from hotlora.server.engine.scheduler import Engine, EngineLimits

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _generate(model, tok, text: str, n: int) -> list[int]:
    ids = torch.tensor([tok(text)["input_ids"]])
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=n,
        do_sample=False,
        pad_token_id=tok.pad_token_id,
    )
    return out[0, ids.shape[1] :].tolist()


def _wait(reqs: list[GenerationRequest], timeout: float = 300.0) -> None:
    end = time.monotonic() + timeout
    while not all(r.done for r in reqs):
        assert time.monotonic() < end, "requests did not finish"
        time.sleep(0.01)


def test_greedy_tokens_on_the_triton_path_equal_generate(tiny_llama, tiny_tok, monkeypatch):
    from hotlora.kernels import triton_attention

    launches = {"paged_decode": 0, "varlen_prefill": 0}
    for name in launches:
        kernel = getattr(triton_attention, name)

        def counted(*args, _kernel=kernel, _name=name, **kw):
            launches[_name] += 1
            return _kernel(*args, **kw)

        monkeypatch.setattr(triton_attention, name, counted)
    runner = runner_from_model(tiny_llama, device=DEVICE)
    runner.attention_path = AttentionPath.TRITON  # CUDA's own; forced on a CPU
    # a 20-token prefill budget: the long prompt is read in chunks, each after the context before it
    engine = Engine(runner, tiny_tok, limits=EngineLimits(max_prefill_tokens=20))
    engine.start()
    try:
        shared = "The quick brown fox jumps over the lazy dog"  # 43 tokens: two full blocks of 16
        texts = ["a", shared, "b x"]
        reqs = [GenerationRequest(tiny_tok(t)["input_ids"], SamplingParams(max_new_tokens=6)) for t in texts]
        for r in reqs:
            engine.submit(r)
        _wait(reqs)
        hits = engine.blocks.hits
        # the prefix cache serves the shared prompt's first 32 tokens: the rest is a chunk after context
        again = GenerationRequest(tiny_tok(shared + "!")["input_ids"], SamplingParams(max_new_tokens=6))
        engine.submit(again)
        _wait([again])
    finally:
        engine.stop()
    assert engine.blocks.hits - hits == 32
    assert launches["paged_decode"] and launches["varlen_prefill"]  # the kernels served every layer
    for text, r in zip([*texts, shared + "!"], [*reqs, again], strict=True):
        assert r.output_ids == _generate(tiny_llama, tiny_tok, text, 6), text
