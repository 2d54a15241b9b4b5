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
