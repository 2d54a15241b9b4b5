"""Fake hotlora servicers for client tests: record what they receive, answer canned messages."""

from __future__ import annotations

import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from hotlora.v1 import (
    adapters_pb2,
    adapters_pb2_grpc,
    common_pb2,
    inference_pb2,
    inference_pb2_grpc,
    training_pb2,
    training_pb2_grpc,
)

MISSING = "adapter 'missing' not found for tenant 'default'; list adapters with `hotlora adapters list`"


@dataclass
class Recorder:
    """Every call a fake received: (method, request, metadata dict)."""

    calls: list[tuple[str, Any, dict[str, str]]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, method: str, request: Any, context: grpc.ServicerContext) -> None:
        md = {m.key: m.value for m in context.invocation_metadata()}
        with self.lock:
            self.calls.append((method, request, md))

    def requests(self, method: str) -> list[Any]:
        with self.lock:
            return [req for m, req, _ in self.calls if m == method]

    def last_metadata(self) -> dict[str, str]:
        with self.lock:
            return self.calls[-1][2]


class StreamCall:
    """One GenerateStream call: its context and an event set when the rpc terminated (cancelled or
    finished). Each call has its own, so a test waits for the call it cancelled, not an earlier one."""

    def __init__(self, context: grpc.ServicerContext):
        self.context = context
        self.ended = threading.Event()
        context.add_callback(self.ended.set)


class FakeInference(inference_pb2_grpc.InferenceServicer):
    STREAM_TEXT = ("Hello", ", ", "world")

    def __init__(self, rec: Recorder):
        self.rec = rec
        self.streams: dict[str, StreamCall] = {}  # GenerateStream calls by prompt
        self.stream_started = threading.Event()

    def Generate(self, request, context):
        self.rec.record("Generate", request, context)
        if request.adapter == "missing":
            context.abort(grpc.StatusCode.NOT_FOUND, MISSING)
        if request.prompt == "slow":
            while context.is_active():
                time.sleep(0.01)
            return inference_pb2.GenerateResponse()
        text = request.prompt or request.messages[-1].content
        return inference_pb2.GenerateResponse(
            text=f"echo: {text}",
            token_ids=[1, 2, 3],
            finish_reason="length",
            usage=inference_pb2.Usage(prompt_tokens=2, completion_tokens=3),
            adapter=f"{request.adapter}@1" if request.adapter else "",
            request_id=request.request_id,
        )

    def GenerateStream(self, request, context):
        self.rec.record("GenerateStream", request, context)
        if request.adapter == "missing":
            context.abort(grpc.StatusCode.NOT_FOUND, MISSING)
        self.streams[request.prompt] = StreamCall(context)
        self.stream_started.set()
        if request.prompt == "forever":
            i = 0
            while context.is_active():
                yield inference_pb2.GenerateChunk(text=f"t{i} ", token_ids=[i])
                i += 1
                time.sleep(0.005)
            return
        for i, piece in enumerate(self.STREAM_TEXT):
            yield inference_pb2.GenerateChunk(text=piece, token_ids=[i])
        yield inference_pb2.GenerateChunk(
            finish_reason="length", usage=inference_pb2.Usage(prompt_tokens=1, completion_tokens=3)
        )

    def Classify(self, request, context):
        self.rec.record("Classify", request, context)
        if request.adapter == "missing":
            context.abort(grpc.StatusCode.NOT_FOUND, MISSING)
        results = [
            inference_pb2.Classification(
                label="pos",
                score=0.75,
                scores=[
                    common_pb2.LabelScore(label="neg", score=0.25),
                    common_pb2.LabelScore(label="pos", score=0.75),
                ],
            )
            for _ in request.texts
        ]
        return inference_pb2.ClassifyResponse(results=results, adapter=f"{request.adapter}@1")

    def Embed(self, request, context):
        self.rec.record("Embed", request, context)
        embs = [inference_pb2.Embedding(values=[float(len(t)), 0.5]) for t in request.texts]
        return inference_pb2.EmbedResponse(embeddings=embs, adapter=request.adapter)


def make_adapter(name: str, version: int = 1, **kw: Any) -> adapters_pb2.Adapter:
    defaults = dict(
        tenant="default",
        task=common_pb2.TASK_CAUSAL_LM,
        rank=8,
        alpha=16.0,
        target_modules=["q_proj", "v_proj"],
        sha256="ab" * 32,
        size_bytes=12345,
        state=adapters_pb2.ADAPTER_STATE_STORED,
        created_at=1_700_000_000.0,
        source=adapters_pb2.ADAPTER_SOURCE_UPLOAD,
    )
    defaults.update(kw)
    return adapters_pb2.Adapter(name=name, version=version, **defaults)


