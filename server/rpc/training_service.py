"""hotlora.v1.Training: thin wire layer over hotlora.adapters.training.finetune_jobs.FineTuneManager."""

from __future__ import annotations

from hotlora.adapters.errors import Unavailable
from hotlora.server.rpc.conversion import evaluate_input, evaluation_pb, finetune_job_pb, finetune_spec
from hotlora.server.rpc.interceptors import current_tenant
from hotlora.v1 import training_pb2, training_pb2_grpc


class TrainingServicer(training_pb2_grpc.TrainingServicer):
    def __init__(self, state):
        self.state = state

    def _manager(self):
        manager = self.state.training
        if manager is None:
            raise Unavailable("the server is starting: fine-tuning is available once the model is loaded")
        return manager

    def CreateFineTune(self, request, context):
        return finetune_job_pb(self._manager().create(current_tenant(), finetune_spec(request)))

    def GetFineTune(self, request, context):
        return finetune_job_pb(self._manager().get(current_tenant(), request.id))

    def ListFineTunes(self, request, context):
        jobs = self._manager().list(current_tenant())
        return training_pb2.ListFineTunesResponse(jobs=[finetune_job_pb(j) for j in jobs])

    def CancelFineTune(self, request, context):
        return finetune_job_pb(self._manager().cancel(current_tenant(), request.id))

    def WatchFineTune(self, request, context):
        for message, job in self._manager().watch(current_tenant(), request.id, context.is_active):
            yield training_pb2.FineTuneEvent(job=finetune_job_pb(job), message=message)

    def EvaluateAdapter(self, request, context):
        ref, job_id, task, examples, chat = evaluate_input(request)
        remaining = context.time_remaining()
        timeout = None if remaining is None or remaining > 1e8 else remaining
        shown, result = self._manager().evaluate(current_tenant(), ref, job_id, task, examples, chat, timeout)
        return evaluation_pb(shown, result)
