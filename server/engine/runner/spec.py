"""What the runner needs to know about a model, read once from its Hugging Face config.

The runner covers the Llama family and the two that differ from it only in details it models: Mistral (a
sliding window) and Qwen2 (q/k/v biases, sliding-window layers). Anything else (another architecture, an
activation other than SiLU, a RoPE whose frequencies change with the sequence length) raises
:class:`Unsupported` with the reason, and the model is served through the transformers path instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FAMILIES = ("llama", "mistral", "qwen2")
# RoPE types whose inverse frequencies are fixed once (the runner precomputes one cos/sin table)
STATIC_ROPE = ("default", "linear", "llama3", "yarn")


class Unsupported(ValueError):
    """The runner does not cover this model; the message says why."""


@dataclass(frozen=True)
class ModelSpec:
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_positions: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    sliding_windows: tuple[int | None, ...]
    """Per layer: keys within this many positions of the query (itself included), None = full attention."""
    inv_freq: torch.Tensor
    """[head_dim / 2] float32 RoPE inverse frequencies, as transformers computes them for this config."""
    rope_scaling: float = 1.0
    """transformers' `attention_scaling` of the RoPE type (cos and sin are multiplied by it)."""

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token over all layers, per byte of the cache dtype."""
        return 2 * self.num_layers * self.kv_size

    @classmethod
    def from_config(cls, config) -> ModelSpec:
        """From a transformers PretrainedConfig; raises Unsupported with the reason."""
        family = getattr(config, "model_type", "")
        if family not in FAMILIES:
            raise Unsupported(
                f"model type {family!r} is not one of the runner's families {', '.join(FAMILIES)}"
            )
        act = getattr(config, "hidden_act", "silu")
        if act != "silu":
            raise Unsupported(f"activation {act!r} (the runner implements SiLU-gated MLPs)")
        rope = dict(getattr(config, "rope_parameters", None) or {})
        rope_type = rope.get("rope_type", "default")
        if rope_type not in STATIC_ROPE:
            raise Unsupported(f"RoPE type {rope_type!r} (the runner precomputes {', '.join(STATIC_ROPE)})")
        inv_freq, scaling = _rope_frequencies(config, rope_type)
        layers = int(config.num_hidden_layers)
        heads = int(config.num_attention_heads)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
        return cls(
            family=family,
            vocab_size=int(config.vocab_size),
            hidden_size=int(config.hidden_size),
            intermediate_size=int(config.intermediate_size),
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
            head_dim=head_dim,
            rms_norm_eps=float(config.rms_norm_eps),
            max_positions=int(getattr(config, "max_position_embeddings", 1 << 20)),
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            qkv_bias=True if family == "qwen2" else bool(getattr(config, "attention_bias", False)),
            o_bias=False if family == "qwen2" else bool(getattr(config, "attention_bias", False)),
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
            sliding_windows=_sliding_windows(config, family, layers),
            inv_freq=inv_freq,
            rope_scaling=float(scaling),
        )


def _rope_frequencies(config, rope_type: str) -> tuple[torch.Tensor, float]:
    # transformers' own initialisers, so every RoPE variant matches the modelling code exactly
    if rope_type == "default":
        rope = config.rope_parameters
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        base = rope["rope_theta"]
        return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim)), 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, None)
    return inv_freq.float(), scaling


def _sliding_windows(config, family: str, layers: int) -> tuple[int | None, ...]:
    window = getattr(config, "sliding_window", None)
    if family == "mistral":
        return (window,) * layers
    types = getattr(config, "layer_types", None)
    if family == "qwen2" and types is not None and window is not None:
        return tuple(window if t == "sliding_attention" else None for t in types)
    return (None,) * layers
