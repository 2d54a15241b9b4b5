"""Adapters on the real embedded default model (SmolLM2-135M-Instruct): a PEFT adapter made for its
architecture changes what it says, serves exactly what PEFT computes, and `@1` rolls back to the first
version after a second upload."""

from __future__ import annotations

import pytest
import torch

from hotlora.v1 import common_pb2, inference_pb2
from tests.server.adapter_utils import upload_chunks
from tests.server.harness import running_server

PROMPT = "The capital of France is"
NEW = 12


@pytest.fixture(scope="module")
def model_dir():
    from hotlora.server.config import default_cache_dir
    from hotlora.server.model_loading import prepare_default_model

    return prepare_default_model(default_cache_dir())


def _make_adapter(model_dir, out, seed: int):
    """A PEFT LoRA for the real model, with random non-zero B so it changes the output."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    torch.manual_seed(seed)  # peft draws lora_A from the global generator
    model = get_peft_model(
        base,
        LoraConfig(
            task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]
        ),
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    model.save_pretrained(out)
    return model, out


def _gen(run, adapter=""):
    return list(run.inference.Generate(inference_pb2.GenerateRequest(
        prompt=PROMPT, adapter=adapter, params=common_pb2.SamplingParams(max_new_tokens=NEW)),
        timeout=120).token_ids)  # fmt: skip


def _embed(run, adapter):
    r = run.inference.Embed(inference_pb2.EmbedRequest(texts=[PROMPT], adapter=adapter), timeout=120)
    return list(r.embeddings[0].values)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_uploaded_adapter_changes_the_default_model_and_rollback_serves_v1(model_dir, tmp_path):
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(model_dir)(PROMPT)["input_ids"]
    peft1, dir1 = _make_adapter(model_dir, tmp_path / "v1", seed=1)
    with torch.no_grad():
        want1 = peft1.generate(input_ids=torch.tensor([ids]), max_new_tokens=NEW, do_sample=False)[
            0, len(ids) :
        ]
    del peft1
    _, dir2 = _make_adapter(model_dir, tmp_path / "v2", seed=2)

    with running_server("", tmp_path / "data", adapter_slots=4, max_rank=16) as run:
        base = _gen(run)
        a1 = run.adapters.UploadAdapter(upload_chunks("france", dir1), timeout=120)
        assert a1.version == 1 and a1.rank == 8
        v1 = _gen(run, "france")
        assert v1 != base, "the adapter did not change the model's output"
        assert v1 == want1.tolist()[: len(v1)], "hotlora and PEFT disagree on the real model"

        a2 = run.adapters.UploadAdapter(upload_chunks("france", dir2), timeout=120)
        assert a2.version == 2
        v2 = _gen(run, "france")
        # strong random adapters may both push greedy decoding into the same degenerate text, so
        # "v2 is really a different adapter" is checked on the hidden states, not the tokens
        assert _embed(run, "france") != _embed(run, "france@1")
        assert _gen(run, "france@1") == v1  # rollback: the old version's exact output
        assert _gen(run, "france@2") == v2
        assert _gen(run) == base  # the base model is untouched by either
