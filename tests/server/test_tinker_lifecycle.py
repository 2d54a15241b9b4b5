"""The Tinker API's sessions across time (issue 32): a session left idle past --session-idle-seconds ends, its
training state is dropped and its open futures fail saying so, its saved checkpoints stay; a server restart
fails the futures that were open (the SDK's caller gets an error, not a hang) and keeps saved weights, which a
new training client loads and a new sampler samples with the same results."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import tinker
from tinker import types

from hotlora.server.tinker.service import TinkerService
from tests.server.harness import running_server
from tests.server.tinker_utils import TOKENS, greedy, http, ids, service_client, sft_datum

PROMPT, ANSWER = ids("Q: sky?\nA:"), ids(" blue") + [2]


def _tokens_file(root):
    path = root / "tokens"
    path.write_text("".join(f"{t} {tok}\n" for t, tok in TOKENS.items()))
    return str(path)


def _retrieve(client, request_id: str) -> dict:
    while True:  # long polls; a server that never answers is bounded by pytest's timeout
        out = client.post("/retrieve_future", json={"request_id": request_id}).json()
        if out.get("type") != "try_again":
            return out


def _wait_until(cond):
    while not cond():  # what the server must do; pytest's timeout bounds a server that never does it
        time.sleep(0.05)


def test_an_idle_session_expires_its_state_is_dropped_and_its_checkpoints_kept(tiny_model_dir, tmp_path):
    with (
        running_server(
            tiny_model_dir,
            tmp_path / "data",
            http_port=0,
            tokens_file=_tokens_file(tmp_path),
            session_idle_seconds=4.0,  # long enough for the calls before the wait, even under load
        ) as run,
        http(run.server.http_port) as a,
    ):
        svc = run.state.tinker
        base = run.state.loaded.name
        sid = a.post("/create_session", json={}).json()["session_id"]
        lora = {"rank": 2, "train_unembed": False}
        created = a.post("/create_model", json={"session_id": sid, "base_model": base, "lora_config": lora})
        model = _retrieve(a, created.json()["request_id"])["model_id"]
        saved = _retrieve(a, a.post("/save_weights", json={"model_id": model, "seq_id": 1, "path": "kept"})
                          .json()["request_id"])  # fmt: skip
        assert saved["path"] == f"tinker://{model}/weights/kept"
        # seq_id 3 waits for a 2 that never comes: a future open when the session expires
        step = {"model_id": model, "seq_id": 3, "adam_params": {"learning_rate": 0.1}}
        waiting = a.post("/optim_step", json=step).json()
        _wait_until(lambda: sid not in svc._sessions)

        out = _retrieve(a, waiting["request_id"])
        assert "expired" in out["error"] and "--session-idle-seconds" in out["error"], out
        r = a.post("/session_heartbeat", json={"session_id": sid})
        assert r.status_code == 410 and "expired after 4 s" in r.json()["detail"]  # the SDK stops beating
        r = a.post("/get_info", json={"model_id": model})
        assert r.status_code == 404 and "training state was dropped" in r.json()["detail"]
        # the checkpoint stays: listed, and loaded into a training client of a new session
        listed = a.get(f"/training_runs/{model}/checkpoints").json()["checkpoints"]
        assert [c["tinker_path"] for c in listed] == [saved["path"]]
        sid2 = a.post("/create_session", json={}).json()["session_id"]
        body = {"session_id": sid2, "path": saved["path"], "model_seq_id": 0, "optimizer": True}
        loaded = _retrieve(a, a.post("/load_weights", json=body).json()["request_id"])
        assert loaded["path"] == saved["path"] and loaded["model_id"].startswith(sid2)


def test_a_restart_fails_open_futures_and_keeps_saved_weights(tiny_model_dir, tmp_path, monkeypatch):
    from hotlora.adapters.training.loop_lora import LoopLora

    data = [sft_datum(PROMPT, ANSWER)]
    started, release = threading.Event(), threading.Event()
    one_pass = LoopLora._one_pass

    def held_pass(self, part, *args):
        if len(part[0].tokens) > 100:  # the long datum's pass: held until the server is closing
            started.set()
            release.wait()
        return one_pass(self, part, *args)

    close = TinkerService.close

    def close_then_release(self):
        close(self)  # fails the open futures; a pass running a unit is not waited for
        release.set()  # then the engine thread leaves the held pass (its future has failed already)

    monkeypatch.setattr(LoopLora, "_one_pass", held_pass)
    monkeypatch.setattr(TinkerService, "close", close_then_release)
    kw = dict(http_port=0, tokens_file=_tokens_file(tmp_path), max_rank=8)
    with running_server(tiny_model_dir, tmp_path / "data", **kw) as first:
        port, base = first.server.http_port, first.state.loaded.name
        sc = tinker.ServiceClient(api_key=TOKENS["alpha"], base_url=f"http://127.0.0.1:{port}")
        tc = sc.create_lora_training_client(base_model=base, rank=4, train_unembed=False, seed=1).result()
        for _ in range(3):
            tc.forward_backward(data, "cross_entropy").result()
            tc.optim_step(types.AdamParams(learning_rate=5e-2)).result()
        state = tc.save_state("kept").result().path
        sampler_path = tc.save_weights_for_sampler("kept-s").result().path
        before = _logprobs(tc, data)
        answer_before = greedy(sc.create_sampling_client(model_path=sampler_path).result(), PROMPT)
        held = tc.forward_backward([sft_datum(PROMPT, [5] * 200)], "cross_entropy")
        outcome: dict = {}

        def wait_held():
            try:
                outcome["result"] = held.result()
            except Exception as exc:  # what the SDK's caller sees
                outcome["error"] = exc

        waiter = threading.Thread(target=wait_held)
        waiter.start()
        assert started.wait(120)
    # the server is gone (its shutdown failed the open future); a new one on the same port and data
    with running_server(tiny_model_dir, tmp_path / "data", **{**kw, "http_port": port}):
        waiter.join()
        error = outcome.get("error")
        assert isinstance(error, tinker.RequestFailedError), outcome
        assert "saved checkpoints are kept" in str(error)
        with service_client(port) as sc2:
            tc2 = sc2.create_training_client_from_state_with_optimizer(state).result()
            assert np.allclose(_logprobs(tc2, data), before, atol=1e-6)
            sampler = sc2.create_sampling_client(model_path=sampler_path).result()
            assert greedy(sampler, PROMPT) == answer_before
            # the state carries AdamW's moments: a step from it differs from a step on fresh moments
            tc3 = sc2.create_training_client_from_state(state).result()
            for client in (tc2, tc3):
                client.forward_backward(data, "cross_entropy").result()
                client.optim_step(types.AdamParams(learning_rate=5e-2)).result()
            with_moments, fresh = _logprobs(tc2, data), _logprobs(tc3, data)
            assert not np.allclose(with_moments, before, atol=1e-4)
            assert not np.allclose(with_moments, fresh, atol=1e-4)
        with pytest.raises(tinker.NotFoundError, match="not live"):
            tc.forward(data, "cross_entropy").result()  # the old training client: gone with the restart


def _logprobs(tc, data) -> list:
    return [o["logprobs"].tolist() for o in tc.forward(data, "cross_entropy").result().loss_fn_outputs]
