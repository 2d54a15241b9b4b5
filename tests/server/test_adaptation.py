"""Adaptation that measures (issue 16) on a tiny random Llama: small data is cross-validated and every
candidate reported, a task no frozen-feature head learns gets LoRA, noise is rejected, a continued version
that forgets its predecessor's task is rejected, versions keep their examples, and EvaluateAdapter agrees
with PEFT on the exported adapter.

The jobs are as small as what each test proves allows (issue 37: at load 5-7 they outran a 300 s deadline)
and run on one intra-op thread (see `server`): heads train for few full-batch epochs at a higher rate (they
separate the marker task in ten), LoRA for few epochs where only the reporting, the gate or the export is
under test, and a held-out split where k-fold is not. Tests wait for a job's last event, with no deadline
of their own (pytest-timeout bounds a job that never ends), and a job a failed test left running is
cancelled before the next test."""

from __future__ import annotations

import math
import random

import grpc
import pytest
import torch

from hotlora.v1 import common_pb2, training_pb2
from tests.server.harness import running_server
from tests.server.test_training import _export, _peft_probs
from tests.server.training_utils import (
    MARKER,
    cancel_unfinished,
    marker_examples,
    marker_text,
    one_intra_op_thread,
    pair_examples,
    seq_cls,
    watch,
)
from tests.tiny import build_tiny_llama, tiny_tokenizer

KFOLD = "kfold"
HEAD_ONLY, LORA = training_pb2.METHOD_HEAD_ONLY, training_pb2.METHOD_LORA
LORA_PROGRESSIVE = training_pb2.METHOD_LORA_PROGRESSIVE


# heads: full-batch epochs; LoRA candidates use the same fields (the rate suits both on the marker task)
QUICK = training_pb2.HyperParameters(epochs=20, learning_rate=0.05)
# AUTO's method search stops at --finetune-max-seconds (600 s) of wall time: on a busy machine that cut the
# LoRA candidates short and a head was promoted. The budget is under test in its own test only.
NO_BUDGET = 86400.0


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    # what is under test is the search, not the threading of the tiny model's matmuls
    with one_intra_op_thread(), running_server(tiny_model_dir, tmp_path_factory.mktemp("data")) as run:
        yield run


@pytest.fixture(autouse=True)
def _no_job_left_running(server):
    yield
    cancel_unfinished(server.training)


def _job(run, req):
    _, job = watch(run.training, run.training.CreateFineTune(req, timeout=30).id)
    return job


def test_small_data_is_cross_validated_and_every_candidate_is_reported(server):
    req = seq_cls("small", marker_examples(24, seed=11), hyperparameters=QUICK, max_seconds=NO_BUDGET)
    job = _job(server, req)
    assert job.state == training_pb2.JOB_STATE_SUCCEEDED, job.error
    m = job.metrics
    assert m.validation_scheme == KFOLD and m.validated_examples == 24  # each example validated once
    assert 0 < m.validation_stderr < 0.5 and m.validation_metric > m.baseline_metric + m.gate_margin
    names = [c.name for c in m.candidates]
    assert names == [  # cheapest first: the heads share one feature pass (the tiny model has 2 layers)
        "HEAD_ONLY(last token, last layer)",
        "HEAD_ONLY(mean pooling, last layer)",
        "HEAD_ONLY(last token, layer 1)",
        "HEAD_ONLY(mean pooling, layer 1)",
        "LORA",
        "LORA_PROGRESSIVE",
    ]
    assert [(c.features, c.layer) for c in m.candidates[:4]] == [
        ("last", -1),
        ("mean", -1),
        ("last", 1),
        ("mean", 1),
    ]
    scored = [c for c in m.candidates if c.status == "scored"]
    assert scored and all(c.seconds > 0 for c in scored)
    assert all(c.status in ("scored", "skipped") and (c.status == "scored" or c.note) for c in m.candidates)
    winner = max(scored, key=lambda c: c.score)
    assert job.method == winner.method and winner.name in m.winner_reason and m.winner == winner.name
    if winner.method == training_pb2.METHOD_HEAD_ONLY:  # the job names what the promoted head reads
        assert (m.head_features.pooling, m.head_features.layer) == (winner.features, winner.layer)

    got = server.adapters.GetAdapter(common_pb2.AdapterRef(name="small"))
    v = got.validation
    assert v.scheme == KFOLD and v.score == pytest.approx(m.validation_metric) and v.examples == 24
    assert v.stderr == pytest.approx(m.validation_stderr) and v.previous_task_examples == 0
    files = {c.filename for c in server.adapters.ExportAdapter(common_pb2.AdapterRef(name="small"))}
    assert files == {"adapter_config.json", "adapter_model.safetensors"}  # examples stay on the server


