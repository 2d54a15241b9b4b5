"""Adapters made by the peft library itself, as a user would make them, read back as uploaded bytes."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model

from hotlora.adapters.base_model_info import BaseModelInfo
from tests.tiny import build_tiny_llama, tiny_llama_config

NUM_LABELS = 3


def build_tiny_classifier(seed: int = 0, num_labels: int = NUM_LABELS):
    """LlamaForSequenceClassification whose decoder equals `build_tiny_llama(seed)`'s."""
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(tiny_llama_config(num_labels=num_labels)).eval()
    model.model.load_state_dict(build_tiny_llama(seed).model.state_dict())
    return model


def randomise_lora(peft_model, seed: int) -> None:
    """PEFT inits lora_B to zero (a no-op adapter); make every A, B and the head non-zero."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)


def make_peft_model(config: LoraConfig, seed: int = 0):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if config.task_type == "SEQ_CLS":
            model = get_peft_model(build_tiny_classifier(0), config)
        else:
            model = get_peft_model(build_tiny_llama(0), config)
    randomise_lora(model, seed)
    return model.eval()


def read_dir(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in Path(path).iterdir() if p.is_file()}


@pytest.fixture(scope="session")
def base_info() -> BaseModelInfo:
    return BaseModelInfo.from_model(build_tiny_llama(0))


@pytest.fixture
def peft_adapter(tmp_path) -> Callable[..., tuple[dict[str, bytes], object]]:
    """`peft_adapter(LoraConfig(...), seed)` -> (files as uploaded, the PEFT model that wrote them)."""
    counter = iter(range(1000))

    def make(config: LoraConfig, seed: int = 0):
        model = make_peft_model(config, seed)
        out = tmp_path / f"adapter{next(counter)}"
        model.save_pretrained(out)
        return read_dir(out), model

    return make


@pytest.fixture(scope="session")
def causal_files(tmp_path_factory) -> dict[str, bytes]:
    """One valid rank-4 CAUSAL_LM adapter on q_proj/v_proj, for tests that break it."""
    model = make_peft_model(
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    )
    out = tmp_path_factory.mktemp("causal")
    model.save_pretrained(out)
    return read_dir(out)
