"""The runner against transformers, family by family: each model directory is loaded from its safetensors
the way `--model` loads it, and its greedy tokens through the engine must equal `generate` in fp32. In bf16
(the default where the CPU or GPU computes it fast) rounding may flip a near tie, so the check is a
documented tolerance instead: at every step of the bf16 engine's greedy output, the fp32 transformers model
given the same prefix picks the same token in at least 90% of the steps. A family the runner does not cover
is served through the transformers path, with a log line saying so, and stays exact."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from hotlora.kernels import bf16_weights, block_weights, native, prefill_attention
from hotlora.kernels.gguf_blocks import Format
from hotlora.server.engine.runner import runner_from_model
from hotlora.server.engine.scheduler import Engine
from hotlora.server.model_loading import load_model
from tests.kernels.test_block_weights import gguf_values
from tests.tiny import TINY_SIZES, tiny_tokenizer

from .test_engine import finish, gen_req, hf_greedy, ids_of

BF16_TOP1_AGREEMENT = 0.9
# longer than the sliding windows below, so the window is exercised in prefill and in decode
PROMPTS = ["The quick brown fox jumps over", "a", "Once upon a time in a land far away"]
NEW_TOKENS = 24

COMMON = TINY_SIZES


def _llama3_rope():
    from transformers import LlamaConfig

    rope = dict(
        rope_type="llama3",
        rope_theta=10000.0,
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=32,
    )
    return LlamaConfig(**COMMON, rope_parameters=rope, tie_word_embeddings=True, attention_bias=True)


def _mistral_sliding():
    from transformers import MistralConfig

    return MistralConfig(**COMMON, sliding_window=8, tie_word_embeddings=False)


def _qwen2_biases_and_window():
    from transformers import Qwen2Config

    # layer 0 full attention, layer 1 a sliding window of 8; q/k/v carry biases
    return Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=8, max_window_layers=1)


def _qwen3_not_covered():
    from transformers import Qwen3Config

    return Qwen3Config(**COMMON)


def _model_dir(tmp_path, config, gguf: bool = False):
    """A random model of `config` saved as a model directory; `gguf`: with the values a checkpoint
    dequantized from a GGUF file holds (Q4_1 projections, a Q8_0 embedding and LM head, as the default
    model's)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    if gguf:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.ndim == 2:
                    p.copy_(gguf_values(p, "Q8_0" if "embed" in name or "lm_head" in name else "Q4_1"))
    path = tmp_path / config.model_type
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return model, path


EACH_FAMILY = pytest.mark.parametrize(
    "make_config",
    [_llama3_rope, _mistral_sliding, _qwen2_biases_and_window],
    ids=["llama-llama3-rope-tied-bias", "mistral-sliding-window", "qwen2-biases-window-layers"],
)


def _greedy_through_engine(runner, tok, prompts, n=NEW_TOKENS) -> list[list[int]]:
    eng = Engine(runner, tok)
    eng.start()
    try:
        reqs = [gen_req(tok, p, n, ignore_eos=True) for p in prompts]
        for r in reqs:  # submitted together: batched decode with prefills of different lengths
            eng.submit(r)
        return [finish(r).output_ids for r in reqs]
    finally:
        eng.stop()


@EACH_FAMILY
def test_fp32_greedy_equals_generate_for_each_family(tmp_path, make_config):
    model, path = _model_dir(tmp_path, make_config())
    loaded = load_model(str(path), str(tmp_path / "cache"), device="cpu", dtype="float32")
    assert loaded.runner_kind == "runner"
    tok = loaded.tokenizer
    got = _greedy_through_engine(loaded.model, tok, PROMPTS)
    for prompt, out in zip(PROMPTS, got, strict=True):
        assert out == hf_greedy(model, tok, prompt, NEW_TOKENS), prompt


@pytest.mark.skipif(native.unavailable_reason() is not None, reason="no C kernels here")
@EACH_FAMILY
def test_fp32_greedy_equals_generate_with_heads_the_prefill_kernel_takes(tmp_path, make_config, monkeypatch):
    # head size 64, the default model's: every prompt's prefill runs through hotlora's C attention kernel
    config = make_config()
    config.head_dim = 64
    model, path = _model_dir(tmp_path, config)
    model.generation_config.eos_token_id = None  # the engine's requests ignore EOS; generate must too
    chunks = []
    kernel = native.ops().prefill_attention
    monkeypatch.setattr(
        native.ops(), "prefill_attention", lambda q, *a: chunks.append(len(q)) or kernel(q, *a)
    )
    loaded = load_model(str(path), str(tmp_path / "cache"), device="cpu", dtype="float32")
    tok = loaded.tokenizer
    got = _greedy_through_engine(loaded.model, tok, PROMPTS)
    for prompt, out in zip(PROMPTS, got, strict=True):
        assert out == hf_greedy(model, tok, prompt, NEW_TOKENS), prompt
    assert chunks  # the prompts' prefills, each layer


@pytest.mark.skipif(block_weights.unavailable_reason() is not None, reason="no block-weight kernel here")
@EACH_FAMILY
def test_gguf_dequantized_weights_are_kept_as_blocks_and_decode_as_generate(tmp_path, make_config):
    # the blocks are read back as the very fp32 values and multiplied in fp32: greedy tokens stay equal to
    # transformers' on the same checkpoint, as with the matrices kept in fp32 (--weight-dtype float32)
    model, path = _model_dir(tmp_path, make_config(), gguf=True)
    loaded = load_model(str(path), str(tmp_path / "cache"), device="cpu", dtype="float32")
    runner = loaded.model
    packed, matrices = runner.w.packed_matrices
    # every matrix (the embedding, four a layer, an LM head of its own); the norms and biases stay fp32
    assert packed == matrices == 1 + 4 * len(runner.w.layers) + (runner.w.lm_head is not runner.w.embed)
    assert runner.w.layers[0].qkv.fmt == Format.Q4_1 and runner.w.embed.fmt == Format.Q8_0
    assert runner.dtype == torch.float32 and runner.w.stored_dtype == torch.float32
    tok = loaded.tokenizer
    want = [hf_greedy(model, tok, p, NEW_TOKENS) for p in PROMPTS]
    assert _greedy_through_engine(runner, tok, PROMPTS) == want
    unpacked = load_model(str(path), str(tmp_path / "cache"), "cpu", "float32", weight_dtype="float32").model
    assert unpacked.w.packed_matrices[0] == 0
    assert _greedy_through_engine(unpacked, tok, PROMPTS) == want


def _round_matrices_to_bf16(model) -> None:
    """What `--weight-dtype bfloat16` stores: every weight matrix (projections, embedding, LM head) rounded
    to bf16; norms and biases stay fp32."""
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.copy_(p.to(torch.bfloat16).float())


@pytest.mark.skipif(bf16_weights.unavailable_reason() is not None, reason="no bf16-weight kernel here")
@EACH_FAMILY
def test_bf16_stored_weights_decode_as_generate_on_the_same_rounded_weights(tmp_path, make_config):
    # the kernel widens bf16 to fp32 exactly and accumulates in fp32, so the only change from the fp32
    # runner is the rounding of the stored weights: on those same weights, transformers decodes the same
    model, path = _model_dir(tmp_path, make_config())
    loaded = load_model(str(path), str(tmp_path / "cache"), "cpu", "float32", weight_dtype="bfloat16")
    runner = loaded.model
    assert runner.w.layers[0].qkv.dtype == torch.bfloat16 and runner.w.embed.dtype == torch.bfloat16
    assert runner.dtype == torch.float32 and runner.w.norm.dtype == torch.float32
    tok = loaded.tokenizer
    got = _greedy_through_engine(runner, tok, PROMPTS)
    plain = [hf_greedy(model, tok, p, NEW_TOKENS) for p in PROMPTS]
    _round_matrices_to_bf16(model)
    rounded = [hf_greedy(model, tok, p, NEW_TOKENS) for p in PROMPTS]
    assert got == rounded
    assert rounded != plain  # the rounding is visible, so the equality above says something about it


def test_bf16_stored_weights_need_the_runner(tmp_path):
    _, path = _model_dir(tmp_path, _qwen3_not_covered())
    with pytest.raises(ValueError, match="needs hotlora's runner"):
        load_model(str(path), str(tmp_path / "cache"), "cpu", "float32", weight_dtype="bfloat16")
    _, llama = _model_dir(tmp_path, _llama3_rope())
    with pytest.raises(ValueError, match="only bfloat16 weights with float32 compute on a CPU"):
        load_model(str(llama), str(tmp_path / "cache"), "cpu", "bfloat16", weight_dtype="float32")


def test_a_family_the_runner_does_not_cover_serves_through_transformers(tmp_path, caplog):
    model, path = _model_dir(tmp_path, _qwen3_not_covered())
    with caplog.at_level(logging.WARNING, logger="hotlora.model"):
        loaded = load_model(str(path), str(tmp_path / "cache"), device="cpu", dtype="float32")
    assert loaded.runner_kind == "transformers"
    assert "through the transformers path" in caplog.text and "qwen3" in caplog.text
    tok = loaded.tokenizer
    got = _greedy_through_engine(loaded.model, tok, PROMPTS)
    for prompt, out in zip(PROMPTS, got, strict=True):
        assert out == hf_greedy(model, tok, prompt, NEW_TOKENS), prompt


def _top1_agreement(reference, tok, prompt: str, output: list[int]) -> float:
    """Share of steps where the reference's top-1 given the same prefix is the token the runner chose."""
    ids = torch.tensor([ids_of(tok, prompt) + output])
    with torch.no_grad():
        logits = reference(ids).logits[0]
    start = len(ids_of(tok, prompt)) - 1
    picks = logits[start : start + len(output)].argmax(-1).tolist()
    return sum(a == b for a, b in zip(picks, output, strict=True)) / len(output)


def test_bf16_runner_agrees_with_the_fp32_reference_within_tolerance(tiny_llama, tiny_tok):
    runner = runner_from_model(tiny_llama, dtype=torch.bfloat16)
    got = _greedy_through_engine(runner, tiny_tok, PROMPTS)
    for prompt, out in zip(PROMPTS, got, strict=True):
        agreement = _top1_agreement(tiny_llama, tiny_tok, prompt, out)
        assert agreement >= BF16_TOP1_AGREEMENT, (prompt, agreement)


def test_the_bf16_tolerance_catches_a_broken_runner(tiny_llama, tiny_tok):
    # the check above is only worth something if a wrong model fails it: drop RoPE's rotation
    runner = runner_from_model(tiny_llama, dtype=torch.bfloat16)
    runner.rope_sin.zero_()
    runner.rope_cos.fill_(1.0)
    got = _greedy_through_engine(runner, tiny_tok, PROMPTS)
    worst = min(_top1_agreement(tiny_llama, tiny_tok, p, out) for p, out in zip(PROMPTS, got, strict=True))
    assert worst < BF16_TOP1_AGREEMENT


@pytest.mark.skipif(block_weights.unavailable_reason() is not None, reason="no block-weight kernel here")
def test_auto_dtype_keeps_a_gguf_checkpoint_in_fp32_blocks_on_a_bf16_cpu(tmp_path, monkeypatch):
    # on a CPU with avx512_bf16 `auto` computes in bf16, except for a checkpoint whose weights are exact
    # GGUF blocks: fp32 there reads fewer bytes (the blocks) and rounds nothing
    from hotlora.server import precision
    from hotlora.server.engine.runner import in_blocks
    from hotlora.server.engine.runner import model as model_module

    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: True)
    _, gguf = _model_dir(tmp_path / "gguf", _llama3_rope(), gguf=True)
    _, plain = _model_dir(tmp_path / "plain", _llama3_rope())
    assert in_blocks(gguf) and not in_blocks(plain)  # what auto reads of the checkpoint
    loaded = load_model(str(gguf), str(tmp_path / "cache"), device="cpu")
    assert loaded.dtype == torch.float32 and loaded.model.w.packed_matrices[0] > 0
    assert loaded.precision.long_products_bf16 and "exact GGUF blocks" in loaded.precision.why
    assert loaded.model.linear is model_module._by_storage_long_in_bf16  # long prefill products in bf16
    asked = load_model(str(gguf), str(tmp_path / "cache"), device="cpu", dtype="float32")
    assert asked.model.linear is model_module._by_storage  # --dtype float32: every product in fp32
    assert load_model(str(plain), str(tmp_path / "cache"), device="cpu").dtype == torch.bfloat16
    # fp32 matrices asked for (--weight-dtype float32): auto computes in fp32, the only dtype that reads them
    kept = load_model(str(plain), str(tmp_path / "cache"), device="cpu", weight_dtype="float32")
    assert kept.dtype == kept.model.w.stored_dtype == torch.float32
    # and so for a setting that reads fp32 only (--adapter-dtype float32)
    asked = load_model(str(plain), str(tmp_path / "cache"), device="cpu", adapter_dtype="float32")
    assert asked.dtype == torch.float32 and asked.precision.banks == torch.float32
    blocks = load_model(str(gguf), str(tmp_path / "cache"), device="cpu", adapter_dtype="float32")
    assert blocks.model.linear is model_module._by_storage_long_in_bf16  # already fp32: auto's own choices
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: False)
    assert load_model(str(plain), str(tmp_path / "cache"), device="cpu").dtype == torch.float32


