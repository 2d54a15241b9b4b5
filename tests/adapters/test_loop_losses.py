"""The Tinker API's built-in losses (adapters/training/loop_losses.py) against the formulas written out in
numpy, gradients included, and the datum checks' messages."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hotlora.adapters.errors import InvalidArgument
from hotlora.adapters.training.loop_losses import check_datum, check_loss, elementwise_loss

LP = np.array([-0.5, -1.0, -2.0, -0.1], np.float32)  # the model's logprobs of the targets
SLP = np.array([-0.7, -0.6, -2.0, -0.3], np.float32)  # the sampler's
ADV = np.array([1.0, -1.0, 2.0, -0.5], np.float32)


def _loss(name, inputs, config=None):
    lp = torch.tensor(LP, requires_grad=True)
    out = elementwise_loss(
        name, lp, {k: torch.tensor(v) for k, v in inputs.items()}, check_loss(name, config)
    )
    out.sum().backward()
    return out.detach().numpy(), lp.grad.numpy()


def test_cross_entropy_is_minus_the_weighted_logprobs():
    w = np.array([0.0, 1.0, 0.5, 1.0], np.float32)
    loss, grad = _loss("cross_entropy", {"weights": w})
    assert np.allclose(loss, -w * LP) and np.allclose(grad, -w)


def test_importance_sampling_weights_advantages_by_the_probability_ratio():
    ratio = np.exp(LP - SLP)
    loss, grad = _loss("importance_sampling", {"logprobs": SLP, "advantages": ADV})
    assert np.allclose(loss, -ratio * ADV, rtol=1e-6)
    assert np.allclose(grad, -ratio * ADV, rtol=1e-6)  # d/dlp of -exp(lp - slp) A


def test_ppo_clips_the_ratio_where_it_would_gain():
    low, high = 0.9, 1.1
    ratio = np.exp(LP - SLP)  # 1.22, 0.67, 1.0, 1.22
    loss, grad = _loss(
        "ppo", {"logprobs": SLP, "advantages": ADV}, {"clip_low_threshold": low, "clip_high_threshold": high}
    )
    want = -np.minimum(ratio * ADV, np.clip(ratio, low, high) * ADV)
    assert np.allclose(loss, want, rtol=1e-6)
    # position 0: ratio 1.22 > 1.1 with A > 0 -> clipped, no gradient; position 1: ratio 0.67 < 0.9 with A < 0
    # -> clipped too; positions 2 and 3 unclipped (ratio 1, and 1.22 with A < 0: the min keeps the ratio)
    assert grad[0] == 0 and grad[1] == 0
    assert np.allclose(grad[2:], (-ratio * ADV)[2:], rtol=1e-6)


def test_bad_data_is_refused_naming_the_datum_and_the_field():
    targets = np.array([1, 2, 3])
    good = {"target_tokens": targets, "weights": np.ones(3, np.float32)}
    short, far = np.ones(2, np.float32), np.array([1, 2, 10])
    nan = {"target_tokens": targets, "logprobs": SLP[:3], "advantages": np.array([1, np.nan, 0])}
    assert check_datum("cross_entropy", 0, [5, 6, 7], good, vocab=10).inputs["weights"].shape == (3,)
    cases = [
        ("cross_entropy", [5, 6, 7], {**good, "weights": short}, ("datum 4", "weights", "[3]")),
        ("cross_entropy", [5, 60, 7], good, ("token id 60", "vocabulary [0, 10)")),
        ("cross_entropy", [5, 6, 7], {**good, "target_tokens": far}, ("target_tokens", "10")),
        ("importance_sampling", [5, 6, 7], nan, ("advantages", "NaN")),
        ("importance_sampling", [5, 6, 7], good, ("weights", "not read by importance_sampling")),
    ]
    for loss, tokens, inputs, words in cases:
        with pytest.raises(InvalidArgument) as e:
            check_datum(loss, 4, tokens, inputs, vocab=10)
        assert all(w in e.value.message for w in words), (words, e.value.message)
    with pytest.raises(InvalidArgument, match="clip_low_threshold <= 1"):
        check_loss("ppo", {"clip_low_threshold": 1.5})
    with pytest.raises(InvalidArgument, match="not offered"):
        check_loss("dpo", {})
