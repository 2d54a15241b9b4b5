"""The scheduler, driven directly with the tiny random Llama: what a caller of the engine
notices (tokens, finish reasons, freed rows, errors), never how the loop does it.

Over 400 lines: each test is short and independent; they share the tiny model built once per module."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from hotlora.adapters.errors import ResourceExhausted, Unavailable
from hotlora.server.engine.requests import GenerationRequest, PoolingRequest
from hotlora.server.engine.runner import runner_from_model
from hotlora.server.engine.sampling import SamplingParams
from hotlora.server.engine.scheduler import BaseOnlyRuntime, Engine, EngineLimits

# Byte-level prompts of different lengths; greedy decoding of these does not reach EOS
# for 1000 tokens (checked against model.generate), so they run as long as asked.
LONG_RUNNERS = ["a", "b", "The quick brown fox jumps"]
PROMPTS = ["a", "The quick brown fox jumps", "Once upon a time in a land far away there lived", "b x"]


class BatchSizes:
    """Observer that records the rows of every decode forward."""

    def __init__(self):
        self.decode_rows: list[int] = []

    def forward_finished(self, kind, rows, tokens, seconds):
        if kind == "decode":
            self.decode_rows.append(rows)

    def request_finished(self, req):
        pass

    def __getattr__(self, name):  # any other observer hook: ignored
        return lambda *a, **k: None


class FailOnceRuntime(BaseOnlyRuntime):
    """Base-only runtime whose next forward raises once `arm()` was called."""

    def __init__(self):
        self.armed = threading.Event()

    def arm(self):
        self.armed.set()

    def begin_forward(self, token_slots):
        if self.armed.is_set():
            self.armed.clear()
            raise RuntimeError("injected failure")


@pytest.fixture
def make_engine(tiny_llama, tiny_tok):
    engines: list[Engine] = []

    def make(**kw) -> Engine:
        start = kw.pop("start", True)
        eng = Engine(runner_from_model(tiny_llama, **kw.pop("runner_kw", {})), tiny_tok, **kw)
        engines.append(eng)
        if start:
            eng.start()
        return eng

    yield make
    for eng in engines:
        eng.stop()


def ids_of(tok, text: str) -> list[int]:
    return tok(text)["input_ids"]


def gen_req(tok, text: str, n: int = 24, **params) -> GenerationRequest:
    return GenerationRequest(ids_of(tok, text), SamplingParams(max_new_tokens=n, **params))


def wait(pred, timeout: float = 60.0, what: str = "condition") -> None:  # a bound, not a budget
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.002)


def finish(req: GenerationRequest, timeout: float = 60.0) -> GenerationRequest:
    wait(lambda: req.done, timeout, f"request {req.seq} to finish")
    return req


def drain_events(req: GenerationRequest):
    events = []
    while not req.events.empty():
        events.append(req.events.get_nowait())
    return events


def hf_greedy(model, tok, text: str, n: int) -> list[int]:
    ids = torch.tensor([ids_of(tok, text)])
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=n,
        do_sample=False,
        pad_token_id=tok.pad_token_id,
    )
    return out[0, ids.shape[1] :].tolist()


def run_alone(make_engine, tok, text, n, **params) -> list[int]:
    eng = make_engine()
    req = gen_req(tok, text, n, **params)
    eng.submit(req)
    finish(req)
    eng.stop()
    return req.output_ids


# ---- greedy correctness ----------------------------------------------------------------


@pytest.mark.parametrize("text", ["zzz", *PROMPTS])
def test_greedy_equals_transformers_generate(make_engine, tiny_llama, tiny_tok, text):
    eng = make_engine()
    req = gen_req(tiny_tok, text, 40)
    eng.submit(req)
    finish(req)
    assert req.output_ids == hf_greedy(tiny_llama, tiny_tok, text, 40)


def test_eos_finishes_like_transformers(make_engine, tiny_llama, tiny_tok):
    # "zzz" reaches EOS after ~200 tokens: generation stops there, EOS included, reason eos
    eng = make_engine()
    req = gen_req(tiny_tok, "zzz", 400)
    eng.submit(req)
    finish(req)
    expected = hf_greedy(tiny_llama, tiny_tok, "zzz", 400)
    assert req.finish_reason == "eos"
    assert req.output_ids == expected and expected[-1] == tiny_tok.eos_token_id
    assert len(req.output_ids) < 400
    assert req.text == tiny_tok.decode(expected, skip_special_tokens=True)


def test_ignore_eos_generates_past_eos_to_max_new_tokens(make_engine, tiny_llama, tiny_tok):
    eng = make_engine()
    req = GenerationRequest(tiny_tok("zzz")["input_ids"], SamplingParams(max_new_tokens=400, ignore_eos=True))
    eng.submit(req)
    finish(req)
    stops_at = hf_greedy(tiny_llama, tiny_tok, "zzz", 400)
    assert req.finish_reason == "length" and len(req.output_ids) == 400
    assert req.output_ids[: len(stops_at)] == stops_at  # same tokens up to and including the EOS


def test_batched_with_joiners_equals_alone(make_engine, tiny_tok):
    lengths = [60, 25, 40, 33]
    alone = [run_alone(make_engine, tiny_tok, p, n) for p, n in zip(PROMPTS, lengths, strict=True)]

    sizes = BatchSizes()
    eng = make_engine(observer=sizes)
    reqs = [gen_req(tiny_tok, p, n) for p, n in zip(PROMPTS, lengths, strict=True)]
    eng.submit(reqs[0])
    wait(lambda: len(reqs[0].output_ids) >= 5, what="first request decoding")
    eng.submit(reqs[1])  # joins while the first decodes
    wait(lambda: len(reqs[1].output_ids) >= 3, what="second request decoding")
    eng.submit(reqs[2])  # two join together, with different prompt lengths
    eng.submit(reqs[3])
    for r in reqs:
        finish(r)

    assert max(sizes.decode_rows) >= 3, "the requests never shared a decode step"
    for r, expected in zip(reqs, alone, strict=True):
        assert r.finish_reason == "length"
        assert r.output_ids == expected
    assert eng.num_running == 0


def test_short_request_leaves_without_disturbing_others(make_engine, tiny_tok):
    alone = run_alone(make_engine, tiny_tok, "a", 50)
    eng = make_engine()
    long, short = gen_req(tiny_tok, "a", 50), gen_req(tiny_tok, "Once upon a time", 3)
    eng.submit(long)
    eng.submit(short)
    finish(short)
    assert len(short.output_ids) == 3 and short.finish_reason == "length"
    assert not long.done  # nobody waits for anybody: the short one left first
    finish(long)
    assert long.output_ids == alone


# ---- cancellation, deadlines, limits -----------------------------------------------------


def test_cancel_frees_the_row_and_others_finish(make_engine, tiny_tok):
    other_alone = run_alone(make_engine, tiny_tok, "b", 30)
    eng = make_engine()
    victim = gen_req(tiny_tok, "a", 1000)
    eng.submit(victim)
    wait(lambda: len(victim.output_ids) >= 3, what="victim decoding")
    other = gen_req(tiny_tok, "b", 30)
    eng.submit(other)
    wait(lambda: eng.num_running == 2, what="both running")
    victim.cancel()
    wait(lambda: victim.done, 60.0, "the cancelled request to finish")
    assert victim.finish_reason == "cancelled"
    assert len(victim.output_ids) < 1000
    wait(lambda: eng.num_running <= 1, 60.0, "the cancelled row to leave the batch")
    finish(other)
    assert other.output_ids == other_alone
    later = gen_req(tiny_tok, "b", 30)
    eng.submit(later)
    finish(later)
    assert later.output_ids == other_alone
    assert eng.num_running == 0
    # the last event tells a streaming caller why it ended
    assert drain_events(victim)[-1].finish_reason == "cancelled"


def test_cancelled_while_queued_never_runs(make_engine, tiny_tok):
    eng = make_engine(start=False)
    req = gen_req(tiny_tok, "a", 10)
    eng.submit(req)
    req.cancel()
    eng.start()
    finish(req)
    assert req.finish_reason == "cancelled" and req.output_ids == []


def test_deadline_expires_a_running_request(make_engine, tiny_tok):
    eng = make_engine()
    req = gen_req(tiny_tok, "a", 1000)
    req.deadline = time.monotonic() + 0.3
    t0 = time.monotonic()
    eng.submit(req)
    finish(req)
    assert req.finish_reason == "deadline"
    assert 0 < len(req.output_ids) < 1000
    assert time.monotonic() - t0 < 2.0
    wait(lambda: eng.num_running == 0, 60.0, "the expired row to leave")


def test_deadline_expires_a_queued_request(make_engine, tiny_tok):
    eng = make_engine(start=False)
    req = gen_req(tiny_tok, "a", 10)
    req.deadline = time.monotonic() - 0.01
    eng.submit(req)
    eng.start()
    finish(req)
    assert req.finish_reason == "deadline" and req.output_ids == []


def test_queue_limits_raise_resource_exhausted(make_engine, tiny_tok):
    eng = make_engine(start=False, limits=EngineLimits(max_queue=3, max_queue_per_tenant=2))
    reqs = [gen_req(tiny_tok, "a", 4) for _ in range(4)]
    for r in reqs[:2]:
        r.tenant = "alice"
    reqs[2].tenant = reqs[3].tenant = "bob"
    eng.submit(reqs[0])
    eng.submit(reqs[1])
    extra = gen_req(tiny_tok, "a", 4)
    extra.tenant = "alice"
    with pytest.raises(ResourceExhausted, match="per-tenant limit"):
        eng.submit(extra)
    eng.submit(reqs[2])  # another tenant still gets in
    with pytest.raises(ResourceExhausted, match="queue is full"):
        eng.submit(reqs[3])
    eng.start()  # the queued ones are served once the engine runs
    for r in reqs[:3]:
        finish(r)
        assert r.finish_reason == "length" and len(r.output_ids) == 4


def test_max_batch_size_bounds_running_rows(make_engine, tiny_tok):
    sizes = BatchSizes()
    eng = make_engine(observer=sizes, limits=EngineLimits(max_batch_size=2))
    reqs = [gen_req(tiny_tok, p, 12) for p in PROMPTS]
    for r in reqs:
        eng.submit(r)
    for r in reqs:
        finish(r)
        assert len(r.output_ids) == 12
    assert max(sizes.decode_rows) == 2


def test_drain_refuses_new_work(make_engine, tiny_tok):
    eng = make_engine()
    eng.drain()
    with pytest.raises(Unavailable, match="shutting down"):
        eng.submit(gen_req(tiny_tok, "a", 4))


# ---- finish reasons ------------------------------------------------------------------


def test_max_new_tokens_gives_length(make_engine, tiny_tok):
    eng = make_engine()
    req = gen_req(tiny_tok, "a", 7)
    eng.submit(req)
    finish(req)
    assert req.finish_reason == "length" and len(req.output_ids) == 7


def _ascii_window(text: str, start: int, width: int) -> int:
    for i in range(start, len(text) - width):
        if all(32 < ord(c) < 127 for c in text[i : i + width]):
            return i
    raise AssertionError("no printable window in the greedy text")


def test_stop_string_cuts_text_exactly(make_engine, tiny_tok):
    eng = make_engine()
    plain = gen_req(tiny_tok, "The quick brown fox jumps", 120)
    eng.submit(plain)
    finish(plain)
    full = plain.text
    i = _ascii_window(full, 10, 3)
    stop = full[i : i + 3]  # three byte tokens: the stop string spans tokens
    expected = full[: full.find(stop)]

    req = gen_req(tiny_tok, "The quick brown fox jumps", 120, stop=(stop,))
    eng.submit(req)
    finish(req)
    assert req.finish_reason == "stop"
    assert req.text == expected
    streamed = "".join(ev.text for ev in drain_events(req))
    assert streamed == expected and stop not in streamed
    assert len(req.output_ids) < 120


# ---- sampling seeds --------------------------------------------------------------------


def test_seed_reproduces_sampled_output_alone_and_batched(make_engine, tiny_tok):
    sampled = dict(temperature=1.0, top_p=0.9, seed=1234)
    alone = run_alone(make_engine, tiny_tok, "a", 30, **sampled)
    again = run_alone(make_engine, tiny_tok, "a", 30, **sampled)
    assert again == alone

    eng = make_engine()
    noise = [
        gen_req(tiny_tok, "The quick brown fox jumps", 40, temperature=1.0, seed=7),
        gen_req(tiny_tok, "b x", 40),
    ]
    for r in noise:
        eng.submit(r)
    wait(lambda: len(noise[0].output_ids) >= 4, what="others decoding")
    batched = gen_req(tiny_tok, "a", 30, **sampled)
    eng.submit(batched)
    finish(batched)
    assert batched.output_ids == alone

    other_seed = run_alone(make_engine, tiny_tok, "a", 30, temperature=1.0, top_p=0.9, seed=1235)
    assert other_seed != alone
    greedy = run_alone(make_engine, tiny_tok, "a", 30)
    assert alone != greedy  # it really sampled


# ---- pooling -------------------------------------------------------------------------


def test_embed_mean_equals_manual_mean_of_last_hidden_state(make_engine, tiny_llama, tiny_tok):
    texts = ["hello", "a much longer sentence than the first", "x"]
    inputs = [ids_of(tiny_tok, t) for t in texts]
    eng = make_engine()
    # a generation runs at the same time: pooling rows are padded into the same prefill
    gen = gen_req(tiny_tok, "The quick brown fox jumps", 20)
    eng.submit(gen)
    req = PoolingRequest(inputs, "mean")
    eng.submit(req)
    out = req.future.result(timeout=10)
    assert out.shape == (3, tiny_llama.config.hidden_size)
    with torch.no_grad():
        for row, ids in zip(out, inputs, strict=True):
            h = tiny_llama.model(torch.tensor([ids])).last_hidden_state[0]  # [T, H]
            torch.testing.assert_close(row, h.mean(0), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(out[0], out[1])
    finish(gen)


def test_classify_on_base_model_fails_only_that_request(make_engine, tiny_tok):
    eng = make_engine()
    req = PoolingRequest([ids_of(tiny_tok, "hello")], "last")
    eng.submit(req)
    with pytest.raises(ValueError, match="no classification head"):
        req.future.result(timeout=10)
    after = gen_req(tiny_tok, "a", 5)
    eng.submit(after)
    assert finish(after).finish_reason == "length"


# ---- robustness ----------------------------------------------------------------------


def test_engine_survives_a_failing_step(make_engine, tiny_tok):
    expected = run_alone(make_engine, tiny_tok, "b", 20)
    runtime = FailOnceRuntime()
    eng = make_engine(runtime=runtime)
    doomed = gen_req(tiny_tok, "a", 1000)
    eng.submit(doomed)
    wait(lambda: len(doomed.output_ids) >= 2, what="decoding")
    runtime.arm()
    finish(doomed)
    assert doomed.finish_reason == "error" and "internal error" in str(doomed.error)
    assert eng.num_running == 0

    # and it keeps serving, correctly
    reqs = [gen_req(tiny_tok, "b", 20), gen_req(tiny_tok, "b", 20)]
    for r in reqs:
        eng.submit(r)
    for r in reqs:
        assert finish(r).output_ids == expected


def test_failing_prefill_fails_the_newcomers_not_the_engine(make_engine, tiny_tok):
    expected = run_alone(make_engine, tiny_tok, "b", 10)
    runtime = FailOnceRuntime()
    eng = make_engine(runtime=runtime)
    runtime.arm()
    doomed = gen_req(tiny_tok, "a", 10)
    eng.submit(doomed)
    finish(doomed)
    assert doomed.finish_reason == "error" and "internal error" in str(doomed.error)
    ok = gen_req(tiny_tok, "b", 10)
    eng.submit(ok)
    assert finish(ok).output_ids == expected


# ---- background tasks (fine-tuning) ---------------------------------------------------------


class SlowUnits:
    """A background task whose every unit takes `seconds` (a training unit that cannot be cut)."""

    def __init__(self, seconds: float):
        self.seconds, self.units = seconds, 0

    def step(self) -> bool:
        time.sleep(self.seconds)
        self.units += 1
        return True


def _back_to_back_waits(eng, tok, n: int = 4) -> list[float]:
    """Seconds from submitting each of `n` sequential requests, each sent as the previous one ends, to
    its first token."""
    waits = []
    for _ in range(n):
        req = gen_req(tok, "a", 2)
        t0 = time.perf_counter()
        eng.submit(req)
        wait(lambda r=req: len(r.output_ids) >= 1, what="first token")
        waits.append(time.perf_counter() - t0)
        finish(req)
    return waits


def test_a_clients_next_request_does_not_wait_behind_a_training_unit(make_engine, tiny_tok):
    unit = 0.3
    eng = make_engine(task_share=0.01, task_idle_grace_s=0.2)
    task = SlowUnits(unit)
    eng.submit_task(task)
    wait(lambda: task.units >= 1, what="training to use the idle engine")  # it does, after the grace
    time.sleep(unit)
    first = _back_to_back_waits(eng, tiny_tok)
    assert sorted(first)[len(first) // 2] < unit / 2  # the median request found the engine free

    eager = make_engine(task_share=0.01, task_idle_grace_s=0.0)  # the harness can fail: no grace
    eager.submit_task(SlowUnits(unit))
    time.sleep(unit)
    waits = _back_to_back_waits(eager, tiny_tok)
    assert sorted(waits)[len(waits) // 2] > unit / 2
