"""What a job will train and validate on, decided when it is created: the new examples tokenized, the
validation plan (k-fold or held-out), and for a continued adapter the previous versions' examples to
replay and to check for forgetting; also the training record the new version will be stored with."""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from hotlora.adapters.training.adaptation import Examples
from hotlora.adapters.training.finetune_spec import Example, FineTuneSpec
from hotlora.adapters.training.training_record import TrainingRecord
from hotlora.adapters.training.validation import ValidationPlan, majority_share, plan_validation

REPLAY_SHARE = 0.5
"""Previous versions' examples replayed in a continued job, per new training example (at most all)."""

Tokenize = Callable[[FineTuneSpec, list[Example], tuple[str, ...], str], tuple[list, list]]


@dataclass(frozen=True)
class JobWork:
    examples: Examples
    """The new examples, then the given validation examples; the plan's folds index into them."""
    plan: ValidationPlan
    replay: Examples
    check: Examples | None
    """The previous versions' validation examples (None for a new adapter or an upload)."""
    baseline: float | None
    """The gate's baseline where it is known before training, shown from the start: a new classifier's
    majority class (the most frequent label's share of all examples under k-fold, of the held-out ones
    otherwise). None where a candidate measures it (a continued adapter's head, the base model's loss)."""
    record: TrainingRecord
    """The examples the new version is stored with (its own and its predecessors')."""

    def describe(self) -> str:
        n_val = sum(len(f.val) for f in self.plan.folds)
        text = f"{len(self.examples.inputs)} examples, {self.plan.describe()} on {n_val}"
        if self.check is not None:
            text += (
                f"; {len(self.replay.inputs)} previous examples replayed, "
                f"{len(self.check.inputs)} checked for forgetting"
            )
        return text


def plan_work(
    spec: FineTuneSpec,
    labels: tuple[str, ...],
    history: TrainingRecord | None,
    max_examples: int,
    tokenize: Tokenize,
    continued: bool = False,
) -> JobWork:
    """`continued`: the job trains on from a stored version (its head sets the baseline)."""
    items = [*spec.examples, *spec.validation]
    key = (lambda e: e.label) if spec.task == "SEQ_CLS" else (lambda e: "")
    keys = [key(e) for e in items]
    plan = plan_validation(keys, len(spec.validation), spec.hyper.seed)
    inputs, targets = tokenize(spec, list(spec.examples), labels, "examples")
    vi, vt = tokenize(spec, list(spec.validation), labels, "validation") if spec.validation else ([], [])
    examples = Examples(inputs + vi, targets + vt, keys)

    fold = plan.folds[0]
    own_train = items if plan.refit else [items[i] for i in fold.train]
    own_val = () if plan.refit else [items[i] for i in fold.val]
    replay_ex, check_ex = [], []
    if history is not None:
        rng = random.Random(spec.hyper.seed)
        n = min(len(history.train), math.ceil(REPLAY_SHARE * len(own_train)))
        replay_ex = rng.sample(list(history.train), n)
        chosen = set(map(id, replay_ex))
        check_ex = list(history.validation) or [e for e in history.train if id(e) not in chosen]
        check_ex = check_ex or list(history.train)
    replay = Examples(*_tokens(tokenize, spec, replay_ex, labels, "replayed examples"))
    check = None if history is None else Examples(*_tokens(tokenize, spec, check_ex, labels, "checked"))
    prev_train = history.train if history is not None else ()
    prev_val = history.validation if history is not None else ()
    train_kept = (*own_train, *prev_train)[:max_examples]  # newest first when the pool is full
    val_kept = (*own_val, *prev_val)[: max(0, max_examples - len(train_kept))]
    baseline = None
    if spec.task == "SEQ_CLS" and not continued:
        if plan.refit:
            baseline = max(Counter(keys[: len(spec.examples)]).values()) / len(spec.examples)
        else:  # what the trainer measures on the held-out fold
            t = examples.targets
            baseline = majority_share([t[i] for i in fold.train], [t[i] for i in fold.val])
    return JobWork(examples, plan, replay, check, baseline, TrainingRecord(train_kept, val_kept))


def _tokens(tokenize: Tokenize, spec, items, labels, where) -> tuple[list, list]:
    return tokenize(spec, items, labels, where) if items else ([], [])
