"""A port in use: `hotlora serve` exits 2 with one line naming the address, the flag and what to do
(`--port 0` takes a free port), for each of its three ports, instead of gRPC's traceback ("Failed to
bind") or a bare `[Errno 98] Address already in use`."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from hotlora.server.config import ServerConfig
from hotlora.server.port_binding import PortUnavailable, why_unbindable

HOTLORA = str(Path(sys.executable).with_name("hotlora"))


@contextlib.contextmanager
def held_port():
    """A port another process would hold: bound and listening on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


PORTS = {
    "grpc": ("--port", "gRPC"),
    "metrics": ("--metrics-port", "Prometheus metrics"),
    "http": ("--http-port", "HTTP door"),
}


@pytest.mark.timeout(180)
@pytest.mark.parametrize("which", PORTS)
def test_serve_names_the_port_in_use_its_flag_and_port_0(which, tiny_model_dir, tmp_path):
    flag, what = PORTS[which]
    ports = {"--port": "0", "--metrics-port": "0", "--http-port": "0"}
    with held_port() as port:
        ports[flag] = str(port)
        out = subprocess.run(
            [HOTLORA, "serve", "--model", str(tiny_model_dir), "--data-dir", str(tmp_path),
             *[a for kv in ports.items() for a in kv]],
            capture_output=True, text=True, timeout=170,
            env={k: v for k, v in os.environ.items() if not k.startswith("HOTLORA_")},
        )  # fmt: skip
    assert out.returncode == 2, out.stderr[-3000:]
    (line,) = [x for x in out.stderr.splitlines() if x.startswith("error:")]
    assert f"cannot listen on 127.0.0.1:{port} for" in line and what in line, line
    assert f"({flag} {port}): the port is in use" in line, line
    assert f"{flag} 0 to take a free port (chosen and logged at start)" in line, line
    assert ("-1 to serve none" in line) == (which != "grpc"), line
    assert "Traceback" not in out.stderr and "Failed to bind" not in out.stderr, out.stderr[-3000:]
    assert "start-up: model load" not in out.stderr  # it stopped before loading anything


def test_why_unbindable_says_why():
    with held_port() as port:
        assert why_unbindable("127.0.0.1", port) == "the port is in use (another process listens on it)"
    assert why_unbindable("127.0.0.1", 0) is None
    assert "does not resolve" in why_unbindable("no-such-host.invalid", 1234)


@pytest.mark.timeout(120)
def test_in_process_bind_releases_every_port_it_took(tiny_model_dir, tmp_path):
    """When a port fails, the ports bound before it are free again (a caller in the same process may
    retry): here the metrics port, bound before the gRPC port that is in use."""
    from hotlora.server.app import HotloraServer

    metrics_port, http_port = _free_port(), _free_port()
    with held_port() as port:
        cfg = ServerConfig(
            model=str(tiny_model_dir), data_dir=str(tmp_path), port=port, metrics_port=metrics_port,
            http_port=http_port,
        )  # fmt: skip
        server = HotloraServer(cfg)
        with pytest.raises(PortUnavailable) as err:
            server.bind()
    assert err.value.flag == "--port" and err.value.port == port
    assert why_unbindable("127.0.0.1", metrics_port) is None
    assert why_unbindable("127.0.0.1", http_port) is None
    assert (server.port, server.metrics_port, server.http) == (None, None, None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
