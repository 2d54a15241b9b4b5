"""The embedded default model, served exactly as a user starts it: `hotlora serve` in a
subprocess, spoken to with the client library, stopped with SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from hotlora.clients import Client

HOTLORA = str(Path(sys.executable).with_name("hotlora"))
READY_TIMEOUT = 180.0  # first use dequantizes the GGUF (~25 s); later starts take a second or two
STOP_TIMEOUT = 30.0


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("data")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOTLORA_")}
    proc = subprocess.Popen(
        [HOTLORA, "serve", "--port", "0", "--metrics-port", "0", "--http-port", "-1",
         "--data-dir", str(data_dir)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    lines: list[str] = []
    port_seen = threading.Event()

    def read():  # keep draining the pipe so the server never blocks on a full one
        for line in proc.stdout:
            lines.append(line)
            if "gRPC on" in line:
                port_seen.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert port_seen.wait(60), "no 'gRPC on' line:\n" + "".join(lines)
        m = re.search(r"gRPC on 127\.0\.0\.1:(\d+)", "".join(lines))
        assert m, "".join(lines)
        yield proc, f"127.0.0.1:{m.group(1)}", lines
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_default_model_answers_and_stops_cleanly(server):
    proc, address, lines = server
    with Client(address, timeout=60) as client:
        deadline = time.monotonic() + READY_TIMEOUT
        status = None
        while time.monotonic() < deadline:
            assert proc.poll() is None, "server exited during start-up:\n" + "".join(lines)
            try:
                status = client.health(timeout=2)
            except grpc.RpcError:
                status = None
            if status == "SERVING":
                break
            time.sleep(0.25)
        assert status == "SERVING", f"not SERVING after {READY_TIMEOUT} s:\n" + "".join(lines)

        resp = client.generate(
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_new_tokens=32,
            temperature=0.0,
        )
        assert "Paris" in resp.text, resp.text
        assert resp.finish_reason in ("eos", "length")
        assert resp.usage.completion_tokens == len(resp.token_ids) > 0

        chunks = list(
            client.generate_stream(
                messages=[{"role": "user", "content": "What is the capital of France?"}], max_new_tokens=32
            )
        )
        assert "".join(c.text for c in chunks) == resp.text

    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=STOP_TIMEOUT)
    assert code == 0, "".join(lines)
    assert time.monotonic() - t0 < STOP_TIMEOUT
