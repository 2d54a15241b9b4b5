"""GGUF files of tiny random models, written as llama.cpp's converter writes them (convert_hf_to_gguf.py:
the same metadata keys, q and k rows reordered for llama.cpp's RoPE, norms in F32, Llama 3's RoPE scaling
as a `rope_freqs` tensor, the tokenizer as `tokenizer.ggml.*`), with each matrix in a chosen GGUF type
quantized by the `gguf` package (or llama.cpp's reference K-quantizer, csrc/quantize_k.c). Tests serve them
with `--model file.gguf` and compare with transformers' own reading of the same file (`gguf_file=`)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from gguf import MODEL_ARCH, GGMLQuantizationType, GGUFWriter, get_tensor_name_map

from hotlora.kernels import gguf_blocks
from hotlora.kernels.gguf_blocks import Format

ARCHS = {"llama": MODEL_ARCH.LLAMA, "mistral": MODEL_ARCH.LLAMA, "qwen2": MODEL_ARCH.QWEN2}


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """convert_hf_to_gguf.py's LlamaModel.permute: each head's rows in llama.cpp's RoPE order."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_freqs(config) -> torch.Tensor | None:
    """convert_hf_to_gguf.py's llama3 rope factors."""
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if rope.get("rope_type") != "llama3":
        return None
    dim = config.head_dim
    freqs = 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old = rope["original_max_position_embeddings"]
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


def write_gguf(model, tokenizer, path: Path, kind: str = "Q8_0", kinds: dict[str, str] | None = None) -> Path:
    """`model` (a transformers Llama/Mistral/Qwen2) as a GGUF file at `path`; every 2-D tensor in GGUF type
    `kind`, or `kinds[gguf name]`."""
    config = model.config
    family = config.model_type
    arch = "qwen2" if family == "qwen2" else "llama"
    writer = GGUFWriter(str(path), arch)
    writer.add_name("mistral-tiny" if family == "mistral" else f"{family}-tiny")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_vocab_size(config.vocab_size)
    vocab = tokenizer.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    specials = set(tokenizer.all_special_tokens)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in specials else 1 for t in tokens])
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_merges([" ".join(m) if isinstance(m, tuple) else m for m in _merges(tokenizer)])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)

    names = get_tensor_name_map(ARCHS[family], config.num_hidden_layers)
    tied = bool(config.tie_word_embeddings)
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and tied:
            continue
        base, suffix = name.rsplit(".", 1)
        gname = f"{names.get_name(base)}.{suffix}"
        t = t.detach().float()
        if arch == "llama" and ".self_attn.q_proj." in name:
            t = _permute(t, config.num_attention_heads)
        elif arch == "llama" and ".self_attn.k_proj." in name:
            t = _permute(t, config.num_key_value_heads)
        if t.dim() == 1:
            writer.add_tensor(gname, t.numpy())
            continue
        fmt = Format[(kinds or {}).get(gname, kind)] if (kinds or {}).get(gname, kind) != "F32" else None
        if fmt is None:
            writer.add_tensor(gname, t.numpy())
            continue
        raw = gguf_blocks.quantize_gguf(t, fmt).numpy()
        writer.add_tensor(gname, raw, raw_shape=raw.shape, raw_dtype=GGMLQuantizationType[fmt.name])
    factors = _rope_freqs(config)
    if factors is not None:
        writer.add_tensor("rope_freqs.weight", factors.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


def _merges(tokenizer) -> list:
    import json

    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    return model.get("merges", [])


def transformers_reading(path: Path):
    """transformers' own model from the GGUF file (dequantized by it), fp32, eval."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model.eval()


def dequantized_values(path: Path) -> dict[str, np.ndarray]:
    """Each tensor of the file as the `gguf` package dequantizes it, by GGUF name."""
    from gguf import quants

    from hotlora.server.engine.runner import gguf_file

    g = gguf_file.read(path)
    try:
        return {
            n: quants.dequantize(np.array(g.raw(n)), t.type).reshape(t.shape) for n, t in g.tensors.items()
        }
    finally:
        g.close()
