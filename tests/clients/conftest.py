"""Fixtures for the client tests: a real gRPC server on 127.0.0.1 running fake servicers."""

import os

import pytest

from tests.clients.fakes import start_fake_server

#: Bytes of a fake adapter_model.safetensors: not a multiple of the chunk sizes used in the tests.
MODEL_BYTES = os.urandom(2500)
CONFIG_BYTES = b'{"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}'


@pytest.fixture
def fake():
    server = start_fake_server()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def peft_dir(tmp_path):
    d = tmp_path / "adapter"
    d.mkdir()
    (d / "adapter_config.json").write_bytes(CONFIG_BYTES)
    (d / "adapter_model.safetensors").write_bytes(MODEL_BYTES)
    return d


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith("HOTLORA_"):
            monkeypatch.delenv(name)