@pytest.mark.skipif(block_weights.unavailable_reason() is not None, reason="no block-weight kernel here")
def test_long_prefill_products_in_bf16_stay_within_the_bf16_tolerance(tmp_path, monkeypatch):
    # --dtype auto on a bf16-capable CPU serves a GGUF-block checkpoint in fp32 with the GEMMs of long
    # prefill chunks, and their attention where the CPU has avx512_bf16, in bf16 arithmetic: they run there,
    # and the greedy tokens after a long prompt keep to the tolerance the bf16 runner is held to
    from hotlora.kernels.narrow_linear import WIDEN_ROWS

    config = _llama3_rope()
    config.head_dim = 64  # the C prefill attention's head sizes (the default model's)
    model, path = _model_dir(tmp_path, config, gguf=True)
    loaded = load_model(str(path), str(tmp_path / "cache"), device="cpu", dtype="float32")
    runner, tok = loaded.model, loaded.tokenizer
    assert runner.long_products_in_bf16()
    rows: list[int] = []
    real = block_weights.long_product_bf16
    monkeypatch.setattr(
        block_weights, "long_product_bf16", lambda x, w, b: rows.append(x.shape[0]) or real(x, w, b)
    )
    attended: list[tuple[int, bool]] = []
    kernel = native.ops().prefill_attention
    monkeypatch.setattr(
        native.ops(), "prefill_attention", lambda q, *a: attended.append((len(q), a[-1])) or kernel(q, *a)
    )
    prompts = [" ".join(["the quick brown fox jumps over the lazy dog"] * 7), PROMPTS[2]]
    assert len(ids_of(tok, prompts[0])) >= WIDEN_ROWS
    got = _greedy_through_engine(runner, tok, prompts, n=16)
    assert rows and min(rows) >= WIDEN_ROWS  # only the long chunks' products
    in_bf16 = {length for length, bf16 in attended if bf16}
    assert {length for length, _ in attended} - in_bf16  # short chunks attend in fp32
    if prefill_attention.bf16_available():
        assert in_bf16 and min(in_bf16) >= WIDEN_ROWS  # long ones in bf16, on a CPU that has it
    else:
        assert not in_bf16
    for prompt, out in zip(prompts, got, strict=True):
        assert _top1_agreement(model, tok, prompt, out) >= BF16_TOP1_AGREEMENT, prompt


