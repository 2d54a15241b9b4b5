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
import time
from importlib.metadata import version

import grpc
import openai
from concurrent_calls import concurrently  # benchmarks/concurrent_calls.py

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


# (schema, an answer that matches it): structure-heavy (enums, an array) and content-heavy (a long string)
GRAMMAR_CASES = {
    "structured": (
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 20},
                "age": {"type": "integer"},
                "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b", "c"]}},
            },
            "required": ["name", "age", "tags"],
            "additionalProperties": False,
        },
        {"name": "Alice Smith", "age": 42, "tags": ["a", "c", "b", "a"]},
    ),
    "long string": (
        {
            "type": "object",
            "properties": {"title": {"type": "string"}, "year": {"type": "integer"}},
            "required": ["title", "year"],
            "additionalProperties": False,
        },
        {"title": "The Lighthouse of the North " * 3, "year": 1871},
    ),
}


def _per_token(step, ids: list[int], make) -> tuple[float, float]:
    """Best of three walks through `ids`: (mask seconds, apply seconds) per token."""
    best = (1e9, 1e9)
    for _ in range(3):
        state = make()
        mask_s = apply_s = 0.0
        for t in ids:
            dm, da = step(state, t)
            mask_s, apply_s = mask_s + dm, apply_s + da
        best = min(best, (mask_s / len(ids), apply_s / len(ids)))
    return best


def grammar_costs(tokenizer, vocab: int) -> list[str]:
    """Per-token cost of each engine, one row, warm: computing the token mask, and applying it to the
    logits (llguidance: as hotlora applies it, hotlora.server.engine.guided.mask_rows)."""
    import torch

    from hotlora.server.engine.guided import GrammarEngine, GuidedKind, GuidedSpec, mask_rows

    logits = torch.randn(1, vocab)
    engine = GrammarEngine(tokenizer, vocab)
    lines = []
    try:
        import xgrammar as xgr

        compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab))
    except ImportError:
        xgr = None
    for case, (schema, answer) in GRAMMAR_CASES.items():
        spec = GuidedSpec(GuidedKind.JSON_SCHEMA, json.dumps(schema))

        def llg_step(m, t):
            t0 = time.perf_counter()
            row = logits.clone()
            mask_rows(row, [0], [m])  # fill + apply together; the fill alone is timed below
            t1 = time.perf_counter()
            assert m.accept(t)
            return 0.0, t1 - t0

        ids = tokenizer(json.dumps(answer, separators=(",", ":")))["input_ids"]
        total = sum(_per_token(llg_step, ids, lambda spec=spec: engine.matcher(spec)))

        def llg_fill(m, t):
            import llguidance.torch as llt

            bitmask = torch.zeros((1, (vocab + 31) // 32), dtype=torch.int32)
            t0 = time.perf_counter()
            llt.fill_next_token_bitmask(m.ll, bitmask, 0)
            t1 = time.perf_counter()
            assert m.accept(t)
            return t1 - t0, 0.0

        fill = _per_token(llg_fill, ids, lambda spec=spec: engine.matcher(spec))[0]
        lines.append(
            f"{case}: llguidance {version('llguidance')} mask {fill * 1e6:.0f} us + apply "
            f"{(total - fill) * 1e6:.0f} us per token"
        )
        if xgr is None:
            continue
        compiled = compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)
        bitmask = xgr.allocate_token_bitmask(1, vocab)

        def xgr_step(m, t, bitmask=bitmask):
            t0 = time.perf_counter()
            m.fill_next_token_bitmask(bitmask)
            t1 = time.perf_counter()
            xgr.apply_token_bitmask_inplace(logits.clone(), bitmask)
            t2 = time.perf_counter()
            assert m.accept_token(t)
            return t1 - t0, t2 - t1

        ids = tokenizer(json.dumps(answer))["input_ids"]  # xgrammar's separators are ", " and ": "
        mask_s, apply_s = _per_token(xgr_step, ids, lambda compiled=compiled: xgr.GrammarMatcher(compiled))
        lines.append(
            f"{case}: xgrammar {version('xgrammar')} mask {mask_s * 1e6:.0f} us + apply "
            f"{apply_s * 1e6:.0f} us per token"
        )
    if xgr is None:
        lines.append("xgrammar: not installed (pip install xgrammar to compare)")
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
