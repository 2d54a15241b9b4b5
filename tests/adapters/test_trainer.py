"""The trainer without a server: bounded steps that leave the shared model and context as they found them,
stratified splits, AUTO's choice and the gate's margin."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch
from hotlora.adapters.base_model_info import BaseModelInfo
from hotlora.adapters.finetune_jobs import gate_margin
from hotlora.adapters.finetune_spec import (
    Example,
    FineTuneSpec,
    HyperParams,
    resolve_method,
    split_validation,
    with_defaults,
)
from hotlora.adapters.lora_layers import inject_multi_lora
from hotlora.adapters.trainer import TrainData
from hotlora.adapters.trainer_cls import ClassifierTrainer
from hotlora.adapters.trainer_lm import CompletionTrainer

from tests.tiny import build_tiny_llama, tiny_tokenizer

TARGETS = ("q_proj", "v_proj", "down_proj")


def _spec(counts: dict[str, int], **kw) -> FineTuneSpec:
    ex = tuple(Example(text=f"{label} {i}", label=label) for label, n in counts.items() for i in range(n))
    return FineTuneSpec(adapter="x", task="SEQ_CLS", examples=ex, **kw)


def test_split_is_stratified_seeded_and_disjoint():
    spec = _spec({"a": 50, "b": 10, "c": 2})
    train, val = split_validation(spec)
    assert Counter(e.label for e in val) == {"a": 10, "b": 2, "c": 1}
    assert not set(train) & set(val) and len(train) + len(val) == 62
    assert split_validation(spec) == (train, val)
    assert split_validation(_spec({"a": 50, "b": 10, "c": 2}, hyper=HyperParams(seed=1)))[1] != val


def test_auto_uses_feature_extraction_for_few_examples_and_lora_for_more():
    assert resolve_method(_spec({"a": 60, "b": 60}), 96, 48) == "HEAD_ONLY"  # < 200 examples
    assert resolve_method(_spec({"a": 300, "b": 10}), 248, 8) == "HEAD_ONLY"  # < 20 of one class
    assert resolve_method(_spec({"a": 200, "b": 200}), 320, 160) == "LORA"
    lm = FineTuneSpec(adapter="x", task="CAUSAL_LM", method="AUTO")
    assert resolve_method(lm, 5, 0) == "LORA"


def test_gate_margin_is_one_standard_error_for_accuracy_only():
    assert gate_margin("SEQ_CLS", 0.75, 100) == pytest.approx((0.75 * 0.25 / 100) ** 0.5)
    assert gate_margin("SEQ_CLS", 1.0, 20) > 0
    assert gate_margin("CAUSAL_LM", -2.0, 20) == 0.0


@pytest.fixture
def model_and_ctx():
    model = build_tiny_llama().requires_grad_(False)  # frozen, as the server loads it
    base = BaseModelInfo.from_model(model)
    ctx, _ = inject_multi_lora(model, TARGETS, num_slots=2, max_rank=8)
    return model, ctx, base


def _run_bounded(trainer, ctx, model) -> int:
    """Step to the end, checking the contract after every step; returns the number of steps."""
    before = {k: v.clone() for k, v in model.state_dict().items() if "bank" not in k}
    sentinel = object()
    ctx.batch = sentinel
    steps, last_step = 0, 0
    while trainer.step():
        steps += 1
        assert ctx.training == {} and ctx.batch is sentinel
        assert trainer.progress.step - last_step <= 1  # at most one optimizer update per step
        last_step = trainer.progress.step
    ctx.batch = None
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the base is used in place, never changed
    assert all(p.grad is None for p in model.parameters())
    return steps


def test_lora_classifier_steps_are_bounded_and_leave_the_model_untouched(model_and_ctx):
    model, ctx, base = model_and_ctx
    tok = tiny_tokenizer()
    rng = random.Random(0)
    texts = ["".join(rng.choice("abc ") for _ in range(8)) + (" zz" if i % 2 else "") for i in range(40)]
    ids = [tok(t)["input_ids"] for t in texts]
    data = TrainData(ids[:32], [i % 2 for i in range(32)], ids[32:], [i % 2 for i in range(32, 40)])
    hp = with_defaults(HyperParams(epochs=3, batch_size=4), "LORA", 32, base.num_layers, TARGETS)
    trainer = ClassifierTrainer(
        model,
        ctx,
        data,
        labels=("no", "yes"),
        method="LORA",
        hyper=hp,
        shapes=base.linear_shapes,
        num_layers=base.num_layers,
    )
    steps = _run_bounded(trainer, ctx, model)
    assert steps >= hp.epochs * 8
    w = trainer.outcome.weights
    assert w.task == "SEQ_CLS" and w.labels == ("no", "yes") and w.head_weight.shape == (2, 64)
    assert {layer for layer, _ in w.modules} == {1}  # default: the upper half of the 2 layers


def test_completion_trainer_scores_the_base_model_first(model_and_ctx):
    model, ctx, base = model_and_ctx
    tok = tiny_tokenizer()
    prompts = [tok(f"q{i}?")["input_ids"] for i in range(12)]
    target = tok(" ok", add_special_tokens=False)["input_ids"] + [2]
    data = TrainData(prompts[:9], [target] * 9, prompts[9:], [target] * 3)
    hp = with_defaults(
        HyperParams(epochs=4, batch_size=3, learning_rate=1e-2), "LORA", 9, base.num_layers, TARGETS
    )
    trainer = CompletionTrainer(model, ctx, data, hyper=hp, shapes=base.linear_shapes)
    _run_bounded(trainer, ctx, model)
    out = trainer.outcome
    assert out.metric_name == "neg_completion_loss" and out.score > out.baseline
    assert out.baseline == pytest.approx(trainer.progress.baseline_metric)
