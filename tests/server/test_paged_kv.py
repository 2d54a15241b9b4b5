"""The paged KV cache as a user of the engine notices it: outputs never change (prefix hits, chunked prompts,
preemption, garbage in unused memory), no cache hit crosses tenants or adapters, long prompts and Embed
texts do not hold the engine, and joining or leaving copies nothing of the other sequences."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from hotlora.server.engine.requests import GenerationRequest, PoolingRequest
from hotlora.server.engine.runner import BlockManager, KVCacheConfig, runner_from_model
from hotlora.server.engine.sampling import SamplingParams
from hotlora.server.engine.scheduler import Engine, EngineLimits

from .test_engine import finish, hf_greedy, ids_of, wait

LONG = "The quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat. " * 2


@dataclass(frozen=True)
class FakeHandle:
    """An adapter handle as the engine sees it: only its key matters to the cache."""

    key: tuple


class Steps:
    """Observer: the kind and token count of every forward, in order."""

    def __init__(self):
        self.forwards: list[tuple[str, int, int]] = []

    def forward_finished(self, kind, rows, tokens, seconds):
        self.forwards.append((kind, rows, tokens))

    def __getattr__(self, name):
        return lambda *a, **k: None


@pytest.fixture
def engines(tiny_llama, tiny_tok):
    made: list[Engine] = []

    def make(kv_bytes=64 << 20, block_size=16, **kw) -> Engine:
        runner = runner_from_model(tiny_llama, kv_bytes=kv_bytes, block_size=block_size)
        eng = Engine(runner, tiny_tok, **kw)
        made.append(eng)
        eng.start()
        return eng

    yield make
    for eng in made:
        eng.stop()


def greedy(tok, text, n, tenant="default", adapter=None) -> GenerationRequest:
    req = GenerationRequest(ids_of(tok, text), SamplingParams(max_new_tokens=n), tenant=tenant)
    req.adapter = adapter
    return req


def run(eng, req) -> list[int]:
    eng.submit(req)
    return finish(req).output_ids


def test_garbage_in_unused_cache_memory_never_reaches_an_output(engines, tiny_llama, tiny_tok):
    """Attention reads whole blocks and masks their unwritten tail; uninitialised memory may hold NaN, and
    0 x NaN is NaN. Blocks are zeroed when handed out, so a pool full of NaN still decodes correctly."""
    eng = engines()
    eng.runner.pool.data.fill_(float("nan"))
    eng.runner.pool.zero_blocks([0])
    # prompts that end inside a block, and ones that fill their blocks whole (those are written, not
    # zeroed, and the next block is handed out by a decode step)
    texts = ["zzz", "a", "b x"] + ["q" * (n - len(ids_of(tiny_tok, ""))) for n in (31, 32, 33, 48)]
    for text in texts:
        assert run(eng, greedy(tiny_tok, text, 40)) == hf_greedy(tiny_llama, tiny_tok, text, 40)


def test_a_fresh_block_the_step_fills_whole_is_written_not_zeroed(engines):
    pool = engines().runner.pool
    bs = pool.block_size
    pool.data.fill_(float("nan"))
    written = list(range(5 * bs, 6 * bs)) + [6 * bs, 6 * bs + 1]  # block 5 whole, block 6 in part
    pool.zero_blocks([5, 6, 7], written)
    assert pool.k[0][5].isnan().all()  # the step writes every position of it
    assert (pool.k[0][6] == 0).all() and (pool.v[1][7] == 0).all()  # masked tails must be finite


def test_prefix_hit_gives_identical_output_and_skips_the_cached_tokens(engines, tiny_llama, tiny_tok):
    steps = Steps()
    eng = engines(observer=steps)
    first = run(eng, greedy(tiny_tok, LONG + "A", 12))
    prompt_tokens = len(ids_of(tiny_tok, LONG + "B"))
    before = len(steps.forwards)
    second = run(eng, greedy(tiny_tok, LONG + "B", 12))
    assert eng.blocks.hits >= 16 * (len(ids_of(tiny_tok, LONG)) // 16) - 16
    assert second == hf_greedy(tiny_llama, tiny_tok, LONG + "B", 12)
    assert first == hf_greedy(tiny_llama, tiny_tok, LONG + "A", 12)
    computed = sum(t for kind, _, t in steps.forwards[before:] if kind == "prefill")
    assert computed < prompt_tokens - 100  # the shared prefix was not computed again


def test_no_prefix_hit_across_tenants_or_adapters(engines, tiny_tok):
    eng = engines()
    run(eng, greedy(tiny_tok, LONG + "A", 4, tenant="alice"))
    run(eng, greedy(tiny_tok, LONG + "B", 4, tenant="bob"))
    assert eng.blocks.hits == 0, "another tenant's blocks were reused"
    run(eng, greedy(tiny_tok, LONG + "C", 4, tenant="alice", adapter=FakeHandle(("alice", "x", 1))))
    assert eng.blocks.hits == 0, "the base model's blocks were reused under an adapter"
    run(eng, greedy(tiny_tok, LONG + "D", 4, tenant="alice", adapter=FakeHandle(("alice", "x", 2))))
    assert eng.blocks.hits == 0, "another adapter version's blocks were reused"
    run(eng, greedy(tiny_tok, LONG + "E", 4, tenant="alice"))
    assert eng.blocks.hits > 0  # the same tenant and adapter do hit


def test_chunked_prompt_equals_unchunked_and_lets_decode_interleave(engines, tiny_llama, tiny_tok):
    steps = Steps()
    eng = engines(observer=steps, limits=EngineLimits(max_prefill_tokens=8))
    short = greedy(tiny_tok, "a", 40)
    eng.submit(short)
    wait(lambda: len(short.output_ids) >= 2, what="the short request decoding")
    long = greedy(tiny_tok, LONG, 10)
    eng.submit(long)
    finish(long)
    finish(short)
    assert long.output_ids == hf_greedy(tiny_llama, tiny_tok, LONG, 10)
    assert short.output_ids == hf_greedy(tiny_llama, tiny_tok, "a", 40)
    prefills = [(rows, t) for kind, rows, t in steps.forwards if kind == "prefill"]
    assert len(prefills) >= len(ids_of(tiny_tok, LONG)) // 8  # the prompt was read 8 tokens at a time
    assert all(t <= 8 + rows for rows, t in prefills)  # never more than the budget (plus decode rows)
    assert any(rows >= 2 for rows, _ in prefills)  # the short request decoded in those same steps


def test_preemption_under_a_tiny_cache_keeps_every_output(engines, tiny_llama, tiny_tok):
    bytes_per_token = 2 * 2 * 2 * 16 * 4  # K and V, 2 layers, 2 kv heads, head dim 16, fp32
    eng = engines(kv_bytes=14 * 16 * bytes_per_token, block_size=16)  # 13 usable blocks of 16 tokens
    texts = ["a", "b", "b x", "zz"]
    reqs = [greedy(tiny_tok, t, 60) for t in texts]
    for r in reqs:
        eng.submit(r)
    for r, t in zip(reqs, texts, strict=True):
        assert finish(r, 60).output_ids == hf_greedy(tiny_llama, tiny_tok, t, 60)
    assert eng.preemptions > 0, "4 sequences of ~62 tokens need 16 blocks: some were preempted"


def test_a_prompt_the_whole_cache_cannot_hold_is_refused(engines, tiny_tok):
    from hotlora.adapters.errors import ResourceExhausted

    eng = engines(kv_bytes=4 * 16 * 512, block_size=16)
    with pytest.raises(ResourceExhausted, match="--kv-cache-bytes"):
        eng.submit(greedy(tiny_tok, LONG, 400))


def test_long_embed_is_chunked_and_does_not_hold_another_tenants_generate(engines, tiny_llama, tiny_tok):
    steps = Steps()
    eng = engines(observer=steps, limits=EngineLimits(max_prefill_tokens=16))
    texts = [LONG * 2, LONG + "x", LONG * 2 + "y"]
    inputs = [ids_of(tiny_tok, t) for t in texts]
    embed = PoolingRequest(inputs, "mean", tenant="alice")
    eng.submit(embed)
    wait(lambda: len(steps.forwards) >= 2, what="the embed to start")
    gen = greedy(tiny_tok, "a", 2, tenant="bob")
    eng.submit(gen)
    finish(gen)
    assert not embed.future.done(), "bob's 2-token request waited for all of alice's texts"
    out = embed.future.result(timeout=30)
    with torch.no_grad():
        for row, ids in zip(out, inputs, strict=True):
            h = tiny_llama.model(torch.tensor([ids])).last_hidden_state[0]
            torch.testing.assert_close(row, h.mean(0), atol=1e-4, rtol=1e-4)
    assert max(t for _, _, t in steps.forwards) <= 16 + 1


def test_joining_and_leaving_copy_nothing_of_a_running_sequence(engines, tiny_tok):
    eng = engines()
    long = greedy(tiny_tok, LONG, 200)
    eng.submit(long)
    wait(lambda: len(long.output_ids) >= 20, what="decoding")
    seq = next(s for s in eng._running if s.req is long)
    blocks = list(seq.kv.blocks[:2])
    k_before = eng.runner.pool.k[0][blocks].clone()
    others = [greedy(tiny_tok, t, 5) for t in ("a", "b", "b x")]
    for r in others:
        eng.submit(r)
    for r in others:
        finish(r)
    assert seq.kv.blocks[:2] == blocks  # same blocks, same place
    assert torch.equal(eng.runner.pool.k[0][blocks], k_before)  # same contents
    long.cancel()
    finish(long)


# ---- the block manager itself -----------------------------------------------------------------


def test_block_manager_reuses_only_full_blocks_of_the_same_key_and_evicts_them_last():
    bm = BlockManager(KVCacheConfig(block_size=4, num_blocks=6))  # 5 usable blocks
    prompt = list(range(10))
    a = bm.open("k", prompt)
    assert a.num_cached == 0 and bm.grow(a, 10) and len(a.blocks) == 3
    first_two = a.blocks[:2]
    bm.commit(a, prompt, 10)  # the 2 full blocks are registered, the partial third is not
    bm.close(a)
    assert bm.num_free == 5  # cached but unused blocks count as free
    b = bm.open("k", prompt + [99])
    assert b.num_cached == 8 and b.blocks == first_two
    assert bm.open("other", prompt).num_cached == 0
    c = bm.open("k", prompt[:8])
    assert c.num_cached == 4  # at most len - 1 tokens come from the cache: the last is computed
    assert bm.num_free == 3
    big = bm.open("x", (), lookup=False)
    assert not bm.grow(big, 16) and big.blocks == [] and bm.num_free == 3  # short: nothing taken
    bm.close(b)
    bm.close(c)
    d = bm.open("y", (), lookup=False)
    assert bm.grow(d, 20)  # every block: the cached ones are taken last, when nothing else is free
    assert bm.open("k", prompt).num_cached == 0  # evicted: no stale hit
