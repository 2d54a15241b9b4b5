"""Start an in-process server on a free 127.0.0.1 port; always stopped by the test."""

from __future__ import annotations

import contextlib

import grpc

from hotlora.server.app import HotloraServer
from hotlora.server.config import ServerConfig
from hotlora.v1 import adapters_pb2_grpc, inference_pb2_grpc, training_pb2_grpc


class Running:
    def __init__(self, server: HotloraServer):
        self.server = server
        self.address = f"127.0.0.1:{server.port}"
        self.channel = grpc.insecure_channel(self.address)
        self.inference = inference_pb2_grpc.InferenceStub(self.channel)
        self.adapters = adapters_pb2_grpc.AdaptersStub(self.channel)
        self.training = training_pb2_grpc.TrainingStub(self.channel)

    @property
    def state(self):
        return self.server.state


@contextlib.contextmanager
def running_server(model_dir, data_dir, load: bool = True, **overrides):
    overrides.setdefault("http_port", -1)  # the HTTP door only where a test asks for it (http_port=0)
    # the tests hold the server to fp32 numbers (PEFT's, transformers'): --dtype auto would compute the tiny
    # random models in bf16 on a CPU with avx512_bf16; a test of bf16 or of auto asks for it
    overrides.setdefault("dtype", "float32")
    cfg = ServerConfig(
        model=str(model_dir), port=0, metrics_port=0, data_dir=str(data_dir), grace_seconds=2.0, **overrides
    )
    server = HotloraServer(cfg)
    server.start()
    run = None
    try:
        if load:
            server.load()
        run = Running(server)
        yield run
    finally:
        if run is not None:
            run.channel.close()
        server.shutdown(grace=1.0)
