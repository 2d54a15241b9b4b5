"""Serving a GGUF file (`--model model.gguf`): architecture, config and tokenizer from its metadata, every
weight matrix kept in the file's own block type (kernels/gguf_blocks.py).

A file is checked whole at start, before anything slow: its header (runner/gguf_file.py), an architecture
the runner serves (llama -- Mistral's GGUF files are llama too -- and qwen2), a type hotlora keeps for every
tensor (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K: the types of the F16, Q8_0, Q4_0 and Q4_K_M files
people download), and every tensor the config implies, present, in the shape it implies -- so an adapter
validated against the config (adapters/base_model_info.py) is validated against the file's tensors.

The config and tokenizer are transformers' own reading of the metadata (`gguf_file=`), made once per file
header (a minute for a 128k-token vocabulary) and kept in the per-user cache beside the default model's
prepared copy; the tensors are read from the file at each start (a memory-mapped view, repacked for the
kernel). llama.cpp's converter stores q and k rows of a Llama in the order of its RoPE; they are put back
in transformers' order (as transformers' GGUF loader does), and a `rope_freqs` tensor (Llama 3's RoPE
scaling) divides the RoPE frequencies as llama.cpp's does.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, quants

from hotlora.kernels import gguf_blocks
from hotlora.kernels.gguf_blocks import Format

from . import gguf_file
from .gguf_file import GGUFError, GGUFFile
from .weights import Getter

log = logging.getLogger("hotlora.model")

ARCHITECTURES = ("llama", "qwen2")
_PERMUTED = ("llama",)  # llama.cpp's converter reorders these architectures' q and k rows for its RoPE
KEPT = ("F32", *(f.name for f in Format))
QUANTIZE_HINT = (
    "requantize the file to one of them (llama-quantize), or serve the original safetensors checkpoint with "
    "--quantize q4_k (or q8_0, q4_0, q4_1, q6_k)"
)


def is_gguf(path: str | Path) -> bool:
    return Path(path).suffix.lower() == ".gguf" and Path(path).is_file()


def open_checked(path: str | Path) -> GGUFFile:
    """The file, its header validated, its architecture and tensor types ones hotlora serves; raises
    GGUFError with the reason."""
    g = gguf_file.read(path)
    try:
        arch = g.architecture
        if arch not in ARCHITECTURES:
            raise GGUFError(
                f"{g.path}: architecture {arch or '(none)'!r} is not served; hotlora serves GGUF files of "
                f"{', '.join(ARCHITECTURES)} (Mistral's are llama)"
            )
        for t in g.tensors.values():
            if t.type.name not in KEPT:
                raise GGUFError(
                    f"{g.path}: tensor {t.name} is {t.type.name}; hotlora keeps {', '.join(KEPT)} -- "
                    + QUANTIZE_HINT
                )
        scaling = g.metadata.get(f"{arch}.rope.scaling.type", "none")
        if scaling not in ("none", ""):
            raise GGUFError(f"{g.path}: RoPE scaling {scaling!r} in the metadata is not served")
    except BaseException:
        g.close()
        raise
    return g


def load_config_and_tokenizer(g: GGUFFile, into: Path) -> None:
    """Write transformers' reading of the file's metadata into `into`: config.json, the tokenizer's files,
    generation_config.json (the file's BOS/EOS)."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    where, name = str(g.path.parent), g.path.name
    config = AutoConfig.from_pretrained(where, gguf_file=name)
    tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)
    config.name_or_path = g.path.stem
    config.save_pretrained(str(into))
    tokenizer.save_pretrained(str(into))
    GenerationConfig.from_model_config(config).save_pretrained(str(into))


def expected_shapes(config) -> dict[str, tuple[int, ...]]:
    """Transformers name -> shape of every tensor the config implies (a model built on the meta device)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def getter(g: GGUFFile, config) -> Getter:
    """Tensors by transformers name, read from the file: a BlockMatrix for a kept block type, an fp32 tensor
    otherwise (F32, and 1-D tensors of any type). Checks first that every tensor the config implies is in the
    file, in that shape (GGUFError otherwise)."""
    import gguf

    arch = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[g.architecture]
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)

    def gguf_name(name: str) -> str | None:
        base, _, suffix = name.rpartition(".")
        mapped = names.get_name(base)
        return None if mapped is None else f"{mapped}.{suffix}"

    tied = bool(getattr(config, "tie_word_embeddings", False))
    for name, shape in expected_shapes(config).items():
        if name == "lm_head.weight" and tied:
            continue
        where = gguf_name(name)
        info = g.tensors.get(where) if where else None
        if info is None:
            raise GGUFError(f"{g.path}: no tensor {where or name} ({name}), which its metadata implies")
        if tuple(info.shape) != shape:
            raise GGUFError(
                f"{g.path}: tensor {where} is {list(info.shape)}, but the file's metadata implies "
                f"{list(shape)} for {name}"
            )
    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}

    def get(name: str):
        where = gguf_name(name)
        info = g.tensors.get(where) if where else None
        if info is None:
            return None
        raw = np.array(g.raw(where))  # a copy: the file's pages stay read-only and may be unmapped later
        if len(info.shape) == 1:
            t = torch.from_numpy(quants.dequantize(raw, info.type).astype(np.float32).reshape(info.shape))
        else:
            t = gguf_blocks.from_gguf(raw, info.type, tuple(info.shape))
        kind = where.split(".")[-2]
        if g.architecture in _PERMUTED and kind in heads:
            t = _unpermute(t, heads[kind])
        return t

    return get


def _unpermute(t, n_head: int):
    """Rows back in transformers' order (its GGUF loader's `reverse_permute`): the converter interleaved
    each head's two halves for llama.cpp's RoPE. Rows only, so a block matrix is reordered as it is."""
    rows = t.shape[0]
    perm = torch.arange(rows).reshape(n_head, rows // n_head // 2, 2).transpose(1, 2).reshape(-1)
    if isinstance(t, gguf_blocks.BlockMatrix):
        return t.with_data(t.data.index_select(0, perm).contiguous())
    return t.index_select(0, perm).contiguous()


def rope_factors(g: GGUFFile) -> torch.Tensor | None:
    """llama.cpp's `rope_freqs` tensor (Llama 3's RoPE scaling: each frequency divided by its factor)."""
    info = g.tensors.get("rope_freqs.weight")
    if info is None:
        return None
    if info.type != GGMLQuantizationType.F32:
        raise GGUFError(f"{g.path}: rope_freqs.weight is {info.type.name}, not F32")
    return torch.from_numpy(np.array(g.raw(info.name)).view(np.float32).copy())
