"""The model runner: our own Llama-family forward over a paged KV cache (see model.py), and its loader."""

from .attention import AttentionMetadata, PrefillSpan
from .kv_cache import BlockManager, KVCacheConfig, KVPool, SequenceKV
from .loader import in_blocks, load_runner, runner_from_model
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
    "in_blocks",
    "load_runner",
    "runner_from_model",
]
