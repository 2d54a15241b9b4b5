"""The Tinker API against a live hotlora through the official `tinker` SDK (issue 32): a supervised loop whose
loss falls and whose sampled answers become the taught completions; an RL step whose forward logprobs match
the sampler's; save -> sample -> export -> PEFT reload; co-serving; tenancy; bad input. Tiny model, two
tenants; one server for the module (the costly part)."""

from __future__ import annotations

import json
import threading
import time

import httpx
import numpy as np
import pytest
import tinker
import torch
from tinker import types

from hotlora.server.rpc import kserve_conversion as kc
from hotlora.v1 import common_pb2, inference_pb2
from tests.server.harness import running_server
from tests.server.tinker_utils import EOS, TOKENS, greedy, http, ids, rl_datum, service_client, sft_datum
from tests.tiny import tiny_tokenizer

PROMPTS = [ids("Q: sky?\nA:"), ids("Q: grass?\nA:")]
TAUGHT = [ids(" blue") + [EOS], ids(" green") + [EOS]]
MLP, ATTN = {"gate_proj", "up_proj", "down_proj"}, {"q_proj", "k_proj", "v_proj", "o_proj"}
LOGPROB_TOLERANCE = 2e-3  # the engine's sampler vs the training forward, fp32 (different kernels)


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("tinker")
    tokens = root / "tokens"
    tokens.write_text("".join(f"{t} {tok}\n" for t, tok in TOKENS.items()))
    with running_server(
        tiny_model_dir,
        root / "data",
        http_port=0,
        tokens_file=str(tokens),
        max_rank=16,
        tinker_max_runs_per_tenant=3,
        tinker_max_bytes_per_tenant=1_000_000,
        tinker_max_batch_tokens=3000,
        max_rpcs_per_tenant=64,
    ) as run:
        yield run


@pytest.fixture(scope="module")
def port(run) -> int:
    return run.server.http_port


@pytest.fixture(scope="module")
def base(run) -> str:
    return run.state.loaded.name


def _client(sc, base, rank=8, **kw):
    return sc.create_lora_training_client(
        base_model=base, rank=rank, train_unembed=False, seed=0, **kw
    ).result()


@pytest.fixture(scope="module")
def taught(port, base):
    """A supervised loop on two prompt -> completion pairs: losses per step, the sampler's answers before
    and after, and the trained client's sampler path (the training client lives for the module)."""
    with service_client(port) as sc:
        tc = _client(sc, base)
        before = [greedy(sc.create_sampling_client(base_model=base).result(), p) for p in PROMPTS]
        data = [sft_datum(p, c) for p, c in zip(PROMPTS, TAUGHT, strict=True)]
        losses = []
        for _ in range(25):
            fb = tc.forward_backward(data, "cross_entropy")
            opt = tc.optim_step(types.AdamParams(learning_rate=2e-2))
            losses.append(fb.result().metrics["loss:sum"])
            opt.result()
        sampler = tc.save_weights_and_get_sampling_client().result()
        after = [greedy(sampler, p) for p in PROMPTS]
        saved = tc.save_weights_for_sampler("taught").result().path
        yield {"losses": losses, "before": before, "after": after, "path": saved, "tc": tc, "sc": sc}


def test_a_supervised_loop_learns_the_taught_completions(taught):
    losses = taught["losses"]
    assert losses[-1] < 0.1 * losses[0], losses
    assert taught["before"] != TAUGHT  # the base model does not answer them
    assert taught["after"] == TAUGHT  # the just-saved weights do, from the engine, EOS included


