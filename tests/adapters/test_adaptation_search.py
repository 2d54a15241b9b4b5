"""AUTO's search with scripted candidates (issue 34): it stops when nothing dearer can win (the best within
the gate's margin of 1.0) and says why, prefers among candidates the gate cannot tell apart the one whose
export stock PEFT reproduces (and says so when the winner's does not), and shows the baseline from the
start and no score before one is measured (nor a step count before there is one)."""

from __future__ import annotations

import pytest

from hotlora.adapters.head_features import auto_choices
from hotlora.adapters.training.adaptation import Adaptation, Examples, candidates_for
from hotlora.adapters.training.finetune_tasks import progress_message
from hotlora.adapters.training.trainer import Progress, TrainOutcome
from hotlora.adapters.training.validation import plan_validation

METHODS = ("HEAD_ONLY", "LORA", "LORA_PROGRESSIVE")
HEADS = [c.name for c in candidates_for(("HEAD_ONLY",), auto_choices(30))]
LAST, MEAN, LAST_MID, MEAN_MID = HEADS  # last token / mean pooling, last layer / layer 18


class ScriptedTrainer:
    """One fold of one candidate: scores what the script says for that fold, in two units."""

    def __init__(self, name: str, score: float | None, baseline: float, task: str):
        self.name, self.score, self.baseline, self.task = name, score, baseline, task
        self.progress = Progress(phase="scripted")
        self.curve: list = []
        self.best_epochs = (1, 0)
        self.outcome = None

    def step(self) -> bool:
        self.units = getattr(self, "units", 0) + 1
        if self.units == 1:
            return True  # a first unit in progress: the search yields
        if self.score is not None:  # a validated fold (the refit has none)
            self.curve.append(((1, 0), (self.score, 0.0)))
        weights = f"weights of {self.name}"
        self.outcome = TrainOutcome(weights, self.score or 0.0, self.baseline, "accuracy")
        return False


class Script:
    """Per candidate name, each fold's score; records which candidates were trained."""

    def __init__(self, folds: dict[str, list[float]], task: str = "SEQ_CLS", baseline: float = 0.5):
        self.folds, self.task, self.baseline = folds, task, baseline
        self.trained: list[str] = []
        self._fold: dict[str, int] = {}

    def trainer(self, cand, data, schedule, feature_cache):
        self.trained.append(cand.name)
        if not data.val_inputs:  # the refit of the winner on every example
            return ScriptedTrainer(cand.name, None, 0.0, self.task)
        k = self._fold.get(cand.name, 0)
        self._fold[cand.name] = k + 1
        return ScriptedTrainer(cand.name, self.folds[cand.name][k], self.baseline, self.task)


def _adaptation(script: Script, n: int = 40, previous=None) -> Adaptation:
    keys = ["pos" if i % 2 else "neg" for i in range(n)] if script.task == "SEQ_CLS" else [""] * n
    examples = Examples([[i] for i in range(n)], [i % 2 for i in range(n)], keys)
    return Adaptation(
        task=script.task,
        candidates=candidates_for(METHODS, auto_choices(30)),
        examples=examples,
        plan=plan_validation(keys, 0, seed=0),  # 5 folds of 8
        make_trainer=script.trainer,
        make_evaluator=lambda weights, data: None,
        max_seconds=600.0,
        previous=previous,
        baseline=0.5 if previous is None else None,  # work.plan_work: a new classifier's majority class
    )


def _run(a: Adaptation) -> None:
    for _ in range(10_000):
        if not a.step():
            return
    raise AssertionError("the search did not end")


def _reports(a: Adaptation) -> dict:
    return {r.name: r for r in a.outcome.candidates}


NEAR_PERFECT = [1.0, 1.0, 1.0, 1.0, 0.875]  # 0.975 ± 0.025 on 40 examples: the sentiment job
GOOD = [0.875, 0.875, 0.75, 0.875, 0.875]  # 0.85


def test_auto_stops_when_the_best_is_within_the_gates_margin_of_one_and_says_why():
    script = Script({LAST: GOOD, MEAN: GOOD, LAST_MID: GOOD, MEAN_MID: NEAR_PERFECT})
    a = _adaptation(script)
    _run(a)
    reports = _reports(a)
    assert [reports[h].status for h in HEADS] == ["scored"] * 4
    assert reports[MEAN_MID].score == pytest.approx(0.975) and reports[MEAN_MID].stderr == pytest.approx(
        0.025
    )
    for dear in ("LORA", "LORA_PROGRESSIVE"):  # never trained: nothing dearer could win
        assert reports[dear].status == "skipped" and dear not in script.trained
        assert "within the gate's margin" in reports[dear].note and "of 1.0" in reports[dear].note
    assert "stopped early" in a.outcome.reason and "0.975 ± 0.025" in a.outcome.reason


def test_a_best_further_from_one_than_the_margin_lets_lora_try():
    script = Script({h: GOOD for h in HEADS} | {"LORA": NEAR_PERFECT, "LORA_PROGRESSIVE": NEAR_PERFECT})
    a = _adaptation(script)
    _run(a)
    assert "LORA" in script.trained and _reports(a)["LORA"].status == "scored"
    # LORA's 0.975 then stops the search before LORA_PROGRESSIVE
    assert _reports(a)["LORA_PROGRESSIVE"].status == "skipped" and a.outcome.winner == "LORA"