def test_shuffled_labels_are_rejected_although_auto_picks_the_best_of_several(server):
    rng = random.Random(3)
    ex = [training_pb2.Example(text=marker_text(rng, i % 2 == 0), label=rng.choice("ab")) for i in range(40)]
    # one epoch: noise is what is scored, and the best of six noisy scores must not pass the gate
    hp = training_pb2.HyperParameters(epochs=1)
    job = _job(server, seq_cls("shuffled", ex, hyperparameters=hp, max_seconds=NO_BUDGET))
    assert job.state == training_pb2.JOB_STATE_REJECTED, (job.error, job.metrics)
    m = job.metrics
    assert m.validation_scheme == KFOLD and sum(c.status == "scored" for c in m.candidates) >= 2
    assert "not better" in job.error and m.gate_margin > m.validation_stderr  # best of several asks more


def test_auto_promotes_lora_where_no_frozen_head_separates_the_labels(server):
    # the label is whether the text's two ends agree: the tiny model's random frozen features do not
    # tell, while LoRA on both its layers learns to attend to the ends (the default, the upper half, is
    # one layer of two here)
    train, test = pair_examples(160, seed=1), pair_examples(100, seed=99)  # 160: a split, 32 validate
    assert not {e.text for e in train} & {e.text for e in test}  # no job sees the held-out examples
    hp = training_pb2.HyperParameters(learning_rate=1e-2, epochs=30, layers_to_transform=[0, 1], seed=1)
    job = _job(server, seq_cls("ends", train, hyperparameters=hp, max_seconds=NO_BUDGET))
    assert job.state == training_pb2.JOB_STATE_SUCCEEDED, job.error
    m = job.metrics
    heads = [c for c in m.candidates if c.method == HEAD_ONLY]
    loras = [c for c in m.candidates if c.method in (LORA, LORA_PROGRESSIVE) and c.status == "scored"]
    assert len(heads) == 4 and all(c.status == "scored" for c in heads) and loras
    best = max(loras, key=lambda c: c.score)
    for head in heads:  # clearly worse: more than three standard errors of the difference below
        assert best.score - head.score > 3 * math.hypot(best.stderr, head.stderr), (head, best)
    assert job.method in (LORA, LORA_PROGRESSIVE) and m.winner == best.name

    def held_out(**ref) -> float:
        return _evaluate(server, examples=test, **ref).accuracy

    auto = held_out(adapter="ends")
    assert auto >= 0.9, auto
    # a head by hand, promoted whatever it scores: held out too, more than three standard errors worse.
    # (AUTO's pick between the two LoRA methods is its best validated score, asserted above; training the
    # other one again by hand cost a third of this test's time and proved nothing more)
    req = seq_cls("ends-head", train, method=HEAD_ONLY, promote=training_pb2.PROMOTE_ALWAYS)
    head = held_out(job_id=_job(server, req).id)
    assert auto - head > 3 * math.sqrt(head * (1 - head) / len(test)), (auto, head)


def test_a_time_budget_keeps_the_cheapest_method_and_says_why_the_rest_were_not_tried(server):
    req = seq_cls("hurry", marker_examples(24, seed=12), max_seconds=0.001, hyperparameters=QUICK)
    job = _job(server, req)
    c = job.metrics.candidates
    assert c[0].status == "scored" and job.method == training_pb2.METHOD_HEAD_ONLY
    assert all(x.status in ("skipped", "stopped") and "time budget" in x.note for x in c[1:])


def _flipped(examples):
    return [training_pb2.Example(text=e.text, label="no" if e.label == "yes" else "yes") for e in examples]


def test_a_continued_version_that_forgets_the_previous_task_is_rejected(server):
    def head(examples, **kw):  # the default epochs: forgetting is judged on well-trained heads
        return seq_cls("keep", examples, method=training_pb2.METHOD_HEAD_ONLY, **kw)

    first = _job(server, head(marker_examples(40, seed=21)))
    assert first.state == training_pb2.JOB_STATE_SUCCEEDED, first.error
    again = _job(server, head(_flipped(marker_examples(40, seed=22))))
    assert again.state == training_pb2.JOB_STATE_REJECTED, again.error
    m = again.metrics
    assert m.replayed_examples == 20 and m.previous_task_examples == 20  # half replayed, half checked
    assert m.previous_task_score < m.previous_task_reference - m.previous_task_stderr
    assert "forgets the previous version's task" in again.error
    assert server.adapters.GetAdapter(common_pb2.AdapterRef(name="keep")).version == 1

    # more of the same task: no better than @1 already is (so ALWAYS), and nothing forgotten
    same = _job(server, head(marker_examples(30, seed=23), promote=training_pb2.PROMOTE_ALWAYS))
    assert same.state == training_pb2.JOB_STATE_SUCCEEDED, same.error
    v = server.adapters.GetAdapter(common_pb2.AdapterRef(name="keep@2")).validation
    assert (
        v.previous_task_examples > 0
        and v.previous_task_score >= v.previous_task_reference - v.previous_task_stderr
    )
    assert v.score == pytest.approx(same.metrics.validation_metric)


def _evaluate(run, **kw):
    return run.training.EvaluateAdapter(training_pb2.EvaluateRequest(**kw), timeout=120)


