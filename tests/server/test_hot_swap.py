"""Adapters uploaded, loaded, evicted and deleted while streams run, on fewer device slots (2) than
adapters in use (5): every answer is still PEFT's, in-flight requests finish on the version they
started with, and a request that finds every slot pinned waits instead of failing."""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import threading
import time

import grpc
import pytest

from hotlora.v1 import adapters_pb2, common_pb2, inference_pb2
from tests.server.adapter_utils import make_peft_adapter, peft_greedy, upload_chunks
from tests.server.harness import running_server
from tests.tiny import tiny_tokenizer

SLOTS = 2
NEW = 8
PROMPTS = ["hot swap", "the quick brown fox"]
KINDS = [
    dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    dict(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    ),
    dict(r=16, lora_alpha=8, target_modules=["gate_proj", "down_proj"], layers_to_transform=[1]),
    dict(r=2, lora_alpha=4, target_modules=["o_proj", "up_proj"], use_rslora=True),
    dict(r=8, lora_alpha=8, target_modules=["k_proj", "down_proj"]),
]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft")
    return [make_peft_adapter(root / f"a{i}", seed=100 + i, **kw) for i, kw in enumerate(KINDS)]


@pytest.fixture(scope="module")
def expected(dirs):
    tok = tiny_tokenizer()
    return {(i, p): peft_greedy(d, tok(p)["input_ids"], NEW) for i, d in enumerate(dirs) for p in PROMPTS}


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory, dirs):
    with running_server(
        tiny_model_dir, tmp_path_factory.mktemp("data"), adapter_slots=SLOTS, max_rank=16
    ) as r:
        for i, d in enumerate(dirs):
            r.adapters.UploadAdapter(upload_chunks(f"stable-{i}", d), timeout=30)
        yield r


def _ref(name, pin=False):
    return common_pb2.AdapterRef(name=name, pin=pin)


def _req(adapter, prompt, n=NEW):
    return inference_pb2.GenerateRequest(
        prompt=prompt, adapter=adapter, params=common_pb2.SamplingParams(max_new_tokens=n)
    )


def _stream(run, adapter, prompt, n=NEW):
    return [
        t for c in run.inference.GenerateStream(_req(adapter, prompt, n), timeout=60) for t in c.token_ids
    ]


def _gen(run, adapter, prompt, n=NEW, timeout=60):
    return list(run.inference.Generate(_req(adapter, prompt, n), timeout=timeout).token_ids)


def test_streams_stay_correct_while_adapters_are_uploaded_loaded_evicted_and_deleted(run, dirs, expected):
    stop = threading.Event()
    errors: list[str] = []
    done = []
    jobs = itertools.cycle([(i, p) for i in range(len(dirs)) for p in PROMPTS])
    lock = threading.Lock()

    def worker():
        while not stop.is_set():
            with lock:
                i, p = next(jobs)
            try:
                got = _stream(run, f"stable-{i}", p)
            except grpc.RpcError as exc:
                errors.append(f"stable-{i} {p!r}: {exc.code()} {exc.details()}")
                continue
            if got != expected[(i, p)]:
                errors.append(f"stable-{i} {p!r}: {got} != PEFT {expected[(i, p)]}")
            done.append((i, p))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        for k in range(6):
            j = k % len(dirs)
            name = f"churn-{k}"
            assert run.adapters.UploadAdapter(upload_chunks(name, dirs[j]), timeout=30).version == 1
            a = run.adapters.LoadAdapter(_ref(name), timeout=30)
            assert a.state == adapters_pb2.ADAPTER_STATE_DEVICE
            assert _gen(run, name, PROMPTS[0]) == expected[(j, PROMPTS[0])]
            t0 = time.monotonic()
            run.adapters.UnloadAdapter(
                _ref(f"stable-{(k + 1) % len(dirs)}"), timeout=30
            )  # evict under traffic
            # a bound for a stall (waiting out all traffic), not a budget: a loaded machine is slow
            assert time.monotonic() - t0 < 30, "UnloadAdapter of a busy adapter stalled"
            run.adapters.DeleteAdapter(_ref(name), timeout=30)
            with pytest.raises(grpc.RpcError) as e:
                _gen(run, name, PROMPTS[0])
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert not errors, "\n".join(errors[:10])
    assert {i for i, _ in done} == set(range(len(dirs))), "every adapter was served (5 adapters, 2 slots)"
    assert len(done) >= 20


