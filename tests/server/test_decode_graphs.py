"""Decode steps with static shapes (runner.decode_graphs): padding a batch to its bucket and a block table to
its width must change no output, with or without adapters, while sequences join and leave. On CPU the
static path runs eagerly; on a GPU (tests marked `gpu`) the same steps are captured and replayed as CUDA
graphs and must give the tokens of the eager engine."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch

from hotlora.adapters.lora_layers import make_lora_sites
from hotlora.adapters.runtime import MultiLoraRuntime, SlotContents
from hotlora.adapters.weights import LoraModule, LoraWeights
from hotlora.kernels import block_weights
from hotlora.server.engine.runner import runner_from_model
from hotlora.server.engine.runner.decode_graphs import BATCH_BUCKETS, StaticDecode, batch_bucket, width_bucket
from hotlora.server.engine.runner.model import FUSED
from hotlora.server.engine.scheduler import Engine
from tests.kernels.test_block_weights import gguf_values

from .test_engine import finish, gen_req, hf_greedy

PROMPTS = ["a", "The quick brown fox jumps", "Once upon a time in a land far away there lived", "b x", "zz"]
SLOTS = 4
RANK = 8


def test_buckets_cover_every_batch_up_to_the_largest():
    assert [batch_bucket(n) for n in (1, 2, 3, 5, 33, 256)] == [1, 2, 4, 8, 64, 256]
    assert batch_bucket(BATCH_BUCKETS[-1] + 1) is None
    assert [width_bucket(n, 64) for n in (1, 2, 3, 9, 64, 65)] == [1, 2, 4, 16, 64, 64]


class CountingDecode(StaticDecode):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.rows: list[int] = []

    def run(self, ids, *rest):
        self.rows.append(len(ids))
        return super().run(ids, *rest)


@dataclass(frozen=True)
class Handle:
    key: tuple
    record: object = None  # what the cache would load from (SlotCache holds every adapter already)


class SlotCache:
    """The adapter cache as the runtime sees it: adapter key -> its slot, always resident."""

    def __init__(self, slots: dict):
        self.slots = slots

    def try_acquire(self, key, source):
        return self.slots[key]

    def release(self, key):
        pass

    def slot_of(self, key):
        return self.slots[key]

    def maintenance(self):
        pass


def _random_adapter(runner, seed: int) -> LoraWeights:
    g = torch.Generator().manual_seed(seed)
    shapes = runner.projection_shapes()
    modules = {}
    for layer in range(runner.spec.num_layers):
        for proj, names in FUSED.items():
            in_f, outs = shapes[proj]
            for name, out in zip(names, outs, strict=True):
                a = torch.randn(RANK, in_f, generator=g) / in_f**0.5
                b = torch.randn(out, RANK, generator=g) * 0.5
                modules[(layer, name)] = LoraModule(a, b, 2.0)
    names = tuple(sorted(n for ns in FUSED.values() for n in ns))
    return LoraWeights("CAUSAL_LM", RANK, 2.0 * RANK, names, modules)


def _runtime(runner, adapters: int) -> tuple[MultiLoraRuntime, list[Handle]]:
    shapes = runner.projection_shapes()
    layout = {p: (shapes[p][0], FUSED[p], shapes[p][1]) for p in FUSED}
    names = [n for ns in FUSED.values() for n in ns]
    ctx, sites = make_lora_sites(
        layout, runner.spec.num_layers, names, SLOTS, RANK, runner.device, runner.dtype, runner.dtype
    )
    runner.sites = sites
    contents = SlotContents(list(sites.values()), SLOTS, runner.device, runner.dtype)
    handles = [Handle(("t", f"a{i}", 1)) for i in range(adapters)]
    runtime = MultiLoraRuntime(ctx, contents, SlotCache({h.key: i for i, h in enumerate(handles)}), RANK)
    for i in range(adapters):
        contents.install(i, _random_adapter(runner, 100 + i))
    return runtime, handles


def _run_all(runner, tok, runtime, static, adapters, n=20):
    """Requests joining while others decode (3 at once, then 2 more), so batches of 1-5 rows occur."""
    eng = Engine(runner, tok, runtime=runtime, static_decode=static)
    eng.start()
    try:
        reqs = []
        for i, p in enumerate(PROMPTS):
            r = gen_req(tok, p, n + 3 * i, ignore_eos=True)
            r.adapter = adapters[i % len(adapters)] if adapters else None
            reqs.append(r)
        for r in reqs[:3]:
            eng.submit(r)
        finish(reqs[0])
        for r in reqs[3:]:
            eng.submit(r)
        return [finish(r).output_ids for r in reqs]
    finally:
        eng.stop()


def test_static_decode_on_cpu_equals_the_dynamic_engine_and_generate(tiny_llama, tiny_tok):
    runner = runner_from_model(tiny_llama)
    static = CountingDecode(runner, capture=False)
    got = _run_all(runner, tiny_tok, None, static, None)
    assert static.rows and len(set(static.rows)) > 1  # the static path ran, on several batch sizes
    assert any(batch_bucket(n) != n for n in static.rows)  # ... padded ones included
    for i, (p, out) in enumerate(zip(PROMPTS, got, strict=True)):
        assert out == hf_greedy(tiny_llama, tiny_tok, p, 20 + 3 * i), p


def test_static_decode_with_adapters_equals_the_dynamic_engine(tiny_llama, tiny_tok):
    runner = runner_from_model(tiny_llama)
    runtime, handles = _runtime(runner, 3)
    plain = _run_all(runner, tiny_tok, runtime, None, handles + [None])
    static = CountingDecode(runner, capture=False, lora_plan=runtime.graph_plan)
    got = _run_all(runner, tiny_tok, runtime, static, handles + [None])
    assert static.rows
    assert got == plain
    # and the adapters do change the output (the check above would pass if LoRA were skipped)
    base = _run_all(runner_from_model(tiny_llama), tiny_tok, None, None, None)
    assert got != base


def test_capture_needs_a_cuda_device(tiny_llama):
    with pytest.raises(ValueError, match="CUDA"):
        StaticDecode(runner_from_model(tiny_llama), capture=True)


@pytest.mark.gpu
def test_cuda_graph_decode_equals_eager_with_adapters(tiny_llama, tiny_tok):
    model = copy.deepcopy(tiny_llama).to("cuda")  # the fixture is shared with CPU tests
    runner = runner_from_model(model, dtype=torch.float32)
    runtime, handles = _runtime(runner, 3)
    eager = _run_all(runner, tiny_tok, runtime, None, handles + [None])
    graphs = CountingDecode(runner, capture=True, lora_plan=runtime.graph_plan)
    got = _run_all(runner, tiny_tok, runtime, graphs, handles + [None])
    assert graphs.rows and all(b.graph is not None for b in graphs._buckets.values())
    assert got == eager


@pytest.mark.skipif(block_weights.unavailable_reason() is not None, reason="no block-weight kernel here")
def test_static_decode_on_weights_kept_in_blocks_equals_the_dynamic_engine(tiny_llama, tiny_tok):
    # a checkpoint of GGUF values (as the default model's): the matrices and the embedding lookup run as
    # hotlora's block kernels on the static path as on the dynamic one
    model = copy.deepcopy(tiny_llama)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.copy_(gguf_values(p, "Q8_0" if "embed" in name else "Q4_1"))
    runner = runner_from_model(model, pack_exact_blocks=True)
    assert runner.w.packed_matrices[0] == runner.w.packed_matrices[1] > 0
    runtime, handles = _runtime(runner, 3)
    plain = _run_all(runner, tiny_tok, runtime, None, handles + [None])
    static = CountingDecode(runner, capture=False, lora_plan=runtime.graph_plan)
    got = _run_all(runner, tiny_tok, runtime, static, handles + [None])
    assert static.rows and got == plain
