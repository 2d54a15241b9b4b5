"""What the engine runs for the fine-tune manager: a job (`JobTask`: its adaptation in bounded units, progress
events, then the promotion gate) and an evaluation (`EvaluationTask`). State transitions go through the
manager (`update_job`, `finish_job`), under its lock."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict
from typing import TYPE_CHECKING

from hotlora.adapters.head_features import HeadFeatures, auto_choices
from hotlora.adapters.peft.format import write_peft_adapter
from hotlora.adapters.store.metadata_store import JobRecord
from hotlora.adapters.training.adaptation import Adaptation, AdaptationOutcome, candidates_for
from hotlora.adapters.training.evaluation import Evaluator
from hotlora.adapters.training.finetune_spec import FineTuneSpec, candidate_methods
from hotlora.adapters.training.job_workers import WorkerFactory
from hotlora.adapters.training.trainer import Progress
from hotlora.adapters.training.training_record import TrainingRecord, ValidationSummary
from hotlora.adapters.training.validation import gate_margin
from hotlora.adapters.training.work import JobWork

if TYPE_CHECKING:
    from hotlora.adapters.training.finetune_jobs import FineTuneManager

log = logging.getLogger("hotlora.finetune")

TERMINAL = frozenset({"SUCCEEDED", "FAILED", "CANCELLED", "REJECTED"})
EVENT_INTERVAL_S = 1.0


def progress_message(p: Progress) -> str:
    """A progress event's line: the phase, then the step and epoch counts once there are some (a feature
    pass has neither: "step 0/0, epoch 0" would read as a count that is not one)."""
    counts = [f"step {p.step}/{p.total_steps}"] if p.total_steps else []
    counts += [f"epoch {p.epoch}"] if p.epoch else []
    return p.phase + (": " + ", ".join(counts) if counts else "")


class JobTask:
    """One job as the engine runs it: `step()` is bounded (one unit of the trainer at work)."""

    def __init__(
        self, manager: FineTuneManager, job: JobRecord, spec: FineTuneSpec, work: JobWork, labels, previous
    ):
        self.manager, self.job, self.spec, self.work = manager, job, spec, work
        self.labels, self.previous = labels, previous
        self.adaptation: Adaptation | None = None
        self._last_event = 0.0
        self._last_epoch = 0

    def metrics(self) -> dict:
        p = self.adaptation.progress
        return {
            "step": p.step,
            "total_steps": p.total_steps,
            "epoch": p.epoch,
            "train_loss": p.train_loss,
            "validation_metric": p.validation_metric,
            "baseline_metric": p.baseline_metric,
            "metric_name": p.metric_name,
            "elapsed_seconds": p.elapsed,
            "remaining_seconds": p.remaining,
            "phase": p.phase,
            "validation_scheme": self.work.plan.scheme,
            "labels": list(self.labels),  # the head's rows: evaluating a rejected job's artifact
        }

    def step(self) -> bool:
        m = self.manager
        if self.job.state in TERMINAL:
            return False
        t0 = time.perf_counter()
        try:
            if self.adaptation is None:
                self.adaptation = self._make_adaptation()
                m.update_job(
                    self, f"running: {self.work.describe()}", state="RUNNING", metrics=self.metrics()
                )
            more = self.adaptation.step()
            if more:
                self._report()
            else:
                self.promote_or_keep()
            return more and self.job.state not in TERMINAL
        except Exception as exc:  # a failed job must not take the engine down
            log.exception("fine-tune job %s failed", self.job.id)
            m.finish_job(self, "FAILED", f"training failed: {type(exc).__name__}: {exc}")
            return False
        finally:
            m.observer.finetune_step(time.perf_counter() - t0)

    def _make_adaptation(self) -> Adaptation:
        m, spec = self.manager, self.spec
        methods = candidate_methods(spec)
        # AUTO compares head features; a hand-picked HEAD_ONLY reads the default (the last token's state)
        choices = auto_choices(m.base.num_layers) if spec.method == "AUTO" else (HeadFeatures(),)
        factory = WorkerFactory(m, spec, self.labels, self.previous, choices)
        return Adaptation(
            task=spec.task,
            candidates=candidates_for(methods, choices),
            examples=self.work.examples,
            plan=self.work.plan,
            make_trainer=factory.trainer,
            make_evaluator=factory.evaluator,
            max_seconds=spec.max_seconds or m.max_seconds,
            replay=self.work.replay,
            check=self.work.check,
            previous=self.previous,
            baseline=self.work.baseline,
        )

    def _report(self) -> None:
        p = self.adaptation.progress
        now = time.monotonic()
        new_epoch = p.epoch != self._last_epoch and not p.phase.endswith("head")  # head epochs: microseconds
        if new_epoch or now - self._last_event >= EVENT_INTERVAL_S:
            self.manager.update_job(self, progress_message(p), metrics=self.metrics())
            self._last_event, self._last_epoch = now, p.epoch

    def promote_or_keep(self) -> None:
        """The promotion gate, then either a new served version or a job artifact.

        Promoted when the validated score beats the baseline by more than the margin and, for a
        continued adapter, the previous version's task is not forgotten beyond its standard error."""
        m = self.manager
        out: AdaptationOutcome = self.adaptation.outcome
        job = self.job
        files = write_peft_adapter(out.weights, m.base_model_name, base=m.base)
        margin = gate_margin(job.task, out.baseline, out.validated_on, out.score, out.compared)
        better = out.score.value > out.baseline + margin
        prev = out.previous_task
        forgot = prev is not None and prev.forgot
        scores = (
            f"validation {out.metric_name} {out.score.value:.4f} ± {out.score.stderr:.4f} "
            f"({out.scheme}) vs baseline {out.baseline:.4f}" + (f" (+{margin:.4f} needed)" if margin else "")
        )
        if prev is not None:
            scores += (
                f"; previous version's task: {prev.score:.4f} vs {prev.reference:.4f} "
                f"(at most {prev.stderr:.4f} lower allowed, {prev.examples} examples)"
            )
        metrics = {**self.metrics(), **outcome_metrics(out, margin)}
        summary = summarize(out)
        record = TrainingRecord(self.work.record.train, self.work.record.validation, summary)
        with m.lock:
            if job.state in TERMINAL or self.job.state in TERMINAL:
                return  # cancelled or shut down meanwhile: nothing is written
            if (better and not forgot) or self.spec.promote == "ALWAYS":
                view = m.adapters.upload(
                    job.tenant,
                    job.adapter,
                    files,
                    description=self.spec.description,
                    labels=out.weights.labels,
                    source="FINETUNE",
                    weights=out.weights,
                    record=record.to_bytes(),
                )
                ref = view.record.ref
                why = "better than the baseline" if better and not forgot else "promote=ALWAYS"
                m.finish_job(
                    self,
                    "SUCCEEDED",
                    f"promoted as {ref}: {scores} ({why}); {out.reason}",
                    result_adapter=ref,
                    promoted=True,
                    method=out.method,
                    metrics=metrics,
                )
            else:
                m.store.set_job_files(job.id, {n: m.adapters.registry.blobs.put(d) for n, d in files.items()})
                what = (
                    "it forgets the previous version's task beyond its standard error"
                    if forgot
                    else "it is not better"
                )
                m.finish_job(
                    self,
                    "REJECTED",
                    f"not promoted: {scores}: {what}; the trained adapter is kept as a job "
                    f"artifact, not served (promote=ALWAYS promotes anyway); {out.reason}",
                    method=out.method,
                    metrics=metrics,
                )


