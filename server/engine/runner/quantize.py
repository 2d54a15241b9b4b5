"""`--quantize`: a plain checkpoint's weight matrices in GGUF blocks, quantized once and cached.

Every projection (q, k, v, o, gate, up, down) goes into the chosen type; the token embedding and the LM
head (one matrix when tied) go into Q6_K -- Q8_0 under q8_0 -- as llama.cpp keeps its output matrix in its
Q4_0 and Q4_K_M files: on a 1B Llama they are a fifth of the weights and the whole LM head is read every
decoded token, so leaving them in fp32 would read more bytes than every layer together, and 4 bits there
cost more accuracy than anywhere else. A matrix whose rows are not a multiple of a K type's 256 weights
(SmolLM2's 576) goes into Q8_0. Norms and biases stay as they are; adapters' banks and classification
heads are never quantized.

The blocks are the `gguf` package's (Q8_0, Q4_0, Q4_1) or llama.cpp's reference quantizer's (Q4_K, Q6_K)
bytes, stored as GGUF blocks in the per-user cache (server/prepared_models.py) under the checkpoint's
content hash and the type: a restart reads them back instead of quantizing again (a 1B model: about a
minute for q4_k, seconds for the others, once).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from hotlora.kernels import gguf_blocks
from hotlora.kernels.gguf_blocks import BlockMatrix, Format
from hotlora.server import prepared_models

from .spec import ModelSpec
from .weights import Getter

CHOICES = {
    "q8_0": Format.Q8_0,
    "q4_0": Format.Q4_0,
    "q4_1": Format.Q4_1,
    "q4_k": Format.Q4_K,
    "q6_k": Format.Q6_K,
}
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")  # fmt: skip


def plan(spec: ModelSpec, kind: str, has_head: bool) -> dict[str, Format]:
    """Transformers name -> the format --quantize `kind` keeps that matrix in."""
    fmt = CHOICES[kind]
    outer = Format.Q8_0 if fmt == Format.Q8_0 else Format.Q6_K
    out = {}
    for i in range(spec.num_layers):
        for p in PROJECTIONS:
            out[f"model.layers.{i}.{p}.weight"] = fmt
    out["model.embed_tokens.weight"] = outer
    if has_head:
        out["lm_head.weight"] = outer
    return out


def _fits(fmt: Format, k: int) -> Format:
    return fmt if k % fmt.block == 0 else Format.Q8_0


def quantized_getter(
    model_dir: str | Path, kind: str, cache_dir: str | Path, spec: ModelSpec, base: Getter
) -> Getter:
    """`base` (the checkpoint's tensors by name) with its matrices as BlockMatrix in --quantize `kind`'s
    formats, made once into the cache and read back from it."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    root = Path(model_dir)
    files = sorted(root.glob("*.safetensors")) + [root / "config.json"]
    digest = prepared_models.content_hash(cache_dir, [f for f in files if f.is_file()])
    has_head = not spec.tie_word_embeddings and base("lm_head.weight") is not None
    formats = plan(spec, kind, has_head)

    def make(tmp: Path) -> None:
        blocks, kept = {}, {}
        for name, fmt in formats.items():
            w = base(name)
            if w is None:
                raise ValueError(f"the checkpoint has no tensor {name!r}")
            fmt = _fits(fmt, w.shape[1])
            blocks[name] = gguf_blocks.quantize_gguf(w.float(), fmt)
            kept[name] = json.dumps([fmt.name, int(w.shape[0]), int(w.shape[1])])
        save_file(blocks, str(tmp / "blocks.safetensors"), metadata=kept)

    name = f"{root.resolve().name}-{digest[:16]}-{kind}"
    where = prepared_models.prepared(cache_dir, name, make, f"{root.name} quantized to {kind}")
    handle = safe_open(str(where / "blocks.safetensors"), framework="pt")
    meta = handle.metadata() or {}

    def get(name: str) -> torch.Tensor | BlockMatrix | None:
        if name not in meta:
            return base(name)
        fmt, n, k = json.loads(meta[name])
        return gguf_blocks.from_gguf(handle.get_tensor(name), Format[fmt].ggml_type, (n, k))

    return get
