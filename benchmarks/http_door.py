"""Figures of the OpenAI-compatible HTTP door (issue 14) on the default model, one in-process server:

(a) structured-output overhead: tokens/s of 16 concurrent /v1/chat/completions with a JSON-schema
    `response_format` over 16 free ones (same prompts, 32 new tokens each: min_tokens = max_tokens, and a
    schema whose shortest answer is longer than that, so both generate every token); goal >= 0.9;
(b) the door's cost: tokens/s of 32 concurrent greedy /v1/completions (the official `openai` client,
    non-streaming) over 32 concurrent hotlora.v1 Generate calls (gRPC), 32 new tokens, ignore_eos;
    goal >= 0.95;
(c) the grammar engines' own cost per token on this tokenizer: llguidance (used) and xgrammar (when it
    is installed: it is not a dependency), mask computation and mask application, one row.

Rounds alternate between the two sides of each ratio and the medians are compared: the machine is
shared, so absolute tokens/s move between runs.

    .venv/bin/python benchmarks/http_door.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from importlib.metadata import version

import grpc
import openai
from hotlora.server.app import HotloraServer
from hotlora.server.config import ServerConfig
from hotlora.v1 import common_pb2, inference_pb2, inference_pb2_grpc

NEW_TOKENS = 32
SCHEMA = {
    "type": "object",
    "properties": {"title": {"type": "string", "minLength": 400}, "year": {"type": "integer"}},
    "required": ["title", "year"],
    "additionalProperties": False,
}
TOPICS = ["a lighthouse", "a lost robot", "the river town", "a clockmaker", "the last dragon", "a library",
          "an old sailor", "the mountain pass", "a painter", "the caravan", "a garden", "the market",
          "an astronomer", "the mill", "a circus", "the forest"]  # fmt: skip
PROMPTS = [f"Describe {t} and the year it was founded, as JSON." for t in TOPICS]


def concurrently(fn, n: int) -> tuple[float, int]:
    """fn(i) -> tokens, for i in range(n) at once; (seconds, tokens)."""
    counts = [0] * n
    errors: list[BaseException] = []
    barrier = threading.Barrier(n + 1)

    def one(i: int) -> None:
        barrier.wait()
        try:
            counts[i] = fn(i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - t0, sum(counts)


def chat(c: openai.OpenAI, model: str, i: int, constrained: bool) -> int:
    extra = {"min_tokens": NEW_TOKENS}
    if constrained:
        extra["response_format"] = {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}}
    resp = c.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
        max_tokens=NEW_TOKENS,
        temperature=0,
        extra_body=extra,
    )
    if constrained:
        assert resp.choices[0].message.content.startswith('{"title":"'), resp.choices[0].message.content
    return resp.usage.completion_tokens


def completion(c: openai.OpenAI, model: str, i: int) -> int:
    resp = c.completions.create(
        model=model,
        prompt=f"Story {i}: " + PROMPTS[i % len(PROMPTS)],
        max_tokens=NEW_TOKENS,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    return resp.usage.completion_tokens


def generate(stub, i: int) -> int:
    req = inference_pb2.GenerateRequest(
        prompt=f"Story {i}: " + PROMPTS[i % len(PROMPTS)],
        params=common_pb2.SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True),
    )
    return len(stub.Generate(req, timeout=600).token_ids)


def rate(result: tuple[float, int]) -> float:
    seconds, tokens = result
    return tokens / seconds


def grammar_costs(tokenizer, vocab: int) -> list[str]:
    """Per-token mask cost of each engine on a fixed JSON answer (warm, best of three)."""
    import numpy as np
    import torch

    schema = {
        "type": "object",
        "properties": {"title": {"type": "string"}, "year": {"type": "integer"}},
        "required": ["title", "year"],
        "additionalProperties": False,
    }
    answer = json.dumps({"title": "The Lighthouse of the North " * 3, "year": 1871}, separators=(",", ":"))
    ids = tokenizer(answer)["input_ids"]
    logits = torch.randn(1, vocab)
    lines = []

    import llguidance
    import llguidance.hf
    import llguidance.torch as llt

    tok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab)
    grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
    best = (1e9, 1e9)
    for _ in range(3):
        m = llguidance.LLMatcher(tok, grammar)
        mask_s = apply_s = 0.0
        bitmask = torch.zeros((1, (vocab + 31) // 32), dtype=torch.int32)
        for t in ids:
            t0 = time.perf_counter()
            llt.fill_next_token_bitmask(m, bitmask, 0)
            t1 = time.perf_counter()
            bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little")[:, :vocab]
            logits.clone().masked_fill_(torch.from_numpy(bits == 0), float("-inf"))
            t2 = time.perf_counter()
            assert m.consume_token(t), m.get_error()
            mask_s, apply_s = mask_s + t1 - t0, apply_s + t2 - t1
        best = min(best, (mask_s / len(ids), apply_s / len(ids)))
    lines.append(f"llguidance {version('llguidance')}: "
                 f"mask {best[0] * 1e6:.0f} us + apply {best[1] * 1e6:.0f} us per token")  # fmt: skip
    try:
        import xgrammar as xgr
    except ImportError:
        lines.append("xgrammar: not installed (pip install xgrammar to compare)")
        return lines
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab)
    compiled = xgr.GrammarCompiler(info).compile_json_schema(json.dumps(schema), any_whitespace=False)
    ids = tokenizer(json.dumps(json.loads(answer)))["input_ids"]  # xgrammar's separators are ", " and ": "
    best = (1e9, 1e9)
    bitmask = xgr.allocate_token_bitmask(1, vocab)
    for _ in range(3):
        m = xgr.GrammarMatcher(compiled)
        mask_s = apply_s = 0.0
        for t in ids:
            t0 = time.perf_counter()
            m.fill_next_token_bitmask(bitmask)
            t1 = time.perf_counter()
            xgr.apply_token_bitmask_inplace(logits.clone(), bitmask)
            t2 = time.perf_counter()
            assert m.accept_token(t)
            mask_s, apply_s = mask_s + t1 - t0, apply_s + t2 - t1
        best = min(best, (mask_s / len(ids), apply_s / len(ids)))
    mask_us, apply_us = best[0] * 1e6, best[1] * 1e6
    lines.append(f"xgrammar {version('xgrammar')}: mask {mask_us:.0f} us + apply {apply_us:.0f} us per token")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="hotlora-bench-http-") as data_dir:
        cfg = ServerConfig(port=0, metrics_port=-1, http_port=0, data_dir=data_dir, grace_seconds=1.0)
        server = HotloraServer(cfg)
        server.start()
        server.load()
        try:
            model = server.state.loaded.name
            c = openai.OpenAI(base_url=f"http://127.0.0.1:{server.http_port}/v1", api_key="-", max_retries=0)
            channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
            stub = inference_pb2_grpc.InferenceStub(channel)
            # warm-up: both doors, both kinds (the grammar engine builds its tokenizer once)
            concurrently(lambda i: chat(c, model, i, True), 4)
            concurrently(lambda i: chat(c, model, i, False), 4)
            concurrently(lambda i: completion(c, model, i), 4)
            concurrently(lambda i: generate(stub, i), 4)
            guided, free, http, grpc_ = [], [], [], []
            for r in range(args.rounds):
                free.append(rate(concurrently(lambda i: chat(c, model, i, False), 16)))
                guided.append(rate(concurrently(lambda i: chat(c, model, i, True), 16)))
                grpc_.append(rate(concurrently(lambda i: generate(stub, i), 32)))
                http.append(rate(concurrently(lambda i: completion(c, model, i), 32)))
                print(
                    f"round {r + 1}: 16 free {free[-1]:.0f} tok/s, 16 JSON-schema {guided[-1]:.0f} tok/s; "
                    f"32 gRPC {grpc_[-1]:.0f} tok/s, 32 HTTP {http[-1]:.0f} tok/s",
                    flush=True,
                )
            channel.close()
            med = statistics.median
            print(f"(a) structured output: JSON-schema / free = {med(guided) / med(free):.2f}x (goal >= 0.9)")
            print(f"(b) HTTP door / gRPC at N=32 = {med(http) / med(grpc_):.2f}x (goal >= 0.95)")
            print("(c) grammar engines, warm, one row:")
            for line in grammar_costs(server.state.loaded.tokenizer, server.state.frontend.vocab_size):
                print("    " + line)
        finally:
            server.shutdown(grace=1.0)


if __name__ == "__main__":
    main()
