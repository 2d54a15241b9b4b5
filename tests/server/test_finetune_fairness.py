"""Issue 12, finding 7: fine-tune jobs share training time across tenants, and a training unit is
bounded in time (--max-train-unit-ms), not in examples: it ends mid-pass, so a request waits for one slice of
a training pass, not the whole pass. Asserted on orders and counts."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from hotlora.adapters.training import trainer as trainer_module
from hotlora.adapters.training.train_units import PreemptibleRun
from hotlora.server.engine.scheduler import Engine
from hotlora.v1 import common_pb2, inference_pb2, training_pb2
from tests.server.harness import running_server
from tests.server.training_utils import TERMINAL, long_lm_job, marker_examples, seq_cls, wait_state

TOKENS = {"big": "tok-big-fair", "small": "tok-small-fair"}


def md(tenant: str):
    return (("authorization", f"Bearer {TOKENS[tenant]}"),)


@pytest.fixture()
def tokens_file(tmp_path):
    path = tmp_path / "tokens"
    path.write_text("".join(f"{t} {tok}\n" for t, tok in TOKENS.items()))
    return path


def test_a_small_job_does_not_wait_behind_another_tenants_big_one(tiny_model_dir, tmp_path, tokens_file):
    with running_server(tiny_model_dir, tmp_path / "data", tokens_file=str(tokens_file), max_jobs=2) as run:
        tr = run.training
        big = tr.CreateFineTune(long_lm_job("big-job"), metadata=md("big"), timeout=30)  # hundreds of units
        wait_state(tr, big.id, {training_pb2.JOB_STATE_RUNNING}, metadata=md("big"), min_step=1)
        small = tr.CreateFineTune(
            seq_cls("small-job", marker_examples(20, seed=1), method=training_pb2.METHOD_HEAD_ONLY),
            metadata=md("small"),
            timeout=30,
        )
        done = wait_state(tr, small.id, TERMINAL, metadata=md("small"))
        big_now = tr.GetFineTune(common_pb2.JobRef(id=big.id), metadata=md("big"))
        tr.CancelFineTune(common_pb2.JobRef(id=big.id), metadata=md("big"))
        assert done.state in (training_pb2.JOB_STATE_SUCCEEDED, training_pb2.JOB_STATE_REJECTED), done.error
        # first in, first out would have finished all of the big job's units first
        assert big_now.state == training_pb2.JOB_STATE_RUNNING
        assert big_now.metrics.step < big_now.metrics.total_steps


@pytest.fixture()
def forwards(monkeypatch):
    """(examples, with gradients?) of every training forward."""
    seen: list[tuple[int, bool]] = []
    real = trainer_module.Trainer._decode  # under hidden() and features(): every training forward

    def decode(self, seqs, all_layers):
        seen.append((len(seqs), torch.is_grad_enabled()))
        return real(self, seqs, all_layers)

    monkeypatch.setattr(trainer_module.Trainer, "_decode", decode)
    return seen


@pytest.mark.parametrize("unit_ms", [1e-6, 60_000.0], ids=["tiny", "roomy"])
def test_passes_keep_their_size_whatever_the_unit_budget(tiny_model_dir, tmp_path, forwards, unit_ms):
    """Units end mid-pass instead of shrinking passes: 2 examples per pass with a backward, 4 without,
    with a budget nothing fits in as with a roomy one (so the same training either way)."""
    with running_server(tiny_model_dir, tmp_path / "data", max_train_unit_ms=unit_ms) as run:
        req = seq_cls("units", marker_examples(24, seed=2), method=training_pb2.METHOD_LORA)
        req.hyperparameters.CopyFrom(training_pb2.HyperParameters(epochs=1, batch_size=8))
        job = run.training.CreateFineTune(req, timeout=30)
        wait_state(run.training, job.id, TERMINAL)
    train = [n for n, grad in forwards if grad]
    evals = [n for n, grad in forwards if not grad]
    assert (max(train), max(evals)) == (2, 4), (train, evals)


@pytest.fixture()
def engine_events(monkeypatch):
    """What the engine did, in order: 'submit' (a request handed to it), 'serve' (a step that served),
    'pause' (a training pass reached a pause point), 'slice' (and its unit ended there)."""
    events: list[str] = []
    real_submit, real_serve = Engine.submit, Engine._serve_step
    real_pause = PreemptibleRun.pause_point

    def submit(self, req):
        events.append("submit")
        return real_submit(self, req)

    def serve(self):
        worked = real_serve(self)
        if worked:
            events.append("serve")
        return worked

    def pause(self):
        events.append("pause")
        before = self.mid_pass
        real_pause(self)
        if self.mid_pass > before:
            events.append("slice")

    monkeypatch.setattr(Engine, "submit", submit)
    monkeypatch.setattr(Engine, "_serve_step", serve)
    monkeypatch.setattr(PreemptibleRun, "pause_point", pause)
    return events


def test_a_request_waits_for_one_slice_of_a_training_pass(tiny_model_dir, tmp_path, engine_events):
    """With a unit budget nothing fits in, a unit ends at the first pause point (a linear layer) of a
    forward or backward pass: a Generate arriving while training runs is served after at most that one
    slice, before the rest of the pass. (A unit of a whole micro-batch would run ~40 pause points.)"""
    with running_server(
        tiny_model_dir, tmp_path / "data", max_train_unit_ms=1e-6, train_idle_grace_ms=0
    ) as run:
        job = run.training.CreateFineTune(long_lm_job("sliced"), timeout=30)
        wait_state(run.training, job.id, {training_pb2.JOB_STATE_RUNNING}, min_step=1)
        for i in range(5):
            params = common_pb2.SamplingParams(max_new_tokens=2)
            run.inference.Generate(inference_pb2.GenerateRequest(prompt=f"hi {i}", params=params), timeout=30)
            # training runs alone meanwhile: wait until it has passed 20 more pause points (a busy
            # machine makes that later, not different)
            assert _wait_for_pauses(engine_events, engine_events.count("pause") + 20)
        state = run.training.GetFineTune(common_pb2.JobRef(id=job.id)).state
        run.training.CancelFineTune(common_pb2.JobRef(id=job.id))
    assert state == training_pb2.JOB_STATE_RUNNING  # the requests arrived while it trained
    events = list(engine_events)
    submits = [i for i, e in enumerate(events) if e == "submit"]
    assert len(submits) == 5
    for at in submits:
        served = events.index("serve", at)
        assert events[at:served].count("pause") <= 1, events[at : served + 1]
        assert "pause" in events[served:]  # the pass went on after the request was served


def _wait_for_pauses(events: list[str], n: int, bound_s: float = 60.0) -> bool:
    """Until `events` holds n pauses; False after bound_s (a training loop that stopped)."""
    deadline = time.monotonic() + bound_s
    while events.count("pause") < n:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_training_alone_is_not_cut_into_slices(tiny_model_dir, tmp_path, engine_events):
    """With nothing to serve, a unit past its budget runs on to its yield: slicing costs handoffs, and
    only serving needs them."""
    with running_server(tiny_model_dir, tmp_path / "data", max_train_unit_ms=1e-6) as run:
        req = seq_cls("alone", marker_examples(12, seed=3), method=training_pb2.METHOD_LORA)
        req.hyperparameters.CopyFrom(training_pb2.HyperParameters(epochs=1, batch_size=4))
        job = run.training.CreateFineTune(req, timeout=30)
        wait_state(run.training, job.id, TERMINAL)
    assert engine_events.count("pause") > 100
    assert engine_events.count("slice") == 0


def test_a_cancelled_job_leaves_no_training_loop_behind(tiny_model_dir, tmp_path):
    """A job cancelled between two of its units has its parked training loop unwound: no training thread
    (nor the activations of a pass it held) outlives the job."""
    with running_server(tiny_model_dir, tmp_path / "data", max_train_unit_ms=1e-6) as run:
        job = run.training.CreateFineTune(long_lm_job("cancelled"), timeout=30)
        wait_state(run.training, job.id, {training_pb2.JOB_STATE_RUNNING}, min_step=1)
        assert _training_loops() >= 1
        run.training.CancelFineTune(common_pb2.JobRef(id=job.id))
        wait_state(run.training, job.id, {training_pb2.JOB_STATE_CANCELLED})
        deadline = time.monotonic() + 30
        while _training_loops() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _training_loops() == 0


def _training_loops() -> int:
    return sum(t.name == "hotlora-training-loop" and t.is_alive() for t in threading.enumerate())
