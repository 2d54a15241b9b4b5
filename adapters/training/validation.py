"""How a fine-tune's score is measured: k-fold cross-validation on small data, a held-out split on more.

Four held-out examples say almost nothing (one mistake moves accuracy by 0.25), so below
`KFOLD_MAX_EXAMPLES` every example is validated once, by a model that did not train on it (k folds,
stratified by label for SEQ_CLS), and the promoted adapter is then trained on all examples for the
number of epochs the folds found best. Above it a held-out split is cheaper and precise enough.

Under k-fold no fold is scored at an epoch chosen on its own validation examples: a fold's best epoch
would pick its luckiest evaluation, and a model that learns nothing would score above chance
(`choose_epochs`). The score comes with its standard error; the gate asks for an improvement beyond
it, more when the winner is the best of several candidates (`gate_margin`)."""

from __future__ import annotations

import math
import random
from collections import Counter, defaultdict
from dataclasses import dataclass

KFOLD_MAX_EXAMPLES = 100
"""Training examples (no validation set given) below which k-fold cross-validation is used."""
FOLDS = 5


@dataclass(frozen=True)
class Fold:
    train: tuple[int, ...]
    val: tuple[int, ...]


@dataclass(frozen=True)
class ValidationPlan:
    scheme: str
    """"kfold" (the adapter is refitted on every example) or "holdout" (the fold's model is the adapter)."""
    folds: tuple[Fold, ...]

    @property
    def refit(self) -> bool:
        return self.scheme == "kfold"

    def describe(self) -> str:
        if self.refit:
            return f"{len(self.folds)}-fold cross-validation"
        return f"held-out validation ({len(self.folds[0].val)} examples)"


def plan_validation(keys: list[str], n_given_val: int, seed: int) -> ValidationPlan:
    """`keys`: one stratification key per example (the label for SEQ_CLS, "" otherwise), the given
    validation examples last (`n_given_val` of them). Given validation examples are used as given."""
    n = len(keys) - n_given_val
    if n_given_val:
        return ValidationPlan("holdout", (Fold(tuple(range(n)), tuple(range(n, len(keys)))),))
    if n >= KFOLD_MAX_EXAMPLES:
        from hotlora.adapters.training.finetune_spec import VALIDATION_FRACTION

        k = max(2, round(1 / VALIDATION_FRACTION))
        fold = stratified_folds(keys, k, seed)[0]
        return ValidationPlan("holdout", (fold,))
    return ValidationPlan("kfold", tuple(stratified_folds(keys, min(FOLDS, n), seed)))


def stratified_folds(keys: list[str], k: int, seed: int) -> list[Fold]:
    """k disjoint validation folds covering every example once; each key's examples dealt round-robin
    after a seeded shuffle, so every fold holds each label in proportion (±1)."""
    if not 2 <= k <= len(keys):
        raise ValueError(f"k-fold needs 2 <= k <= {len(keys)} examples (got k={k})")
    rng = random.Random(seed)
    groups: dict[str, list[int]] = defaultdict(list)
    for i, key in enumerate(keys):
        groups[key].append(i)
    members: list[list[int]] = [[] for _ in range(k)]
    turn = 0
    for key in sorted(groups):
        items = groups[key][:]
        rng.shuffle(items)
        for i in items:  # continue the deal where the previous label stopped: folds stay the same size
            members[turn % k].append(i)
            turn += 1
    everyone = set(range(len(keys)))
    return [Fold(tuple(sorted(everyone - set(m))), tuple(sorted(m))) for m in members]


@dataclass(frozen=True)
class Score:
    value: float
    stderr: float


