"""Wire <-> domain conversion for hotlora.v1: the only module below the servicers that
knows the *_pb2 types."""

from __future__ import annotations

import time
from dataclasses import asdict

from hotlora.server.engine.guided import GuidedKind, GuidedSpec
from hotlora.server.frontend.inference import GenerateInput
from hotlora.v1 import common_pb2, inference_pb2


def generate_input(req: inference_pb2.GenerateRequest) -> GenerateInput:
    p = req.params
    return GenerateInput(
        adapter=req.adapter,
        prompt=req.prompt,
        messages=[(m.role, m.content) for m in req.messages],
        max_new_tokens=p.max_new_tokens,
        temperature=p.temperature,
        top_p=p.top_p,
        top_k=p.top_k,
        seed=p.seed if p.HasField("seed") else None,
        ignore_eos=p.ignore_eos,
        stop=list(p.stop),
        request_id=req.request_id,
        logprobs=p.logprobs if p.HasField("logprobs") else None,
        prompt_logprobs=p.prompt_logprobs if p.HasField("prompt_logprobs") else None,
        presence_penalty=p.presence_penalty,
        frequency_penalty=p.frequency_penalty,
        repetition_penalty=p.repetition_penalty,
        min_tokens=p.min_tokens,
        stop_token_ids=list(p.stop_token_ids),
        logit_bias=dict(p.logit_bias),
        guided=guided_spec(p.guided) if p.HasField("guided") else None,
    )


def guided_spec(g: common_pb2.Guided) -> GuidedSpec | None:
    kind = g.WhichOneof("kind")
    if kind is None or (kind == "json_object" and not g.json_object):
        return None
    if kind == "choice":
        return GuidedSpec(GuidedKind.CHOICE, tuple(g.choice.choices))
    return GuidedSpec(GuidedKind(kind), "" if kind == "json_object" else getattr(g, kind))


def token_logprobs(entries, tokenizer) -> list[common_pb2.TokenLogprob]:
    """TokenLogprob entries -> wire, each token with its text."""
    out = []
    for e in entries or ():
        out.append(
            common_pb2.TokenLogprob(
                token_id=e.token_id,
                token=tokenizer.decode([e.token_id]),
                logprob=e.logprob,
                rank=e.rank,
                top=[
                    common_pb2.TopLogprob(token_id=t, token=tokenizer.decode([t]), logprob=lp)
                    for t, lp in e.top
                ],
            )
        )
    return out


def deadline_of(context) -> float | None:
    remaining = context.time_remaining()
    if remaining is None or remaining > 1e8:
        return None
    return time.monotonic() + remaining


def usage(req) -> inference_pb2.Usage:
    return inference_pb2.Usage(prompt_tokens=len(req.prompt_ids), completion_tokens=len(req.output_ids))


def usage_of_samples(samples) -> inference_pb2.Usage:
    """The prompt once, every sample's tokens."""
    return inference_pb2.Usage(
        prompt_tokens=sum(len(r.prompt_ids) for r in samples.prompt_requests()),
        completion_tokens=sum(len(r.output_ids) for r in samples.requests if r is not None),
    )


def label_scores(scores) -> list[common_pb2.LabelScore]:
    return [common_pb2.LabelScore(label=label, score=score) for label, score in scores]


def head_features_pb(features) -> common_pb2.HeadFeatures | None:
    return (
        None if features is None else common_pb2.HeadFeatures(pooling=features.pooling, layer=features.layer)
    )


def adapter_pb(view, summary=None, head_features=None):
    """`summary`: a fine-tuned version's ValidationSummary, `head_features` what its head reads
    (GetAdapter)."""
    from hotlora.v1 import adapters_pb2

    rec = view.record
    created = rec.created_at.timestamp() if hasattr(rec.created_at, "timestamp") else float(rec.created_at)
    return adapters_pb2.Adapter(
        tenant=rec.tenant,
        name=rec.name,
        version=rec.version,
        task=common_pb2.Task.Value("TASK_" + rec.task),
        rank=rec.rank,
        alpha=rec.alpha,
        target_modules=list(rec.target_modules),
        labels=list(rec.labels),
        sha256=rec.sha256,
        size_bytes=rec.size_bytes,
        state=adapters_pb2.AdapterState.Value("ADAPTER_STATE_" + view.state),
        pinned=view.pinned,
        created_at=created,
        source=adapters_pb2.AdapterSource.Value("ADAPTER_SOURCE_" + rec.source),
        description=rec.description,
        waiting_requests=view.waiting,
        validation=None if summary is None else adapters_pb2.AdapterValidation(**asdict(summary)),
        head_features=head_features_pb(head_features),
        export_loader="" if head_features is None else head_features.export_loader,
        device=view.device,
        replica=view.replica,
    )


# ---- hotlora.v1.Training ----------------------------------------------------------------------------


