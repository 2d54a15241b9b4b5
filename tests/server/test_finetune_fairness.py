"""Issue 12, finding 7: fine-tune jobs share training time across tenants, and a training unit is
bounded in time (--max-train-unit-ms), not in examples. Both asserted on orders and counts."""

from __future__ import annotations

import pytest
import torch

from hotlora.adapters.training import trainer as trainer_module
from hotlora.adapters.training.train_units import UnitSizer
from hotlora.v1 import common_pb2, training_pb2
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
        done = wait_state(tr, small.id, TERMINAL, metadata=md("small"), timeout=120)
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


@pytest.mark.parametrize(("unit_ms", "largest"), [(1e-6, (1, 1)), (60_000.0, (2, 4))], ids=["tiny", "roomy"])
def test_training_units_shrink_to_the_time_budget(tiny_model_dir, tmp_path, forwards, unit_ms, largest):
    """With a budget no example fits in, every unit is one example; with room, units keep their usual
    size (2 examples with a backward pass, 4 without)."""
    with running_server(tiny_model_dir, tmp_path / "data", max_train_unit_ms=unit_ms) as run:
        req = seq_cls("units", marker_examples(24, seed=2), method=training_pb2.METHOD_LORA)
        req.hyperparameters.CopyFrom(training_pb2.HyperParameters(epochs=1, batch_size=8))
        job = run.training.CreateFineTune(req, timeout=30)
        wait_state(run.training, job.id, TERMINAL, timeout=120)
    train = [n for n, grad in forwards if grad]
    evals = [n for n, grad in forwards if not grad]
    assert train and evals
    assert (max(train), max(evals)) == largest, (train, evals)


def test_unit_sizer_follows_the_measured_cost():
    s = UnitSizer(budget_s=0.1, most=4)
    assert s.size(10) == 1  # nothing measured yet
    s.observe(1, 0.01)  # 10 ms an example: 4 fit (the most)
    assert s.size(10) == 4 and s.size(3) == 3
    s.observe(4, 0.4)  # examples got longer: 100 ms each now, smoothed
    assert s.size(10) == 1
    s.observe(1, 0.5)
    assert s.size(10) == 1  # never less than one example
    assert [len(p) for p in UnitSizer(1.0, 2).split(list(range(5)))] == [1, 1, 1, 1, 1]
