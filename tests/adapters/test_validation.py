"""How a fine-tune is scored: folds that cover every example once with labels in proportion, the switch
to a held-out split on more data, standard errors, and a gate that asks more of the best of several."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest

from hotlora.adapters.training.trainer import frozen_layers
from hotlora.adapters.training.validation import (
    KFOLD_MAX_EXAMPLES,
    Score,
    choose_epochs,
    combine_folds,
    gate_margin,
    plan_validation,
    stratified_folds,
)


def test_folds_cover_every_example_once_and_keep_label_proportions():
    keys = ["pos"] * 12 + ["neg"] * 12 + ["odd"] * 3
    folds = stratified_folds(keys, 5, seed=0)
    seen = [i for f in folds for i in f.val]
    assert sorted(seen) == list(range(len(keys)))  # validated exactly once
    for f in folds:
        assert not set(f.train) & set(f.val) and len(f.train) + len(f.val) == len(keys)
        counts = Counter(keys[i] for i in f.val)
        assert all(abs(counts[k] - n / 5) <= 1 for k, n in (("pos", 12), ("neg", 12)))
    assert max(len(f.val) for f in folds) - min(len(f.val) for f in folds) <= 1
    assert stratified_folds(keys, 5, seed=0) == folds
    assert stratified_folds(keys, 5, seed=1) != folds


def test_small_data_is_cross_validated_more_is_held_out_and_given_validation_is_used():
    small = plan_validation(["a", "b"] * 12, 0, seed=0)
    assert small.scheme == "kfold" and small.refit and len(small.folds) == 5
    big = plan_validation(["a", "b"] * (KFOLD_MAX_EXAMPLES // 2), 0, seed=0)
    assert big.scheme == "holdout" and len(big.folds) == 1
    assert len(big.folds[0].val) == KFOLD_MAX_EXAMPLES // 5
    given = plan_validation(["a", "b"] * 5 + ["a", "b"], 2, seed=0)
    assert given.scheme == "holdout" and given.folds[0].val == (10, 11)


def test_fold_scores_combine_into_a_mean_with_its_standard_error():
    s = combine_folds([0.8, 0.6, 1.0, 0.8, 0.8], [5, 5, 5, 5, 4], binomial=True)
    assert s.value == pytest.approx((0.8 * 5 + 0.6 * 5 + 1.0 * 5 + 0.8 * 5 + 0.8 * 4) / 24)
    spread = math.sqrt(sum((x - s.value) ** 2 for x in [0.8, 0.6, 1.0, 0.8, 0.8]) / 4 / 5)
    binomial = math.sqrt(s.value * (1 - s.value) / 24)
    assert s.stderr == pytest.approx(max(spread, binomial))
    assert combine_folds([-1.0, -1.2], [3, 3], binomial=False).stderr == pytest.approx(0.1)


def test_the_gate_asks_more_of_the_best_of_several_candidates():
    one = gate_margin("SEQ_CLS", 0.5, 24, Score(0.7, 0.09), compared=1)
    four = gate_margin("SEQ_CLS", 0.5, 24, Score(0.7, 0.09), compared=4)
    assert one == pytest.approx(math.sqrt(0.25 / 24))  # the baseline's error is the larger here
    assert four == pytest.approx(one * math.sqrt(2 * math.log(4)))
    assert gate_margin("CAUSAL_LM", -2.0, 20, Score(-1.0, 0.3), compared=3) == 0.0


def test_a_model_that_learns_nothing_scores_chance_not_its_luckiest_epoch():
    # 5 folds of 8 examples, 30 evaluations each, every one a coin toss per example: each fold's own
    # best epoch averages about 0.8, and so would the fold scores at the best epoch of their mean
    rng = random.Random(0)
    sizes, chosen, own_best = [8] * 5, [], []
    for _ in range(200):
        curves = [
            [((10 * e, 0), (sum(rng.random() < 0.5 for _ in range(8)) / 8, 0.0)) for e in range(1, 31)]
            for _ in sizes
        ]
        chosen.append(choose_epochs(curves, sizes, binomial=True).score.value)
        own_best.append(sum(max(a for _, (a, _) in c) for c in curves) / len(curves))
    assert sum(own_best) / 200 > 0.75
    assert sum(chosen) / 200 == pytest.approx(0.5, abs=0.02)


def test_one_schedule_is_chosen_on_the_mean_of_the_folds_and_each_fold_scored_at_the_others_choice():
    # fold 0 peaks at epoch 10, fold 1 at 20; fold 2 stopped after 20 and keeps that score at 30
    curves = [
        [((10, 0), (1.0, -0.2)), ((20, 0), (0.5, 0.0)), ((30, 0), (0.5, 0.0))],
        [((10, 0), (0.5, 0.0)), ((20, 0), (1.0, 0.0)), ((30, 0), (0.75, 0.0))],
        [((10, 0), (0.5, 0.0)), ((20, 0), (0.75, 0.0))],
    ]
    choice = choose_epochs(curves, [4, 4, 4], binomial=False)
    assert choice.schedule == (20, 0)  # mean accuracy 0.75 over 0.67 at 10 and at 30
    # fold 0 at 20 (folds 1, 2: 0.875), fold 1 at 10 (folds 0, 2: 0.75), fold 2 at 20 (folds 0, 1 tie
    # at 0.75 on 10 and 20; the loss breaks it); each fold's own best would have scored 0.92
    assert choice.score.value == pytest.approx((0.5 + 0.5 + 0.75) / 3)
    with pytest.raises(ValueError, match=r"2\+ folds"):
        choose_epochs(curves[:1], [4], binomial=False)


def test_progressive_unfreezing_starts_at_the_top_and_reaches_every_layer():
    layers = list(range(8))
    assert frozen_layers(layers, 1) == set(range(6))
    assert frozen_layers(layers, 2) == set(range(4))
    assert frozen_layers(layers, 4) == set() == frozen_layers(layers, 9)
    assert frozen_layers([5], 1) == set()
