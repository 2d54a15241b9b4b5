"""A fine-tune job's work: try methods in order of cost, score each the same honest way (k-fold or
held-out, adapters/training/validation.py), keep the best within the time budget, train the winner on every
example, and for a continued adapter check that it still does the previous version's task.

The search stops early when nothing dearer can win: accuracy is at most 1.0, so once the best is within the
gate's margin of 1.0 no later candidate could beat it by more than that margin. Among candidates the gate
cannot tell apart, the one whose export stock PEFT reproduces wins (a head on other features than the last
token's final state needs hotlora's loader outside the server).

Driven like a trainer: `step()` runs one bounded unit (a unit of the trainer at work) and returns False
when `outcome` is set. Every candidate is reported with its score and why the winner won."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

from hotlora.adapters.head_features import EXPORT_LOADER, HeadFeatures
from hotlora.adapters.training.evaluation import Evaluation
from hotlora.adapters.training.trainer import Progress, TrainData
from hotlora.adapters.training.validation import (
    Fold,
    Score,
    ValidationPlan,
    choose_epochs,
    combine_folds,
    gate_margin,
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

    @property
    def peft_round_trip(self) -> bool:
        """Whether stock PEFT reproduces its export (LoRA candidates' heads read the default features)."""
        return self.features.peft_computes


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
    peft_round_trip: bool = True
    """Whether `PeftModel.from_pretrained` alone reproduces its export (Candidate.peft_round_trip)."""

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
        baseline: float | None = None,
    ):
        self.task, self.candidates, self.examples, self.plan = task, candidates, examples, plan
        self.make_trainer, self.make_evaluator = make_trainer, make_evaluator
        self.max_seconds = max_seconds
        self.replay = replay or Examples([], [])
        self.check, self.previous = check, previous
        self.known_baseline = baseline
        """The gate's baseline when known before training (work.JobWork.baseline); else the first scored
        candidate measures it."""
        self.metric_name = "accuracy" if task == "SEQ_CLS" else "neg_completion_loss"
        self.progress = Progress(metric_name=self.metric_name)
        self.outcome: AdaptationOutcome | None = None
        self.reports = [
            CandidateReport(
                c.name, c.method, c.features.pooling, c.features.layer, peft_round_trip=c.peft_round_trip
            )
            for c in candidates
        ]
        self.stopped_early = ""
        """Why the candidates after the last one tried were not worth training ("" if none was skipped so)."""
        self.progress.baseline_metric = baseline
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
            self.stopped_early = self.stopped_early or self._nothing_later_can_win()
            if self.stopped_early:
                rep.status, rep.note = "skipped", self.stopped_early
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
                self.progress.baseline_metric = self._baseline(baselines)
            self.progress.validation_metric = max(r.score for r in self._scored())

        if not baselines:
            raise RuntimeError("no candidate could be scored within the time budget")
        baseline = self._baseline(baselines)
        winner = self._winner(baseline)
        w = self.reports.index(winner)
        sizes = [len(f.val) for f in folds]

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
            compared=len(self._scored()),
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

    def _baseline(self, fold_baselines: list[float]) -> float:
        """The gate's baseline: known before training, or the first scored candidate's folds' mean."""
        if self.known_baseline is not None:
            return self.known_baseline
        sizes = [len(f.val) for f in self.plan.folds]
        return sum(b * n for b, n in zip(fold_baselines, sizes, strict=True)) / sum(sizes)

    def _scored(self) -> list[CandidateReport]:
        return [r for r in self.reports if r.status == "scored"]

    def _best(self, among: Callable[[CandidateReport], bool] = lambda r: True) -> CandidateReport | None:
        """The highest-scoring candidate (of those `among` accepts); on a tie the cheaper (earlier) one."""
        best = None
        for r in self._scored():
            if among(r) and (best is None or r.score > best.score):
                best = r
        return best

    def _margin(self, baseline: float, candidate: CandidateReport, compared: int) -> float:
        """The gate's margin (validation.gate_margin): how far above `baseline` the candidate's score must
        be for the gate to call it better, when it is the best of `compared`."""
        n_val = sum(len(f.val) for f in self.plan.folds)
        return gate_margin(self.task, baseline, n_val, Score(candidate.score, candidate.stderr), compared)

    def _nothing_later_can_win(self) -> str:
        """Why no later candidate is worth training ("" while one may be): accuracy is at most 1.0, so once
        the best is within the gate's margin of 1.0 (the margin the gate would ask of a later candidate,
        the best of one more, with the best as its baseline), none could beat it by more."""
        best = self._best()
        if best is None or self.task != "SEQ_CLS":
            return ""
        if best.score >= PERFECT:
            return f"{best.name} already scored 1.0"
        margin = self._margin(best.score, best, len(self._scored()) + 1)
        if best.score + margin < 1.0:
            return ""
        return (
            f"{best.name} scored {best.score:.3f} ± {best.stderr:.3f}, within the gate's margin "
            f"({margin:.3f}) of 1.0: no later candidate could beat it by more"
        )

    def _winner(self, baseline: float) -> CandidateReport | None:
        """The best candidate; but when stock PEFT does not reproduce its export and the gate, with the
        best candidate whose export it does reproduce as the baseline, would not call it better, that one
        (unless only the best clears the gate against `baseline`: portability never costs a promotion)."""
        best = self._best()
        if best is None or best.peft_round_trip:
            return best
        portable = self._best(lambda r: r.peft_round_trip)
        if portable is None:
            return best
        compared = len(self._scored())
        if best.score > portable.score + self._margin(portable.score, best, compared):
            return best

        def promoted(r: CandidateReport) -> bool:
            return r.score > baseline + self._margin(baseline, r, compared)

        return portable if promoted(portable) or not promoted(best) else best

    def _reason(self, winner: CandidateReport) -> str:
        scored = self._scored()
        best = self._best()
        desc = f"({winner.score:.3f} ± {winner.stderr:.3f}, {self.plan.describe()})"
        if winner is best:
            why = f"{winner.name} has the best validated {self.metric_name} {desc}"
            others = sorted((r for r in scored if r is not winner), key=lambda r: -r.score)
            if others:
                nxt = others[0]
                tie = " and is cheaper" if nxt.score == winner.score else ""
                why += f"; next {nxt.name} {nxt.score:.3f} ± {nxt.stderr:.3f}{tie}"
            else:
                why += "; the only candidate scored"
        else:
            margin = self._margin(winner.score, best, len(scored))
            why = (
                f"{winner.name} {desc} is chosen over {best.name} ({best.score:.3f} ± {best.stderr:.3f}), "
                f"which does not beat it by more than the gate's margin ({margin:.3f}): stock PEFT "
                f"reproduces {winner.name}'s export, while {best.name}'s would need hotlora's loader"
            )
        if not winner.peft_round_trip:
            portable = self._best(lambda r: r.peft_round_trip)
            why += (
                "; its export does not round-trip in stock PEFT (PEFT's classifier reads the last token's "
                f"final state): it carries head_config.json and loads with {EXPORT_LOADER}"
            )
            if portable is not None:
                why += (
                    f" (the best candidate that round-trips, {portable.name} {portable.score:.3f} ± "
                    f"{portable.stderr:.3f}, is beyond the gate's margin below it or would not be promoted)"
                )
        if self.stopped_early:
            why += f"; stopped early: {self.stopped_early}"
        return why


def _figure(result: Evaluation) -> float:
    return result.accuracy if result.task == "SEQ_CLS" else -result.loss
