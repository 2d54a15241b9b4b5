"""The losses of a training loop the user drives (the Tinker API's built-in ones), per token, in torch.

Each datum is a sequence of T input tokens with per-position loss inputs of length T: position t is scored
on `target_tokens[t]` (the token that follows input t):
`logprobs[t] = log p(target_tokens[t] | input[:t+1])`.
The loss of a datum is the sum of its elementwise losses (the SDK's convention: no mean, the caller weights):

    cross_entropy        l_t = -weights_t · logprobs_t
    importance_sampling  l_t = -exp(logprobs_t - sampling_logprobs_t) · advantages_t
    ppo                  l_t = -min(r_t · A_t, clip(r_t, clip_low, clip_high) · A_t),  r_t = exp(lp_t - slp_t)

`logprobs` in loss_fn_inputs (RL) are the sampler's log-probabilities of the same target tokens."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from hotlora.adapters.errors import InvalidArgument

# loss name -> the loss_fn_inputs it reads (all of length T); `weights` of cross_entropy may be left out (1)
INPUTS: dict[str, tuple[str, ...]] = {
    "cross_entropy": ("target_tokens", "weights"),
    "importance_sampling": ("target_tokens", "logprobs", "advantages"),
    "ppo": ("target_tokens", "logprobs", "advantages"),
}
OPTIONAL = {("cross_entropy", "weights")}
CONFIG: dict[str, dict[str, float]] = {  # loss_fn_config keys and their defaults
    "cross_entropy": {},
    "importance_sampling": {},
    "ppo": {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2},
}


@dataclass(frozen=True)
class LossDatum:
    """One datum, checked: input tokens and its loss inputs as 1-D arrays of the same length."""

    tokens: list[int]
    inputs: dict[str, np.ndarray]


def check_loss(loss_fn: str, config: dict[str, float | str]) -> dict[str, float]:
    """The loss's config with defaults; InvalidArgument naming what is wrong."""
    if loss_fn not in INPUTS:
        offered = ", ".join(sorted(INPUTS))
        raise InvalidArgument(f"loss_fn {loss_fn!r} is not offered by this server (offered: {offered})")
    known = CONFIG[loss_fn]
    out = dict(known)
    for key, value in (config or {}).items():
        if key not in known:
            allowed = ", ".join(sorted(known)) or "none"
            raise InvalidArgument(f"loss_fn_config key {key!r} is not read by {loss_fn} (keys: {allowed})")
        if isinstance(value, str) or not math.isfinite(float(value)):
            raise InvalidArgument(f"loss_fn_config {key} must be a finite number (got {value!r})")
        out[key] = float(value)
    if loss_fn == "ppo" and not 0 <= out["clip_low_threshold"] <= 1 <= out["clip_high_threshold"]:
        raise InvalidArgument(
            "ppo needs 0 <= clip_low_threshold <= 1 <= clip_high_threshold "
            f"(got {out['clip_low_threshold']}, {out['clip_high_threshold']})"
        )
    return out


def check_datum(loss_fn: str, index: int, tokens: list[int], inputs: dict[str, np.ndarray], vocab: int):
    """A LossDatum, or InvalidArgument naming the datum and the field."""
    where = f"datum {index}"
    n = len(tokens)
    if n == 0:
        raise InvalidArgument(f"{where}: model_input has no tokens")
    bad = [t for t in tokens if not 0 <= t < vocab]
    if bad:
        raise InvalidArgument(
            f"{where}: model_input token id {bad[0]} is outside the vocabulary [0, {vocab})"
        )
    wanted = INPUTS[loss_fn]
    extra = sorted(set(inputs) - set(wanted))
    if extra:
        raise InvalidArgument(
            f"{where}: loss_fn_inputs {extra} are not read by {loss_fn} (it reads {list(wanted)})"
        )
    out = {}
    for name in wanted:
        if name not in inputs:
            if (loss_fn, name) in OPTIONAL:
                out[name] = np.ones(n, np.float32)
                continue
            raise InvalidArgument(f"{where}: {loss_fn} needs loss_fn_inputs[{name!r}]")
        a = inputs[name]
        if a.ndim != 1 or a.shape[0] != n:
            raise InvalidArgument(
                f"{where}: loss_fn_inputs[{name!r}] has shape {list(a.shape)}, but model_input has {n} "
                f"tokens: every loss input is one value per input position ([{n}])"
            )
        if name == "target_tokens":
            a = a.astype(np.int64)
            bad = a[(a < 0) | (a >= vocab)]
            if bad.size:
                raise InvalidArgument(
                    f"{where}: target_tokens has token id {int(bad[0])}, outside the vocabulary [0, {vocab})"
                )
        else:
            a = a.astype(np.float32)
            if not np.isfinite(a).all():
                raise InvalidArgument(f"{where}: loss_fn_inputs[{name!r}] has a NaN or infinite value")
        out[name] = a
    return LossDatum(list(tokens), out)


def elementwise_loss(
    loss_fn: str, logprobs: torch.Tensor, inputs: dict[str, torch.Tensor], config: dict[str, float]
) -> torch.Tensor:
    """[T] losses from the model's [T] log-probabilities of the target tokens (differentiable)."""
    if loss_fn == "cross_entropy":
        return -inputs["weights"] * logprobs
    ratio = torch.exp(logprobs - inputs["logprobs"])
    adv = inputs["advantages"]
    if loss_fn == "importance_sampling":
        return -ratio * adv
    clipped = torch.clamp(ratio, config["clip_low_threshold"], config["clip_high_threshold"])
    return -torch.minimum(ratio * adv, clipped * adv)
