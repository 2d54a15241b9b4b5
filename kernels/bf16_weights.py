"""fp32 activations times bf16-stored weights on AVX-512 CPUs without avx512_bf16 (`--weight-dtype bfloat16`).

There oneDNN emulates bf16 and runs 2-7x slower than fp32, so bf16 *compute* is no option; but a decode step
is bound by the bytes of weights it reads, and bf16 *storage* halves them. `csrc/bf16_weights.c` widens the
weights to fp32 in registers and accumulates in fp32 (benchmarks/bf16_weights.py measures it against torch's
fp32 GEMM). The C source is built on first use (kernels/native.py).

At and above `WIDEN_ROWS` rows (long prefill chunks, where the GEMM is compute-bound and MKL's fp32 kernel is
faster than this one), and whenever autograd needs a gradient through the product (on-line training), the
weight is widened to fp32 and torch runs the GEMM. While torch.compile traces it, the kernel runs as the
custom op `torch.ops.hotlora.linear_bf16w` (no graph break at the ctypes call).
"""

from __future__ import annotations

import ctypes
import functools

import torch
import torch.nn.functional as F

from . import native, torch_ops
from .native import Unavailable, unavailable_reason

__all__ = ["WIDEN_ROWS", "Unavailable", "ensure_built", "linear", "unavailable_reason"]

# Rows of x from which torch's fp32 GEMM on a widened copy beats the kernel (one thread, SmolLM2 shapes:
# 1.07x the kernel's speed at 128 rows, 0.62x at 512).
WIDEN_ROWS = 256
# Below this many multiply-adds one thread does it: waking a second one costs more than it saves.
PARALLEL_FROM = 1 << 16


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight.float(), bias)` for fp32 `x` [..., K] and a bf16 `weight` [N, K]."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if rows >= WIDEN_ROWS or rows == 0 or (x.requires_grad and torch.is_grad_enabled()):
        return F.linear(x, weight.float(), bias)
    if x.dtype != torch.float32 or weight.dtype != torch.bfloat16:
        raise TypeError(f"expected float32 x and bfloat16 weight, got {x.dtype} and {weight.dtype}")
    if torch.compiler.is_compiling():
        return _linear_op(x, weight, bias)
    return _linear(x, weight, bias)


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    n, k = weight.shape
    flat = x.dim() == 2 and x.is_contiguous()  # the runner's rows: no reshape (~1 µs each, ~120 a step)
    x2 = x if flat else x.reshape(-1, k).contiguous()
    rows = x2.shape[0]
    w = weight if weight.is_contiguous() else weight.contiguous()
    b = None if bias is None else bias.float().contiguous()
    y = torch.empty(rows, n, dtype=torch.float32)
    status = _library().hotlora_linear_bf16w(
        x2.data_ptr(),
        rows,
        k,
        w.data_ptr(),
        n,
        y.data_ptr(),
        None if b is None else b.data_ptr(),
        torch.get_num_threads() if rows * n * k >= PARALLEL_FROM else 1,
    )
    if status != 0:
        raise MemoryError(f"bf16-weight linear: no scratch memory for {rows} x {k}")
    return y if flat else y.view(*x.shape[:-1], n)


_linear_op = torch_ops.define(  # for torch.compile (kernels/torch_ops.py)
    "linear_bf16w(Tensor x, Tensor weight, Tensor? bias) -> Tensor",
    _linear,
    lambda x, weight, bias: x.new_empty(*x.shape[:-1], weight.shape[0]),
)


def ensure_built() -> None:
    """Build and load the kernel now; raises Unavailable with the reason."""
    _library()


@functools.cache
def _library() -> ctypes.CDLL:
    lib = native.library("bf16_weights")
    fn = lib.hotlora_linear_bf16w
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    fn.argtypes = [ptr, i64, i64, ptr, i64, ptr, ptr, ctypes.c_int]
    fn.restype = ctypes.c_int
    return lib
