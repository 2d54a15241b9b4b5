"""Shared fixtures: tiny random Llama models built from a config in code (milliseconds)."""

import logging
import os

# Triton kernels run under the interpreter on a machine without a GPU. The variable must be set before
# the first @triton.jit function is defined, and other test modules (peft, transformers) may import
# triton early, so it is set here, before any of them is collected.
if not os.path.exists("/dev/nvidia0") and not os.environ.get("CUDA_VISIBLE_DEVICES"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from tests.tiny import build_tiny_llama, save_tiny_model_dir, tiny_tokenizer


@pytest.fixture(autouse=True)
def _root_logging_restored():
    """A test that runs `serve` in-process installs a handler on the captured stderr of that test; left
    there, every later log line fails ("--- Logging error ---") into another test's stderr."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need a CUDA device: skipped, with the reason, everywhere else (CI is CPU only)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run `make test-gpu` on a GPU host)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # not `"gpu" in keywords`: a folder's name is one
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_llama():
    return build_tiny_llama()


@pytest.fixture(scope="session")
def tiny_tok():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"))


# ---- a fleet's shared stores: one PostgreSQL and one S3 server per session (started on first use) ----
@pytest.fixture(scope="session")
def postgres(tmp_path_factory):
    from tests.fleet_stores import postgres_server

    with postgres_server(tmp_path_factory.mktemp("postgres")) as server:
        yield server


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    from tests.fleet_stores import S3_ENV, s3_server

    saved = {k: os.environ.get(k) for k in S3_ENV}
    os.environ.update(S3_ENV)  # boto3 in this process and in replica subprocesses reads these
    with s3_server(tmp_path_factory.mktemp("s3")) as server:
        yield server
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def shared_stores(postgres, s3):
    from tests.fleet_stores import SharedStores

    return SharedStores(postgres.new_database(), f"s3://{s3.new_bucket()}/adapters", s3.endpoint)
