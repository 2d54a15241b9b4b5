"""`hotlora serve` replicas in their own processes on one PostgreSQL + S3 (so a test can SIGKILL one)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc

from hotlora.v1 import adapters_pb2_grpc, inference_pb2_grpc, training_pb2_grpc

READY_TIMEOUT_S = 120.0


class Replica:
    def __init__(
        self,
        model_dir: Path,
        data_dir: Path,
        stores,
        *,
        name: str,
        job_lease_s: float = 3.0,
        extra: tuple[str, ...] = (),
    ):
        """`extra`: more `hotlora serve` flags (`--metrics-port 0`: the port is read into `metrics_port`)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("HOTLORA_")}
        hotlora = Path(sys.executable).with_name("hotlora")
        self.name = name
        self.log_path = Path(data_dir).with_suffix(".log")
        self.log = open(self.log_path, "a")  # noqa: SIM115 (closed in stop/kill)
        flags = stores.server_flags()
        self.proc = subprocess.Popen(
            [str(hotlora), "serve", "--model", str(model_dir), "--port", "0", "--metrics-port", "-1",
             "--http-port", "-1", "--data-dir", str(data_dir), "--device", "cpu", "--workers", "8",
             "--max-rank", "16",
             "--registry", flags["registry"], "--blob-store", flags["blob_store"],
             "--s3-endpoint-url", flags["s3_endpoint_url"], "--job-lease-seconds", str(job_lease_s),
             "--replica-id", name, "--grace-seconds", "1", *extra],
            stdout=subprocess.PIPE, stderr=self.log, text=True, env=env,
        )  # fmt: skip
        self.port = self.metrics_port = None
        ready = threading.Event()

        def read():
            for line in self.proc.stdout:
                if "gRPC on" in line:
                    self.port = int(line.split("gRPC on ")[1].split(",")[0].rsplit(":", 1)[1])
                    if "metrics on " in line:
                        self.metrics_port = int(line.split("metrics on ")[1].split(",")[0].rsplit(":", 1)[1])
                if "hotlora: ready" in line:
                    ready.set()

        threading.Thread(target=read, daemon=True).start()
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not ready.wait(0.2) and self.proc.poll() is None and time.monotonic() < deadline:
            pass
        if not ready.is_set():
            self.kill()
            raise RuntimeError(
                f"replica {name} not ready in {READY_TIMEOUT_S} s:\n{self.log_path.read_text()}"
            )
        self.address = f"127.0.0.1:{self.port}"
        self.channel = grpc.insecure_channel(self.address)
        self.inference = inference_pb2_grpc.InferenceStub(self.channel)
        self.adapters = adapters_pb2_grpc.AdaptersStub(self.channel)
        self.training = training_pb2_grpc.TrainingStub(self.channel)

    def kill(self) -> None:
        """SIGKILL: no drain, no lease released, nothing flushed."""
        self._end(signal.SIGKILL)

    def stop(self) -> None:
        self._end(signal.SIGTERM)

    def _end(self, sig) -> None:
        if getattr(self, "channel", None) is not None:
            self.channel.close()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
