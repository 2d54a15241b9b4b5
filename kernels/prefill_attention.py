"""Causal attention of a prefill chunk in one C call a layer (`csrc/prefill_attention.c`), for fp32 on CPUs
that run hotlora's C kernels, head sizes a multiple of 64; the runner's SDPA call serves everything else.
It scores the query heads that share a kv head together, so at 512 tokens it takes about half the time of
torch's CPU flash kernel (`benchmarks/prefill_attention.py`)."""

from __future__ import annotations

import ctypes
import functools

import torch

from . import native


def usable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """q: [L, heads, d]; k, v: [keys, kv_heads, d]; each with d contiguous and heads d apart."""
    d = q.shape[-1]
    return (
        q.device.type == "cpu"
        and q.dtype == k.dtype == v.dtype == torch.float32
        and d % 64 == 0
        and q.shape[1] % k.shape[1] == 0
        and all(t.stride(2) == 1 and t.stride(1) == d for t in (q, k, v))
        and not torch.is_grad_enabled()
        and available()
    )


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, context: int, scale: float, window: int | None
) -> torch.Tensor:
    """q: [L, heads, d] at positions context .. context + L - 1; k, v: [context + L, kv_heads, d] (the chunk's
    own last). Each query sees the keys at or before its position (and, with a window, fewer than `window`
    behind it). Returns [L, heads, d] contiguous."""
    length, heads, d = q.shape
    keys, kv_heads, _ = k.shape
    if keys != context + length or v.shape != k.shape:
        raise ValueError(f"prefill attention: {keys} keys for {context} + {length} positions")
    out = torch.empty(length, heads, d, dtype=torch.float32)
    status = _library().hotlora_prefill_attention(
        q.data_ptr(), length, heads, d, q.stride(0), k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0),
        kv_heads, context, window or 0, scale, out.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    if status != 0:
        raise MemoryError("prefill attention: no scratch memory")
    return out


@functools.cache
def available() -> bool:
    return native.loads_or_warns(_library, "prefill attention runs through SDPA")


@functools.cache
def _library() -> ctypes.CDLL:
    lib = native.library("prefill_attention")
    fn = lib.hotlora_prefill_attention
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    fn.argtypes = [p, i64, i64, i64, i64, p, i64, p, i64, i64, i64, i64, ctypes.c_float, p, ctypes.c_int]
    fn.restype = ctypes.c_int
    return lib
