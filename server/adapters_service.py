"""hotlora.v1.Adapters (replaced by the registry-backed servicer once adapters are wired)."""

from hotlora.v1 import adapters_pb2_grpc


class AdaptersServicer(adapters_pb2_grpc.AdaptersServicer):
    def __init__(self, state):
        self.state = state