def test_evaluate_adapter_matches_peft_on_the_exported_adapter(server, tmp_path):
    # the export and the evaluation are under test, not the training: a held-out split, two epochs
    examples = marker_examples(40, seed=31)
    req = seq_cls(
        "judge",
        examples[:24],
        method=training_pb2.METHOD_LORA,
        validation=examples[24:],
        hyperparameters=training_pb2.HyperParameters(epochs=2),
        promote=training_pb2.PROMOTE_ALWAYS,
    )
    job = _job(server, req)
    assert job.state == training_pb2.JOB_STATE_SUCCEEDED, job.error
    rng = random.Random(32)
    texts = [marker_text(rng, rng.random() < 0.5) for _ in range(16)]
    truth = ["yes" if t.endswith(MARKER) != (i % 5 == 0) else "no" for i, t in enumerate(texts)]  # some wrong
    ex = [training_pb2.Example(text=t, label=y) for t, y in zip(texts, truth, strict=True)]
    got = _evaluate(server, adapter="judge", examples=ex)
    assert got.adapter == "judge@1" and got.examples == 16 and list(got.labels) == ["no", "yes"]

    probs = _peft_probs(_export(server, "judge", tmp_path / "judge"), ["no", "yes"], texts)
    pred = [max(p, key=p.get) for p in probs]
    confusion = [
        [sum(1 for t, q in zip(truth, pred, strict=True) if t == a and q == b) for b in ("no", "yes")]
        for a in ("no", "yes")
    ]
    assert [list(r.counts) for r in got.confusion] == confusion
    assert got.accuracy == pytest.approx(sum(t == q for t, q in zip(truth, pred, strict=True)) / 16)
    f1 = []
    for label in {*truth, *pred}:  # scikit-learn's macro average: labels in the truth or the predictions
        tp = sum(t == q == label for t, q in zip(truth, pred, strict=True))
        f1.append(2 * tp / (truth.count(label) + pred.count(label)))
    assert got.macro_f1 == pytest.approx(sum(f1) / len(f1))
    by_job = _evaluate(server, job_id=job.id, examples=ex)
    assert by_job.adapter == f"job:{job.id}" and by_job.accuracy == got.accuracy


def test_evaluate_completions_matches_transformers_and_the_base_model_can_be_scored(server):
    prompts = [f"q{i}?" for i in range(6)]
    ex = [training_pb2.Example(prompt=p, completion=" ok") for p in prompts]
    got = _evaluate(server, task=common_pb2.TASK_CAUSAL_LM, examples=ex)
    assert got.adapter == "" and got.examples == 6  # the base model

    tok, model = tiny_tokenizer(), build_tiny_llama().eval()
    total, n, exact = 0.0, 0, 0
    with torch.no_grad():
        for p in prompts:
            x = tok(p)["input_ids"]
            y = tok(" ok", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            logits = model(input_ids=torch.tensor([x + y])).logits[0, len(x) - 1 : len(x) - 1 + len(y)]
            total += float(torch.nn.functional.cross_entropy(logits, torch.tensor(y), reduction="sum"))
            n += len(y)
            exact += bool((logits.argmax(-1) == torch.tensor(y)).all())
    assert got.tokens == n  # the completion's tokens and eos
    assert got.loss == pytest.approx(total / n, rel=1e-4)
    assert got.perplexity == pytest.approx(torch.exp(torch.tensor(total / n)).item(), rel=1e-4)
    assert got.exact_match == pytest.approx(exact / 6)

    with pytest.raises(grpc.RpcError) as err:
        _evaluate(server, task=common_pb2.TASK_SEQ_CLS, examples=[training_pb2.Example(text="a", label="b")])
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.RpcError) as err:
        _evaluate(server, adapter="nope", examples=ex)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_the_cli_evaluates_and_shows_candidates_and_validation(server, capsys, monkeypatch, tmp_path):
    import json

    from hotlora.clients.cli import main

    for var in ("HOTLORA_ADDRESS", "HOTLORA_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    rows = [{"text": e.text, "label": e.label} for e in marker_examples(24, seed=41)]
    data = tmp_path / "ex.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))

    def hl(*args):
        capsys.readouterr()
        code = main([*args, "--address", server.address])
        return code, capsys.readouterr().out

    create = ["finetune", "create", "--adapter", "cli-auto", "--task", "seq_cls", "--examples", str(data)]
    code, out = hl(*create, "--method", "lora_progressive", "--epochs", "2", "--no-watch")
    assert code == 0
    _, job = watch(server.training, out.strip())
    assert job.method == training_pb2.METHOD_LORA_PROGRESSIVE
    code, out = hl("finetune", "show", job.id)
    assert code == 0 and "candidate LORA_PROGRESSIVE" in out and "why" in out
    if job.promoted:
        code, out = hl("adapters", "show", "cli-auto")
        assert code == 0 and "kfold" in out
    code, out = hl("adapters", "evaluate", "--job", job.id, "--examples", str(data), "--json")
    assert code == 0
    got = json.loads(out)
    assert got["examples"] == 24 and got["labels"] == ["no", "yes"] and len(got["confusion"]) == 2
