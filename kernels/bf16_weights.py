"""fp32 activations times bf16-stored weights on AVX-512 CPUs without avx512_bf16 (`--weight-dtype bfloat16`).

There oneDNN emulates bf16 and runs 2-7x slower than fp32, so bf16 *compute* is no option; but a decode step
is bound by the bytes of weights it reads, and bf16 *storage* halves them. `csrc/bf16_weights.c` widens the
weights to fp32 in registers and accumulates in fp32 (benchmarks/bf16_weights.py measures it against torch's
fp32 GEMM); its binding is `linear_bf16w` (kernels/native.py).

At and above `WIDEN_ROWS` rows (long prefill chunks, where the GEMM is compute-bound and MKL's fp32 kernel is
faster than this one), and whenever autograd needs a gradient through the product (on-line training), the
weight is widened to fp32 and torch runs the GEMM.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .narrow_linear import WIDEN_ROWS, torch_runs
from .native import Unavailable, ops, unavailable_reason

__all__ = ["WIDEN_ROWS", "Unavailable", "ensure_built", "linear", "unavailable_reason"]


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, ahead: tuple | None = None
) -> torch.Tensor:
    """`F.linear(x, weight.float(), bias)` for fp32 `x` [..., K] and a bf16 `weight` [N, K]; `ahead`: the
    rows a LoRA update reads next, (banks, step slots), asked for while the kernel computes (LoraSite's
    `rows_ahead`, csrc/rows_ahead.h)."""
    if torch_runs(x):
        return F.linear(x, weight.float(), bias)
    if x.dtype != torch.float32 or weight.dtype != torch.bfloat16:
        raise TypeError(f"expected float32 x and bfloat16 weight, got {x.dtype} and {weight.dtype}")
    banks, slots = (None, None) if ahead is None else ahead
    return ops().linear_bf16w(x, weight.contiguous(), bias, banks, slots)


def ensure_built() -> None:
    """Build and load the kernels now; raises Unavailable with the reason."""
    ops()