def combine_folds(scores: list[float], sizes: list[int], binomial: bool) -> Score:
    """The size-weighted mean of fold scores and its standard error: the spread between folds
    (sd / sqrt(k)), and for accuracy at least the binomial error of n predictions sqrt(p(1-p)/n)."""
    n = sum(sizes)
    mean = sum(s * m for s, m in zip(scores, sizes, strict=True)) / n
    k = len(scores)
    spread = 0.0
    if k > 1:
        var = sum((s - mean) ** 2 for s in scores) / (k - 1)
        spread = math.sqrt(var / k)
    if binomial:
        p = min(max(mean, 1.0 / n), 1.0 - 1.0 / n) if n > 1 else 0.5
        spread = max(spread, math.sqrt(p * (1 - p) / n))
    return Score(mean, spread)


Schedule = tuple[int, int]
"""(head epochs, LoRA epochs): the state a trainer reached, and what a refit trains for."""
Point = tuple[Schedule, tuple[float, float]]
"""One evaluation of a fold's model: its schedule and (metric, tie-break), higher is better."""


@dataclass(frozen=True)
class EpochChoice:
    schedule: Schedule
    """Best on the mean over all folds: what the adapter is refitted for."""
    score: Score
    """Each fold scored at the schedule best on the mean over the *other* folds."""


def choose_epochs(curves: list[list[Point]], sizes: list[int], binomial: bool) -> EpochChoice:
    """One schedule per candidate, chosen on the size-weighted mean over folds of each fold's
    evaluations (`curves`, in training order). Each fold is scored at the schedule the other folds
    find best (leave one fold out), so its score owes nothing to a choice made on its own validation
    examples: for a model that learns nothing it is chance on average, where every fold's own best
    epoch, or the best of the mean, would be above it. A fold that stopped early keeps its last
    evaluation for the schedules it did not reach (it stopped because they were no better)."""
    if len(curves) < 2 or len(curves) != len(sizes) or not all(curves):
        raise ValueError(f"choose_epochs needs 2+ folds, each evaluated (got {len(curves)})")
    schedules = sorted({s for c in curves for s, _ in c})
    table = [_filled(c, schedules) for c in curves]

    def best(folds: list[int]) -> Schedule:
        n = sum(sizes[f] for f in folds)

        def mean(s: Schedule) -> tuple[float, float]:
            return tuple(sum(sizes[f] * table[f][s][j] for f in folds) / n for j in (0, 1))

        return max(schedules, key=mean)  # the earliest of equals

    everyone = list(range(len(curves)))
    scores = [table[f][best([g for g in everyone if g != f])][0] for f in everyone]
    return EpochChoice(best(everyone), combine_folds(scores, sizes, binomial))


def _filled(curve: list[Point], schedules: list[Schedule]) -> dict[Schedule, tuple[float, float]]:
    seen = dict(curve)
    out, last = {}, curve[0][1]
    for s in schedules:
        last = seen.get(s, last)
        out[s] = last
    return out


def majority_share(train_targets: list, val_targets: list) -> float:
    """A new classifier's baseline on held-out examples: the share of `val_targets` that is the most
    frequent of `train_targets` (the first seen of equals)."""
    majority = Counter(train_targets).most_common(1)[0][0]
    return sum(t == majority for t in val_targets) / len(val_targets)


def selection_factor(compared: int) -> float:
    """How far the best of `compared` equally good candidates lands above their common score, in
    standard errors (about sqrt(2 ln m)): picking the best of several must clear more than one."""
    return max(1.0, math.sqrt(2.0 * math.log(compared))) if compared > 1 else 1.0


def gate_margin(task: str, baseline: float, n_val: int, score: Score, compared: int) -> float:
    """How much better than the baseline a new adapter must score to be promoted.

    SEQ_CLS: the larger of the score's standard error and the baseline's binomial error on `n_val`
    examples, times `selection_factor` when the winner was picked among several candidates, so that a
    model that only fits noise rarely clears it. CAUSAL_LM: the completion loss averages over many
    tokens; any decrease counts."""
    if task != "SEQ_CLS":
        return 0.0
    p = min(max(baseline, 1.0 / n_val), 1.0 - 1.0 / n_val) if n_val > 1 else 0.5
    base_se = math.sqrt(p * (1 - p) / max(n_val, 1))
    return max(base_se, score.stderr) * selection_factor(compared)