@pytest.mark.skipif(block_weights.unavailable_reason() is not None, reason="no block-weight kernel here")
def test_a_long_product_in_bf16_is_the_bf16_product_of_the_blocks():
    from hotlora.kernels.narrow_linear import WIDEN_ROWS
    from tests.kernels.test_block_weights import _matrix

    w = _matrix(96, 64, "Q4_1")
    packed, g = block_weights.pack(w), torch.Generator().manual_seed(5)
    x, bias = torch.randn(WIDEN_ROWS + 3, 64, generator=g), torch.randn(96, generator=g)
    got = block_weights.linear(x, packed, bias, long_in_bf16=True)
    want = F.linear(x.bfloat16(), w.bfloat16()).float() + bias
    assert torch.equal(got, want) and not torch.equal(got, block_weights.linear(x, packed, bias))
    torch.testing.assert_close(got, block_weights.linear(x, packed, bias), rtol=2e-2, atol=2e-2)
    short = x[:8]  # decode rows and short chunks stay fp32 on the blocks
    assert torch.equal(
        block_weights.linear(short, packed, bias, long_in_bf16=True),
        block_weights.linear(short, packed, bias),
    )
    x.requires_grad_(True)  # and so does a product autograd differentiates (on-line training)
    assert block_weights.linear(x, packed, bias, long_in_bf16=True).dtype == torch.float32
    torch.testing.assert_close(block_weights.linear(x, packed, bias, long_in_bf16=True), F.linear(x, w, bias))
