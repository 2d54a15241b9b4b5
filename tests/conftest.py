"""Shared fixtures: tiny random Llama models built from a config in code (milliseconds)."""

import os

# Triton kernels run under the interpreter on a machine without a GPU. The variable must be set before
# the first @triton.jit function is defined, and other test modules (peft, transformers) may import
# triton early, so it is set here, before any of them is collected.
if not os.path.exists("/dev/nvidia0") and not os.environ.get("CUDA_VISIBLE_DEVICES"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from tests.tiny import build_tiny_llama, save_tiny_model_dir, tiny_tokenizer


@pytest.fixture(scope="session")
def tiny_llama():
    return build_tiny_llama()


@pytest.fixture(scope="session")
def tiny_tok():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"))
