"""Causal attention of a prefill chunk in one C call a layer (`csrc/prefill_attention.c`), for fp32 on CPUs
that run hotlora's C kernels, head sizes a multiple of 64; the runner's SDPA call serves everything else.
It scores the query heads that share a kv head together, so at 512 tokens it takes about half the time of
torch's CPU flash kernel (`benchmarks/prefill_attention.py`).

`attend(..., bf16=True)`, on a CPU with avx512_bf16 (`bf16_available`): q, k, v and the probabilities
rounded to bf16, their products summed in fp32 by the CPU's bf16 dot products, the softmax in fp32 -- the
runner's long prefill chunks under --dtype auto (the default model at 512 tokens on an AMD EPYC: 2.0 ->
1.4-1.6 ms a layer)."""

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
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    context: int,
    scale: float,
    window: int | None,
    bf16: bool = False,
) -> torch.Tensor:
    """q: [L, heads, d] at positions context .. context + L - 1; k, v: [context + L, kv_heads, d] (the chunk's
    own last). Each query sees the keys at or before its position (and, with a window, fewer than `window`
    behind it). Returns [L, heads, d] contiguous, fp32. `bf16`: in bf16 arithmetic (only where
    `bf16_available()`)."""
    if bf16 and not bf16_available():
        raise RuntimeError("prefill attention in bf16 needs a CPU with avx512_bf16")
    length, heads, d = q.shape
    keys, kv_heads, _ = k.shape
    if keys != context + length or v.shape != k.shape:
        raise ValueError(f"prefill attention: {keys} keys for {context} + {length} positions")
    out = torch.empty(length, heads, d, dtype=torch.float32)
    lib = _library()
    fn = lib.hotlora_prefill_attention_bf16 if bf16 else lib.hotlora_prefill_attention
    status = fn(
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
def bf16_available() -> bool:
    """The kernel runs here and the CPU has avx512_bf16 (its dot products)."""
    return "avx512_bf16" in (native.cpu_flags() or ()) and available()


@functools.cache
def _library() -> ctypes.CDLL:
    lib = native.library("prefill_attention")
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    for fn in (lib.hotlora_prefill_attention, lib.hotlora_prefill_attention_bf16):
        fn.argtypes = [p, i64, i64, i64, i64, p, i64, p, i64, i64, i64, i64, ctypes.c_float, p, ctypes.c_int]
        fn.restype = ctypes.c_int
    return lib
