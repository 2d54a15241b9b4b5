"""`--model file.gguf`: GGUF files written as llama.cpp's converter writes them (tests/gguf_models.py), one
family each with the block types people download mixed in (Q4_K_M's Q4_K with Q6_K, Q8_0 with F16/BF16,
Q4_0 with Q4_1), served on their blocks with transformers' own reading of the file (`gguf_file=`) as the
reference: its config, its tokenizer, its greedy tokens. A restart reuses the prepared config/tokenizer; a
file hotlora cannot serve is refused at start with what to do instead; an adapter whose shapes do not fit
the file's tensors is refused as on a safetensors base (FAILED_PRECONDITION, "does not fit the base model")
and one that fits is served as PEFT serves it."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter

from hotlora.kernels import block_weights
from hotlora.server.config import ServerConfig
from hotlora.server.engine.runner import gguf_model
from hotlora.server.engine.runner.gguf_file import GGUFError
from hotlora.server.engine.runner.weights import RowStack
from hotlora.server.model_loading import load_model
from hotlora.v1 import common_pb2, inference_pb2
from tests.gguf_models import transformers_reading, write_gguf
from tests.server.adapter_utils import upload_chunks
from tests.server.harness import running_server
from tests.server.test_engine import hf_greedy
from tests.server.test_runner_families import _greedy_through_engine
from tests.tiny import TINY_SIZES, tiny_tokenizer

pytestmark = pytest.mark.skipif(
    block_weights.unavailable_reason() is not None, reason=f"{block_weights.unavailable_reason()}"
)

# hidden and intermediate sizes multiples of 256, so that every type (Q4_K, Q6_K's super-blocks) applies
SIZES = {**TINY_SIZES, "hidden_size": 256, "intermediate_size": 512, "head_dim": 64}
PROMPTS = ["The quick brown fox jumps over", "a", "Once upon a time in a land far away"]
NEW = 16


def _llama():
    from transformers import LlamaConfig

    rope = dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                original_max_position_embeddings=32)  # fmt: skip
    return LlamaConfig(**SIZES, rope_parameters=rope, tie_word_embeddings=True)


def _mistral():
    from transformers import MistralConfig

    # no sliding window: llama.cpp serves Mistral's GGUF files as llama ones (v0.2 on have none)
    return MistralConfig(**SIZES, sliding_window=None, tie_word_embeddings=False)


def _qwen2():
    from transformers import Qwen2Config

    return Qwen2Config(**SIZES, tie_word_embeddings=False)


FILES = {  # name: (config, the type of most matrices, the others by GGUF name)
    "llama-q4_k_m": (
        _llama,
        "Q4_K",
        {"blk.0.attn_v.weight": "Q6_K", "blk.1.ffn_down.weight": "Q6_K", "token_embd.weight": "Q6_K"},
    ),  # fmt: skip
    "mistral-q8_0-f16-bf16": (_mistral, "Q8_0", {"output.weight": "F16", "blk.1.ffn_down.weight": "BF16"}),
    "qwen2-q4_0-q4_1-f32": (_qwen2, "Q4_0", {"blk.0.attn_q.weight": "Q4_1", "output.weight": "F32"}),
}


def _model(make_config, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(make_config()).eval()


def _file(tmp_path, name: str):
    make_config, kind, kinds = FILES[name]
    return write_gguf(_model(make_config), tiny_tokenizer(), tmp_path / f"{name}.gguf", kind, kinds)


@pytest.mark.parametrize("name", list(FILES))
def test_a_gguf_file_serves_transformers_greedy_tokens_on_its_blocks(tmp_path, name):
    path = _file(tmp_path, name)
    loaded = load_model(str(path), str(tmp_path / "cache"), device="cpu", dtype="auto")
    runner = loaded.model
    assert loaded.runner_kind == "runner" and loaded.name == name and runner.dtype == torch.float32
    _, kind, kinds = FILES[name]
    formats = runner.w.block_formats
    for t in {kind, *kinds.values()} - {"F32"}:
        assert formats.get(t), (t, formats)  # every type of the file kept as itself
    if name.startswith("llama"):  # q and k in Q4_K, v in Q6_K: one projection of parts
        assert isinstance(runner.w.layers[0].qkv, RowStack)
    reference = _reference(path, FILES[name][0])
    tok = loaded.tokenizer
    assert tok("hello there").input_ids == _transformers_tokenizer(path)("hello there").input_ids
    want = [hf_greedy(reference, tok, p, NEW) for p in PROMPTS]
    assert _greedy_through_engine(runner, tok, PROMPTS, NEW) == want


def _reference(path, make_config):
    """The model of the original config (Llama 3's RoPE scaling included, which transformers' reading of a
    GGUF file leaves out: llama.cpp keeps it as the `rope_freqs` tensor) on transformers' reading of the
    file's weights: the gguf package's dequantization, q and k rows put back."""
    model = _model(make_config)
    model.load_state_dict(transformers_reading(path).state_dict())
    model.generation_config.eos_token_id = None  # the engine's requests ignore EOS; generate must too
    return model


def _transformers_tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def test_a_restart_reads_the_prepared_config_and_tokenizer(tmp_path, monkeypatch):
    path = _file(tmp_path, "qwen2-q4_0-q4_1-f32")
    cache = tmp_path / "cache"
    first = load_model(str(path), str(cache), device="cpu", dtype="float32")

    def again(*_):
        raise AssertionError("prepared again")

    monkeypatch.setattr(gguf_model, "load_config_and_tokenizer", again)
    second = load_model(str(path), str(cache), device="cpu", dtype="float32")
    assert second.path == first.path and second.path.is_relative_to(cache)
    assert _greedy_through_engine(second.model, second.tokenizer, PROMPTS[:1], 4) == _greedy_through_engine(
        first.model, first.tokenizer, PROMPTS[:1], 4
    )


def test_a_type_hotlora_does_not_keep_is_refused_with_the_kept_ones_and_quantize(tmp_path):
    path = tmp_path / "q5k.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    raw = np.zeros((4, 176), dtype=np.uint8)  # 4 rows of one Q5_K block
    writer.add_tensor("blk.0.ffn_down.weight", raw, raw_shape=raw.shape, raw_dtype=GGMLQuantizationType.Q5_K)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(GGUFError) as info:
        load_model(str(path), str(tmp_path / "cache"), device="cpu")
    msg = str(info.value)
    assert "blk.0.ffn_down.weight is Q5_K" in msg and "F16, BF16" in msg and "Q4_K, Q6_K" in msg
    assert "--quantize q4_k" in msg and not (tmp_path / "cache" / "models").exists()


def test_an_architecture_hotlora_does_not_serve_is_refused(tmp_path):
    path = tmp_path / "gpt2.gguf"
    writer = GGUFWriter(str(path), "gpt2")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(
        GGUFError, match="architecture 'gpt2' is not served; hotlora serves GGUF files of llama"
    ):
        load_model(str(path), str(tmp_path / "cache"), device="cpu")


def test_tensors_that_disagree_with_the_metadata_are_refused_at_start(tmp_path):
    model = _model(_qwen2)
    path = write_gguf(model, tiny_tokenizer(), tmp_path / "m.gguf", "Q8_0")
    # the same file with an FFN size in its metadata that its tensors do not have
    blob = path.read_bytes()
    key = b"qwen2.feed_forward_length"
    at = blob.index(key) + len(key) + 4  # the key, its value type, then the uint32
    assert int.from_bytes(blob[at : at + 4], "little") == 512
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(blob[:at] + (768).to_bytes(4, "little") + blob[at + 4 :])
    with pytest.raises(
        GGUFError, match=r"blk\.0\.ffn_gate\.weight is \[512, 256\], but the file's metadata "
    ):
        load_model(str(bad), str(tmp_path / "cache"), device="cpu")


def test_the_config_takes_a_gguf_file_and_refuses_quantize_on_it(tmp_path):
    path = _file(tmp_path, "qwen2-q4_0-q4_1-f32")
    assert ServerConfig(model=str(path)).model == str(path)
    other = tmp_path / "weights.bin"
    other.write_bytes(b"x")
    with pytest.raises(ValueError, match="must be a local model directory or a .gguf file"):
        ServerConfig(model=str(other))
    with pytest.raises(ValueError, match="--quantize q4_0: --model is a GGUF file, quantized already"):
        ServerConfig(model=str(path), quantize="q4_0")


def _adapter(tmp_path, model, seed: int, **lora):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **lora))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    out = tmp_path / f"adapter-{seed}"
    peft_model.save_pretrained(out)
    return out


def test_adapters_are_validated_against_the_files_tensors_and_served_as_peft(tmp_path):
    from peft import PeftModel

    path = _file(tmp_path, "llama-q4_k_m")
    fits = _adapter(
        tmp_path, _model(_llama), 1, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]
    )
    from tests.tiny import build_tiny_llama  # hidden 64: every target's shape differs from the file's

    other = _adapter(tmp_path, build_tiny_llama(), 2, r=4, lora_alpha=8, target_modules=["q_proj"])
    with running_server(path, tmp_path / "data", cache_dir=str(tmp_path / "cache"), max_rank=16) as run:
        with pytest.raises(grpc.RpcError) as info:
            run.adapters.UploadAdapter(upload_chunks("other", other))
        # as for a safetensors base: the contract's status for an adapter that does not fit the base model
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "q_proj" in info.value.details() and "expected [r, 256]" in info.value.details()
        run.adapters.UploadAdapter(upload_chunks("fits", fits))
        params = common_pb2.SamplingParams(max_new_tokens=NEW, temperature=0.0, ignore_eos=True)
        got = run.inference.Generate(
            inference_pb2.GenerateRequest(adapter="fits", prompt=PROMPTS[0], params=params)
        )
    reference = PeftModel.from_pretrained(_reference(path, _llama), str(fits)).eval()
    tok = _transformers_tokenizer(path)
    assert list(got.token_ids) == hf_greedy(reference, tok, PROMPTS[0], NEW)
