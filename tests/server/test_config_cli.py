"""`hotlora serve` configuration: bad settings fail at start with a clear message, every flag
has its HOTLORA_<FLAG> variable, and the command runs as a user would start it."""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from hotlora.server.config import ServerConfig, add_config_arguments, config_from_args

HOTLORA = str(Path(sys.executable).with_name("hotlora"))


def parse(argv: list[str]) -> ServerConfig:
    p = argparse.ArgumentParser()
    add_config_arguments(p)
    return config_from_args(p.parse_args(argv))


# a bound for a process that never exits, not a budget: on a loaded machine the imports alone took 43 s
def hotlora(*argv: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [HOTLORA, *argv], capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )


@pytest.fixture(autouse=True)
def _no_hotlora_env(monkeypatch):
    for k in list(os.environ):
        if k.startswith("HOTLORA_"):
            monkeypatch.delenv(k)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--max-batch-size", "0"], "--max-batch-size must be at least 1 (got 0)"),
        (["--host", "0.0.0.0"], "give a tokens file to bind '0.0.0.0'"),
        (["--metrics-host", "0.0.0.0"], "give a tokens file to bind '0.0.0.0' (--metrics-host)"),
        (["--request-idle-seconds", "0"], "--request-idle-seconds must be more than 0"),
        (["--max-rpcs-per-tenant", "-1"], "--max-rpcs-per-tenant must be 0 (automatic) or more"),
        (
            ["--max-prompt-tokens", "100", "--max-request-tokens", "99"],
            "--max-request-tokens cannot be below",
        ),
        (
            ["--max-upload-bytes", "100", "--upload-buffer-bytes", "99"],
            "--upload-buffer-bytes cannot be below --max-upload-bytes",
        ),
        (["--port", "70000"], "--port must be 0..65535"),
        (["--port", "abc"], "--port expects int, got 'abc'"),
        (["--train-share", "0"], "--train-share must be in (0, 1]"),
        (["--dtype", "float8"], "--dtype must be auto, float32, float16 or bfloat16"),
        (["--weight-dtype", "int4"], "--weight-dtype must be auto, float32 or bfloat16"),
        (["--weight-dtype", "bfloat16", "--dtype", "bfloat16"], "--weight-dtype bfloat16 widens to fp32"),
        (["--weight-dtype", "bfloat16", "--runner", "transformers"], "needs hotlora's runner"),
        (["--adapter-dtype", "float16"], "--adapter-dtype must be auto, float32 or bfloat16"),
        (
            ["--adapter-dtype", "bfloat16", "--runner", "transformers"],
            "--adapter-dtype needs hotlora's runner",
        ),
        (["--adapter-dtype", "float32", "--dtype", "bfloat16"], "--adapter-dtype float32 needs fp32 compute"),
        (
            ["--adapter-dtype", "bfloat16", "--dtype", "float16"],
            "--adapter-dtype bfloat16 needs fp32 or bf16",
        ),
        (["--tls-cert", "/nonexistent.pem"], "--tls-cert and --tls-key go together"),
        (["--model", "/no/such/dir"], "--model must be a local model directory"),
        (
            ["--default-max-new-tokens", "100", "--max-new-tokens", "10"],
            "--default-max-new-tokens cannot exceed --max-new-tokens",
        ),
    ],
)
def test_bad_settings_are_refused_with_a_clear_message(argv, message):
    with pytest.raises(ValueError) as err:
        parse(argv)
    assert message in str(err.value)


def test_all_problems_are_reported_at_once():
    with pytest.raises(ValueError) as err:
        parse(["--max-batch-size", "0", "--max-queue", "0"])
    assert "--max-batch-size" in str(err.value) and "--max-queue" in str(err.value)


def test_environment_variables_and_flag_precedence(monkeypatch):
    monkeypatch.setenv("HOTLORA_PORT", "50123")
    monkeypatch.setenv("HOTLORA_MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("HOTLORA_REFLECTION", "false")
    cfg = parse([])
    assert (cfg.port, cfg.max_batch_size, cfg.reflection) == (50123, 7, False)
    assert parse(["--port", "50124"]).port == 50124  # the flag wins over the variable
    monkeypatch.setenv("HOTLORA_MAX_BATCH_SIZE", "0")
    with pytest.raises(ValueError, match="--max-batch-size must be at least 1"):
        parse([])


def test_serve_fails_fast_on_a_bad_flag():
    out = hotlora("serve", "--max-batch-size", "0")
    assert out.returncode == 2
    assert "--max-batch-size must be at least 1 (got 0)" in out.stderr
    assert "Traceback" not in out.stderr


def test_serve_refuses_a_public_host_without_tokens():
    out = hotlora("serve", "--host", "0.0.0.0")
    assert out.returncode == 2
    assert "--tokens-file" in out.stderr and "0.0.0.0" in out.stderr


def test_serve_refuses_a_token_listed_for_two_tenants(tmp_path, tiny_model_dir):
    """Issue 12, finding 11: the token would silently belong to one of them."""
    tokens = tmp_path / "tokens"
    tokens.write_text("acme shared-token\nglobex other-token\nglobex shared-token\n")
    out = hotlora(
        "serve", "--tokens-file", str(tokens), "--model", str(tiny_model_dir), "--port", "0",
        "--metrics-port", "-1", "--data-dir", str(tmp_path / "data"),
    )  # fmt: skip
    assert out.returncode == 2
    assert (
        f"{tokens}:3: this token (or its sha256) is already listed on line 1 for tenant 'acme'" in out.stderr
    )
    assert "Traceback" not in out.stderr


def test_serve_help_lists_the_flags():
    out = hotlora("serve", "--help")
    assert out.returncode == 0
    for flag in (
        "--model",
        "--host",
        "--port",
        "--metrics-port",
        "--data-dir",
        "--tokens-file",
        "--max-batch-size",
        "--max-new-tokens",
        "--grace-seconds",
        "--tls-cert",
        "--log-format",
        "--http-port",
        "--allowed-local-adapter-dirs",
        "--vllm-compatible-metrics",
    ):
        assert flag in out.stdout, flag
    assert "HOTLORA_PORT" in out.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_honours_hotlora_port_logs_each_start_up_phase_and_stops_on_sigterm(tiny_model_dir, tmp_path):
    port = _free_port()
    env = {**os.environ, "HOTLORA_PORT": str(port), "HOTLORA_METRICS_PORT": "0", "HOTLORA_HTTP_PORT": "0"}
    proc = subprocess.Popen(
        [HOTLORA, "serve", "--model", str(tiny_model_dir), "--data-dir", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "hotlora: ready" in line:
                break
        assert any(re.search(rf"gRPC on 127\.0\.0\.1:{port}\b", x) for x in lines), lines
        # every phase of the start, in order, each with its time: a slow start shows where its time went
        phases = [m.group(1) for x in lines if (m := re.search(r"start-up: (.+?) in \d+\.\d\d s", x))]
        assert phases == [
            "imports (torch, transformers, grpc)", "ports", "model load", "adapter banks", "engine",
            "doors and fine-tuning",
        ], lines  # fmt: skip
        ports_line = next(x for x in lines if "start-up: ports in" in x)
        assert f"gRPC on 127.0.0.1:{port}, metrics on 127.0.0.1:" in ports_line and "HTTP on" in ports_line
        assert any(re.search(r"ready: model \S+ on cpu/\S+ in \d+\.\d\d s", x) for x in lines), lines
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=300) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