class FakeAdapters(adapters_pb2_grpc.AdaptersServicer):
    def __init__(self, rec: Recorder):
        self.rec = rec
        self.uploads: list[list[adapters_pb2.UploadChunk]] = []
        self.export_chunks: list[common_pb2.FileChunk] = []
        self.export_abort_after: int | None = None

    def UploadAdapter(self, request_iterator, context):
        chunks = list(request_iterator)
        self.rec.record("UploadAdapter", chunks, context)
        self.uploads.append(chunks)
        first = chunks[0]
        size = sum(len(c.data) for c in chunks)
        return make_adapter(
            first.name, labels=list(first.labels), description=first.description, size_bytes=size
        )

    def ListAdapters(self, request, context):
        self.rec.record("ListAdapters", request, context)
        items = [
            make_adapter("support-bot", 2),
            make_adapter(
                "sentiment", 1, task=common_pb2.TASK_SEQ_CLS, labels=["neg", "pos"],
                state=adapters_pb2.ADAPTER_STATE_DEVICE, pinned=True,
            ),
        ]  # fmt: skip
        return adapters_pb2.ListAdaptersResponse(
            adapters=[a for a in items if a.name.startswith(request.prefix)]
        )

    def GetAdapter(self, request, context):
        self.rec.record("GetAdapter", request, context)
        if request.name.split("@")[0] == "missing":
            context.abort(grpc.StatusCode.NOT_FOUND, MISSING)
        return make_adapter(request.name.split("@")[0])

    def DeleteAdapter(self, request, context):
        self.rec.record("DeleteAdapter", request, context)
        return common_pb2.Ack(message=f"deleted {request.name}")

    def LoadAdapter(self, request, context):
        self.rec.record("LoadAdapter", request, context)
        return make_adapter(request.name, state=adapters_pb2.ADAPTER_STATE_DEVICE, pinned=request.pin)

    def UnloadAdapter(self, request, context):
        self.rec.record("UnloadAdapter", request, context)
        return make_adapter(request.name)

    def ExportAdapter(self, request, context):
        self.rec.record("ExportAdapter", request, context)
        for i, chunk in enumerate(self.export_chunks):
            if self.export_abort_after is not None and i == self.export_abort_after:
                context.abort(grpc.StatusCode.UNAVAILABLE, "server is draining; retry on another replica")
            yield chunk


def make_job(state: str = "QUEUED", step: int = 0, **kw: Any) -> training_pb2.FineTuneJob:
    return training_pb2.FineTuneJob(
        id="job-1",
        tenant="default",
        adapter="sentiment",
        task=common_pb2.TASK_SEQ_CLS,
        method=training_pb2.METHOD_HEAD_ONLY,
        state=training_pb2.JobState.Value(f"JOB_STATE_{state}"),
        metrics=training_pb2.FineTuneMetrics(
            step=step, total_steps=4, epoch=1, train_loss=1.0 / (step + 1), validation_metric=0.9,
            baseline_metric=0.5, metric_name="accuracy",
        ),
        created_at=1_700_000_000.0,
        **kw,
    )  # fmt: skip


class FakeTraining(training_pb2_grpc.TrainingServicer):
    def __init__(self, rec: Recorder):
        self.rec = rec
        self.final_state = "SUCCEEDED"

    def CreateFineTune(self, request, context):
        self.rec.record("CreateFineTune", request, context)
        if not request.examples:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no examples")
        return make_job("QUEUED")

    def WatchFineTune(self, request, context):
        self.rec.record("WatchFineTune", request, context)
        if request.id != "job-1":
            context.abort(grpc.StatusCode.NOT_FOUND, f"fine-tune job {request.id!r} not found")
        for step in range(1, 5):
            yield training_pb2.FineTuneEvent(job=make_job("RUNNING", step), message=f"step {step}")
        final = self.final_state
        extra = (
            {"result_adapter": "sentiment@3", "promoted": True}
            if final == "SUCCEEDED"
            else {"error": "diverged"}
        )
        yield training_pb2.FineTuneEvent(job=make_job(final, 4, **extra), message="done")

    def GetFineTune(self, request, context):
        self.rec.record("GetFineTune", request, context)
        return make_job("SUCCEEDED", 4, result_adapter="sentiment@3", promoted=True)

    def ListFineTunes(self, request, context):
        self.rec.record("ListFineTunes", request, context)
        return training_pb2.ListFineTunesResponse(jobs=[make_job("RUNNING", 2)])

    def CancelFineTune(self, request, context):
        self.rec.record("CancelFineTune", request, context)
        return make_job("CANCELLED", 2)


@dataclass
class FakeServer:
    server: grpc.Server
    address: str
    rec: Recorder
    inference: FakeInference
    adapters: FakeAdapters
    training: FakeTraining
    health: health.HealthServicer

    def set_health(self, status: str, service: str = "") -> None:
        self.health.set(service, health_pb2.HealthCheckResponse.ServingStatus.Value(status))

    def stop(self) -> None:
        self.server.stop(grace=None).wait(timeout=5)


def start_fake_server(
    credentials: grpc.ServerCredentials | None = None, host: str = "127.0.0.1"
) -> FakeServer:
    rec = Recorder()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    fakes = FakeInference(rec), FakeAdapters(rec), FakeTraining(rec)
    inference_pb2_grpc.add_InferenceServicer_to_server(fakes[0], server)
    adapters_pb2_grpc.add_AdaptersServicer_to_server(fakes[1], server)
    training_pb2_grpc.add_TrainingServicer_to_server(fakes[2], server)
    hs = health.HealthServicer()
    hs.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(hs, server)
    if credentials is None:
        port = server.add_insecure_port(f"{host}:0")
    else:
        port = server.add_secure_port(f"{host}:0", credentials)
    server.start()
    return FakeServer(server, f"{host}:{port}", rec, *fakes, hs)