def test_forward_logprobs_are_the_per_token_logprobs_of_the_loss(taught):
    tc = taught["tc"]
    data = [sft_datum(p, c) for p, c in zip(PROMPTS, TAUGHT, strict=True)]
    out = tc.forward(data, "cross_entropy").result()
    for d, o in zip(data, out.loss_fn_outputs, strict=True):
        lp = np.asarray(o["logprobs"].tolist())
        w = np.asarray(d.loss_fn_inputs["weights"].tolist())
        assert lp.shape == w.shape and (lp <= 0).all()
        assert np.allclose(o["elementwise_loss"].tolist(), -w * lp, atol=1e-6)
    total = sum(float(np.sum(o["elementwise_loss"].tolist())) for o in out.loss_fn_outputs)
    assert out.metrics["loss:sum"] == pytest.approx(total, rel=1e-5)


def test_an_rl_step_scores_sampled_tokens_as_the_sampler_did(port, base):
    with service_client(port) as sc:
        tc = _client(sc, base)
        sampler = tc.save_weights_and_get_sampling_client().result()
        prompt = PROMPTS[0]
        params = types.SamplingParams(max_tokens=10, temperature=1.0, seed=7)
        res = sampler.sample(types.ModelInput.from_ints(prompt), 4, params).result()
        assert len(res.sequences) == 4 and len({tuple(s.tokens) for s in res.sequences}) > 1
        advantages = [1.0, -1.0, 0.5, -0.5]
        data = [
            rl_datum(prompt, s.tokens, s.logprobs, a) for s, a in zip(res.sequences, advantages, strict=True)
        ]
        out = tc.forward(data, "importance_sampling").result()
        pad = len(prompt) - 1
        worst = 0.0
        for s, o in zip(res.sequences, out.loss_fn_outputs, strict=True):
            trained = np.asarray(o["logprobs"].tolist())[pad:]
            worst = max(worst, float(np.abs(trained - np.asarray(s.logprobs)).max()))
        assert worst < LOGPROB_TOLERANCE, f"forward vs sampler logprobs differ by up to {worst}"
        # on-policy, the ratio is 1: the loss is minus the advantages summed over the sampled tokens
        fb = tc.forward_backward(data, "importance_sampling").result()
        expected = -sum(a * len(s.tokens) for s, a in zip(res.sequences, advantages, strict=True))
        assert fb.metrics["loss:sum"] == pytest.approx(expected, abs=0.05)
        tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
        ppo = tc.forward(data, "ppo", {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}).result()
        assert np.isfinite(ppo.metrics["loss:sum"]) and ppo.metrics["loss:sum"] != pytest.approx(expected)


def test_saved_for_sampling_is_a_registry_version_served_everywhere_and_exported_as_peft(
    run, port, taught, tiny_model_dir, tmp_path
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ref = "taught@1"
    view = run.state.adapters.get("alpha", ref)
    assert view.record.source == "FINETUNE"
    # gRPC Generate with the version: the taught answer
    prompt_text = "Q: sky?\nA:"
    reply = run.inference.Generate(
        inference_pb2.GenerateRequest(
            adapter=ref, prompt=prompt_text, params=common_pb2.SamplingParams(max_new_tokens=8)
        ),
        metadata=[("authorization", f"Bearer {TOKENS['alpha']}")],
    )
    assert list(reply.token_ids) == TAUGHT[0]
    # the OpenAI door and KServe serve it too
    taught_text = tiny_tokenizer().decode(TAUGHT[0][:-1])
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as h:
        r = h.post(
            "/v1/completions",
            json={"model": ref, "prompt": prompt_text, "max_tokens": 8, "temperature": 0},
            headers={"Authorization": f"Bearer {TOKENS['alpha']}"},
        )
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == taught_text, r.text
    req = kc.pb.ModelInferRequest(model_name="taught", model_version="1")
    req.inputs.add(name="text_input", datatype="BYTES", shape=[1])
    req.raw_input_contents.append(kc.encode_bytes([prompt_text.encode()]))
    req.parameters["max_tokens"].int64_param = 8
    infer = run.channel.unary_unary(
        f"/{kc.SERVICE}/ModelInfer",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=kc.pb.ModelInferResponse.FromString,
    )
    out = infer(req, metadata=[("authorization", f"Bearer {TOKENS['alpha']}")], timeout=60)
    assert kc.decode_bytes(out.raw_output_contents[0], 1, "text_output") == [taught_text.encode()]
    # exported as PEFT, reloaded on the base model with transformers: the same greedy tokens
    _, files = run.state.adapters.export("alpha", ref)
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path).eval()
    for prompt, want in zip(PROMPTS, TAUGHT, strict=True):
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), max_new_tokens=len(want), do_sample=False)
        assert out[0, len(prompt) :].tolist() == want
    # and the SDK samples the saved path in a new sampling client
    sampler = taught["sc"].create_sampling_client(model_path=taught["path"]).result()
    assert greedy(sampler, PROMPTS[1]) == TAUGHT[1]


