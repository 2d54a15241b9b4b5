"""Shared fixtures: tiny random Llama models built from a config in code (milliseconds)."""

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
