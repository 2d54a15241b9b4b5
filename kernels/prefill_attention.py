"""Causal attention of a prefill chunk in one C call a layer (`prefill_attention`,
`csrc/prefill_attention.c`), for fp32 on CPUs that run hotlora's C kernels, head sizes a multiple of 64; the
runner's SDPA call serves everything else. It scores the query heads that share a kv head together, so at
512 tokens it takes about half the time of torch's CPU flash kernel (`benchmarks/prefill_attention.py`).

`bf16=True`, on a CPU with avx512_bf16 (`bf16_available`): q, k, v and the probabilities rounded to bf16,
their products summed in fp32 by the CPU's bf16 dot products, the softmax in fp32 -- the runner's long
prefill chunks under --dtype auto (the default model at 512 tokens on an AMD EPYC: 2.0 -> 1.4-1.6 ms a
layer)."""

from __future__ import annotations

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
        and native.available()
    )


def bf16_available() -> bool:
    """The kernel runs here and the CPU has avx512_bf16 (its dot products)."""
    return "avx512_bf16" in (native.cpu_flags() or ()) and native.available()
