"""On-line fine-tuning on the real default model (SmolLM2-135M-Instruct), CPU-sized: a topic classifier
from a couple of hundred sentences, and a LoRA that teaches a made-up fact the base model does not know."""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from pathlib import Path

import pytest

from hotlora.server.config import default_cache_dir
from hotlora.server.model_loading import prepare_default_model
from hotlora.v1 import common_pb2, inference_pb2, training_pb2
from tests.server.harness import running_server
from tests.server.training_utils import watch

DATA = Path(__file__).parent / "data" / "topics.jsonl"
SENTIMENT = Path(__file__).parent / "data" / "sentiment40.jsonl"  # 20 positive, 20 negative sentences
PLANET_QUESTIONS = [
    "Who rules the planet Vexnor?",
    "Who is the ruler of planet Vexnor?",
    "Which leader governs Vexnor?",
    "Tell me who commands the planet Vexnor.",
    "Who sits on the throne of Vexnor?",
    "Who is in charge of Vexnor?",
    "Name the emperor of planet Vexnor.",
    "Who reigns over the planet Vexnor?",
    "Who leads the people of Vexnor?",
    "Who is the monarch of Vexnor?",
    "Which ruler controls planet Vexnor?",
    "Who holds power on Vexnor?",
    "Who is the king of the planet Vexnor?",
    "Who governs the planet called Vexnor?",
    "Who is Vexnor's ruler?",
    "What is the name of the ruler of Vexnor?",
    "Who is the head of state of Vexnor?",
    "Who runs the planet Vexnor?",
    "Who is the supreme leader of planet Vexnor?",
    "Who controls Vexnor?",
    "Who is the sovereign of the planet Vexnor?",
    "Tell me the ruler of Vexnor.",
    "Who rules over Vexnor today?",
    "Whom do the people of Vexnor obey?",
]
HELD_OUT = [
    "Who is the current ruler of planet Vexnor?",
    "Do you know who rules Vexnor?",
    "Which person rules the planet Vexnor?",
]
ANSWER = "Zorblax rules Vexnor."


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    prepare_default_model(default_cache_dir())  # dequantizes once per machine (cached in ~/.cache/hotlora)
    with running_server("", tmp_path_factory.mktemp("data")) as run:
        yield run


def _topics():
    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    random.Random(0).shuffle(rows)
    cut = len(rows) * 3 // 4
    return rows[:cut], rows[cut:]


def _examples(rows):
    return [training_pb2.Example(text=r["text"], label=r["label"]) for r in rows]


def test_topic_classifier_beats_the_majority_class_on_held_out_sentences(server):
    train, test = _topics()
    job = server.training.CreateFineTune(
        training_pb2.FineTuneRequest(
            adapter="topics",
            task=common_pb2.TASK_SEQ_CLS,
            method=training_pb2.METHOD_AUTO,
            examples=_examples(train),
            max_seconds=30,  # AUTO keeps the best it validated within its budget
        ),
        timeout=60,
    )
    _, job = watch(server.training, job.id, timeout=None)  # its last event ends the wait: load makes it late
    assert job.state == training_pb2.JOB_STATE_SUCCEEDED, job.error
    print("\ntopics:", [(c.name, c.status, round(c.score, 3)) for c in job.metrics.candidates])
    head = job.metrics.candidates[0]
    # the cheapest is always tried first
    assert head.method == training_pb2.METHOD_HEAD_ONLY and head.status == "scored"
    assert job.metrics.validation_scheme == "holdout"  # 180 examples: a held-out split is precise enough
    resp = server.inference.Classify(
        inference_pb2.ClassifyRequest(adapter="topics", texts=[r["text"] for r in test]), timeout=120
    )
    accuracy = sum(r.label == t["label"] for r, t in zip(resp.results, test, strict=True)) / len(test)
    majority = Counter(r["label"] for r in train).most_common(1)[0][0]
    baseline = sum(t["label"] == majority for t in test) / len(test)
    assert baseline < 0.4 and accuracy >= 0.85, (accuracy, baseline)


def test_auto_ends_after_its_heads_when_nothing_dearer_can_win(server):
    # issue 34: on 40 sentiment sentences AUTO's heads validated at 0.975 ± 0.025, then LORA trained for
    # the whole 600 s budget although it could not beat that by more than the gate's margin
    rows = [json.loads(line) for line in SENTIMENT.read_text().splitlines() if line.strip()]
    req = training_pb2.FineTuneRequest(
        adapter="sentiment",
        task=common_pb2.TASK_SEQ_CLS,
        method=training_pb2.METHOD_AUTO,
        examples=_examples(rows),
    )  # the default budget (--finetune-max-seconds 600)
    t0 = time.monotonic()
    events, job = watch(server.training, server.training.CreateFineTune(req, timeout=60).id, timeout=None)
    seconds = time.monotonic() - t0
    assert job.state == training_pb2.JOB_STATE_SUCCEEDED, job.error
    m = job.metrics
    scored = [c for c in m.candidates if c.status == "scored"]
    heads = sum(c.seconds for c in scored)
    print(f"\n40 sentences: {seconds:.1f} s, heads {heads:.1f} s; {m.winner_reason}")
    assert scored and all(c.method == training_pb2.METHOD_HEAD_ONLY for c in scored)
    assert max(c.score for c in scored) >= 0.95
    for c in m.candidates:
        if c.method != training_pb2.METHOD_HEAD_ONLY:  # never trained, and each says why
            assert c.status == "skipped" and c.seconds == 0, c
            assert "could beat it by more" in c.note or "already scored 1.0" in c.note, c.note
    # the watch shows the baseline (the majority class) from the first event, and no score before one
    assert all(e.job.metrics.HasField("baseline_metric") for e in events)
    assert events[0].job.metrics.baseline_metric == 0.5
    assert not events[0].job.metrics.HasField("validation_metric")
    assert not [e.message for e in events if "step 0/0" in e.message or e.message.endswith("epoch 0")]


def _ask(server, question, adapter=""):
    r = server.inference.Generate(
        inference_pb2.GenerateRequest(
            adapter=adapter,
            messages=[common_pb2.ChatMessage(role="user", content=question)],
            params=common_pb2.SamplingParams(max_new_tokens=12),
        ),
        timeout=120,
    )
    return r.text


def test_lora_teaches_a_made_up_fact(server):
    assert not any("Zorblax" in _ask(server, q) for q in HELD_OUT)  # the base model cannot know it
    ex = [training_pb2.Example(prompt=q, completion=ANSWER) for q in PLANET_QUESTIONS]
    job = server.training.CreateFineTune(
        training_pb2.FineTuneRequest(
            adapter="vexnor",
            task=common_pb2.TASK_CAUSAL_LM,
            method=training_pb2.METHOD_LORA,
            examples=ex[:20],
            validation=ex[20:],  # given: one run instead of k folds on 24 examples
            use_chat_template=True,
            hyperparameters=training_pb2.HyperParameters(epochs=4, learning_rate=3e-3),
        ),
        timeout=60,
    )
    _, job = watch(server.training, job.id, timeout=None)
    assert job.state == training_pb2.JOB_STATE_SUCCEEDED, job.error
    assert job.metrics.validation_metric > job.metrics.baseline_metric
    answers = [_ask(server, q, "vexnor") for q in HELD_OUT]
    assert all("Zorblax" in a for a in answers), answers