def test_weights_saved_for_sampling_are_sampled_without_a_load_from_the_store(run, port, base, monkeypatch):
    cache = run.state.adapters.cache
    loads, loader = [], cache._loader
    monkeypatch.setattr(cache, "_loader", lambda source: loads.append(source) or loader(source))
    with service_client(port) as sc:
        tc = _client(sc, base, rank=2)
        tc.forward_backward([sft_datum(PROMPTS[0], TAUGHT[0])], "cross_entropy").result()
        tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
        sampler = tc.save_weights_and_get_sampling_client().result()
        assert len(greedy(sampler, PROMPTS[0])) > 0
    assert loads == []  # the saved tensors went to the cache's host tier as they were saved


def test_samples_stop_where_asked_and_the_server_says_what_it_serves(taught, port, base):
    sampler = taught["sc"].create_sampling_client(model_path=taught["path"]).result()
    prompt = types.ModelInput.from_ints(PROMPTS[0])  # taught: " blue" EOS
    l_token = ids("l")[0]

    def sample(n=1, **params):
        return sampler.sample(prompt, n, types.SamplingParams(temperature=0.0, **params)).result().sequences

    (on_eos,) = sample(max_tokens=12)
    assert on_eos.tokens == TAUGHT[0] and on_eos.stop_reason == "stop"
    (on_length,) = sample(max_tokens=2)
    assert on_length.tokens == TAUGHT[0][:2] and on_length.stop_reason == "length"
    (on_token,) = sample(max_tokens=12, stop=[l_token])
    assert on_token.tokens == TAUGHT[0][: TAUGHT[0].index(l_token) + 1] and on_token.stop_reason == "stop"
    (on_string,) = sample(max_tokens=12, stop=["lu"])
    assert on_string.stop_reason == "stop" and EOS not in on_string.tokens
    assert tiny_tokenizer().decode(on_string.tokens).startswith(" bl")
    many = sample(n=3, max_tokens=12)
    assert [s.tokens for s in many] == [TAUGHT[0]] * 3 and all(len(s.logprobs) == len(s.tokens) for s in many)
    rest = tinker.RestClient(base_url=f"http://127.0.0.1:{port}", api_key=TOKENS["alpha"])
    models = rest.get_server_capabilities().result().supported_models
    assert [m.model_name for m in models] == [base]


def test_train_attn_and_train_mlp_choose_the_modules_trained(run, port, base):
    with service_client(port) as sc:
        for attn, mlp, name in ((False, True, "mlp-only"), (True, False, "attn-only")):
            tc = _client(sc, base, rank=2, train_attn=attn, train_mlp=mlp)
            tc.forward_backward([sft_datum(PROMPTS[0], TAUGHT[0])], "cross_entropy").result()
            tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
            tc.save_weights_for_sampler(name).result()
            _, files = run.state.adapters.export("alpha", f"{name}@1")
            modules = set(json.loads(files["adapter_config.json"])["target_modules"])
            wanted = MLP if mlp else ATTN
            assert modules and modules <= wanted, (name, modules)


