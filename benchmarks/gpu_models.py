"""Model directories with seeded random weights, built from a config in code, for the device check
(`deploy/gpu/device-check.sh`): a machine with no network and a 64 MiB working tree gets no checkpoint.

    python benchmarks/gpu_models.py --dir DIR [--tiny] [--device cuda]

- `default`: the shapes of SmolLM2-135M-Instruct, hotlora's default model (its GGUF is 94 MiB, 90 MB
  compressed: it cannot travel in 64 MiB with the code and the wheels; throughput does not depend on the
  values of the weights);
- `llama-1b`: the shapes of Llama-3.2-1B (16 layers, hidden 2048, 32 heads over 8 kv heads of 64, MLP 8192,
  vocabulary 128256, tied embeddings, llama3 RoPE).

Each directory has config.json, model.safetensors (bf16) and a tokenizer of the model's vocabulary size:
byte-level tokens first (any text encodes), then filler tokens up to the vocabulary (random weights emit
them; they decode to their own names). `--tiny` writes two small models instead (the dry run on a CPU).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]

SHAPES = {
    "default": dict(  # SmolLM2-135M-Instruct's config.json
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
        rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
    ),
    "llama-1b": dict(  # Llama-3.2-1B's config.json
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
        rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True,
        rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192),
    ),
}  # fmt: skip
TINY = {  # the same two families of shapes, small enough for a CPU dry run
    "default": dict(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=2048, tie_word_embeddings=True,
    ),
    "llama-1b": dict(
        vocab_size=320, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=32, max_position_embeddings=2048, tie_word_embeddings=True,
    ),
}  # fmt: skip


def padded_tokenizer(vocab_size: int):
    """Byte-level BPE without merges (ids 0-3 specials, then the 256 bytes), padded with filler tokens to
    `vocab_size`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    if vocab_size < len(vocab):
        raise ValueError(f"a vocabulary of {vocab_size} cannot hold the {len(vocab)} byte-level tokens")
    for i in range(len(vocab), vocab_size):
        vocab[f"<x{i}>"] = i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def write_model(path: Path, shape: dict, device: str, seed: int = 0) -> Path:
    """A Llama model directory with seeded random bf16 weights (initialised on `device`: fast on a GPU)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(**shape, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    model.save_pretrained(path)
    padded_tokenizer(shape["vocab_size"]).save_pretrained(path)
    del model
    return path


def weight_bytes(path: Path) -> int:
    """Bytes of the safetensors files (bf16): what a decode step of one row reads, give or take the
    embedding rows (tied: the LM head reads the whole matrix)."""
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("--tiny", action="store_true", help="small shapes (the CPU dry run)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    shapes = TINY if args.tiny else SHAPES
    out = {}
    for name, shape in shapes.items():
        path = write_model(args.dir / name, shape, args.device)
        out[name] = {"path": str(path), "bytes": weight_bytes(path), "config": shape}
        print(f"{name}: {path} ({weight_bytes(path) / 2**20:.0f} MiB)", flush=True)
    (args.dir / "models.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
