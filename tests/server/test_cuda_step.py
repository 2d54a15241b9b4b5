"""On a GPU: the engine's steps make the host wait for the device once, to read the sampled tokens. Under
torch's sync debug mode set to "error", any other synchronising call in a step (a `.item()`, a copy from
pageable memory, a read of the slots) raises. Decode steps replay CUDA graphs; prefill steps run the Triton
attention eagerly; rows sample with controls and log-probabilities."""

from __future__ import annotations

import pytest
import torch

from hotlora.server.engine import logits_controls
from hotlora.server.engine.requests import GenerationRequest
from hotlora.server.engine.runner import runner_from_model
from hotlora.server.engine.runner.attention import AttentionPath
from hotlora.server.engine.runner.decode_graphs import StaticDecode
from hotlora.server.engine.sampling import SamplingParams
from hotlora.server.engine.scheduler import Engine, EngineLimits

pytestmark = pytest.mark.gpu


def test_engine_steps_on_cuda_synchronise_only_to_read_the_tokens(tiny_llama, tiny_tok, monkeypatch):
    runner = runner_from_model(tiny_llama, device="cuda", dtype=torch.bfloat16)
    assert runner.attention_path is AttentionPath.TRITON
    engine = Engine(
        runner, tiny_tok, limits=EngineLimits(max_prefill_tokens=16), static_decode=StaticDecode(runner, True)
    )  # not started: stepped here
    reads = []
    read_back = logits_controls.read_back

    def allowed_read(t):  # the step's one read: allowed, and counted
        torch.cuda.set_sync_debug_mode(0)
        try:
            reads.append(t.numel())
            return read_back(t)
        finally:
            torch.cuda.set_sync_debug_mode("error")

    monkeypatch.setattr(logits_controls, "read_back", allowed_read)
    decode = engine.static_decode
    capture = decode._capture

    def capture_allowed(bucket):  # capturing a new bucket's graph synchronises, once per bucket
        torch.cuda.set_sync_debug_mode(0)
        try:
            capture(bucket)
        finally:
            torch.cuda.set_sync_debug_mode("error")

    monkeypatch.setattr(decode, "_capture", capture_allowed)
    sampled = SamplingParams(
        max_new_tokens=12, temperature=0.8, top_k=20, top_p=0.9, seed=5, repetition_penalty=1.1, logprobs=2
    )
    first = [
        GenerationRequest(tiny_tok("The quick brown fox")["input_ids"], SamplingParams(max_new_tokens=12)),
        GenerationRequest(tiny_tok("a b c")["input_ids"], sampled),
    ]
    for r in first:
        engine.submit(r)
    with torch.inference_mode():
        for _ in range(4):  # warm-up: kernels compiled, the first graphs captured
            engine._serve_step()
        late = GenerationRequest(tiny_tok("Once upon a time, far away")["input_ids"], sampled)
        engine.submit(late)
        per_step = []
        torch.cuda.set_sync_debug_mode("error")
        try:
            while not all(r.done for r in [*first, late]) and len(per_step) < 60:
                before = len(reads)
                engine._serve_step()  # raises on any synchronising call but the read
                per_step.append(len(reads) - before)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert all(r.done and r.error is None for r in [*first, late])
    assert max(per_step) == 1 and sum(per_step) >= len(per_step) - 2, per_step
    assert len(late.output_logprobs) == 12