def test_training_units_share_the_engine_with_another_tenants_generate(run, port, base, monkeypatch):
    """A forward_backward runs in units (here 3 passes made 0.5 s slower each); beta's Generate, sent once the
    first pass has started, ends before the forward_backward does."""
    from hotlora.adapters.training.loop_lora import LoopLora

    started = threading.Event()
    one_pass = LoopLora._one_pass

    def slow_pass(self, *args):
        started.set()
        time.sleep(0.5)
        return one_pass(self, *args)

    monkeypatch.setattr(LoopLora, "_one_pass", slow_pass)
    with service_client(port) as sc:
        tc = _client(sc, base, rank=4)
        data = [sft_datum(ids("x" * 20), ids("y" * 480)) for _ in range(6)]  # 3 passes of 1000 tokens
        fb = tc.forward_backward(data, "cross_entropy")
        assert started.wait(60)
        reply = run.inference.Generate(
            inference_pb2.GenerateRequest(prompt="hello", params=common_pb2.SamplingParams(max_new_tokens=4)),
            metadata=[("authorization", f"Bearer {TOKENS['beta']}")],
        )
        generate_first = not fb.future().done()
        out = fb.result()
    assert len(reply.token_ids) == 4 and len(out.loss_fn_outputs) == 6
    assert generate_first, "the Generate waited for the whole forward_backward"


def test_runs_and_checkpoints_are_listed_per_tenant(port, base, taught):
    rest = tinker.RestClient(base_url=f"http://127.0.0.1:{port}", api_key=TOKENS["alpha"])
    run_id = taught["tc"].model_id
    runs = rest.list_training_runs().result()
    assert run_id in [r.training_run_id for r in runs.training_runs]
    ckpts = rest.list_checkpoints(run_id).result().checkpoints
    assert taught["path"] in [c.tinker_path for c in ckpts]
    with http(port, "beta") as b:
        assert b.get("/training_runs").json()["training_runs"] == []
        r = b.get(f"/training_runs/{run_id}/checkpoints")
        assert r.status_code == 404 and "not found" in r.json()["detail"]
        r = b.post("/get_info", json={"model_id": run_id})
        assert r.status_code == 404


def test_another_tenants_futures_are_not_found(port, base):
    """Raw HTTP (the SDK never sends another tenant's ids): alpha's session, training client and futures are
    not found for beta; a seq_id reused by a call of another kind is refused, not answered with the first
    call's future."""
    with http(port, "alpha") as a, http(port, "beta") as b:
        sid = a.post("/create_session", json={}).json()["session_id"]
        lora = {"rank": 2, "train_unembed": False}
        created = a.post("/create_model", json={"session_id": sid, "base_model": base, "lora_config": lora})
        model = _retrieve(a, created.json()["request_id"])["model_id"]
        step = {"model_id": model, "seq_id": 1, "adam_params": {"learning_rate": 0.0}}
        r = a.post("/optim_step", json=step)
        rid = r.json()["request_id"]
        assert _retrieve(a, rid)["metrics"] is not None
        again = a.post("/optim_step", json={"model_id": model, "seq_id": 1, "adam_params": {}})
        assert again.json()["request_id"] == rid  # an SDK retry: the same future
        r = a.post("/save_weights", json={"model_id": model, "seq_id": 1, "path": "x"})
        assert r.status_code == 400 and "already used by another call (OptimStep" in r.json()["detail"]
        for path, body in (
            ("/retrieve_future", {"request_id": rid}),
            ("/get_info", {"model_id": model}),
            ("/session_heartbeat", {"session_id": sid}),
            ("/optim_step", {"model_id": model, "seq_id": 2, "adam_params": {}}),
        ):
            r = b.post(path, json=body)
            assert r.status_code == 404 and "not found" in r.json()["detail"], (path, r.text)
        a.post(f"/sessions/{sid}/finish", json={})


def _retrieve(client, request_id: str) -> dict:
    while True:  # the server long-polls: bounded by pytest's timeout only if the server never answers
        out = client.post("/retrieve_future", json={"request_id": request_id}).json()
        if out.get("type") != "try_again":
            return out


