"""Wire <-> domain conversion for hotlora.v1: the only module below the servicers that
knows the *_pb2 types."""

from __future__ import annotations

import time

from hotlora.server.frontend import GenerateInput
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
        stop=list(p.stop),
        request_id=req.request_id,
    )


def deadline_of(context) -> float | None:
    remaining = context.time_remaining()
    if remaining is None or remaining > 1e8:
        return None
    return time.monotonic() + remaining


def usage(req) -> inference_pb2.Usage:
    return inference_pb2.Usage(prompt_tokens=len(req.prompt_ids), completion_tokens=len(req.output_ids))


def label_scores(scores) -> list[common_pb2.LabelScore]:
    return [common_pb2.LabelScore(label=label, score=score) for label, score in scores]


def adapter_pb(view):
    from hotlora.v1 import adapters_pb2

    rec = view.record
    created = rec.created_at.timestamp() if hasattr(rec.created_at, "timestamp") else float(rec.created_at)
    return adapters_pb2.Adapter(
        tenant=rec.tenant, name=rec.name, version=rec.version,
        task=common_pb2.Task.Value("TASK_" + rec.task), rank=rec.rank, alpha=rec.alpha,
        target_modules=list(rec.target_modules), labels=list(rec.labels), sha256=rec.sha256,
        size_bytes=rec.size_bytes, state=adapters_pb2.AdapterState.Value("ADAPTER_STATE_" + view.state),
        pinned=view.pinned, created_at=created,
        source=adapters_pb2.AdapterSource.Value("ADAPTER_SOURCE_" + rec.source),
        description=rec.description, waiting_requests=view.waiting,
    )