def outcome_metrics(out: AdaptationOutcome, margin: float) -> dict:
    """What a finished job reports beyond progress: the gate's figures and every candidate."""
    prev = out.previous_task
    return {
        "validation_metric": out.score.value,
        "validation_stderr": out.score.stderr,
        "baseline_metric": out.baseline,
        "gate_margin": margin,
        "validation_scheme": out.scheme,
        "validated_examples": out.validated_on,
        "candidates": [c.as_dict() for c in out.candidates],
        "winner_reason": out.reason,
        "winner": out.winner,
        **(
            {"head_features": asdict(out.weights.head_features)}
            if out.weights.head_weight is not None
            else {}
        ),
        "replayed_examples": out.replayed,
        **(
            {
                "previous_task_score": prev.score,
                "previous_task_reference": prev.reference,
                "previous_task_stderr": prev.stderr,
                "previous_task_examples": prev.examples,
            }
            if prev is not None
            else {}
        ),
    }


def summarize(out: AdaptationOutcome) -> ValidationSummary:
    prev = out.previous_task
    return ValidationSummary(
        scheme=out.scheme,
        metric_name=out.metric_name,
        score=out.score.value,
        stderr=out.score.stderr,
        baseline=out.baseline,
        examples=out.validated_on,
        method=out.method,
        previous_task_reference=prev.reference if prev else 0.0,
        previous_task_score=prev.score if prev else 0.0,
        previous_task_stderr=prev.stderr if prev else 0.0,
        previous_task_examples=prev.examples if prev else 0,
    )


class EvaluationTask:
    """An evaluation as the engine runs it: one evaluation unit per step; the rpc waits on `done`."""

    def __init__(self, evaluator: Evaluator):
        self.evaluator = evaluator
        self.done = threading.Event()
        self.error: Exception | None = None
        self.cancelled = False

    def step(self) -> bool:
        if self.cancelled:
            return False
        try:
            more = self.evaluator.step()
        except Exception as exc:  # answered to the caller; the engine goes on
            log.exception("evaluation failed")
            self.error, more = exc, False
        if not more:
            self.done.set()
        return more
