"""The container image under podman, as tests/image/test_image.py and benchmarks/image.py use it: build it
with deploy/image/podman.sh, run it with its ports published on loopback, wait for SERVING, stop it."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import grpc

from hotlora.clients import Client

ROOT = Path(__file__).resolve().parents[2]
PODMAN_SH = ROOT / "deploy" / "image" / "podman.sh"
IMAGE = os.environ.get("IMAGE_TAG", "localhost/hotlora:cpu")
GRPC, HTTP, METRICS = 50051, 8000, 9400
# a bound on waiting for a container that never becomes ready (it is checked for having exited each second)
READY_BOUND_S = 1200


def podman(*args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout, check=check)


def build(log: Path) -> float:
    """`deploy/image/podman.sh build` (its output into `log`); returns its seconds."""
    start = time.monotonic()
    with log.open("w") as out:
        cmd = ["sh", str(PODMAN_SH), "build"]
        done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=5400)
    if done.returncode != 0:
        raise AssertionError(f"the image build failed; the end of {log}:\n{log.read_text()[-6000:]}")
    return time.monotonic() - start


def image_bytes(image: str = IMAGE) -> int:
    return int(podman("image", "inspect", "--format", "{{.Size}}", image).stdout)


@dataclass
class Container:
    name: str
    token: str
    grpc_address: str
    http_url: str
    metrics_url: str
    ready_s: float  # from `podman run` to health SERVING

    def logs(self) -> str:
        return _logs(self.name)

    def client(self) -> Client:
        return Client(self.grpc_address, self.token, timeout=120)

    def stop(self) -> int:
        """SIGTERM (`podman stop`, 30 s before SIGKILL); the server's exit status."""
        podman("stop", "--time", "30", self.name, timeout=120)
        return int(podman("inspect", "--format", "{{.State.ExitCode}}", self.name).stdout)


def _published(name: str, port: int) -> str:
    """`host:port` where the container's `port` is published (podman picked a free one)."""
    return podman("port", name, f"{port}/tcp").stdout.split()[0].replace("0.0.0.0", "127.0.0.1")


def _logs(name: str) -> str:
    done = podman("logs", name, check=False)
    return done.stdout + done.stderr


def _running(name: str) -> bool:
    return podman("inspect", "--format", "{{.State.Running}}", name, check=False).stdout.strip() == "true"


@contextlib.contextmanager
def running(tokens_dir: Path, *serve_args: str, image: str = IMAGE, env: dict[str, str] | None = None):
    """The image serving on 0.0.0.0 inside (a tokens file is mounted), its three ports published on free
    loopback ports; stopped (SIGTERM, then removed) on exit."""
    token = f"tok-{uuid.uuid4().hex}"
    (tokens_dir / "tokens").write_text(f"acme {token}\n")
    tokens_dir.chmod(0o755)  # the server runs as uid 10001 in there
    (tokens_dir / "tokens").chmod(0o644)
    name = f"hotlora-test-{uuid.uuid4().hex[:12]}"
    env_args = [a for k, v in (env or {}).items() for a in ("--env", f"{k}={v}")]
    start = time.monotonic()
    subprocess.run(
        ["sh", str(PODMAN_SH), "run", "--detach", "--name", name,
         "-p", f"127.0.0.1::{GRPC}", "-p", f"127.0.0.1::{HTTP}", "-p", f"127.0.0.1::{METRICS}",
         "-v", f"{tokens_dir}:/etc/hotlora:ro", *env_args, image,
         "--host", "0.0.0.0", "--tokens-file", "/etc/hotlora/tokens", *serve_args],
        check=True, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    try:
        address = _published(name, GRPC)
        with Client(address, token) as client:
            while True:
                try:
                    if client.health(timeout=5) == "SERVING":
                        break
                except grpc.RpcError:
                    pass  # not listening yet
                if not _running(name):
                    raise AssertionError(f"the container exited before serving:\n{_logs(name)}")
                if time.monotonic() - start > READY_BOUND_S:
                    raise AssertionError(f"not SERVING after {READY_BOUND_S} s:\n{_logs(name)}")
                time.sleep(1)
        ready = time.monotonic() - start
        http, metrics = (f"http://{_published(name, port)}" for port in (HTTP, METRICS))
        yield Container(name, token, address, http, metrics, ready)
    finally:
        podman("stop", "--time", "30", name, check=False, timeout=120)
        podman("rm", "--force", name, check=False)
