"""The trainer without a server: bounded steps that leave the shared model and context as they found them,
progressive unfreezing, and the refit that runs the epochs k-fold found best."""

from __future__ import annotations

import random

import pytest
import torch

from hotlora.adapters.base_model_info import BaseModelInfo
from hotlora.adapters.lora_layers import inject_multi_lora
from hotlora.adapters.training.finetune_spec import (
    Example,
    FineTuneSpec,
    HyperParams,
    with_defaults,
)
from hotlora.adapters.training.trainer import TrainData
from hotlora.adapters.training.trainer_cls import ClassifierTrainer
from hotlora.adapters.training.trainer_lm import CompletionTrainer
from tests.tiny import build_tiny_llama, tiny_tokenizer

TARGETS = ("q_proj", "v_proj", "down_proj")


def _spec(counts: dict[str, int], **kw) -> FineTuneSpec:
    ex = tuple(Example(text=f"{label} {i}", label=label) for label, n in counts.items() for i in range(n))
    return FineTuneSpec(adapter="x", task="SEQ_CLS", examples=ex, **kw)


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


def _train_with_units(model, ctx, base, make, unit_seconds: float):
    """Train to the end with `unit_seconds` per unit; (the outcome's weights, units that ended mid-pass)."""
    trainer = make(model, ctx, base, unit_seconds)
    _run_bounded(trainer, ctx, model)
    return trainer.outcome.weights, trainer.units.mid_pass


def _classifier(model, ctx, base, unit_seconds):
    tok = tiny_tokenizer()
    rng = random.Random(3)
    texts = ["".join(rng.choice("abc ") for _ in range(8)) + (" zz" if i % 2 else "") for i in range(20)]
    ids = [tok(t)["input_ids"] for t in texts]
    data = TrainData(ids[:14], [i % 2 for i in range(14)], ids[14:], [i % 2 for i in range(14, 20)])
    hp = with_defaults(HyperParams(epochs=2, batch_size=5, seed=7), "LORA", 14, base.num_layers, TARGETS)
    return ClassifierTrainer(
        model, ctx, data, labels=("no", "yes"), method="LORA", hyper=hp, shapes=base.linear_shapes,
        num_layers=base.num_layers, unit_seconds=unit_seconds,
    )  # fmt: skip


def _completion(model, ctx, base, unit_seconds):
    tok = tiny_tokenizer()
    prompts = [tok(f"q{i}?")["input_ids"] for i in range(10)]
    target = tok(" ok", add_special_tokens=False)["input_ids"] + [2]
    data = TrainData(prompts[:7], [target] * 7, prompts[7:], [target] * 3)
    hp = with_defaults(
        HyperParams(epochs=2, batch_size=3, learning_rate=1e-2, seed=7), "LORA", 7, base.num_layers, TARGETS
    )
    return CompletionTrainer(model, ctx, data, hyper=hp, shapes=base.linear_shapes, unit_seconds=unit_seconds)


@pytest.mark.parametrize("make", [_classifier, _completion], ids=["seq_cls", "causal_lm"])
def test_units_that_end_mid_pass_train_the_same_adapter(model_and_ctx, make):
    """A unit budget nothing fits in ends units inside forward and backward passes; the adapter is the one
    trained with units that end only between mini-batches (fixed seed)."""
    model, ctx, base = model_and_ctx
    whole, whole_mid = _train_with_units(model, ctx, base, make, 3600.0)
    sliced, sliced_mid = _train_with_units(model, ctx, base, make, 1e-9)
    assert whole_mid == 0 and sliced_mid > 50  # the second really was cut into slices
    assert whole.modules.keys() == sliced.modules.keys()
    for key, m in whole.modules.items():
        torch.testing.assert_close(sliced.modules[key].a, m.a, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(sliced.modules[key].b, m.b, rtol=1e-5, atol=1e-6)
        assert m.b.abs().sum() > 0  # LoRA did train
    if whole.head_weight is not None:
        torch.testing.assert_close(sliced.head_weight, whole.head_weight, rtol=1e-5, atol=1e-6)