def finetune_spec(req):
    """FineTuneRequest -> FineTuneSpec (enums by name; UNSPECIFIED = the documented default)."""
    from hotlora.adapters.training.finetune_spec import Example, FineTuneSpec, HyperParams
    from hotlora.v1 import training_pb2

    def examples(items):
        return tuple(Example(e.text, e.label, e.prompt, e.completion) for e in items)

    hp = req.hyperparameters
    task = common_pb2.Task.Name(req.task).removeprefix("TASK_")
    method = training_pb2.FineTuneMethod.Name(req.method).removeprefix("METHOD_")
    promote = training_pb2.Promote.Name(req.promote).removeprefix("PROMOTE_")
    return FineTuneSpec(
        adapter=req.adapter,
        task=task,
        method="AUTO" if method == "UNSPECIFIED" else method,
        examples=examples(req.examples),
        validation=examples(req.validation),
        hyper=HyperParams(
            rank=hp.rank,
            alpha=hp.alpha,
            learning_rate=hp.learning_rate,
            epochs=hp.epochs,
            batch_size=hp.batch_size,
            target_modules=tuple(hp.target_modules),
            layers_to_transform=tuple(hp.layers_to_transform),
            seed=hp.seed if hp.HasField("seed") else 0,
        ),
        promote="GATED" if promote == "UNSPECIFIED" else promote,
        labels=tuple(req.labels),
        use_chat_template=req.use_chat_template,
        description=req.description,
        max_seconds=req.max_seconds,
    )


def finetune_job_pb(job):
    from hotlora.v1 import training_pb2

    m = job.metrics
    method = job.method if job.method in METHODS else "AUTO"
    return training_pb2.FineTuneJob(
        id=job.id,
        tenant=job.tenant,
        adapter=job.adapter,
        task=common_pb2.Task.Value("TASK_" + job.task) if job.task in ("SEQ_CLS", "CAUSAL_LM") else 0,
        method=training_pb2.FineTuneMethod.Value("METHOD_" + method),
        state=training_pb2.JobState.Value("JOB_STATE_" + job.state),
        metrics=training_pb2.FineTuneMetrics(
            step=int(m.get("step", 0)),
            total_steps=int(m.get("total_steps", 0)),
            epoch=int(m.get("epoch", 0)),
            train_loss=float(m.get("train_loss", 0.0)),
            validation_metric=_known(m.get("validation_metric")),  # unset until measured
            baseline_metric=_known(m.get("baseline_metric")),
            metric_name=str(m.get("metric_name", "")),
            elapsed_seconds=float(m.get("elapsed_seconds", 0.0)),
            remaining_seconds=float(m.get("remaining_seconds", 0.0)),
            validation_stderr=float(m.get("validation_stderr", 0.0)),
            validation_scheme=str(m.get("validation_scheme", "")),
            validated_examples=int(m.get("validated_examples", 0)),
            candidates=[_candidate_pb(c) for c in m.get("candidates", ())],
            winner_reason=str(m.get("winner_reason", "")),
            gate_margin=float(m.get("gate_margin", 0.0)),
            previous_task_score=float(m.get("previous_task_score", 0.0)),
            previous_task_reference=float(m.get("previous_task_reference", 0.0)),
            previous_task_stderr=float(m.get("previous_task_stderr", 0.0)),
            previous_task_examples=int(m.get("previous_task_examples", 0)),
            replayed_examples=int(m.get("replayed_examples", 0)),
            phase=str(m.get("phase", "")),
            winner=str(m.get("winner", "")),
            head_features=(
                common_pb2.HeadFeatures(**m["head_features"])
                if isinstance(m.get("head_features"), dict)
                else None
            ),
        ),
        result_adapter=job.result_adapter,
        error=job.error,
        created_at=job.created_at,
        finished_at=job.finished_at,
        promoted=job.promoted,
    )


METHODS = ("HEAD_ONLY", "LORA", "AUTO", "LORA_PROGRESSIVE")


def _known(value) -> float | None:
    """A figure a job has measured, or None (the field stays unset: no 0 that is not a score)."""
    return None if value is None else float(value)


def _features_pb(raw) -> common_pb2.HeadFeatures | None:
    if not isinstance(raw, dict):
        return None
    return common_pb2.HeadFeatures(pooling=str(raw.get("pooling", "")), layer=int(raw.get("layer", -1)))


def _candidate_pb(c: dict):
    from hotlora.v1 import training_pb2

    method = c.get("method", "AUTO")
    return training_pb2.FineTuneCandidate(
        name=str(c.get("name", "")),
        method=training_pb2.FineTuneMethod.Value("METHOD_" + (method if method in METHODS else "AUTO")),
        features=str(c.get("features", "")),
        status=str(c.get("status", "")),
        score=float(c.get("score", 0.0)),
        stderr=float(c.get("stderr", 0.0)),
        seconds=float(c.get("seconds", 0.0)),
        servable=True,
        note=str(c.get("note", "")),
        layer=int(c.get("layer", -1)),
    )


def evaluate_input(req):
    """EvaluateRequest -> (adapter ref, job id, task or "", examples, use_chat_template)."""
    from hotlora.adapters.training.finetune_spec import Example

    task = common_pb2.Task.Name(req.task).removeprefix("TASK_")
    examples = tuple(Example(e.text, e.label, e.prompt, e.completion) for e in req.examples)
    return req.adapter, req.job_id, "" if task == "UNSPECIFIED" else task, examples, req.use_chat_template


def evaluation_pb(ref: str, ev):
    from hotlora.v1 import training_pb2

    return training_pb2.EvaluateResponse(
        adapter=ref,
        task=common_pb2.Task.Value("TASK_" + ev.task),
        examples=ev.examples,
        accuracy=ev.accuracy,
        macro_f1=ev.macro_f1,
        labels=list(ev.labels),
        confusion=[training_pb2.ConfusionRow(counts=list(row)) for row in ev.confusion],
        loss=ev.loss,
        perplexity=ev.perplexity,
        exact_match=ev.exact_match,
        tokens=ev.tokens,
    )
