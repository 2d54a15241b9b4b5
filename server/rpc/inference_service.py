"""hotlora.v1.Inference: thin wire layer over InferenceFrontend."""

from __future__ import annotations

from hotlora.adapters.errors import Unavailable
from hotlora.server.engine.requests import FinishReason
from hotlora.server.frontend.events import request_events
from hotlora.server.frontend.samples import SampleSet
from hotlora.server.rpc import conversion
from hotlora.server.rpc.interceptors import current_tenant
from hotlora.v1 import inference_pb2, inference_pb2_grpc


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    def __init__(self, state):
        self.state = state  # AppState: .frontend is set once the model is ready

    def _frontend(self):
        fe = self.state.frontend
        if fe is None:
            raise Unavailable("the server is starting: the model is still loading")
        return fe

    @staticmethod
    def _events(req, context):
        """The request's engine events; cancelled as soon as the caller goes away."""
        context.add_callback(req.cancel)
        return request_events(req, alive=context.is_active)

    def _samples(self, request, context) -> SampleSet:
        """params.n > 1: every sample of the prompt, cancelled if the caller goes away."""
        fe = self._frontend()
        g = conversion.generate_input(request)
        samples = SampleSet(fe, current_tenant(), [g], request.params.n, conversion.deadline_of(context))
        context.add_callback(samples.cancel)
        return samples

    def Generate(self, request, context):
        fe = self._frontend()
        if request.params.n > 1:
            return self._generate_samples(fe, request, context)
        req, resolved = fe.start_generation(
            current_tenant(), conversion.generate_input(request), conversion.deadline_of(context)
        )
        for ev in self._events(req, context):
            if ev.finish_reason is not None and ev.finish_reason != FinishReason.CANCELLED:
                fe.raise_for_finish(ev.finish_reason, req.error)
        return inference_pb2.GenerateResponse(
            text=req.text,
            token_ids=req.output_ids,
            finish_reason=req.finish_reason,
            usage=conversion.usage(req),
            adapter=resolved,
            request_id=request.request_id,
            logprobs=conversion.token_logprobs(req.output_logprobs, fe.tokenizer),
            prompt_logprobs=conversion.token_logprobs(req.prompt_logprobs, fe.tokenizer),
        )

    def _generate_samples(self, fe, request, context):
        samples = self._samples(request, context)
        for _ in samples.stream(alive=context.is_active):
            pass
        for req in samples.requests:
            if not req.finish_reason.completed:
                fe.raise_for_finish(req.finish_reason, req.error)
        first = samples.requests[0]
        return inference_pb2.GenerateResponse(
            text=first.text,
            token_ids=first.output_ids,
            finish_reason=first.finish_reason,
            usage=conversion.usage_of_samples(samples),
            adapter=samples.adapter,
            request_id=request.request_id,
            logprobs=conversion.token_logprobs(first.output_logprobs, fe.tokenizer),
            prompt_logprobs=conversion.token_logprobs(first.prompt_logprobs, fe.tokenizer),
            samples=[
                inference_pb2.Sample(
                    index=i,
                    text=r.text,
                    token_ids=r.output_ids,
                    finish_reason=r.finish_reason,
                    logprobs=conversion.token_logprobs(r.output_logprobs, fe.tokenizer),
                )
                for i, r in enumerate(samples.requests)
            ],
        )

    def _stream_samples(self, fe, request, context):
        samples = self._samples(request, context)
        events = samples.stream(alive=context.is_active)
        open_samples = request.params.n
        for index, ev in events:
            last = ev.finish_reason is not None
            if last and not _completed_or_cancelled(ev.finish_reason):
                fe.raise_for_finish(ev.finish_reason, samples.requests[index].error)
            chunk = inference_pb2.GenerateChunk(
                text=ev.text,
                token_ids=ev.token_ids,
                adapter=samples.adapter,
                request_id=request.request_id,
                logprobs=conversion.token_logprobs(ev.logprobs, fe.tokenizer),
                index=index,
            )
            if last:
                chunk.finish_reason = ev.finish_reason
                open_samples -= 1
                if open_samples == 0:
                    chunk.usage.CopyFrom(conversion.usage_of_samples(samples))
            yield chunk

    def GenerateStream(self, request, context):
        fe = self._frontend()
        if request.params.n > 1:
            yield from self._stream_samples(fe, request, context)
            return
        req, resolved = fe.start_generation(
            current_tenant(), conversion.generate_input(request), conversion.deadline_of(context)
        )
        for ev in self._events(req, context):
            last = ev.finish_reason is not None
            if last and not _completed_or_cancelled(ev.finish_reason):
                fe.raise_for_finish(ev.finish_reason, req.error)
            chunk = inference_pb2.GenerateChunk(
                text=ev.text,
                token_ids=ev.token_ids,
                adapter=resolved,
                request_id=request.request_id,
                logprobs=conversion.token_logprobs(ev.logprobs, fe.tokenizer),
            )
            if last:
                chunk.finish_reason = ev.finish_reason
                chunk.usage.CopyFrom(conversion.usage(req))
            yield chunk

    def Embed(self, request, context):
        vectors, resolved = self._frontend().embed(
            current_tenant(), request.adapter, list(request.texts), conversion.deadline_of(context)
        )
        return inference_pb2.EmbedResponse(
            embeddings=[inference_pb2.Embedding(values=v.tolist()) for v in vectors], adapter=resolved
        )

    def Classify(self, request, context):
        results, resolved = self._frontend().classify(
            current_tenant(), request.adapter, list(request.texts), conversion.deadline_of(context)
        )
        return inference_pb2.ClassifyResponse(
            results=[
                inference_pb2.Classification(
                    label=r.label, score=r.score, scores=conversion.label_scores(r.scores)
                )
                for r in results
            ],
            adapter=resolved,
        )


def _completed_or_cancelled(reason: FinishReason) -> bool:
    """A stream ends normally on these; it reports a cancel in its last chunk instead of failing."""
    return reason.completed or reason == FinishReason.CANCELLED
