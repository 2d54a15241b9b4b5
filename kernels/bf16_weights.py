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
from .narrow_linear import WIDEN_ROWS, on_rows, torch_runs
from .native import Unavailable, unavailable_reason
from .rows_ahead import Ahead, addresses

__all__ = ["WIDEN_ROWS", "Unavailable", "ensure_built", "linear", "unavailable_reason"]


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, ahead: Ahead | None = None
) -> torch.Tensor:
    """`F.linear(x, weight.float(), bias)` for fp32 `x` [..., K] and a bf16 `weight` [N, K]; `ahead`: the
    rows a LoRA update reads next, asked for while the kernel computes (kernels/rows_ahead.py)."""
    if torch_runs(x):
        return F.linear(x, weight.float(), bias)
    if x.dtype != torch.float32 or weight.dtype != torch.bfloat16:
        raise TypeError(f"expected float32 x and bfloat16 weight, got {x.dtype} and {weight.dtype}")
    if torch.compiler.is_compiling():
        return _linear_op(x, weight, bias)
    return _linear(x, weight, bias, ahead)


def _linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, ahead: Ahead | None = None
) -> torch.Tensor:
    n, k = weight.shape
    w = weight if weight.is_contiguous() else weight.contiguous()
    fn, wp = _library().hotlora_linear_bf16w, w.data_ptr()
    banks, slots = addresses(ahead)

    def kernel(xp, rows, yp, bp, threads):
        return fn(xp, rows, k, wp, n, yp, bp, threads, banks, slots)

    return on_rows(x, n, k, bias, kernel, "bf16-weight linear")


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
    fn.argtypes = [ptr, i64, i64, ptr, i64, ptr, ptr, ctypes.c_int, ptr, ptr]
    fn.restype = ctypes.c_int
    return lib
