"""A fine-tune job's work: try methods in order of cost, score each the same honest way (k-fold or
held-out, adapters/training/validation.py), keep the best within the time budget, train the winner on every
example, and for a continued adapter check that it still does the previous version's task.

Driven like a trainer: `step()` runs one bounded unit (a unit of the trainer at work) and returns False
when `outcome` is set. Every candidate is reported with its score and why the winner won."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

from hotlora.adapters.head_features import HeadFeatures
from hotlora.adapters.training.evaluation import Evaluation
from hotlora.adapters.training.trainer import Progress, TrainData
from hotlora.adapters.training.validation import (
    Fold,
    Score,
    ValidationPlan,
    choose_epochs,
    combine_folds,
)
from hotlora.adapters.weights import LoraWeights

PERFECT = 1.0 - 1e-9


@dataclass(frozen=True)
class Candidate:
    method: str
    """HEAD_ONLY | LORA | LORA_PROGRESSIVE."""
    features: HeadFeatures = HeadFeatures()
    """What the head reads (stored with it and served as trained); LoRA candidates read the default."""

    @property
    def name(self) -> str:
        return f"{self.method}({self.features.describe()})" if self.method == "HEAD_ONLY" else self.method


def candidates_for(methods: tuple[str, ...], head_features: tuple[HeadFeatures, ...]) -> list[Candidate]:
    """Each method in order; HEAD_ONLY once per feature choice in `head_features` (the cheap ones
    first: they share one feature pass)."""
    out = []
    for m in methods:
        if m == "HEAD_ONLY":
            out.extend(Candidate(m, f) for f in head_features or (HeadFeatures(),))
        else:
            out.append(Candidate(m))
    return out


@dataclass
class CandidateReport:
    name: str
    method: str
    features: str
    """A head's pooling: "last" (token) or "mean"."""
    layer: int = -1
    """The hidden layer a head reads (an `output_hidden_states` index; -1 = the last, after the norm)."""
    status: str = "pending"
    """scored | skipped | stopped (the time budget ran out while it trained) | failed."""
    score: float = 0.0
    stderr: float = 0.0
    seconds: float = 0.0
    note: str = ""
    epochs: tuple[int, int] = (0, 0)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["epochs"] = list(self.epochs)
        return d


@dataclass(frozen=True)
class PreviousTask:
    """The continued version's own task: its validation examples, scored by it and by the new one."""

    reference: float
    """The previous version's score on them (the figure not to lose)."""
    stderr: float
    score: float
    """The new version's score on them."""
    examples: int

    @property
    def forgot(self) -> bool:
        return self.score < self.reference - self.stderr


@dataclass(frozen=True)
class AdaptationOutcome:
    weights: LoraWeights
    method: str
    score: Score
    baseline: float
    metric_name: str
    scheme: str
    validated_on: int
    """Examples the score was measured on (every example once for k-fold)."""
    compared: int
    """Candidates scored: the winner was the best of these."""
    candidates: list[CandidateReport]
    reason: str
    winner: str
    """The chosen candidate's name (a head's with its features)."""
    previous_task: PreviousTask | None = None
    replayed: int = 0


MakeTrainer = Callable[[Candidate, TrainData, tuple[int, int], dict], object]
MakeEvaluator = Callable[[LoraWeights | None, TrainData], object]


@dataclass
class Examples:
    """Tokenized examples: inputs, targets, and the stratification key of each."""

    inputs: list
    targets: list
    keys: list[str] = field(default_factory=list)

    def take(self, idx) -> tuple[list, list]:
        return [self.inputs[i] for i in idx], [self.targets[i] for i in idx]