# ---- bad input -------------------------------------------------------------------------------------
def _bad(fn, *words):
    with pytest.raises(tinker.BadRequestError) as info:
        fn()
    for w in words:
        assert w in str(info.value), str(info.value)


def test_bad_input_is_refused_with_a_message_and_touches_nothing(port, base, taught):
    tc = taught["tc"]
    probe = [sft_datum(p, c) for p, c in zip(PROMPTS, TAUGHT, strict=True)]

    def logprobs():
        return [o["logprobs"].tolist() for o in tc.forward(probe, "cross_entropy").result().loss_fn_outputs]

    reference = logprobs()
    with service_client(port) as sc:
        other = _client(sc, base, rank=2)
        good = sft_datum(PROMPTS[0], TAUGHT[0])
        vocab_bad = types.Datum(
            model_input=types.ModelInput.from_ints([5, 6]),
            loss_fn_inputs={"target_tokens": [6, 99999], "weights": [1.0, 1.0]},
        )
        _bad(lambda: other.forward_backward([vocab_bad], "cross_entropy").result(), "99999", "vocabulary")
        short = types.Datum(
            model_input=types.ModelInput.from_ints([5, 6, 7]),
            loss_fn_inputs={"target_tokens": [6, 7, 8], "weights": [1.0, 1.0]},
        )
        _bad(
            lambda: other.forward_backward([short], "cross_entropy").result(),
            "weights",
            "shape [2]",
            "3 tokens",
        )
        nan = rl_datum(PROMPTS[0], [5, 6], [-1.0, -1.0], float("nan"))
        _bad(lambda: other.forward_backward([nan], "importance_sampling").result(), "advantages", "NaN")
        _bad(lambda: other.forward_backward([good], "cispo").result(), "cispo", "not offered")
        too_long = sft_datum([5] * 600, [6] * 600)
        _bad(lambda: other.forward_backward([too_long], "cross_entropy").result(), "context is 1024")
        _bad(
            lambda: other.forward_backward([sft_datum([5] * 500, [6] * 500)] * 4, "cross_entropy").result(),
            "--tinker-max-batch-tokens",
        )
        _bad(
            lambda: sc.create_lora_training_client(base_model=base, rank=64, train_unembed=False).result(),
            "--max-rank",
        )
        _bad(
            lambda: sc.create_lora_training_client(base_model=base, rank=4).result(),
            "train_unembed",
            "LM head",
        )
        _bad(
            lambda: sc.create_lora_training_client(
                base_model="Qwen/Qwen3-8B", rank=4, train_unembed=False
            ).result(),
            "Qwen/Qwen3-8B",
            "not served",
        )
        _bad(lambda: other.optim_step(types.AdamParams(learning_rate=-1.0)).result(), "learning_rate")
        # the refused calls took their seq_ids: the client goes on
        out = other.forward_backward([good], "cross_entropy").result()
        assert np.isfinite(out.metrics["loss:sum"])
        other.optim_step(types.AdamParams(learning_rate=1e-2)).result()
        with pytest.raises(tinker.NotFoundError, match="save_weights_external"):
            other.save_weights_external("x").result()
    assert logprobs() == reference  # the other session's run did not move


def test_per_tenant_limits_on_live_clients_and_their_memory(port, base):
    with service_client(port, "beta") as sc:
        _client(sc, base, rank=16)
        _client(sc, base, rank=16)  # 2 x 475,136 bytes of the 1,000,000
        with pytest.raises(tinker.PermissionDeniedError, match="--tinker-max-bytes-per-tenant"):
            _client(sc, base, rank=4)
        _client(sc, base, rank=1)
        with pytest.raises(tinker.PermissionDeniedError, match="--tinker-max-runs-per-tenant 3"):
            _client(sc, base, rank=1)
    with service_client(port, "beta") as sc:  # the finished session's clients are gone
        _client(sc, base, rank=16)