def test_in_flight_request_finishes_on_its_version_after_the_delete(run, dirs):
    tok = tiny_tokenizer()
    long_n = 300
    want_v1 = peft_greedy(dirs[1], tok(PROMPTS[1])["input_ids"], long_n)
    run.adapters.UploadAdapter(upload_chunks("victim", dirs[1]), timeout=30)
    chunks: list = []
    first = threading.Event()

    def consume():
        for c in run.inference.GenerateStream(_req("victim", PROMPTS[1], long_n), timeout=120):
            chunks.append(c)
            first.set()

    with cf.ThreadPoolExecutor(1) as pool:
        fut = pool.submit(consume)
        assert first.wait(30)
        v2 = run.adapters.UploadAdapter(upload_chunks("victim", dirs[3]), timeout=30)
        assert v2.version == 2
        run.adapters.DeleteAdapter(_ref("victim@1"), timeout=30)
        seen_at_delete = len(chunks)
        with pytest.raises(grpc.RpcError) as e:
            _gen(run, "victim@1", PROMPTS[1])
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        fut.result(120)
    tokens = [t for c in chunks for t in c.token_ids]
    assert seen_at_delete < len(chunks), "the stream had already finished before the delete (too fast a test)"
    assert {c.adapter for c in chunks} == {"victim@1"}
    assert tokens == want_v1[: len(tokens)] and len(tokens) > seen_at_delete
    assert chunks[-1].finish_reason in ("length", "eos")
    # the name now serves version 2
    resp = run.inference.Generate(_req("victim", PROMPTS[0]), timeout=60)
    assert resp.adapter == "victim@2"
    assert list(resp.token_ids) == peft_greedy(dirs[3], tok(PROMPTS[0])["input_ids"], NEW)
    run.adapters.DeleteAdapter(_ref("victim"), timeout=30)


def test_request_waits_while_every_slot_is_pinned_and_runs_after_an_unpin(run, expected):
    for i in range(SLOTS):
        a = run.adapters.LoadAdapter(_ref(f"stable-{i}", pin=True), timeout=30)
        assert a.state == adapters_pb2.ADAPTER_STATE_DEVICE and a.pinned
    try:
        with pytest.raises(grpc.RpcError) as e:
            run.adapters.LoadAdapter(_ref("stable-4", pin=True), timeout=30)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "pinned" in e.value.details()
        assert not run.adapters.GetAdapter(_ref("stable-4")).pinned  # the refused pin left nothing behind

        with cf.ThreadPoolExecutor(1) as pool:
            fut = pool.submit(_gen, run, "stable-4", PROMPTS[0], NEW, 60)
            waiting = 0
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not waiting:
                waiting = run.adapters.GetAdapter(_ref("stable-4")).waiting_requests
                time.sleep(0.05)
            assert waiting > 0, "GetAdapter should show the request waiting for a slot"
            time.sleep(0.3)
            assert not fut.done(), "with every slot pinned the request cannot run yet"
            # pinned adapters keep serving meanwhile
            assert _gen(run, "stable-0", PROMPTS[1]) == expected[(0, PROMPTS[1])]
            run.adapters.UnloadAdapter(_ref("stable-1"), timeout=30)
            assert fut.result(30) == expected[(4, PROMPTS[0])]
        assert run.adapters.GetAdapter(_ref("stable-4")).waiting_requests == 0
    finally:
        for i in range(SLOTS):
            run.adapters.UnloadAdapter(_ref(f"stable-{i}"), timeout=30)


def test_unload_when_idle_leaves_the_adapter_stored_and_it_reloads_on_demand(run, expected):
    run.adapters.LoadAdapter(_ref("stable-2"), timeout=30)
    a = run.adapters.UnloadAdapter(_ref("stable-2"), timeout=30)
    assert a.state == adapters_pb2.ADAPTER_STATE_STORED and not a.pinned
    assert _gen(run, "stable-2", PROMPTS[1]) == expected[(2, PROMPTS[1])]
    assert run.adapters.GetAdapter(_ref("stable-2")).state == adapters_pb2.ADAPTER_STATE_DEVICE