class Adaptation:
    def __init__(
        self,
        *,
        task: str,
        candidates: list[Candidate],
        examples: Examples,
        plan: ValidationPlan,
        make_trainer: MakeTrainer,
        make_evaluator: MakeEvaluator,
        max_seconds: float,
        replay: Examples | None = None,
        check: Examples | None = None,
        previous: LoraWeights | None = None,
        majority: float | None = None,
    ):
        self.task, self.candidates, self.examples, self.plan = task, candidates, examples, plan
        self.make_trainer, self.make_evaluator = make_trainer, make_evaluator
        self.max_seconds = max_seconds
        self.replay = replay or Examples([], [])
        self.check, self.previous = check, previous
        self.majority = majority
        """A new classifier's baseline under k-fold: the most frequent label's share of all examples."""
        self.metric_name = "accuracy" if task == "SEQ_CLS" else "neg_completion_loss"
        self.progress = Progress(metric_name=self.metric_name)
        self.outcome: AdaptationOutcome | None = None
        self.reports = [
            CandidateReport(c.name, c.method, c.features.pooling, c.features.layer) for c in candidates
        ]
        self._done_steps = 0
        self._gen: Iterator[None] | None = None

    def step(self) -> bool:
        if self._gen is None:
            self._gen = self._run()
        try:
            next(self._gen)
            return True
        except StopIteration:
            return False

    # ---- the search ----------------------------------------------------------------------------------
    def _fold_data(self, fold: Fold) -> TrainData:
        ti, tt = self.examples.take(fold.train)
        vi, vt = self.examples.take(fold.val)
        return TrainData(ti + self.replay.inputs, tt + self.replay.targets, vi, vt)

    def _drive(self, worker, label: str) -> Iterator[None]:
        """Run a trainer or evaluator to its end, one unit per yield, mirroring its progress."""
        p, q = self.progress, worker.progress
        while worker.step():
            p.phase = f"{label}: {q.phase}"
            p.step = self._done_steps + q.step
            p.total_steps = max(p.step, self._done_steps + q.total_steps)  # this worker's part, as known
            p.epoch, p.train_loss = q.epoch, q.train_loss
            yield
        self._done_steps += q.step
        p.step = max(p.step, self._done_steps)

    def _run(self) -> Iterator[None]:
        deadline = self.progress.started + self.max_seconds
        folds = self.plan.folds
        fold_outcomes: dict[int, list] = {}
        baselines: list[float] = []
        feature_cache: dict = {}
        for i, (cand, rep) in enumerate(zip(self.candidates, self.reports, strict=True)):
            best = self._best()
            if best is not None and time.monotonic() > deadline:
                rep.status, rep.note = "skipped", f"the time budget ({self.max_seconds:.0f} s) was spent"
                continue
            if best is not None and self.task == "SEQ_CLS" and best.score >= PERFECT:
                rep.status, rep.note = "skipped", f"{best.name} already scored 1.0"
                continue
            t0 = time.monotonic()
            results, stopped = [], False
            for k, fold in enumerate(folds):
                trainer = self.make_trainer(cand, self._fold_data(fold), (0, 0), feature_cache)
                label = f"{cand.name}, fold {k + 1}/{len(folds)}" if self.plan.refit else cand.name
                for _ in self._drive(trainer, label):
                    yield
                    if best is not None and time.monotonic() > deadline:
                        stopped = True
                        break
                if stopped:
                    break
                results.append(trainer)
            rep.seconds = time.monotonic() - t0
            if stopped:
                rep.status = "stopped"
                rep.note = f"the time budget ({self.max_seconds:.0f} s) ran out while it trained"
                continue
            sizes, binomial = [len(f.val) for f in folds], self.task == "SEQ_CLS"
            if self.plan.refit:  # one epoch count for all folds, no fold scored on its own choice
                choice = choose_epochs([t.curve for t in results], sizes, binomial)
                score, rep.epochs = choice.score, choice.schedule
            else:  # held out: the fold's model, at its best epoch, is the adapter
                score = combine_folds([results[0].outcome.score], sizes, binomial)
                rep.epochs = results[0].best_epochs
            rep.status, rep.score, rep.stderr = "scored", score.value, score.stderr
            fold_outcomes[i] = [t.outcome for t in results]
            if not baselines:
                baselines = [t.outcome.baseline for t in results]
            self.progress.validation_metric = max(r.score for r in self.reports if r.status == "scored")

        winner = self._best()
        if winner is None:
            raise RuntimeError("no candidate could be scored within the time budget")
        w = self.reports.index(winner)
        sizes = [len(f.val) for f in folds]
        baseline = sum(b * n for b, n in zip(baselines, sizes, strict=True)) / sum(sizes)
        if self.plan.refit and self.majority is not None and self.previous is None:
            baseline = self.majority
        self.progress.baseline_metric = baseline

        if self.plan.refit:  # the adapter itself: every example, for the epochs the folds found best
            all_idx = tuple(range(len(self.examples.inputs)))
            data = self._fold_data(Fold(all_idx, ()))
            trainer = self.make_trainer(self.candidates[w], data, winner.epochs, feature_cache)
            yield from self._drive(trainer, f"{winner.name} on all {len(all_idx)} examples")
            weights = trainer.outcome.weights
        else:
            weights = fold_outcomes[w][0].weights

        previous_task = None
        if self.check is not None and self.check.inputs:
            previous_task = yield from self._previous_task(weights)

        self.outcome = AdaptationOutcome(
            weights=weights,
            method=winner.method,
            score=Score(winner.score, winner.stderr),
            baseline=baseline,
            metric_name=self.metric_name,
            scheme=self.plan.scheme,
            validated_on=sum(sizes),
            compared=sum(1 for r in self.reports if r.status == "scored"),
            candidates=self.reports,
            reason=self._reason(winner),
            winner=winner.name,
            previous_task=previous_task,
            replayed=len(self.replay.inputs),
        )

    def _previous_task(self, weights: LoraWeights) -> Iterator[None]:
        data = TrainData([], [], self.check.inputs, self.check.targets)
        old = self.make_evaluator(self.previous, data)
        yield from self._drive(old, "previous version on its validation examples")
        new = self.make_evaluator(weights, data)
        yield from self._drive(new, "new version on the previous version's validation examples")
        ref, now = _figure(old.result), _figure(new.result)
        n = len(self.check.inputs)
        if self.task == "SEQ_CLS":
            p = min(max(ref, 1.0 / n), 1.0 - 1.0 / n) if n > 1 else 0.5
            se = math.sqrt(p * (1 - p) / n)
        else:
            se = old.result.loss_stderr
        return PreviousTask(reference=ref, stderr=se, score=now, examples=n)

    def _best(self) -> CandidateReport | None:
        """The highest-scoring candidate; on a tie the cheaper (earlier) one."""
        best = None
        for r in self.reports:
            if r.status == "scored" and (best is None or r.score > best.score):
                best = r
        return best

    def _reason(self, winner: CandidateReport) -> str:
        scored = [r for r in self.reports if r.status == "scored"]
        others = sorted((r for r in scored if r is not winner), key=lambda r: -r.score)
        why = (
            f"{winner.name} has the best validated {self.metric_name} "
            f"({winner.score:.3f} ± {winner.stderr:.3f}, {self.plan.describe()})"
        )
        if others:
            nxt = others[0]
            tie = " and is cheaper" if nxt.score == winner.score else ""
            why += f"; next {nxt.name} {nxt.score:.3f} ± {nxt.stderr:.3f}{tie}"
        else:
            why += "; the only candidate scored"
        return why


def _figure(result: Evaluation) -> float:
    return result.accuracy if result.task == "SEQ_CLS" else -result.loss
