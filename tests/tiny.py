"""Tiny random Llama models and a byte-level tokenizer, built in code for tests (no hub)."""

from __future__ import annotations

from pathlib import Path

import torch

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]
VOCAB_SIZE = len(SPECIALS) + 256

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def tiny_tokenizer():
    """Byte-level BPE without merges: every byte is a token; ids 0-3 are specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = list(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in sorted(byte_chars):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


# the sizes and ids every tiny model shares, whatever its family
TINY_SIZES = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=1024,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=3,
    initializer_range=0.2,
)


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    return LlamaConfig(**{**TINY_SIZES, "tie_word_embeddings": False, **overrides})


def build_tiny_llama(seed: int = 0, **overrides):
    """A random Llama with weights wider than the default init, so its logits are peaked
    and greedy decoding does not flip on float rounding between batch shapes."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**overrides)).eval()


def save_tiny_model_dir(path: Path, seed: int = 0, **overrides) -> Path:
    """A Hugging Face model directory (config, safetensors, tokenizer) a server can `--model`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    build_tiny_llama(seed, **overrides).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path
