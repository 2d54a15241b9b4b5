"""Fine-tune jobs: validation, queueing on the engine, state transitions, persistence (what a job runs and its
promotion gate: finetune_tasks.py).

A job is QUEUED when created, RUNNING from its first engine step, and ends SUCCEEDED (promoted: served
as the next version of its adapter at once), REJECTED (the gate found it no better than the baseline),
FAILED or CANCELLED. Jobs and their events live in the registry database; a job a previous process left
QUEUED or RUNNING is marked FAILED when the manager opens, so none is RUNNING forever.

Adapters that are trained but not promoted (REJECTED) are kept as job artifacts: their PEFT files are
stored in the blob store, referenced by the job (never by an adapter name, so `name` keeps resolving to
the last promoted version), and readable with `artifact(tenant, job_id)`.

Every state transition happens under one lock and only from a non-terminal state, so a cancel, a
shutdown and a promotion racing each other leave exactly one outcome.

While the registry database is unreachable a job keeps training: progress it cannot write is skipped
(the next write carries the latest), and an outcome it cannot write is kept and written as soon as the
database answers (its lease keeps being renewed meanwhile, so no other replica fails it) — unless the job
was ended elsewhere meanwhile (its lease ran out), which then stands."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace

from hotlora.adapters.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    HotloraError,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from hotlora.adapters.names import parse_ref, validate_name
from hotlora.adapters.observer import NO_OBSERVER, AdapterObserver
from hotlora.adapters.peft.format import parse_peft_adapter
from hotlora.adapters.store.metadata_store import JobRecord
from hotlora.adapters.training.evaluation import Evaluation, Evaluator
from hotlora.adapters.training.finetune_spec import (
    Example,
    FineTuneLimits,
    FineTuneSpec,
    candidate_methods,
    check_example,
    check_spec,
    label_order,
    tokenize_examples,
)
from hotlora.adapters.training.finetune_tasks import TERMINAL, EvaluationTask, JobTask
from hotlora.adapters.training.job_queue import FairTaskQueue
from hotlora.adapters.training.trainer import UNIT_SECONDS, TrainData
from hotlora.adapters.training.training_record import TrainingRecord
from hotlora.adapters.training.work import plan_work

log = logging.getLogger("hotlora.finetune")

ACTIVE = ("QUEUED", "RUNNING")
RESTARTED = "server restarted during the job"
STOPPED = "server stopped during the job; submit it again"
UNSAVED_RETRY_S = 1.0  # how often an outcome the registry could not take is offered again


class FineTuneManager:
    """The engine runs the jobs' `step()`s through one `FairTaskQueue` (tenants take turns); everything
    else is called from rpc threads."""

    def __init__(
        self,
        *,
        store,
        adapters,
        engine,
        model,
        tokenizer,
        ctx,
        base,
        targets: tuple[str, ...],
        limits: FineTuneLimits,
        max_jobs: int,
        max_jobs_per_tenant: int,
        max_example_tokens: int = 512,
        unit_seconds: float = UNIT_SECONDS,
        max_seconds: float = 600.0,
        base_model_name: str = "",
        observer: AdapterObserver = NO_OBSERVER,
    ):
        self.store, self.adapters, self.engine = store, adapters, engine
        self.model, self.tokenizer, self.ctx, self.base = model, tokenizer, ctx, base
        self.targets, self.limits = tuple(targets), limits
        self.max_jobs, self.max_jobs_per_tenant = max_jobs, max_jobs_per_tenant
        self.max_example_tokens = max_example_tokens
        self.unit_seconds = unit_seconds
        self.max_seconds = max_seconds
        """Default time budget of a job's method search (a request's max_seconds overrides it)."""
        self.base_model_name = base_model_name
        self.observer = observer
        self.lock = threading.RLock()
        self._changed = threading.Condition(self.lock)
        self._tasks: dict[str, JobTask] = {}
        self.queue = FairTaskQueue(engine.submit_task)
        """Where jobs take turns by tenant; the Tinker API's training runs take theirs here too."""
        self._closed = False
        self._unsaved: dict[str, tuple[JobRecord, str]] = {}  # outcomes the store has not taken yet
        self._saver: threading.Thread | None = None
        n = store.fail_unfinished_jobs(RESTARTED)
        if n:
            log.warning("marked %d fine-tune job(s) of a previous run FAILED (%s)", n, RESTARTED)
        store.watch_job_leases(self._lost)

    # ---- rpcs ----------------------------------------------------------------------------------
    def create(self, tenant: str, spec: FineTuneSpec) -> JobRecord:
        name, version = parse_ref(spec.adapter) if spec.adapter else ("", None)
        if not name:
            raise InvalidArgument("adapter (the name of the adapter to create or continue) is required")
        validate_name(name)
        check_spec(spec, self.limits, self.base.num_layers, self.targets)
        previous, history = self._previous(tenant, name, version, spec.task)
        labels = (
            label_order(spec, tuple(previous.labels) if previous is not None else ())
            if spec.task == "SEQ_CLS"
            else ()
        )
        work = plan_work(
            spec, labels, history, self.limits.max_examples, self._tokenize, continued=previous is not None
        )
        method = candidate_methods(spec)[0] if spec.method != "AUTO" else "AUTO"
        with self.lock:
            if self._closed:
                raise FailedPrecondition(
                    "the server is shutting down; submit the job again after it restarts"
                )
            active = [t for t in self._tasks.values() if self._state(t) in ACTIVE]
            if len(active) >= self.max_jobs:
                raise ResourceExhausted(
                    f"{len(active)} fine-tune jobs are queued or running, the server's limit "
                    f"(--max-jobs {self.max_jobs}); retry when one ends"
                )
            mine = [t for t in active if t.job.tenant == tenant]
            if len(mine) >= self.max_jobs_per_tenant:
                raise ResourceExhausted(
                    f"you have {len(mine)} fine-tune job(s) queued or running, the limit per "
                    f"tenant (--max-jobs-per-tenant {self.max_jobs_per_tenant}); wait or cancel"
                )
            job = JobRecord(
                id=uuid.uuid4().hex[:16],
                tenant=tenant,
                adapter=name,
                task=spec.task,
                method=method,
                state="QUEUED",
                metrics={"metric_name": _metric_name(spec.task), "baseline_metric": work.baseline},
                created_at=time.time(),
            )
            task = JobTask(self, job, spec, work, labels, previous)
            self._tasks[job.id] = task
            self._save(job, f"queued: {method}, {work.describe()}")
            self._state_changed()
        self.queue.add(tenant, task)
        return job

    def get(self, tenant: str, job_id: str) -> JobRecord:
        job = self.store.get_job(tenant, job_id) if job_id else None
        if job is None:
            raise NotFound(f"fine-tune job {job_id!r} not found; list jobs to see their ids")
        return self._live(job)

    def list(self, tenant: str) -> list[JobRecord]:
        return [self._live(j) for j in self.store.list_jobs(tenant)]

    def _live(self, job: JobRecord) -> JobRecord:
        """A running job's current progress (the store has it as of the last event)."""
        task = self._tasks.get(job.id)
        if task is None or task.adaptation is None or task.job.state in TERMINAL:
            return job
        return replace(task.job, metrics=task.metrics())

    def cancel(self, tenant: str, job_id: str) -> JobRecord:
        self.get(tenant, job_id)  # NotFound for another tenant's job
        with self.lock:
            task = self._tasks.get(job_id)
            if task is not None and task.job.state not in TERMINAL:
                self.finish_job(task, "CANCELLED", "cancelled by the caller")
                return task.job
        # run by another replica (a shared registry): end it there through the store
        ended = self.store.end_job(tenant, job_id, "CANCELLED", "cancelled by the caller")
        if ended is not None:
            self._state_changed()
        return self.get(tenant, job_id)

    def _lost(self, job_ids: set[str]) -> None:
        """Jobs we run were ended elsewhere (cancelled on another replica, or our lease expired while
        we were cut off from the registry): stop them here and keep the stored outcome."""
        with self.lock:
            for job_id in job_ids:
                self._unsaved.pop(job_id, None)  # the stored outcome stands
                task = self._tasks.pop(job_id, None)
                if task is None:
                    continue
                try:
                    stored = self.store.get_job(task.job.tenant, job_id)
                except HotloraError:  # unreachable again: it is ended all the same
                    stored = None
                task.job = stored if stored is not None else replace(task.job, state="FAILED")
                log.warning("fine-tune job %s was ended elsewhere: %s", job_id, task.job.state)
                self._state_changed()
            self._changed.notify_all()

    def watch(
        self, tenant: str, job_id: str, active: Callable[[], bool] = lambda: True, poll_s: float = 0.5
    ) -> Iterator[tuple[str, JobRecord]]:
        """Every stored event of the job, then new ones as they come, until it ends."""
        self.get(tenant, job_id)
        seq = 0
        while True:
            job = self.get(tenant, job_id)
            for number, message, snapshot in self.store.job_events(job_id, seq):
                seq = number
                yield message, snapshot
            if job.state in TERMINAL:
                return
            with self._changed:
                self._changed.wait(poll_s)
            if not active():
                return

    def artifact_files(self, tenant: str, job_id: str) -> dict[str, str]:
        """File name -> blob digest of the adapter a job trained (also of a REJECTED one)."""
        job = self.get(tenant, job_id)
        files = self.store.job_files(job.id)
        if not files:
            raise NotFound(f"fine-tune job {job_id} has no trained adapter (state {job.state})")
        return files

    def artifact(self, tenant: str, job_id: str) -> dict[str, bytes]:
        """The PEFT files of the adapter a job trained, in memory (small adapters, tests)."""
        files = self.artifact_files(tenant, job_id)
        return {name: self.adapters.registry.blobs.get(sha) for name, sha in files.items()}

    def evaluate(
        self,
        tenant: str,
        ref: str,
        job_id: str,
        task: str,
        examples: tuple[Example, ...],
        use_chat_template: bool = False,
        timeout: float | None = None,
    ) -> tuple[str, Evaluation]:
        """Score `ref` (`name`, `name@N`), job `job_id`'s trained adapter, or the base model (neither
        given) on labelled examples; the engine runs it in bounded units between serving steps."""
        if ref and job_id:
            raise InvalidArgument("give adapter or job_id, not both")
        if ref:
            rec = self.adapters.registry.resolve(tenant, ref)
            weights = self.adapters.registry.load_weights(rec, self.adapters.base, self.adapters.limits)
            shown = rec.ref
        elif job_id:
            job = self.get(tenant, job_id)
            if job.result_adapter:  # promoted: the artifact is that version
                rec = self.adapters.registry.resolve(tenant, job.result_adapter)
                weights = self.adapters.registry.load_weights(rec, self.adapters.base, self.adapters.limits)
            else:
                labels = tuple(job.metrics.get("labels", ()))
                files = self.artifact(tenant, job_id)
                weights = parse_peft_adapter(files, self.adapters.base, self.adapters.limits, labels)
            shown = f"job:{job_id}"
        else:
            weights, shown = None, ""
        task = _evaluation_task(weights, task)
        if not examples:
            raise InvalidArgument("no examples to evaluate; give at least 1")
        if len(examples) > self.limits.max_examples:
            raise ResourceExhausted(f"{len(examples)} examples; at most {self.limits.max_examples}")
        for i, e in enumerate(examples):
            check_example(task, e, f"examples[{i}]", self.limits)
        labels = tuple(weights.labels) if task == "SEQ_CLS" else ()
        unknown = sorted({e.label for e in examples} - set(labels)) if task == "SEQ_CLS" else []
        if unknown:
            raise InvalidArgument(
                f"examples use label(s) {unknown[:5]} the adapter lacks; its labels: {list(labels)[:10]}"
            )
        spec = FineTuneSpec(adapter=shown, task=task, use_chat_template=use_chat_template)
        inputs, targets = self._tokenize(spec, list(examples), labels, "examples")
        with self.lock:
            if self._closed:
                raise FailedPrecondition("the server is shutting down; evaluate again after it restarts")
        data = TrainData([], [], inputs, targets)
        run = EvaluationTask(
            Evaluator(self.model, self.ctx, data, task=task, weights=weights, unit_seconds=self.unit_seconds)
        )
        self.queue.add(tenant, run)
        if not run.done.wait(timeout):
            run.cancelled = True
            raise DeadlineExceeded(f"the evaluation of {len(examples)} examples did not finish in time")
        if run.error is not None:
            raise run.error
        return shown, run.evaluator.result

    def count_by_state(self) -> dict[str, int]:
        return self.store.count_jobs_by_state()

    def close(self) -> None:
        """Stop training: jobs still queued or running end FAILED; no adapter is half-written."""
        with self.lock:
            self._closed = True
            for task in list(self._tasks.values()):
                if task.job.state not in TERMINAL:
                    self.finish_job(task, "FAILED", STOPPED)
        self.queue.close()  # outside the lock: a parked training loop unwinds first

    # ---- internals -------------------------------------------------------------------------------
    def _previous(self, tenant, name, version, task) -> tuple[object, TrainingRecord | None]:
        """The continued version's weights and training record (None for a new adapter or an upload)."""
        registry = self.adapters.registry
        try:
            rec = registry.resolve(tenant, f"{name}@{version}" if version else name)
        except NotFound:
            if version is not None:
                raise
            return None, None  # a new adapter
        if rec.task != task:
            raise InvalidArgument(
                f"adapter {rec.ref} is a {rec.task} adapter; continuing it needs task {rec.task}"
            )
        data = registry.read_record(rec)
        history = None if data is None else TrainingRecord.from_bytes(data)
        return registry.load_weights(rec, self.adapters.base, self.adapters.limits), history

    def _tokenize(self, spec: FineTuneSpec, items, labels, where: str) -> tuple[list, list]:
        return tokenize_examples(self.tokenizer, self.max_example_tokens, spec, items, labels, where)

    def _state(self, task: JobTask) -> str:
        return task.job.state

    def _save(self, job: JobRecord, message: str) -> None:
        self.store.save_job(job)
        self.store.add_job_event(job.id, message, job)
        self._changed.notify_all()

    def update_job(self, task: JobTask, message: str | None = None, **changes) -> None:
        """Progress of a running job; the store takes it when it can (training does not wait for it)."""
        with self.lock:
            if task.job.state in TERMINAL:
                return
            old = task.job.state
            task.job = replace(task.job, **changes)
            try:
                if message is None:
                    self.store.save_job(task.job)
                else:
                    self._save(task.job, message)
            except Unavailable as exc:
                log.warning("fine-tune job %s: progress not stored (%s); training goes on", task.job.id, exc)
            if task.job.state != old:
                self._state_changed()

    def finish_job(self, task: JobTask, state: str, message: str, **changes) -> None:
        with self.lock:
            if task.job.state in TERMINAL:
                return
            error = changes.pop("error", message if state in ("FAILED", "CANCELLED", "REJECTED") else "")
            task.job = replace(task.job, state=state, error=error, finished_at=time.time(), **changes)
            try:
                self._save(task.job, message)
            except Unavailable as exc:
                log.warning("fine-tune job %s: %s not stored yet (%s); retrying", task.job.id, state, exc)
                self._keep_unsaved(task.job, message)
            self._state_changed()
            self._tasks.pop(task.job.id, None)  # frees the examples; the record stays in the store
        log.info(
            "fine-tune job %s (%s/%s): %s — %s",
            task.job.id,
            task.job.tenant,
            task.job.adapter,
            state,
            message,
        )

    def _state_changed(self) -> None:
        self.observer.finetune_job_state_changed()

    def _keep_unsaved(self, job: JobRecord, message: str) -> None:
        """An outcome the store could not take (lock held): written by a saver thread as soon as the
        store answers."""
        self._unsaved[job.id] = (job, message)
        if self._saver is None:
            self._saver = threading.Thread(
                target=self._save_unsaved, name="hotlora-job-outcomes", daemon=True
            )
            self._saver.start()

    def _save_unsaved(self) -> None:
        while True:
            with self.lock:
                if not self._unsaved:
                    self._saver = None  # under the lock: the next unsaved outcome starts another
                    return
                pending = list(self._unsaved.items())
            for job_id, (job, message) in pending:
                try:
                    self.store.save_job(job)  # refused by the store if the job was ended elsewhere
                    self.store.add_job_event(job_id, message, job)
                except Unavailable:
                    continue
                with self.lock:
                    if self._unsaved.get(job_id, (None,))[0] is job:
                        del self._unsaved[job_id]
                    self._changed.notify_all()
                log.info("fine-tune job %s: %s stored", job_id, job.state)
            with self.lock:
                if self._closed and self._unsaved:
                    log.warning("%d fine-tune outcome(s) not stored at shutdown; their leases will "
                                "lapse and another replica fails them", len(self._unsaved))  # fmt: skip
                    self._saver = None
                    return
            time.sleep(UNSAVED_RETRY_S)


def _evaluation_task(weights, task: str) -> str:
    if weights is not None:
        if task and task != weights.task:
            raise InvalidArgument(f"the adapter is a {weights.task} adapter; task {task} does not match")
        return weights.task
    if task == "SEQ_CLS":
        raise FailedPrecondition("the base model has no classification head; name a SEQ_CLS adapter")
    return "CAUSAL_LM"


def _metric_name(task: str) -> str:
    return "accuracy" if task == "SEQ_CLS" else "neg_completion_loss"