def test_a_perfect_head_still_stops_the_search_at_once():
    script = Script({LAST: [1.0] * 5})
    a = _adaptation(script)
    _run(a)
    assert script.trained == [LAST] * 6  # five folds and the refit
    assert all("already scored 1.0" in r.note for r in a.outcome.candidates[1:])


def test_auto_prefers_the_candidate_stock_peft_reproduces_within_the_gates_margin():
    # the mean-pooled head scores a little higher, within the gate's margin: the last-token head wins
    script = Script(
        {LAST: GOOD, MEAN: [0.875, 0.875, 0.875, 0.875, 1.0], LAST_MID: GOOD, MEAN_MID: GOOD}
        | {m: GOOD for m in ("LORA", "LORA_PROGRESSIVE")}
    )
    a = _adaptation(script)
    _run(a)
    assert a.outcome.winner == LAST and a.outcome.method == "HEAD_ONLY"
    assert script.trained[-1] == LAST  # the refit trains the chosen one
    reason = a.outcome.reason
    assert reason.startswith(f"{LAST} (0.850") and f"chosen over {MEAN} (0.900" in reason
    assert "stock PEFT reproduces" in reason


def test_the_preference_never_costs_a_promotion():
    # within the margin of each other, but only the mean-pooled head clears the gate against the baseline
    low, mean = [0.625, 0.625, 0.5, 0.625, 0.625], [0.75, 0.75, 0.625, 0.75, 0.75]  # 0.600 and 0.725
    chance = [0.5] * 5
    script = Script(
        {LAST: low, MEAN: mean, LAST_MID: chance, MEAN_MID: chance, "LORA": chance}
        | {"LORA_PROGRESSIVE": chance}
    )
    a = _adaptation(script)
    _run(a)
    assert a.outcome.winner == MEAN and "would not be promoted" in a.outcome.reason


def test_a_winner_whose_export_needs_the_loader_says_so():
    script = Script({LAST: [0.5] * 5, MEAN: [1.0] * 5})
    a = _adaptation(script)
    _run(a)
    assert a.outcome.winner == MEAN
    reason = a.outcome.reason
    assert "does not round-trip in stock PEFT" in reason and "hotlora.clients.exported_heads" in reason
    assert f"{LAST} 0.500" in reason  # the best that does, and that it is beyond the margin
    assert [r.peft_round_trip for r in a.outcome.candidates] == [True, False, False, False, True, True]


def test_the_baseline_shows_from_the_start_and_no_score_before_one_is_measured():
    script = Script({h: GOOD for h in HEADS} | {"LORA": GOOD, "LORA_PROGRESSIVE": GOOD})
    a = _adaptation(script)
    assert a.progress.baseline_metric == 0.5 and a.progress.validation_metric is None
    a.step()  # the first fold of the first head: nothing scored yet
    assert a.progress.validation_metric is None
    _run(a)
    assert a.progress.validation_metric == pytest.approx(0.85) and a.outcome.baseline == 0.5


def test_progress_lines_show_only_counts_there_are():
    # a feature pass has no steps or epochs: its line must not read "step 0/0, epoch 0"
    assert progress_message(Progress(phase="HEAD_ONLY(last token), fold 1/5: features")) == (
        "HEAD_ONLY(last token), fold 1/5: features"
    )
    assert progress_message(Progress(phase="LORA: lora", step=3, total_steps=40, epoch=1)) == (
        "LORA: lora: step 3/40, epoch 1"
    )
    assert progress_message(Progress(phase="head", step=5, total_steps=300)) == "head: step 5/300"


def test_a_measured_baseline_shows_once_the_first_candidate_measured_it():
    # a continued adapter's baseline is its previous head's score: only a candidate can measure it
    script = Script({h: GOOD for h in HEADS} | {"LORA": GOOD, "LORA_PROGRESSIVE": GOOD}, baseline=0.625)
    a = _adaptation(script, previous="the previous version")
    assert a.progress.baseline_metric is None
    for _ in range(5):  # the first head's five folds
        a.step()
    assert a.progress.baseline_metric is None
    a.step()
    assert a.progress.baseline_metric == pytest.approx(0.625)


def test_completion_tasks_have_no_upper_bound_and_try_every_method():
    lm = ("LORA", "LORA_PROGRESSIVE")
    script = Script({"LORA": [-0.01] * 5, "LORA_PROGRESSIVE": [-0.02] * 5}, task="CAUSAL_LM", baseline=-3.0)
    keys = [""] * 40
    a = Adaptation(
        task="CAUSAL_LM",
        candidates=candidates_for(lm, ()),
        examples=Examples([[i] for i in range(40)], [[1]] * 40, keys),
        plan=plan_validation(keys, 0, seed=0),
        make_trainer=script.trainer,
        make_evaluator=lambda weights, data: None,
        max_seconds=600.0,
    )
    assert a.progress.baseline_metric is None  # the base model's loss: measured by the first candidate
    _run(a)
    assert [r.status for r in a.outcome.candidates] == ["scored", "scored"]
