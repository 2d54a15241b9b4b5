"""hotlora.v1.Training (replaced by the fine-tuning servicer)."""

import grpc

from hotlora.v1 import training_pb2_grpc


class TrainingServicer(training_pb2_grpc.TrainingServicer):
    def __init__(self, state):
        self.state = state

    def _unimplemented(self, request, context):
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "on-line fine-tuning (hotlora.v1.Training) is not built yet")

    CreateFineTune = GetFineTune = ListFineTunes = CancelFineTune = _unimplemented

    def WatchFineTune(self, request, context):
        self._unimplemented(request, context)
        yield from ()
