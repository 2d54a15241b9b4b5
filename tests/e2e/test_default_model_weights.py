"""The default model's weights as the runner keeps them: SmolLM2-135M-Instruct is dequantized from a GGUF
Q4_1 file, so every matrix holds exactly Q4_1 (projections) or Q8_0 (embedding, tied LM head) block values,
and `--weight-dtype auto` keeps them as those blocks (kernels/block_weights.py). Greedy decoding through the
engine must still equal transformers' `generate` on the dequantized fp32 checkpoint, token for token."""

from __future__ import annotations

import pytest
import torch

from hotlora.kernels import block_weights
from tests.server.test_engine import hf_greedy
from tests.server.test_runner_families import _greedy_through_engine

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "1, 2, 3, 4,",
    "Write a haiku about the sea.",
    "Explain why the sky is blue in one sentence.",
]
NEW = 40


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.skipif(block_weights.unavailable_reason() is not None, reason="no block-weight kernel here")
def test_the_default_model_is_kept_in_blocks_and_decodes_as_generate():
    from transformers import AutoModelForCausalLM

    from hotlora.server.config import default_cache_dir
    from hotlora.server.model_loading import load_model, prepare_default_model

    path = prepare_default_model(default_cache_dir())
    loaded = load_model("", str(default_cache_dir()), "cpu", "float32")
    weights = loaded.model.w
    assert weights.packed_matrices == (121, 121)  # 30 layers x 4 fused projections, the tied embedding
    assert weights.nbytes < 120 << 20  # 106 MiB, against 513 MiB in fp32
    tok = loaded.tokenizer
    got = _greedy_through_engine(loaded.model, tok, PROMPTS, NEW)  # batched, EOS ignored
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    stopped = 0
    for prompt, out in zip(PROMPTS, got, strict=True):
        want = hf_greedy(hf, tok, prompt, NEW)  # stops at EOS: equal up to there
        assert out[: len(want)] == want, prompt
        stopped += len(want) < NEW
    assert stopped < len(PROMPTS)  # some prompts ran the whole length
