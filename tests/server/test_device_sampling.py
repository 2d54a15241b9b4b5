"""Token choice stays on the device: the sampling and the logits controls run where the logits are, and a
step reads the device once (the token ids, with the log-probabilities asked for). The device here is the
CPU, on the same code path: `DeviceReads` follows every tensor computed from the model's output or sent
over by `device_io` (the "device" tensors) and counts each read of one back into Python (`tolist`, `item`,
`bool`, `int`, `float`, indexing with one, `numpy`), which on CUDA would make the host wait."""

from __future__ import annotations

import weakref

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from hotlora.server.engine import device_io
from hotlora.server.engine.guided import GrammarEngine, GuidedKind, GuidedSpec
from hotlora.server.engine.logits_controls import choose_tokens, record_prompt_logprobs
from hotlora.server.engine.requests import GenerationRequest
from hotlora.server.engine.runner import runner_from_model
from hotlora.server.engine.sampling import SamplingParams, make_generator
from hotlora.server.engine.scheduler import Engine, EngineLimits
from tests.tiny import VOCAB_SIZE, tiny_tokenizer

READS = {"tolist", "item", "__bool__", "__int__", "__float__", "__index__", "numpy"}


class DeviceReads(TorchFunctionMode):
    """Counts reads of device tensors back into Python. A tensor is a device tensor when it is one of
    `roots`, was sent by device_io.to_device, or was computed from a device tensor."""

    def __init__(self, roots=()):
        super().__init__()
        self._device: dict[int, weakref.ref] = {}
        self.reads: list[str] = []
        self.paused = False
        for t in roots:
            self.mark(t)

    def mark(self, t) -> None:
        if isinstance(t, torch.Tensor):
            self._device[id(t)] = weakref.ref(t)

    def is_device(self, t) -> bool:
        ref = self._device.get(id(t)) if isinstance(t, torch.Tensor) else None
        return ref is not None and ref() is t

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.paused:
            return out
        inputs, _ = tree_flatten((args, kwargs))
        if any(self.is_device(t) for t in inputs):
            name = getattr(func, "__name__", "")
            if name in READS:
                self.reads.append(name)
            for t in tree_flatten(out)[0]:
                self.mark(t)
        return out


@pytest.fixture
def reads(monkeypatch):
    """A DeviceReads that also marks what device_io sends."""
    mode = DeviceReads()
    send = device_io.to_device

    def to_device(host, device):
        out = send(host, device)
        mode.mark(out)
        return out

    monkeypatch.setattr(device_io, "to_device", to_device)
    return mode


def test_the_counter_sees_a_read_of_the_device(reads):
    logits = torch.randn(2, 5)
    reads.mark(logits)
    with reads:
        host = torch.tensor([1, 2])
        host.tolist()  # a host tensor: no read of the device
        if logits.argmax(-1)[0] >= 0:  # one
            pass
    assert reads.reads == ["__bool__"]


def test_choosing_tokens_with_every_control_reads_the_device_once(reads):
    grammar = GrammarEngine(tiny_tokenizer(), VOCAB_SIZE)
    choice = GuidedSpec(GuidedKind.CHOICE, ("yes", "no"))

    def req(out=(), matcher=None, **params):
        r = GenerationRequest([5, 6, 7], SamplingParams(**params), matcher=matcher)
        r.output_ids = list(out)
        return r

    reqs = [
        req(),  # greedy
        req(temperature=0.8, top_k=20, top_p=0.9, seed=1),
        req(out=(9, 9, 4), repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.2, logprobs=3),
        req(logit_bias=((11, 5.0),), min_tokens=4, logprobs=0, temperature=1.0),
        req(matcher=grammar.matcher(choice)),
    ]
    prompt = GenerationRequest(list(range(3, 40)), SamplingParams(prompt_logprobs=2))
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(len(reqs), VOCAB_SIZE, generator=gen) * 3
    chunk = torch.randn(16, VOCAB_SIZE, generator=gen)
    reads.mark(logits)
    reads.mark(chunk)
    with reads:
        pending = record_prompt_logprobs(prompt, chunk, 0)
        tokens, entries = choose_tokens(logits, reqs, [make_generator(i) for i in range(5)], {2}, [pending])
    assert reads.reads == ["tolist"]  # device_io.read_back: the one read of the step
    # what came back is what the host needs: token ids, the entries asked for, the prompt's entries
    assert tokens[0] == int(logits[0].argmax())
    assert [e is None for e in entries] == [True, True, False, False, True]
    assert entries[2].token_id == tokens[2] and len(entries[2].top) == 3 and entries[3].top == ()
    assert entries[2].logprob == pytest.approx(float(torch.log_softmax(logits[2], -1)[tokens[2]]))
    assert len(prompt.prompt_logprobs) == 16
    assert [e.token_id for e in prompt.prompt_logprobs] == list(range(4, 20))
    want = torch.log_softmax(chunk[3], -1)
    assert prompt.prompt_logprobs[3].logprob == pytest.approx(float(want[7]))
    assert [t for t, _ in prompt.prompt_logprobs[3].top] == torch.topk(want, 2).indices.tolist()
    assert tokens[4] in tiny_tokenizer()("yn")["input_ids"]


def test_an_engine_step_reads_the_device_once(reads, tiny_llama, tiny_tok):
    """The engine's steps around the forward (the batch's tensors, the new blocks' zeros, the rows to
    sample, the controls and sampling) read the device once when a step samples and never otherwise."""
    runner = runner_from_model(tiny_llama)
    engine = Engine(runner, tiny_tok, limits=EngineLimits(max_prefill_tokens=8))  # not started: stepped here
    forward, lm_head = runner.forward, runner._lm_head.forward

    def device_side(fn):  # the model's work is the device's own: not counted, its output is a device tensor
        def run(*args, **kw):
            reads.paused = True
            try:
                out = fn(*args, **kw)
            finally:
                reads.paused = False
            reads.mark(out)
            return out

        return run

    runner.forward = device_side(forward)
    runner._lm_head.forward = device_side(lm_head)
    sampled = dict(temperature=0.9, top_p=0.8, seed=3, repetition_penalty=1.1, logprobs=2)
    reqs = [
        GenerationRequest(tiny_tok("The quick brown fox")["input_ids"], SamplingParams(max_new_tokens=4)),
        GenerationRequest(tiny_tok("ab")["input_ids"], SamplingParams(max_new_tokens=4, **sampled)),
    ]
    for r in reqs:
        engine.submit(r)
    per_step = []
    with torch.inference_mode(), reads:
        while not all(r.done for r in reqs) and len(per_step) < 40:
            before = len(reads.reads)
            outputs = sum(len(r.output_ids) for r in reqs)
            engine._serve_step()
            per_step.append((len(reads.reads) - before, sum(len(r.output_ids) for r in reqs) > outputs))
    assert all(r.done for r in reqs)
    assert any(not sampled for _, sampled in per_step)  # steps that only read prompts happened
    for n, sampled in per_step:
        assert n == (1 if sampled else 0), per_step
    assert len(reqs[1].output_logprobs) == 4
