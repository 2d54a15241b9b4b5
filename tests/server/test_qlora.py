"""QLoRA-style fine-tuning: on-line LORA and LORA_PROGRESSIVE jobs train on a quantized base (--quantize
q4_0), the forward and the input gradient through the block kernels -- no matrix is ever widened whole --
and the adapter they make, served on that base, gives PEFT's greedy tokens on the dequantized weights."""

from __future__ import annotations

import random

import pytest
import torch

from hotlora.kernels import block_weights, gguf_blocks
from hotlora.kernels.gguf_blocks import Format
from hotlora.v1 import common_pb2, inference_pb2, training_pb2
from tests.server.adapter_utils import peft_greedy
from tests.server.harness import running_server
from tests.server.test_training import _export
from tests.server.training_utils import watch
from tests.tiny import build_tiny_llama, tiny_tokenizer

pytestmark = pytest.mark.skipif(
    block_weights.unavailable_reason() is not None, reason=f"{block_weights.unavailable_reason()}"
)


def _dequantized_q4_0_base():
    """The tiny Llama as --quantize q4_0 holds it: projections in Q4_0; the embedding and LM head, whose
    64-weight rows no Q6_K super-block divides, in Q8_0."""
    model = build_tiny_llama()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                fmt = Format.Q4_0 if ".layers." in name else Format.Q8_0
                p.copy_(gguf_blocks.dequantize(gguf_blocks.quantize(p, fmt)))
    return model


METHODS = [training_pb2.METHOD_LORA, training_pb2.METHOD_LORA_PROGRESSIVE]


@pytest.mark.parametrize("method", METHODS, ids=["LORA", "LORA_PROGRESSIVE"])
def test_a_lora_trained_on_a_q4_base_serves_peft_tokens_on_its_dequantized_weights(
    method, tiny_model_dir, tmp_path, monkeypatch
):
    whole, backward = [], []
    real_widen, real_backward = block_weights.widen, block_weights._BlockProduct.backward

    def widen(m, rows=None, out=None):
        if rows is None:
            whole.append(m.shape)  # a whole matrix widened: what QLoRA must not need
        return real_widen(m, rows, out)

    def counted_backward(ctx, gy):
        backward.append(gy.shape)
        return real_backward(ctx, gy)

    monkeypatch.setattr(block_weights, "widen", widen)
    monkeypatch.setattr(block_weights._BlockProduct, "backward", staticmethod(counted_backward))
    rng = random.Random(5)
    prompts = [f"planet {''.join(rng.choice('abcdefgh') for _ in range(4))}?" for _ in range(40)]
    name = f"q4-{training_pb2.FineTuneMethod.Name(method).lower().replace('_', '-')}"
    with running_server(
        tiny_model_dir, tmp_path / "data", quantize="q4_0", cache_dir=str(tmp_path / "c")
    ) as run:
        assert run.state.loaded.model.w.layers[0].qkv.fmt == Format.Q4_0
        req = training_pb2.FineTuneRequest(
            adapter=name,
            task=common_pb2.TASK_CAUSAL_LM,
            method=method,
            examples=[training_pb2.Example(prompt=p, completion=" zorb") for p in prompts[:16]],
            # held out as given: one training run, no folds
            validation=[training_pb2.Example(prompt=p, completion=" zorb") for p in prompts[16:20]],
            hyperparameters=training_pb2.HyperParameters(learning_rate=2e-2, epochs=8, rank=8),
        )
        _, job = watch(run.training, run.training.CreateFineTune(req, timeout=30).id, timeout=3600)
        assert job.state == training_pb2.JOB_STATE_SUCCEEDED, job.error
        assert job.method == method and job.metrics.validation_metric > job.metrics.baseline_metric
        params = common_pb2.SamplingParams(max_new_tokens=8)
        served = {
            p: run.inference.Generate(inference_pb2.GenerateRequest(adapter=name, prompt=p, params=params))
            for p in prompts[32:35]
        }
        out = _export(run, name, tmp_path / name)
    assert backward, "no input gradient went through the block kernels"
    assert not whole, f"matrices widened whole while training: {whole}"
    tok = tiny_tokenizer()
    for p, r in served.items():
        want = peft_greedy(out, tok(p)["input_ids"], 8, base=_dequantized_q4_0_base)
        assert list(r.token_ids) == want[: len(r.token_ids)]
