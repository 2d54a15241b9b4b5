"""`--quantize`: a safetensors checkpoint's matrices quantized at load into GGUF blocks -- the projections
in the chosen type, the embedding and LM head in Q6_K (Q8_0 under q8_0) -- bit for bit the `gguf`
package's blocks (Q8_0, Q4_0, Q4_1) or llama.cpp's reference quantizer's (Q4_K, Q6_K); served with
transformers' greedy tokens on the dequantized weights; cached, so a restart does not quantize again and a
changed checkpoint does."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import quants

from hotlora.kernels import block_weights, gguf_blocks
from hotlora.kernels.gguf_blocks import Format
from hotlora.server.config import ServerConfig
from hotlora.server.engine.runner import quantize
from hotlora.server.model_loading import load_model
from tests.server.test_engine import hf_greedy
from tests.server.test_runner_families import _greedy_through_engine
from tests.tiny import build_tiny_llama, tiny_tokenizer

pytestmark = pytest.mark.skipif(
    block_weights.unavailable_reason() is not None, reason=f"{block_weights.unavailable_reason()}"
)

SIZES = dict(hidden_size=256, intermediate_size=512, head_dim=64)
PROMPTS = ["The quick brown fox jumps over", "Once upon a time"]
NEW = 16


def _checkpoint(tmp_path, seed=0, **sizes):
    model = build_tiny_llama(seed, **{**SIZES, **sizes})
    path = tmp_path / f"ckpt-{seed}"
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return model, path


def _dequantized(model, kind: str):
    """`model` with each matrix --quantize `kind` quantizes replaced by what its blocks hold."""
    from hotlora.server.engine.runner.spec import ModelSpec

    plan = quantize.plan(ModelSpec.from_config(model.config), kind, not model.config.tie_word_embeddings)
    state = model.state_dict()
    with torch.no_grad():
        for name, fmt in plan.items():
            fmt = fmt if state[name].shape[1] % fmt.block == 0 else Format.Q8_0
            state[name].copy_(gguf_blocks.dequantize(gguf_blocks.quantize(state[name], fmt)))
    model.generation_config.eos_token_id = None  # the engine's requests ignore EOS; generate must too
    return model


@pytest.mark.parametrize("kind", list(quantize.CHOICES))
def test_quantize_serves_greedy_tokens_of_the_dequantized_weights(tmp_path, kind):
    model, path = _checkpoint(tmp_path)
    original = {n: t.clone() for n, t in model.state_dict().items()}
    loaded = load_model(str(path), str(tmp_path / "cache"), device="cpu", dtype="auto", quantize=kind)
    w = loaded.model.w
    fmt, outer = quantize.CHOICES[kind], Format.Q8_0 if kind == "q8_0" else Format.Q6_K
    assert loaded.model.dtype == torch.float32
    assert w.layers[0].qkv.fmt == w.layers[1].down.fmt == fmt and w.embed.fmt == w.lm_head.fmt == outer
    # the blocks are the reference quantizer's: layer 0's q_proj, the first rows of its fused qkv
    q = original["model.layers.0.self_attn.q_proj.weight"]
    if kind in ("q8_0", "q4_0", "q4_1"):
        blocks = torch.from_numpy(quants.quantize(q.numpy(), fmt.ggml_type))  # the gguf package's own
    else:
        blocks = gguf_blocks.quantize_gguf(q, fmt)  # llama.cpp's (tests/kernels/test_gguf_blocks.py)
    want = gguf_blocks.from_gguf(blocks, fmt.ggml_type, tuple(q.shape)).data
    assert torch.equal(w.layers[0].qkv.data[: q.shape[0]], want)
    reference = _dequantized(model, kind)
    tok = loaded.tokenizer
    assert _greedy_through_engine(loaded.model, tok, PROMPTS, NEW) == [
        hf_greedy(reference, tok, p, NEW) for p in PROMPTS
    ]


def test_a_restart_reads_the_cached_blocks_and_a_changed_checkpoint_is_quantized_again(tmp_path, monkeypatch):
    model, path = _checkpoint(tmp_path)
    cache = tmp_path / "cache"
    first = load_model(str(path), str(cache), device="cpu", quantize="q4_k")
    made = list((cache / "models").glob("ckpt-0-*-q4_k"))
    assert len(made) == 1 and (made[0] / "blocks.safetensors").is_file()
    calls = []
    real = gguf_blocks.quantize_gguf
    monkeypatch.setattr(gguf_blocks, "quantize_gguf", lambda *a: calls.append(a) or real(*a))
    again = load_model(str(path), str(cache), device="cpu", quantize="q4_k")
    assert not calls  # read back, not quantized again
    assert torch.equal(again.model.w.layers[0].gate_up.data, first.model.w.layers[0].gate_up.data)
    other = build_tiny_llama(1, **SIZES)  # new weights saved over the checkpoint
    other.save_pretrained(path)
    changed = load_model(str(path), str(cache), device="cpu", quantize="q4_k")
    assert calls and len(list((cache / "models").glob("ckpt-0-*-q4_k"))) == 2
    assert not torch.equal(changed.model.w.layers[0].gate_up.data, first.model.w.layers[0].gate_up.data)


def test_rows_that_k_blocks_do_not_divide_go_into_q8_0(tmp_path):
    # hidden 64, the tiny model's: no row of a 256-weight super-block
    model, path = _checkpoint(tmp_path, hidden_size=64, intermediate_size=96, head_dim=16)
    loaded = load_model(str(path), str(tmp_path / "cache"), device="cpu", quantize="q4_k")
    assert set(loaded.model.w.block_formats) == {"Q8_0"}
    tok = loaded.tokenizer
    reference = _dequantized(model, "q4_k")
    assert _greedy_through_engine(loaded.model, tok, PROMPTS[:1], 8) == [
        hf_greedy(reference, tok, PROMPTS[0], 8)
    ]


def test_quantize_is_refused_with_what_cannot_serve_its_blocks(tmp_path):
    _, path = _checkpoint(tmp_path)
    for extra, words in (
        (dict(dtype="bfloat16"), "cannot go with --dtype bfloat16"),
        (dict(runner="transformers"), "cannot go with --runner transformers"),
        (dict(weight_dtype="float32"), "cannot go with --weight-dtype float32"),
    ):
        with pytest.raises(ValueError, match=words):
            ServerConfig(model=str(path), quantize="q4_0", **extra)
    with pytest.raises(ValueError, match="q3_k"):
        ServerConfig(model=str(path), quantize="q3_k")
    assert np.isclose(ServerConfig(model=str(path), quantize="q4_k").kv_cache_bytes, 2 << 30)
