"""The model runner: our own Llama-family forward over a paged KV cache (see model.py), and its loader."""

from .attention import AttentionMetadata, PrefillSpan
from .kv_cache import BlockManager, KVCacheConfig, KVPool, SequenceKV
from .loader import auto_dtype, cpu_has_fast_bf16, load_runner, runner_from_model
from .model import FUSED, Runner, StepInput
from .spec import ModelSpec, Unsupported

__all__ = [
    "FUSED",
    "AttentionMetadata",
    "BlockManager",
    "KVCacheConfig",
    "KVPool",
    "ModelSpec",
    "PrefillSpan",
    "Runner",
    "SequenceKV",
    "StepInput",
    "Unsupported",
    "auto_dtype",
    "cpu_has_fast_bf16",
    "load_runner",
    "runner_from_model",
]
